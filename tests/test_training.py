"""Training stage on CPU with the tiny models of tests/tiny_models.py.

Covers: real optimisation steps (causal LoRA, T5 LoRA, causal QLoRA) with LoRA weights moving and
base weights fixed; the run folder; per-token loss = the model's loss; gradient-accumulation
equivalence; exact kill-and-resume; windows prefetched in a background thread (same run, exact
resume, errors as before); host-device syncs per step; two stages with replay; loss balancing; NaN
and validation errors; DDP with two CPU processes.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from launching import TWO_CPU_PROCESSES, accelerate_launch
from safetensors.torch import load_file

from t2t_mtl.cli.main import main
from t2t_mtl.core.config import load_config
from t2t_mtl.core.errors import T2TError
from t2t_mtl.mixing import mixture
from t2t_mtl.model import features, loading
from t2t_mtl.training import losses, preflight, trainer

REPO = Path(__file__).resolve().parents[1]
TOY_TEMPLATES = REPO / "tests" / "fixtures" / "training" / "templates"
TASKS = ["toy_polarity", "toy_copy"]


def make_cfg(out: Path, model_dir: Path, *overrides: str):
    """A small run on the two toy tasks (tests/fixtures/training)."""
    data = {
        "output_dir": str(out),
        "template_dirs": [str(TOY_TEMPLATES)],
        "seed": 3,
        "model": {"name": str(model_dir), "max_length": 96, "max_target_length": 32},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "tasks": [{"template": t} for t in TASKS],
        "train": {
            "steps": 4,
            "batch_size": 4,
            "logging_steps": 2,
            "save_steps": 2,
            "learning_rate": 1e-2,
            "warmup_steps": 1,
            "report_to": "none",
        },
    }
    return load_config(data=data, overrides=list(overrides))


def trainable(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step}" / "trainable.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= tol, f"max difference {worst:g} > {tol:g}"


def assert_lora_trained(weights: dict) -> None:
    assert weights and all("lora_" in k for k in weights), "only adapter weights may train"
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(float(v.abs().sum()) > 0 for v in b), (
        "lora_B starts at zero and must have moved"
    )


# ------------------------------------------------------------------ real runs


def test_cli_train_writes_run_folder_and_only_lora_moves(tmp_path, tiny_causal_dir, capsys):
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--config",
            str(REPO / "launch/configs/tiny_cpu.yaml"),
            f"model.name={tiny_causal_dir}",
            f"output_dir={run}",
            "train.steps=4",
            "train.report_to=tensorboard",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(run)
    saved = load_config(run / "config.yaml")
    assert saved.task_names() == ["sentiment_sst2", "qa_squad"] and saved.model.name == str(
        tiny_causal_dir
    )
    assert (run / "templates" / "sentiment_sst2.yaml").is_file()
    assert (
        run / "templates" / "_shared" / "label_task.yaml"
    ).is_file()  # includes keep their layout
    mix = json.loads((run / "mixture.json").read_text())["stages"]
    assert [m["name"] for m in mix[0]["members"]] == ["sentiment_sst2", "qa_squad"]
    assert abs(sum(m["rate"] for m in mix[0]["members"]) - 1) < 1e-9
    rows = metrics(run)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0
        assert abs(sum(v for k, v in r.items() if k.startswith("share/")) - 1) < 1e-9
        assert any(k.startswith("loss/") for k in r) and any(k.startswith("tokens/") for k in r)
    # TensorBoard through accelerate's tracker: RUN/logs/<project>/ (tests/test_trackers.py)
    assert list((run / "logs" / "t2t-mtl").glob("events.out.tfevents.*"))
    assert (run / "loss_curves.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (run / "stages" / "main" / "adapter" / "t2t_manifest.json").is_file()
    man = json.loads((run / "adapter" / "t2t_manifest.json").read_text())
    assert man["family"] == "causal" and man["prompt_format"]["kind"] == "chat" and man["step"] == 4
    assert [(t["name"], t["version"], t["parse"]) for t in man["tasks"]] == [
        ("sentiment_sst2", 1, "label"),
        ("qa_squad", 1, "span"),
    ]
    assert man["tasks"][0]["template_file"] == "templates/sentiment_sst2.yaml"
    assert_lora_trained(trainable(run, 4))
    # The base weights of the saved bundle are the original ones.
    from transformers import AutoModelForCausalLM

    tuned, _, _, _ = loading.load_for_inference(run / "adapter")
    base = tuned.unload().state_dict()
    orig = AutoModelForCausalLM.from_pretrained(tiny_causal_dir).state_dict()
    assert base.keys() == orig.keys()
    assert all(torch.equal(base[k], orig[k]) for k in orig)


def test_t5_lora_trains(tmp_path, tiny_t5_dir, monkeypatch):
    """T5 trains, in batches whose widths come in buckets: sources of 64 tokens, targets of 8,
    capped at max_length and max_target_length (the cap: tests/test_features.py)."""
    widths = []
    collate = features.Seq2SeqCollator.__call__

    def recorded(self, feats):
        b = collate(self, feats)
        assert (self.max_length, self.max_target_length) == (96, 32)
        longest = [max(len(f[k]) for f in feats) for k in ("input_ids", "labels")]
        widths.append((*longest, b["input_ids"].shape[1], b["labels"].shape[1]))
        return b

    monkeypatch.setattr(features.Seq2SeqCollator, "__call__", recorded)
    cfg = make_cfg(tmp_path / "t5", tiny_t5_dir, "train.steps=3")
    run = trainer.train(cfg)
    assert widths
    for src, tgt, ws, wt in widths:  # (the toy sources are shorter than 64: the cap is not hit)
        assert ws == -(-src // 64) * 64 and wt == -(-tgt // 8) * 8
    assert_lora_trained(trainable(run, 3))
    man = json.loads((run / "adapter" / "t2t_manifest.json").read_text())
    assert man["family"] == "seq2seq" and man["prompt_format"]["kind"] == "seq2seq"
    assert all(r["loss"] > 0 for r in metrics(run))


def test_qlora_causal_trains(tmp_path, tiny_causal_dir):
    cfg = make_cfg(tmp_path / "q", tiny_causal_dir, "adapter.method=qlora", "train.steps=2")
    run = trainer.train(cfg)
    assert_lora_trained(trainable(run, 2))
    man = json.loads((run / "adapter" / "t2t_manifest.json").read_text())
    assert man["adapter"]["method"] == "qlora"


# ------------------------------------------------------------------ the step itself


class _SGDRecorder:
    """Stands in for the optimiser: records gradients, then plain SGD (Adam would hide loss scale)."""

    def __init__(self, model, lr=0.5):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.lr, self.grads = lr, []

    def step(self):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.params.items()})
        with torch.no_grad():
            for p in self.params.values():
                p -= self.lr * p.grad

    def zero_grad(self, set_to_none=True):
        for p in self.params.values():
            p.grad = None


def _runner(tmp_path, model_dir, batch, accum, balancing="none", *overrides, mixed_precision="no"):
    from accelerate import Accelerator

    from t2t_mtl.model import features
    from t2t_mtl.model.prompt_format import PromptFormat
    from t2t_mtl.training.batching import Batcher
    from t2t_mtl.training.optimizer_step import StepRunner

    cfg = make_cfg(
        tmp_path / "unused",
        model_dir,
        f"train.batch_size={batch}",
        f"train.grad_accum={accum}",
        *overrides,
    )
    members, _ = preflight.check_run(cfg)
    torch.manual_seed(0)
    model, tok, family = loading.load_model_and_tokenizer(cfg.model, cfg.adapter)
    fmt = PromptFormat.for_tokenizer(tok, family)
    idx = {n: i for i, n in enumerate(TASKS)}
    collate = (
        features.Seq2SeqCollator(tok.pad_token_id)
        if family == "seq2seq"
        else features.CausalCollator(tok.pad_token_id, packing=True, max_length=96)
    )
    batcher = Batcher(
        mixture.plan_stage(cfg, 0, members).stream(),
        batch_size=batch,
        grad_accum=accum,
        encode=lambda r: features.encode(r, tok, fmt, 96, 32, task_index=idx[r.task]),
        collate=collate,
    )
    opt = _SGDRecorder(model)
    if mixed_precision != "no":
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # the process-wide state fixes mixed_precision at first use
    acc = Accelerator(gradient_accumulation_steps=accum, mixed_precision=mixed_precision)
    if mixed_precision != "no":
        model = acc.prepare(model)  # what wraps the forward in autocast
    runner = StepRunner(
        acc, model, opt, losses.make_balancer(balancing, TASKS, [1.0, 2.0]), TASKS, family, 0.0
    )
    return runner, batcher, opt, model


@pytest.mark.parametrize("model_fixture", ["tiny_causal_dir", "tiny_t5_dir"])
def test_per_token_losses_equal_the_models_loss(tmp_path, model_fixture, request):
    runner, batcher, _, model = _runner(tmp_path, request.getfixturevalue(model_fixture), 4, 1)
    batch = batcher.next_window().micro[0]
    model.eval()  # T5 has dropout: both forwards must be deterministic
    tok_loss, tok_task = runner.token_losses(batch)
    labels = batch["labels"]
    ref = model(**{k: v for k, v in batch.items() if k != "task_ids"}, use_cache=False).loss
    assert abs(float(tok_loss.mean()) - float(ref)) < 1e-5
    targets = labels[:, 1:] if model_fixture == "tiny_causal_dir" else labels
    assert sorted(set(tok_task.tolist())) == [0, 1] and len(tok_loss) == int(
        (targets != -100).sum()
    )


def test_logit_selection_modes_give_the_same_token_losses(tmp_path, tiny_causal_dir):
    """Target-only logits (2-D boolean mask), target columns, and full logits: same losses, same order."""
    runner, batcher, _, model = _runner(tmp_path, tiny_causal_dir, 4, 1)
    assert (
        runner.logits_mode == "mask"
    )  # transformers' own causal LMs slice with slice_logits_to_keep
    batch = batcher.next_window().micro[0]
    model.eval()
    out = {}
    for mode in ("mask", "columns", "all"):
        runner.logits_mode = mode
        out[mode] = runner.token_losses(batch)
    for mode in ("columns", "all"):
        assert torch.equal(out[mode][1], out["mask"][1])
        assert_close({"l": out[mode][0]}, {"l": out["mask"][0]}, 1e-5)


@pytest.mark.parametrize("balancing", ["none", "equal"])
def test_grad_accumulation_equivalence(tmp_path, tiny_causal_dir, balancing):
    """batch 2 × accum 1 and batch 1 × accum 2 see the same records and give the same gradients."""
    grads = []
    for batch, accum in ((2, 1), (1, 2)):
        runner, batcher, opt, _ = _runner(tmp_path, tiny_causal_dir, batch, accum, balancing)
        values = [runner.run(batcher.next_window()).objective for _ in range(3)]
        grads.append((opt.grads, values))
    (g1, v1), (g2, v2) = grads
    assert len(g1) == len(g2) == 3
    for a, b in zip(g1, g2):
        assert_close(a, b, 1e-6)
    assert max(abs(x - y) for x, y in zip(v1, v2)) < 1e-6
    assert any(
        float(v.abs().sum()) > 0 for k, v in g1[2].items() if "lora_A" in k
    )  # A moves once B has


def test_bf16_autocast_feeds_lora_bf16_inputs_with_the_same_gradients(tmp_path, tiny_causal_dir):
    """Under bf16 autocast (accelerate --mixed_precision bf16) on a bf16 base with float32 adapters, peft's
    float32 copy of every LoRA input is skipped during the step (autocast casts for the matmuls anyway):
    same gradients as with the copies, and the switch is restored after the step."""
    from accelerate.state import AcceleratorState

    seen, runs = [], []
    try:
        _bf16_runs(tmp_path, tiny_causal_dir, seen, runs)
    finally:
        AcceleratorState._reset_state()  # later tests expect the default (no autocast)
    assert {d for u, d in seen if u} == {torch.bfloat16} and {d for u, d in seen if not u} == {
        torch.float32
    }
    (*v1, g1), (*v2, g2) = runs
    assert max(abs(a - b) for a, b in zip(v1, v2)) < 1e-3
    for a, b in zip(g1, g2):
        assert_close(a, b, 2e-2)


def _bf16_runs(tmp_path, tiny_causal_dir, seen, runs):
    for uncast in (True, False):
        runner, batcher, opt, model = _runner(
            tmp_path, tiny_causal_dir, 2, 1, "none", "model.dtype=bfloat16", mixed_precision="bf16"
        )
        layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        assert layers and runner.uncast == layers
        if not uncast:
            runner.uncast = []
        hook = (
            layers[0]
            .lora_A["default"]
            .register_forward_pre_hook(
                lambda m, a, uncast=uncast: seen.append((uncast, a[0].dtype))
            )
        )
        runs.append([runner.run(batcher.next_window()).objective for _ in range(2)] + [opt.grads])
        hook.remove()
        assert all(getattr(m, "cast_input_dtype_enabled", True) for m in layers)  # restored


def test_grad_accumulation_equivalence_end_to_end(tmp_path, tiny_causal_dir):
    a = trainer.train(
        make_cfg(tmp_path / "a", tiny_causal_dir, "train.batch_size=2", "train.grad_accum=1")
    )
    b = trainer.train(
        make_cfg(tmp_path / "b", tiny_causal_dir, "train.batch_size=1", "train.grad_accum=2")
    )
    # Gradients agree to 1e-6 (test above); over 4 AdamW steps float summation-order noise (the LM head
    # runs on differently shaped target sets) is amplified where gradients are tiny, so allow 1e-5.
    assert_close(trainable(a, 4), trainable(b, 4), 1e-5)


def test_training_steps_lower_the_loss_on_repeated_data(tmp_path, tiny_causal_dir):
    runner, batcher, _, _ = _runner(tmp_path, tiny_causal_dir, 4, 1)
    window = batcher.next_window()
    values = [runner.run(window).objective for _ in range(4)]
    assert values[-1] < values[0] - 0.05, values


# ------------------------------------------------------------------ batching


def _toy_stream(n_a=10, n_b=7):
    from t2t_mtl.core.records import Record

    recs = {
        t: [
            Record(t, "i", "x" * (k % 5 + 1), "y" * (k % 3 + 1), {"row_id": str(k), "variant": "v"})
            for k in range(n)
        ]
        for t, n in (("a", n_a), ("b", n_b))
    }
    members = [mixture.member_from_records(t, r) for t, r in recs.items()]
    return mixture.MixedStream(members, {"a": 0.6, "b": 0.4}, seed=11)


def _batcher(**kw):
    from t2t_mtl.training.batching import Batcher

    def enc(r):
        return {
            "input_ids": [1] * len(r.input),
            "labels": [2] * len(r.output),
            "key": (r.task, r.meta["row_id"]),
        }

    return Batcher(_toy_stream(), encode=enc, collate=lambda fs: [f["key"] for f in fs], **kw)


@pytest.mark.parametrize("grouped", [False, True])
def test_batcher_shards_processes_and_resumes_mid_chunk(grouped):
    kw = dict(batch_size=2, group_by_length=grouped, group_steps=3, seq2seq=grouped, total_steps=7)
    one = _batcher(grad_accum=2, **kw)
    ranks = [_batcher(grad_accum=1, world_size=2, rank=r, **kw) for r in (0, 1)]
    for _ in range(
        7
    ):  # world 2 x accum 1 sees, per step, exactly the micro-batches of world 1 x accum 2
        w = one.next_window()
        w0, w1 = (b.next_window() for b in ranks)
        assert w.micro == w0.micro + w1.micro and w.records == w0.records == w1.records
    ref = _batcher(grad_accum=1, **kw)
    windows = [ref.next_window().keys for _ in range(7)]
    part = _batcher(grad_accum=1, **kw)
    for _ in range(4):  # stop inside the second chunk when grouped (chunks of 3 steps)
        part.next_window()
    saved = json_roundtrip(part.state())
    again = _batcher(grad_accum=1, **kw)
    again.load_state(saved)
    assert [again.next_window().keys for _ in range(3)] == windows[4:]


def json_roundtrip(d):
    return json.loads(json.dumps(d))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_hands_out_the_batchers_windows_with_the_state_after_each(grouped, depth):
    from t2t_mtl.training.batching import Prefetcher

    kw = dict(batch_size=2, grad_accum=1, group_by_length=grouped, group_steps=3, seq2seq=grouped)
    ref = _batcher(total_steps=7, **kw)
    want = []
    for _ in range(7):
        w = ref.next_window()
        want.append((w.keys, json_roundtrip(ref.state())))
    feed = Prefetcher(_batcher(total_steps=7, **kw), 7, depth)
    got = []
    for _ in range(7):
        w, state = feed.get()
        got.append((w.keys, json_roundtrip(state)))
    feed.close()
    assert got == want
    assert not any(t.name == "t2t-mtl-prefetch" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="all 7 window"):
        feed.get()


def test_prefetcher_builds_no_window_past_count_and_raises_a_builders_error_as_it_is():
    from t2t_mtl.core.errors import DataError, Problem
    from t2t_mtl.training.batching import Prefetcher

    b = _batcher(batch_size=2, grad_accum=1)
    real, calls = b.next_window, []

    def next_window():
        calls.append(1)
        if len(calls) == 3:
            raise DataError(Problem("data/toy.jsonl", 3, "this row fails to render"))
        return real()

    b.next_window = next_window
    feed = Prefetcher(b, 5, depth=4)
    feed.get(), feed.get()
    with pytest.raises(DataError) as e:
        feed.get()
    assert e.value.problems[0].format().startswith("data/toy.jsonl:3: this row fails to render")
    with pytest.raises(DataError):  # again, not a hang
        feed.get()
    feed.close()
    assert len(calls) == 3  # the thread stopped at the error
    short = _batcher(batch_size=2, grad_accum=1)
    n = []
    short.next_window = lambda: n.append(1) or real()
    feed = Prefetcher(short, 2, depth=4)
    feed.get(), feed.get()
    feed.close()
    assert len(n) == 2  # depth 4, but the stage has 2 steps: a third window is never built


# ------------------------------------------------------------------ evaluation hook


def test_eval_hook_is_called_in_eval_mode_and_logged(tmp_path, tiny_causal_dir):
    calls = []

    def hook(ctx):
        calls.append((ctx.step, ctx.stage, ctx.model.training, ctx.family))
        return {"score": float(ctx.step), "note": "ignored (not a number)"}

    run = trainer.train(
        make_cfg(tmp_path / "ev", tiny_causal_dir, "eval.every_steps=2"), eval_fn=hook
    )
    assert calls == [(2, "main", False, "causal"), (4, "main", False, "causal")]
    assert [(r["step"], r["eval/score"]) for r in metrics(run) if "eval/score" in r] == [
        (2, 2.0),
        (4, 4.0),
    ]


def test_best_bundle_is_kept_by_the_combined_eval_score(tmp_path, tiny_causal_dir):
    """eval.select_best keeps RUN/best/adapter from the step with the highest combined score, not the last."""
    scores = {2: 10.0, 4: 30.0, 6: 20.0}
    weights_at: dict = {}

    def hook(ctx):
        weights_at[ctx.step] = {
            k: v.detach().clone() for k, v in ctx.model.named_parameters() if "lora_" in k
        }
        return {"combined": scores[ctx.step]}

    run = trainer.train(
        make_cfg(tmp_path / "best", tiny_causal_dir, "train.steps=6", "eval.every_steps=2"),
        eval_fn=hook,
    )
    best = json.loads((run / "best" / "best.json").read_text())
    assert best == {"step": 4, "stage": "main", "combined": 30.0}
    man = json.loads((run / "best" / "adapter" / "t2t_manifest.json").read_text())
    assert man["step"] == 4
    from safetensors.torch import load_file

    saved = load_file(str(run / "best" / "adapter" / "adapter_model.safetensors"))
    # the saved adapter is step 4's (a later step's weights differ: training went on after it)
    some = next(iter(saved))
    suffix = some.split("base_model.model.")[-1]

    def at(step):
        return [
            v for k, v in weights_at[step].items() if k.replace(".default", "").endswith(suffix)
        ][0]

    assert torch.allclose(saved[some], at(4))
    assert not torch.allclose(at(4), at(6))


# ------------------------------------------------------------------ resume


def test_kill_and_resume_gives_the_same_records_and_weights(tmp_path, tiny_causal_dir):
    over = (
        "train.steps=6",
        "train.save_steps=2",
        "train.logging_steps=1",
        "adapter.dropout=0.1",
        "train.loss_balancing=uncertainty",
    )
    seen_a: dict = {}
    full = trainer.train(
        make_cfg(tmp_path / "full", tiny_causal_dir, *over),
        on_step=lambda s, info: seen_a.__setitem__(s, info["records"]),
    )

    def killer(step, info):
        if step == 3:
            raise RuntimeError("killed")

    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="killed"):
        trainer.train(make_cfg(cut, tiny_causal_dir, *over), on_step=killer)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-2"]
    seen_b: dict = {}
    trainer.train(
        make_cfg(cut, tiny_causal_dir, *over),
        on_step=lambda s, info: seen_b.__setitem__(s, info["records"]),
    )
    assert sorted(seen_b) == [3, 4, 5, 6]
    assert all(seen_b[s] == seen_a[s] for s in seen_b)
    assert_close(trainable(full, 6), trainable(cut, 6), 1e-6)
    ma, mb = metrics(full), metrics(cut)
    assert [r["step"] for r in mb] == [1, 2, 3, 4, 5, 6]  # the killed run's step-3 row was replaced
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(ma, mb)) < 1e-6
    sa = json.loads((full / "checkpoints/step-6/trainer_state.json").read_text())["balancer"]
    sb = json.loads((cut / "checkpoints/step-6/trainer_state.json").read_text())["balancer"]
    assert max(abs(x - y) for x, y in zip(sa["s"], sb["s"])) < 1e-9


def test_adamw_8bit_trains_and_resumes_exactly(tmp_path, tiny_causal_dir, monkeypatch):
    """train.optim=adamw_8bit: bitsandbytes' AdamW8bit (8-bit state for tensors of >= 4096 elements:
    r=32 makes the MLP adapters that big), and its quantised state survives a kill and resume."""
    import bitsandbytes as bnb

    from t2t_mtl.training import optimizer_step

    over = ("train.optim=adamw_8bit", "adapter.r=32", "train.steps=4", "train.save_steps=2")
    made = []
    real = optimizer_step.make_optimizer

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(trainer, "make_optimizer", spy)
    full = trainer.train(make_cfg(tmp_path / "full", tiny_causal_dir, *over))
    assert isinstance(made[0], bnb.optim.AdamW8bit)
    states = [v for st in made[0].state.values() for v in st.values() if torch.is_tensor(v)]
    assert any(v.dtype == torch.uint8 for v in states)

    def killer(step, info):
        if step == 3:
            raise RuntimeError("killed")

    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="killed"):
        trainer.train(make_cfg(cut, tiny_causal_dir, *over), on_step=killer)
    trainer.train(make_cfg(cut, tiny_causal_dir, *over))
    assert_close(trainable(full, 4), trainable(cut, 4), 1e-6)
    plain = trainer.train(make_cfg(tmp_path / "plain", tiny_causal_dir, *over[1:]))
    assert not torch.equal(  # it really was another optimiser
        next(iter(trainable(plain, 4).values())), next(iter(trainable(full, 4).values()))
    )


def test_optimizer_setting_is_validated(tmp_path, tiny_causal_dir, capsys):
    base = ["train", "--config", str(REPO / "launch/configs/tiny_cpu.yaml")]
    base += [f"model.name={tiny_causal_dir}", f"output_dir={tmp_path / 'run'}"]
    assert main([*base, "train.optim=adam8"]) == 2
    err = capsys.readouterr().err
    assert "train.optim: invalid value" in err and "did you mean" in err and "Traceback" not in err
    if not torch.cuda.is_available():
        for optim in ("paged_adamw", "paged_adamw_8bit"):
            assert main([*base, f"train.optim={optim}"]) == 2
            err = capsys.readouterr().err
            assert f"train.optim: {optim} needs a GPU" in err and "adamw_8bit" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ prefetching and syncs


@pytest.mark.usefixtures("one_thread")
def test_prefetched_windows_give_the_same_run_and_resume_exactly(tmp_path, tiny_causal_dir):
    """train.prefetch builds windows in a background thread: the losses, weights and checkpointed
    stream positions are those of prefetch 0, and a run killed at step 3 (window 4 already built
    ahead) resumes from step 2's checkpoint with the same records and weights."""
    over = ("train.steps=5", "train.save_steps=2", "train.save_total_limit=3")
    over += ("train.logging_steps=1", "train.grad_accum=2")
    runs, seen = {}, {}
    for depth in (0, 1, 3):
        seen[depth] = {}
        runs[depth] = trainer.train(
            make_cfg(tmp_path / f"p{depth}", tiny_causal_dir, *over, f"train.prefetch={depth}"),
            on_step=lambda s, info, d=depth: seen[d].__setitem__(s, info["records"]),
        )
    for depth in (1, 3):
        assert seen[depth] == seen[0]
        assert [r["loss"] for r in metrics(runs[depth])] == [r["loss"] for r in metrics(runs[0])]
        for step in (2, 4, 5):
            a, b = trainable(runs[0], step), trainable(runs[depth], step)
            assert all(torch.equal(a[k], b[k]) for k in a)
            state = f"checkpoints/step-{step}/trainer_state.json"
            assert (
                json.loads((runs[depth] / state).read_text())["batcher"]
                == json.loads((runs[0] / state).read_text())["batcher"]
            )

    def killer(step, info):
        if step == 3:
            raise KeyboardInterrupt  # as Ctrl-C at a step's end: the thread must not linger

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        trainer.train(make_cfg(cut, tiny_causal_dir, *over, "train.prefetch=1"), on_step=killer)
    assert not any(t.name == "t2t-mtl-prefetch" for t in threading.enumerate())
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-2"]
    again: dict = {}
    trainer.train(
        make_cfg(cut, tiny_causal_dir, *over, "train.prefetch=1"),
        on_step=lambda s, info: again.__setitem__(s, info["records"]),
    )
    assert again == {s: seen[0][s] for s in (3, 4, 5)}
    a, b = trainable(runs[0], 5), trainable(cut, 5)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("prefetch", [0, 1])
def test_a_data_error_while_building_a_window_reaches_the_user_as_before(
    tmp_path, tiny_causal_dir, monkeypatch, capsys, prefetch
):
    """A record that fails to render during training (here: the first of step 3's window) stops
    the run with exit code 2 and the problem, after step 2's checkpoint, prefetched or not."""
    from t2t_mtl.core.errors import DataError, Problem
    from t2t_mtl.training.batching import Batcher

    real, calls = Batcher._render, {"n": 0}

    def render(self, i, row, epoch):
        calls["n"] += 1
        if calls["n"] == 9:  # batch 4: windows 1 and 2 rendered 8 records
            raise DataError(Problem("data/toy.jsonl", 7, "this row fails to render: boom"))
        return real(self, i, row, epoch)

    monkeypatch.setattr(Batcher, "_render", render)
    run = tmp_path / "run"
    base = ["train", "--config", str(REPO / "launch/configs/tiny_cpu.yaml")]
    over = [f"model.name={tiny_causal_dir}", f"output_dir={run}", f"train.prefetch={prefetch}"]
    over += ["train.steps=4", "train.save_steps=2", "train.batch_size=4", "train.grad_accum=1"]
    assert main([*base, *over]) == 2
    err = capsys.readouterr().err
    assert "data/toy.jsonl:7: this row fails to render: boom" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert calls["n"] == 9  # no window past the failing one was rendered
    assert not any(t.name == "t2t-mtl-prefetch" for t in threading.enumerate())


def test_prefetch_setting_is_validated(tmp_path, tiny_causal_dir):
    with pytest.raises(T2TError) as e:
        make_cfg(tmp_path / "run", tiny_causal_dir, "train.prefetch=-1")
    msg = "\n".join(p.format() for p in e.value.problems)
    assert "train.prefetch" in msg and "must be >= 0" in msg


class _SyncCounter(torch.overrides.TorchFunctionMode):
    """Where code run under it would make the host wait for the device, with the CPU standing in
    for the device. Device tensors: parameters, the model's buffers (`mark`), what `.to(device)`
    returns and anything computed from them. Kinds: `to_host` (a device tensor becomes Python
    values or host memory: item, tolist, bool, float, int, cpu, numpy, printing), `mask` (a boolean
    index or nonzero on a device tensor: its size must reach the host), `h2d` (a blocking copy to
    the device: `.to(device)` without non_blocking=True waits for the device's queue). Each is
    counted as ours (t2t_mtl) or the libraries' (transformers' own checks)."""

    T = torch.Tensor
    TO_HOST = {T.item, T.tolist, T.__bool__, T.__float__, T.__int__, T.__index__, T.cpu, T.numpy}
    TO_HOST |= {T.__format__, T.__repr__, T.__array__}
    MASK = {T.nonzero, torch.nonzero, T.masked_select, torch.masked_select, T.unique, torch.unique}

    def __init__(self):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.dev = WeakIdKeyDictionary()
        self.counts: collections.Counter = collections.Counter()

    def mark(self, tensors) -> None:
        for t in tensors:
            self.dev[t] = True

    def _on_device(self, t) -> bool:
        return isinstance(t, torch.nn.Parameter) or t in self.dev

    def _note(self, kind: str) -> None:
        f = sys._getframe(2)
        while f is not None and (
            f"{os.sep}torch{os.sep}" in f.f_code.co_filename or f.f_code.co_name == "_note"
        ):
            f = f.f_back
        where = f.f_code.co_filename if f is not None else ""
        self.counts[kind, "ours" if f"{os.sep}t2t_mtl{os.sep}" in where else "library"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        kwargs = kwargs or {}
        flat = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        dev = any(self._on_device(t) for t in flat)
        if dev and func in self.TO_HOST:
            self._note("to_host")
            out = func(*args, **kwargs)  # on the CPU the same object: a copy is the host's
            return out.clone() if isinstance(out, torch.Tensor) else out
        if dev and func in self.MASK:
            self._note("mask")
        if dev and func is self.T.__getitem__:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self._note("mask")
        moves = func is self.T.to and (
            "device" in kwargs
            or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])
        )
        if moves and not dev:  # host to device
            if not kwargs.get("non_blocking", False):
                self._note("h2d")
            out = func(*args, **kwargs)
            out = out.clone() if out is args[0] else out
            self.mark([out])
            return out
        out = func(*args, **kwargs)
        if dev or kwargs.get("device") is not None:
            self.mark(x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor))
        return out


@pytest.mark.usefixtures("one_thread")
def test_a_training_step_waits_for_the_device_once(tmp_path, tiny_causal_dir, monkeypatch):
    """The default step (one process, balancing none, clipping on, packed causal batches, two
    micro-batches) waits for the device once in our code: the per-task loss sums, kept on the
    device through the window, come back with the gradient norm in one transfer, which the
    non-finite check reads too. Before this the step had 3 + grad_accum transfers, 5 boolean
    masks per micro-batch and a blocking copy per batch tensor. What transformers does itself
    (its packed-sequence check, the boolean `logits_to_keep` slice: one each per micro-batch) is
    counted apart and not held to this."""
    per_step = []
    real = trainer._Trainer._step

    def counted(self, si, s, feed, sched):
        c = _SyncCounter()
        c.mark(self.model.buffers())
        with c:
            real(self, si, s, feed, sched)
        per_step.append(c.counts)

    monkeypatch.setattr(trainer._Trainer, "_step", counted)
    over = ("train.steps=4", "train.save_steps=100", "train.logging_steps=1", "train.grad_accum=2")
    trainer.train(make_cfg(tmp_path / "run", tiny_causal_dir, *over))
    for counts in per_step[:-1]:  # the last step also writes the checkpoint
        ours = {k: v for (k, who), v in counts.items() if who == "ours"}
        assert ours == {"to_host": 1}, dict(counts)


def test_two_stages_with_replay(tmp_path, tiny_causal_dir):
    seen: dict = {}
    run = trainer.train(
        make_cfg(
            tmp_path / "st",
            tiny_causal_dir,
            "stages=[{name: s1, tasks: [toy_polarity], steps: 3}, "
            "{name: s2, tasks: [toy_copy], steps: 4, learning_rate: 1.0e-3}]",
            "replay.enabled=true",
            "replay.per_task=6",
            "replay.share=0.5",
        ),
        on_step=lambda s, info: seen.__setitem__(
            s, (info["stage"], {r[0] for r in info["records"]})
        ),
    )
    assert all(seen[s] == ("s1", {"toy_polarity"}) for s in (1, 2, 3))
    assert {t for s in (4, 5, 6, 7) for t in seen[s][1]} == {
        "toy_polarity",
        "toy_copy",
    }  # replay joins s2
    buf = [json.loads(x) for x in (run / "replay" / "buffer.jsonl").read_text().splitlines()]
    assert 0 < len(buf) <= 6 and {r["task"] for r in buf} == {"toy_polarity"}
    stages = json.loads((run / "mixture.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["s1", "s2"]
    rep = [m for m in stages[1]["members"] if m["name"] == "replay"]
    assert rep and abs(rep[0]["rate"] - 0.5) < 1e-9 and rep[0]["tasks"] == ["toy_polarity"]
    for st in ("s1", "s2"):
        assert (
            json.loads((run / "stages" / st / "adapter" / "t2t_manifest.json").read_text())["stage"]
            == st
        )
    assert {r["stage"] for r in metrics(run)} == {"s1", "s2"}
    assert any(k == "share/replay" for r in metrics(run) for k in r)
    lrs = {
        st: [r["lr"] for r in metrics(run) if r["stage"] == st and "lr" in r] for st in ("s1", "s2")
    }
    assert (
        lrs["s1"] and lrs["s2"] and max(lrs["s1"]) > 2e-3 and 0 < max(lrs["s2"]) <= 1e-3
    )  # s2's own peak LR


# ------------------------------------------------------------------ loss balancing


def test_balancer_coefficients_and_directions():
    tok = torch.tensor([10.0, 2.0], dtype=torch.float64)
    none = losses.make_balancer("none", TASKS, [1.0, 3.0])
    assert torch.allclose(
        none.coefficients(tok), torch.tensor([1 / 12, 3 / 12], dtype=torch.float64)
    )
    eq = losses.make_balancer("equal", TASKS, [1.0, 1.0])
    assert torch.allclose(eq.coefficients(tok), torch.tensor([1 / 20, 1 / 4], dtype=torch.float64))
    assert torch.equal(
        eq.coefficients(torch.tensor([5.0, 0.0], dtype=torch.float64))[1:],
        torch.zeros(1, dtype=torch.float64),
    )

    unc = losses.make_balancer("uncertainty", TASKS, [1.0, 1.0])
    for _ in range(400):  # task 0 has mean loss 4, task 1 has 0.25: s_i -> log L_i
        unc.observe(torch.tensor([40.0, 0.5], dtype=torch.float64), tok)
    s = unc.s
    assert abs(float(s[0]) - 1.386) < 0.1 and abs(float(s[1]) + 1.386) < 0.1
    w = unc.weights()
    assert w["toy_polarity"] < 1 < w["toy_copy"]
    clone = losses.make_balancer("uncertainty", TASKS, [1.0, 1.0])
    clone.load_state_dict(json.loads(json.dumps(unc.state_dict())))
    assert torch.equal(clone.s, unc.s)

    gn = losses.make_balancer("gradnorm", TASKS, [1.0, 1.0], gradnorm_alpha=1.5)
    grads = torch.tensor(
        [[10.0, 0.0], [0.0, 1.0]]
    )  # task 0's gradient is 10x larger, same training rate
    for _ in range(10):
        gn.observe(torch.tensor([20.0, 4.0], dtype=torch.float64), tok, grads)
    assert gn.g[0] < 1 < gn.g[1] and abs(float(gn.g.sum()) - 2) < 1e-9
    gn2 = losses.make_balancer("gradnorm", TASKS, [1.0, 1.0], gradnorm_alpha=1.5)
    eq_grads = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gn2.observe(torch.tensor([20.0, 4.0], dtype=torch.float64), tok, eq_grads)
    for _ in range(
        10
    ):  # task 1's loss halves, task 0's stays: task 0 trains slower and gains weight
        gn2.observe(torch.tensor([20.0, 2.0], dtype=torch.float64), tok, eq_grads)
    assert gn2.g[0] > 1 > gn2.g[1]


@pytest.mark.parametrize("strategy", ["equal", "uncertainty", "gradnorm"])
def test_balancing_strategies_train(tmp_path, tiny_causal_dir, strategy):
    run = trainer.train(
        make_cfg(
            tmp_path / strategy,
            tiny_causal_dir,
            f"train.loss_balancing={strategy}",
            "train.logging_steps=1",
            "train.steps=3",
        )
    )
    rows = metrics(run)
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)
    last = rows[-1]
    if strategy == "equal":  # objective = mean of the two tasks' token-mean losses
        both = [r for r in rows if "loss/toy_polarity" in r and "loss/toy_copy" in r]
        assert both and all(
            abs(r["loss"] - (r["loss/toy_polarity"] + r["loss/toy_copy"]) / 2) < 1e-6 for r in both
        )
    elif strategy == "uncertainty":  # losses ~6 > 1: every log-variance grows, weights fall below 1
        assert all(last[f"weight/{t}"] < 1 for t in TASKS)
    else:
        w = [last[f"weight/{t}"] for t in TASKS]
        assert abs(sum(w) - 2) < 1e-6 and max(abs(x - 1) for x in w) > 1e-4


# ------------------------------------------------------------------ errors


def test_nan_loss_stops_with_step_and_tasks(tmp_path, tiny_causal_dir, monkeypatch):
    calls = {"n": 0}
    real = losses.target_losses

    def poisoned(*a, **k):
        calls["n"] += 1
        out, tasks = real(*a, **k)
        return (out * float("nan"), tasks) if calls["n"] == 3 else (out, tasks)

    monkeypatch.setattr(losses, "target_losses", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(T2TError) as e:
        trainer.train(make_cfg(run, tiny_causal_dir))
    msg = e.value.problems[0].format()
    assert "step 3" in msg and "non-finite loss" in msg and "toy_" in msg and "step-2" in msg
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]


def test_validation_reports_every_problem_before_loading(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        f"template_dirs: [{TOY_TEMPLATES}]\n"
        "model: {name: ./no/such/model, attn_implementation: flash_attention_2}\n"
        "tasks: [{template: toy_polarity}, {template: toy_polarty}]\n"
    )
    rc = main(["train", "--config", str(cfg), f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "toy_polarty" in err and "did you mean 'toy_polarity'" in err
    assert "no model folder" in err and "flash_attention_2 needs a CUDA GPU" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ two processes


def test_ddp_two_cpu_processes_agree(tmp_path, tiny_causal_dir, monkeypatch):
    """`accelerate launch` with two processes (gloo): ranks agree, and match one process with accum 2;
    the replay buffer the run builds is the one `t2t-mtl mix --processes 2` previews."""
    run = tmp_path / "ddp"
    over = [
        f"model.name={tiny_causal_dir}",
        "stages=[{name: s1, tasks: [sentiment_sst2], steps: 2}, {name: s2, tasks: [qa_squad], steps: 1}]",
        "replay.enabled=true",
        "replay.share=0.25",
    ]
    proc = accelerate_launch(
        TWO_CPU_PROCESSES,
        ["--config", str(REPO / "launch/configs/tiny_cpu.yaml"), *over, f"output_dir={run}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    a, b = summary["weight_checksums"]
    assert a == b
    single = trainer.train(
        load_config(
            REPO / "launch/configs/tiny_cpu.yaml",
            over + ["train.grad_accum=2", f"output_dir={tmp_path / 'one'}"],
        )
    )
    assert_close(trainable(run, 3), trainable(single, 3), 1e-5)
    from test_mixing import mix_preview_offers  # the spy on the offering both sides call

    config = str(REPO / "launch/configs/tiny_cpu.yaml")
    preview = mix_preview_offers(monkeypatch, ["--config", config, *over, "--processes", "2"])
    assert [(st, n) for st, n, _ in preview] == [("s1", 2 * 2 * 1 * 2)]  # steps x batch x accum x 2
    saved = [json.loads(x) for x in (run / "replay" / "buffer.jsonl").read_text().splitlines()]
    assert len(saved) == 8 and saved == preview[0][2]
    assert (single / "replay" / "buffer.jsonl").read_text() == (
        run / "replay" / "buffer.jsonl"
    ).read_text()
    one = mix_preview_offers(monkeypatch, ["--config", config, *over, "--processes", "1"])
    assert len(one[0][2]) == 4  # what the preview showed before it counted processes


def _launch(config_file: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return accelerate_launch(["--config_file", str(config_file)], list(args), cwd)


def test_fsdp_two_cpu_processes_match_one_process(tmp_path, tiny_causal_dir):
    """FSDP2 over gloo (launch/accelerate/cpu_fsdp.yaml) on a bf16 base with float32 LoRA adapters
    (the mix FSDP1 cannot flatten): it trains, evaluates during training through the sharded model,
    saves an adapter gathered from the shards that equals one process's (grad_accum 2), and resumes
    from its sharded checkpoint to the same weights."""
    from safetensors.torch import load_file

    run = tmp_path / "fsdp"
    over = [
        "--config",
        str(REPO / "launch/configs/tiny_cpu.yaml"),
        f"model.name={tiny_causal_dir}",
        "model.dtype=bfloat16",
        "train.steps=3",
        "eval.every_steps=2",
        "eval.limit=2",
        "eval.max_new_tokens=4",
        "eval.ci_resamples=0",
    ]
    cfg_file = REPO / "launch/accelerate/cpu_fsdp.yaml"
    proc = _launch(cfg_file, tmp_path, *over, f"output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "packing on" in proc.stderr
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    a, b = summary["weight_checksums"]
    assert a == b  # sums over the shards of both processes
    assert (run / "eval" / "during_training.jsonl").is_file()
    assert (run / "checkpoints" / "step-3" / "pytorch_model_fsdp_0").is_dir()  # sharded
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    single = trainer.train(
        load_config(
            REPO / "launch/configs/tiny_cpu.yaml",
            [o for o in over if "=" in o]
            + ["train.grad_accum=2", f"output_dir={tmp_path / 'one'}"],
        )
    )
    one = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    assert {v.dtype for v in adapter.values()} == {torch.float32}
    assert_close(adapter, one, 1e-5)
    one_sums = json.loads((single / "train_summary.json").read_text())["weight_checksums"][0]
    assert a == pytest.approx(one_sums, rel=1e-6)

    (run / "adapter" / "adapter_model.safetensors").unlink()
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-3")
    proc = _launch(cfg_file, tmp_path, *over, f"output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "step-2" in proc.stderr
    assert_close(load_file(str(run / "adapter" / "adapter_model.safetensors")), adapter, 1e-6)


def _fsdp1_units(model, policy) -> list[set]:
    """The parameter dtypes of each unit FSDP1 would flatten under `policy` (a module the policy
    wraps owns its parameters except those of units inside it; the root owns the rest)."""
    units = [m for m in model.modules() if m is not model and policy(m, False, 0)]
    owner = {}
    for unit in [model, *units]:  # inner units come later in modules() order and win
        for p in unit.parameters():
            owner[id(p)] = unit
    dtypes: dict = {}
    for p in model.parameters():
        dtypes.setdefault(id(owner[id(p)]), set()).add(p.dtype)
    return list(dtypes.values())


def test_fsdp1_wraps_lora_layers_apart_so_every_unit_has_one_dtype(tiny_causal_dir):
    """FSDP1 needs one dtype per flattened unit; the default transformer-block wrapping mixes the
    bf16 base with float32 adapters ("Must flatten tensors with uniform dtype"), peft's policy
    (set by preflight.configure_fsdp for FSDP1 only) does not. FSDP1 needs a GPU to run."""
    import functools
    from types import SimpleNamespace

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from t2t_mtl.core.config import AdapterConfig, ModelConfig

    model, _, _ = loading.load_model_and_tokenizer(
        ModelConfig(name=str(tiny_causal_dir), dtype="bfloat16"), AdapterConfig(r=4)
    )
    default = functools.partial(
        transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}
    )
    assert any(len(d) > 1 for d in _fsdp1_units(model, default))  # what crashed at prepare
    plugin = SimpleNamespace(auto_wrap_policy=default)
    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), is_fsdp2=True)
    preflight.configure_fsdp(acc, model)
    assert plugin.auto_wrap_policy is default  # FSDP2 shards per parameter: left alone
    acc.is_fsdp2 = False
    preflight.configure_fsdp(acc, model)
    units = _fsdp1_units(model, plugin.auto_wrap_policy)
    assert all(len(d) == 1 for d in units) and {torch.float32} in units


def test_deepspeed_auto_accumulation_becomes_the_runs_own(monkeypatch):
    """The shipped DeepSpeed configs say gradient_accumulation_steps: auto; accelerate launch passes
    that on as ACCELERATE_GRADIENT_ACCUMULATION_STEPS=auto, which Accelerator() cannot parse."""
    cfg = load_config(REPO / "launch/configs/tiny_cpu.yaml", ["train.grad_accum=3"])
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    preflight.deepspeed_launch_env(cfg)
    assert os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "3"
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")  # an explicit value stays
    preflight.deepspeed_launch_env(cfg)
    assert os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "4"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert not preflight.deepspeed_zero3()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert preflight.deepspeed_zero3()


def test_fsdp_on_cpu_needs_fsdp2_without_module_broadcast(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("these limits are for CPU processes")
    cfg = load_config(REPO / "launch/configs/tiny_cpu.yaml")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "true")
    msgs = [p.format() for p in preflight.backend_problems(cfg)]
    assert any("fsdp_version: 2" in m and "cpu_fsdp.yaml" in m for m in msgs)
    assert any("fsdp_sync_module_states: true needs a GPU" in m for m in msgs)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
    assert preflight.backend_problems(cfg) == []
    cfg.adapter.method = "qlora"
    (qlora,) = preflight.backend_problems(cfg)
    assert "qlora is not supported with FSDP" in qlora.format()


# ------------------------------------------------------------------ mixed precision


def test_mixed_precision_bf16_runs_under_autocast_on_cpu(tmp_path, tiny_causal_dir, monkeypatch):
    from t2t_mtl.training import optimizer_step

    seen = []
    real_run = optimizer_step.StepRunner.run

    # the accelerator the step runs under, and the dtype a linear layer computes in
    def spy(self, window, **kw):
        lin = next(m for m in self.model.modules() if isinstance(m, torch.nn.Linear))
        dtypes = []
        hook = lin.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
        try:
            res = real_run(self, window, **kw)
        finally:
            hook.remove()
        seen.append((self.acc.mixed_precision, set(dtypes)))
        return res

    monkeypatch.setattr(optimizer_step.StepRunner, "run", spy)
    from accelerate.state import AcceleratorState

    run = tmp_path / "run"
    AcceleratorState._reset_state()  # earlier in-process runs fixed mixed_precision at "no"
    try:
        rc = main(
            [
                "train",
                "--config",
                str(REPO / "launch/configs/tiny_cpu.yaml"),
                f"model.name={tiny_causal_dir}",
                f"output_dir={run}",
                "train.steps=2",
                "train.mixed_precision=bf16",
            ]
        )
    finally:
        AcceleratorState._reset_state()  # later runs expect the default (no autocast)
    assert rc == 0 and seen and all(m == "bf16" and d == {torch.bfloat16} for m, d in seen)
    assert all(r["loss"] > 0 for r in metrics(run))


def test_packing_is_checked_on_the_prepared_model_and_falls_back_to_padding(
    tmp_path, tiny_causal_dir, monkeypatch, caplog, capsys
):
    """The packing check runs after accelerator.prepare (here: the bf16-autocast forward), with the
    collator layout training uses; a failed check trains with padding and says why."""
    import logging

    from t2t_mtl.model import features

    calls, batches = [], []
    real_check, real_call = features.packing_check, features.CausalCollator.__call__

    def check(model, collator, device=None):
        calls.append((hasattr(model, "_original_forward"), collator.layout, str(device)))
        return real_check(model, collator, device)

    def collate(self, feats):
        out = real_call(self, feats)
        batches.append(out)
        return out

    monkeypatch.setattr(features, "packing_check", check)
    monkeypatch.setattr(features.CausalCollator, "__call__", collate)
    from accelerate.state import AcceleratorState

    cfg = make_cfg(
        tmp_path / "bf16", tiny_causal_dir, "train.steps=1", "train.mixed_precision=bf16"
    )
    AcceleratorState._reset_state()  # the process-wide state fixes mixed_precision at first use
    try:
        trainer.train(cfg)
    finally:
        AcceleratorState._reset_state()  # later runs expect the default (no autocast)
    assert calls == [(True, "rows", "cpu")]  # autocast-wrapped: accelerate prepared it
    assert "packing on (rows of max_length" in capsys.readouterr().err
    assert batches and all("attention_mask" not in b for b in batches[1:])  # [0]: the check's

    def leaky(model, collator, device=None):
        return False, "B's logits moved by 0.5 (a stand-in for a leaking model)"

    monkeypatch.setattr(features, "packing_check", leaky)
    batches.clear()
    with caplog.at_level(logging.WARNING, logger="t2t_mtl"):
        trainer.train(make_cfg(tmp_path / "leaky", tiny_causal_dir, "train.steps=1"))
    assert "training with padding instead" in caplog.text and "stand-in" in caplog.text
    assert "packing off" in capsys.readouterr().err
    assert batches and all("attention_mask" in b for b in batches)


def test_runs_of_another_precision_train_one_after_another_in_one_process(
    tmp_path, tiny_causal_dir
):
    """accelerate's process-wide state fixes the mixed precision at the first Accelerator: a float32
    run, then a bf16 one, then float32 again in one process (a notebook, the quality study) each get
    their own, with no ValueError."""
    from accelerate.state import AcceleratorState

    for i, mp in enumerate(("no", "bf16", "no")):
        cfg = make_cfg(
            tmp_path / f"r{i}", tiny_causal_dir, "train.steps=1", f"train.mixed_precision={mp}"
        )
        trainer.train(cfg)
        assert AcceleratorState._shared_state["_mixed_precision"] == mp


def test_mixed_precision_auto_follows_accelerate_launch_else_the_hardware(monkeypatch, tmp_path):
    cfg = load_config(REPO / "launch/configs/tiny_cpu.yaml")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if not torch.cuda.is_available():  # a CPU: bf16 where it has bf16 matrix units
        for flag, want in (("1", "bf16"), ("0", "no")):
            monkeypatch.setenv(preflight.CPU_BF16_ENV, flag)
            assert preflight.mixed_precision(cfg) == want
        monkeypatch.delenv(preflight.CPU_BF16_ENV)
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        amx = any(ln.startswith("flags") and "amx_bf16" in ln.split() for ln in flags.splitlines())
        assert preflight.mixed_precision(cfg) == ("bf16" if amx else "no")
        monkeypatch.setenv(preflight.CPU_BF16_ENV, "0")
    else:
        assert preflight.mixed_precision(cfg) == (
            "bf16" if torch.cuda.is_bf16_supported() else "no"
        )
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert preflight.mixed_precision(cfg) == "bf16"
    cfg.train.mixed_precision = "no"  # an explicit setting wins over the launcher
    assert preflight.mixed_precision(cfg) == "no"


def test_fp16_on_cpu_is_a_config_error(tmp_path, tiny_causal_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    rc = main(
        [
            "train",
            "--config",
            str(REPO / "launch/configs/tiny_cpu.yaml"),
            f"model.name={tiny_causal_dir}",
            f"output_dir={tmp_path / 'run'}",
            "train.mixed_precision=fp16",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "fp16 needs a GPU" in err and "Traceback" not in err


def test_our_training_steps_equal_trl_sft_on_the_same_records(tmp_path, tiny_causal_dir):
    """Our trainer and a plain TRL `SFTTrainer` (the script a user would write), from the same LoRA
    init on the same token sequences in the same order (float32, no dropout), end with the same
    adapter: our packing, per-token loss, optimiser and schedule are TRL's training, step for step. The quality
    benchmark's TRL-on-our-records baseline (bench/bench_quality.py `trl_ours`) relies on this: a
    gap between it and ours is then seed noise, not training (docs/benchmarks.md)."""
    sys.path.insert(0, str(REPO / "bench"))
    import common  # bench/common.py: our stream's records as TRL rows, one LoRA init for both
    from trl import SFTTrainer

    from t2t_mtl.model.prompt_format import PromptFormat

    with common.same_lora_init() as init:  # TRL starts from our run's LoRA draw
        steps = 3
        cfg = make_cfg(
            tmp_path / "ours",
            tiny_causal_dir,
            f"train.steps={steps}",
            "train.mixed_precision=no",
            "train.learning_rate=1e-3",
        )
        assert cfg.adapter.dropout == 0.0
        ours = load_file(str(trainer.train(cfg) / "adapter" / "adapter_model.safetensors"))

        from datasets import Dataset

        model, tok, family = loading.load_model_and_tokenizer(cfg.model, None, for_training=True)
        fmt = PromptFormat.for_tokenizer(tok, family, cfg.model.prompt_format, cfg.model.truncation)
        rows = common.stream_examples(cfg, tok, fmt, steps * cfg.train.batch_size)
        args, lora = common.trl_configs(
            cfg, str(tmp_path / "trl"), steps, train_sampling_strategy="sequential"
        )
        # Our token ids and labels as they are (TRL takes a tokenised dataset unchanged): the same
        # sequences and targets, so only the training itself can differ.
        trl = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(
                [{"input_ids": r["ids"], "labels": r["labels"]} for r in rows]
            ),
            processing_class=tok,
            peft_config=lora,
        )
        assert trl.train_dataset[0]["input_ids"] == rows[0]["ids"]
        trl.train()
    theirs = {
        k.replace(".default", ""): v.detach()
        for k, v in trl.model.state_dict().items()
        if "lora_" in k
    }
    assert ours.keys() == theirs.keys()
    start = {k.replace(".default", ""): v for k, v in init.items()}
    num = sum(float((ours[k] - theirs[k]).double().pow(2).sum()) for k in ours)
    den = sum(float((ours[k] - start[k]).double().pow(2).sum()) for k in ours)
    assert den > 0 and (num / den) ** 0.5 < 1e-3, (num / den) ** 0.5
