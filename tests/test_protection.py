"""Against interference and forgetting: EWC, PCGrad, freezing and layer-wise learning rates
(`t2t_mtl.training.protection`, `t2t_mtl.model.layers`) on the tiny models of tests/tiny_models.py.

Covers: the Fisher against a hand computation; the penalty's value and gradient; PCGrad's projection
(pure and on a tiny model's real per-task gradients); a two-stage run with EWC (files, logged penalty,
weights held nearer stage 1); exact resume with every knob on; frozen blocks bitwise still and gradual
unfreezing at the right steps; adapter.layers for LoRA and full fine-tuning; per-group learning rates;
config and backend errors at file:line; two CPU processes (gloo) against one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launching import TWO_CPU_PROCESSES, accelerate_launch
from safetensors import safe_open
from safetensors.torch import load_file
from test_training import REPO, TASKS, _runner, assert_close, make_cfg, metrics, trainable

from t2t_mtl.core.config import config_to_dict, load_config
from t2t_mtl.core.errors import ConfigError, T2TError
from t2t_mtl.model import features, layers, loading
from t2t_mtl.training import preflight, protection, trainer
from t2t_mtl.training.optimizer_step import StepRunner, make_optimizer, make_scheduler

TWO_STAGES = (
    "stages=[{name: s1, tasks: [toy_polarity], steps: 4}, "
    "{name: s2, tasks: [toy_copy], steps: 8%s}]"
)


def block_of(name: str) -> int | None:
    return layers.block_index(name)


# ------------------------------------------------------------------ EWC


def test_fisher_equals_a_hand_computation(tmp_path, tiny_causal_dir):
    """Empirical Fisher of three single records = mean of squared gradients of the model's own
    loss (HF's token-mean cross-entropy) times the task's loss weight."""
    runner, batcher, _, model = _runner(tmp_path, tiny_causal_dir, 1, 1)  # weights [1, 2]
    batches = [batcher.next_window().micro[0] for _ in range(3)]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    got = protection.estimate_fisher(runner, model, named, batches, seed=0)
    hand = {n: torch.zeros_like(p) for n, p in named}
    weight = {0: 1.0, 1: 2.0}
    tasks = set()
    for b in batches:
        task = int(b["task_ids"][b["task_ids"] >= 0][0])
        tasks.add(task)
        inputs = features.model_inputs({k: v for k, v in b.items() if k != "task_ids"})
        loss = weight[task] * model(**inputs).loss
        grads = torch.autograd.grad(loss, [p for _, p in named])
        for (n, _), g in zip(named, grads):
            hand[n] += g**2
    assert tasks == {0, 1}  # both loss weights take part
    scale = max(float(v.abs().max()) for v in hand.values())
    assert scale > 0
    assert_close(
        {n: v / 3 for n, v in got.items()}, {n: v / 3 for n, v in hand.items()}, 1e-5 * scale
    )
    assert all(p.requires_grad for _, p in named)  # restored


def test_ewc_penalty_is_zero_at_the_anchor_and_the_formula_elsewhere():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 2))
    b = torch.nn.Parameter(torch.randn(4))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    named = [("a", a), ("b", b), ("frozen", frozen)]
    fisher = {n: torch.rand_like(p) for n, p in named}
    anchor = {n: p.detach().clone() for n, p in named}
    pen = protection.EwcPenalty(named, fisher, anchor, lam=3.0)
    assert pen.value_and_grad() == 0.0
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))
    delta = {n: torch.randn_like(p) for n, p in named}
    with torch.no_grad():
        for n, p in named:
            p += delta[n]
    a.grad = torch.ones_like(a)  # the data gradient is already there: the penalty's adds to it
    b.grad = None
    value = pen.value_and_grad(scale=2.0)
    want = 0.5 * 3.0 * sum(float((fisher[n] * delta[n] ** 2).sum()) for n, _ in named)
    assert value == pytest.approx(want, rel=1e-6)
    assert torch.allclose(a.grad, 1 + 2.0 * 3.0 * fisher["a"] * delta["a"], atol=1e-6)
    assert torch.allclose(b.grad, 2.0 * 3.0 * fisher["b"] * delta["b"], atol=1e-6)
    assert frozen.grad is None  # in the value, but a frozen parameter gets no gradient
    with pytest.raises(T2TError, match="EWC Fisher of this stage is missing"):
        protection.load_ewc(protection.ewc_file(Path("/nonexistent"), "s1"), torch.device("cpu"))
    with pytest.raises(ValueError, match="no Fisher"):
        protection.EwcPenalty(
            named + [("c", torch.nn.Parameter(torch.zeros(1)))], fisher, anchor, 1.0
        )


def _dist(run, a: str, b: str) -> float:
    x = load_file(str(run / "stages" / a / "adapter" / "adapter_model.safetensors"))
    y = load_file(str(run / "stages" / b / "adapter" / "adapter_model.safetensors"))
    return sum(float(((x[k] - y[k]) ** 2).sum()) for k in x) ** 0.5


def test_two_stages_with_ewc_write_the_fisher_log_the_penalty_and_stay_nearer(
    tmp_path, tiny_causal_dir
):
    plain = trainer.train(
        make_cfg(tmp_path / "plain", tiny_causal_dir, TWO_STAGES % "", "train.logging_steps=1"),
        eval_fn=None,
    )
    ewc = trainer.train(
        make_cfg(
            tmp_path / "ewc",
            tiny_causal_dir,
            TWO_STAGES % ", ewc: {lambda: 10000, samples: 8}",
            "train.logging_steps=1",
            "train.save_total_limit=0",
        ),
        eval_fn=None,
    )
    assert not (plain / "ewc").exists()
    path = ewc / "ewc" / "after-s1.safetensors"
    assert sorted(p.name for p in (ewc / "ewc").iterdir()) == ["after-s1.safetensors"]
    state = load_file(str(path))
    weights_s1 = trainable(ewc, 4)  # the checkpoint at the end of stage s1
    assert {k[len("anchor.") :] for k in state if k.startswith("anchor.")} == set(weights_s1)
    assert {k[len("fisher.") :] for k in state if k.startswith("fisher.")} == set(weights_s1)
    assert all(torch.equal(state[f"anchor.{k}"], v) for k, v in weights_s1.items())
    fisher = torch.cat([v.flatten() for k, v in state.items() if k.startswith("fisher.")])
    assert float(fisher.min()) >= 0 and float(fisher.max()) > 0
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["t2t"])
    assert meta == {"stage": "s1", "stages": ["s1"], "samples": 8, "gamma": 1.0}
    rows = metrics(ewc)
    assert all("ewc_penalty" not in r for r in rows if r["stage"] == "s1")
    pen = [r["ewc_penalty"] for r in rows if r["stage"] == "s2"]
    assert len(pen) == 8 and pen[0] == 0.0 and max(pen) > 0  # 0 at the anchor, then it grows
    # The penalty holds stage s2's adapter nearer to stage s1's than plain training does.
    near, far = _dist(ewc, "s1", "s2"), _dist(plain, "s1", "s2")
    assert near < 0.85 * far, (near, far)


def test_online_ewc_accumulates_fisher_over_stages(tmp_path, tiny_causal_dir):
    """Three stages, EWC in the third: F_after_s2 = gamma * F_after_s1 + Fisher(s2), the anchor is
    the latest weights. With gamma 0 the file holds Fisher(s2) alone (stages 1-2 train the same)."""
    runs = {}
    for gamma in (0.5, 0):
        runs[gamma] = trainer.train(
            make_cfg(
                tmp_path / f"g{gamma}",
                tiny_causal_dir,
                "stages=[{name: s1, tasks: [toy_polarity], steps: 2}, "
                "{name: s2, tasks: [toy_copy], steps: 2}, "
                "{name: s3, tasks: [toy_polarity, toy_copy], steps: 2, "
                f"ewc: {{lambda: 100, samples: 4, gamma: {gamma}}}}}]",
            ),
            eval_fn=None,
        )
    run = runs[0.5]
    f1 = load_file(str(run / "ewc" / "after-s1.safetensors"))
    f2 = load_file(str(run / "ewc" / "after-s2.safetensors"))
    only_s2 = load_file(str(runs[0] / "ewc" / "after-s2.safetensors"))
    assert all(torch.equal(f2[f"anchor.{k}"], v) for k, v in trainable(run, 4).items())
    fisher = [k for k in f2 if k.startswith("fisher.")]
    assert fisher and any(float(only_s2[k].max()) > 0 for k in fisher)
    assert_close({k: f2[k] for k in fisher}, {k: 0.5 * f1[k] + only_s2[k] for k in fisher}, 1e-9)
    with safe_open(str(run / "ewc" / "after-s2.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["t2t"])["stages"] == ["s1", "s2"]


# ------------------------------------------------------------------ PCGrad


def test_pcgrad_projects_conflicts_and_keeps_agreeing_gradients():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1 . g2 = -1
    out = protection.pcgrad(torch.stack([g1, g2]), protection.order_generator(0, 1))
    assert torch.allclose(out, torch.tensor([0.5, 1.5]))  # (g1 + g2/2) + (g2 + g1)
    assert float(out @ g1) >= 0 and float(out @ g2) >= 0
    torch.manual_seed(0)
    agree = torch.rand(3, 50) + 0.1  # positive entries: every pair agrees
    assert torch.allclose(
        protection.pcgrad(agree, protection.order_generator(0, 1)), agree.sum(0), atol=1e-6
    )
    # with three conflicting tasks the order matters: it comes from (seed, step) only
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.2], [-0.5, -1.0, 1.0]])
    outs = {
        tuple(protection.pcgrad(g, protection.order_generator(7, s)).tolist()) for s in range(12)
    }
    assert len(outs) > 1
    a = protection.pcgrad(g, protection.order_generator(7, 3))
    assert torch.equal(a, protection.pcgrad(g, protection.order_generator(7, 3)))


def test_pcgrad_step_on_a_tiny_model(tmp_path, tiny_causal_dir):
    """Real per-task gradients: the applied gradient never points against a task's gradient; where the
    tasks agree it is the plain step's gradient. lr 0 keeps the model fixed so both see the same."""
    runner, batcher, opt, model = _runner(tmp_path, tiny_causal_dir, 4, 1)
    opt.lr = 0.0
    pc = StepRunner(
        runner.acc, model, opt, runner.balancer, TASKS, "causal", 0.0, gradient_surgery="pcgrad"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    seen = {"conflict": 0, "agree": 0}
    for step in range(1, 7):
        window = batcher.next_window()
        runner.run(window)
        pc.run(window, step=step)
        plain_g, pc_g = (torch.cat([g.flatten() for g in gs.values()]) for gs in opt.grads[-2:])
        tokens = sum(runner.count(m) for m in window.micro)
        coef = runner.balancer.coefficients(tokens).float()
        tl, tt = runner.token_losses(window.micro[0])
        task_g = [
            torch.cat(
                [
                    g.flatten()
                    for g in torch.autograd.grad(
                        (coef[i] * tl[tt == i]).sum(), params, retain_graph=True
                    )
                ]
            )
            for i in tt.unique().tolist()
        ]
        assert torch.allclose(sum(task_g), plain_g, atol=1e-6)  # the per-task split is exact
        for g in task_g:
            assert float(pc_g @ g) >= -1e-9
        if len(task_g) == 2 and float(task_g[0] @ task_g[1]) < 0:
            seen["conflict"] += 1
            assert not torch.allclose(pc_g, plain_g, atol=1e-6)
        else:
            seen["agree"] += 1
            assert torch.allclose(pc_g, plain_g, atol=1e-6)
    assert seen["conflict"] and seen["agree"]  # both cases were exercised


# ------------------------------------------------------------------ resume


def test_resume_is_exact_with_ewc_pcgrad_unfreezing_and_layer_lr(tmp_path, tiny_causal_dir):
    over = (
        "stages=[{name: s1, tasks: [toy_polarity, toy_copy], steps: 3}, "
        "{name: s2, tasks: [toy_copy, toy_polarity], steps: 4, ewc: {lambda: 1000, samples: 6}}]",
        "train.gradient_surgery=pcgrad",
        "train.unfreeze_every=2",
        "train.layer_lr_decay=0.7",
        "train.save_steps=2",
        "train.logging_steps=1",
        "adapter.dropout=0.1",
    )
    seen_full: dict = {}
    full = trainer.train(
        make_cfg(tmp_path / "full", tiny_causal_dir, *over),
        eval_fn=None,
        on_step=lambda s, info: seen_full.__setitem__(s, info["records"]),
    )
    for kill in (3, 5):  # the end of stage s1 (Fisher not yet estimated), and inside stage s2
        cut = tmp_path / f"cut{kill}"

        def killer(step, info, kill=kill):
            if step == kill:
                raise RuntimeError("killed")

        with pytest.raises(RuntimeError, match="killed"):
            trainer.train(make_cfg(cut, tiny_causal_dir, *over), eval_fn=None, on_step=killer)
        assert (cut / "ewc").exists() == (kill == 5)
        seen: dict = {}
        trainer.train(
            make_cfg(cut, tiny_causal_dir, *over),
            eval_fn=None,
            on_step=lambda s, info, seen=seen: seen.__setitem__(s, info["records"]),
        )
        assert all(seen[s] == seen_full[s] for s in seen) and max(seen) == 7
        assert_close(trainable(full, 7), trainable(cut, 7), 1e-6)
        a = load_file(str(full / "ewc" / "after-s1.safetensors"))
        b = load_file(str(cut / "ewc" / "after-s1.safetensors"))
        assert_close(a, b, 1e-9)
        ma, mb = metrics(full), metrics(cut)
        assert [r["step"] for r in mb] == list(range(1, 8))
        assert max(abs(x["loss"] - y["loss"]) for x, y in zip(ma, mb)) < 1e-6
        assert (
            max(abs(x.get("ewc_penalty", 0) - y.get("ewc_penalty", 0)) for x, y in zip(ma, mb))
            < 1e-6
        )


# ------------------------------------------------------------------ freezing and layer LRs


def _by_block(weights: dict, block: int) -> dict:
    return {k: v for k, v in weights.items() if block_of(k) == block}


def test_gradual_unfreezing_keeps_frozen_blocks_bitwise_and_unfreezes_on_schedule(
    tmp_path, tiny_causal_dir
):
    run = trainer.train(
        make_cfg(
            tmp_path / "uf",
            tiny_causal_dir,
            "train.steps=4",
            "train.save_steps=1",
            "train.save_total_limit=0",
            "train.unfreeze_every=2",
        ),
        eval_fn=None,
    )
    w = {s: trainable(run, s) for s in (1, 2, 3, 4)}
    assert all(set(w[s]) == set(w[1]) for s in w)  # checkpoints hold frozen blocks too
    # stage steps 0-1 (global 1-2): block 1 only; from stage step 2 (global 3) blocks 0..1.
    # Step 1 runs at lr 0 (warm-up), so step 2 is the first update.
    b0 = {s: _by_block(w[s], 0) for s in w}
    b1 = {s: _by_block(w[s], 1) for s in w}
    assert all(torch.equal(b0[2][k], b0[1][k]) for k in b0[1])  # frozen: bitwise the same
    assert all(float(v.abs().max()) == 0 for k, v in b0[2].items() if "lora_B" in k)
    assert any(not torch.equal(b1[2][k], b1[1][k]) for k in b1[1])  # block 1 trained
    assert any(not torch.equal(b0[3][k], b0[2][k]) for k in b0[2])  # block 0 joined at step 3


def test_stage_train_layers_freeze_the_other_blocks(tmp_path, tiny_causal_dir):
    run = trainer.train(
        make_cfg(
            tmp_path / "tl",
            tiny_causal_dir,
            "stages=[{name: s1, tasks: [toy_polarity], steps: 3, train_layers: [-1, -1]}, "
            "{name: s2, tasks: [toy_copy], steps: 3, train_layers: [0, 0]}]",
            "train.save_steps=1",
            "train.save_total_limit=0",
        ),
        eval_fn=None,
    )
    w = {s: trainable(run, s) for s in range(1, 7)}
    b0_start = _by_block(w[1], 0)
    assert all(torch.equal(_by_block(w[3], 0)[k], v) for k, v in b0_start.items())  # s1: 0 frozen
    assert any(not torch.equal(_by_block(w[3], 1)[k], v) for k, v in _by_block(w[1], 1).items())
    b1_end_s1 = _by_block(w[3], 1)
    assert all(torch.equal(_by_block(w[6], 1)[k], v) for k, v in b1_end_s1.items())  # s2: 1 frozen
    assert any(not torch.equal(_by_block(w[6], 0)[k], v) for k, v in _by_block(w[3], 0).items())


def test_adapter_layers_for_lora_and_full_fine_tuning(tmp_path, tiny_causal_dir):
    lora = trainer.train(
        make_cfg(tmp_path / "l", tiny_causal_dir, "adapter.layers=[1, 1]", "train.steps=2"),
        eval_fn=None,
    )
    names = list(trainable(lora, 2))
    assert names and all("lora_" in n and block_of(n) == 1 for n in names)
    tuned, _, _, _ = loading.load_for_inference(lora / "adapter")  # peft reads its target list
    assert {block_of(n) for n, _ in tuned.named_parameters() if "lora_" in n} == {1}
    # full fine-tuning of the top block: it and the parts above it train; embeddings (tied with
    # the LM head) and block 0 stay bitwise the base model's
    run = trainer.train(
        make_cfg(
            tmp_path / "full",
            tiny_causal_dir,
            "adapter.method=full",
            "adapter.layers=[-1, -1]",
            "train.steps=3",
            "train.learning_rate=1e-3",
        ),
        eval_fn=None,
    )
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_causal_dir)
    top = {n for n, _ in base.named_parameters() if block_of(n) == 1} | {"model.norm.weight"}
    assert set(trainable(run, 3)) == top
    tuned = AutoModelForCausalLM.from_pretrained(run / "adapter").state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(tuned[k], v) == (k not in top), k


def test_layer_lr_decay_sets_each_groups_learning_rate(tmp_path, tiny_causal_dir):
    cfg = make_cfg(tmp_path / "u", tiny_causal_dir)
    lora, _, _ = loading.load_model_and_tokenizer(cfg.model, cfg.adapter)
    cfg = make_cfg(tmp_path / "u", tiny_causal_dir, "adapter.method=full")
    full, _, _ = loading.load_model_and_tokenizer(cfg.model, cfg.adapter)
    for model, want in (
        (lora, {0: 0.5, 1: 1.0}),
        (full, {-1: 0.25, 0: 0.5, 1: 1.0, 2: 1.0}),  # embeddings lowest, norm/head at the top rate
    ):
        opt = make_optimizer(model, 1e-2, 0.1, layer_lr_decay=0.5)
        make_scheduler(opt, "constant", 0, 10, 2e-2)
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        scales = [g["lr_scale"] for g in opt.param_groups]
        assert scales == sorted(scales, reverse=True)  # group 0 carries the schedule's own rate
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            g = group_of[id(p)]
            assert g["lr"] == pytest.approx(2e-2 * want[layers.position(name, 2)]), name
            assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
    plain = make_optimizer(lora, 1e-2, 0.0)
    assert [g["lr_scale"] for g in plain.param_groups] == [1.0]


# ------------------------------------------------------------------ errors


def test_config_errors_name_every_key_with_its_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "tasks: [{template: toy_polarity}, {template: toy_copy}]\n"
        "stages:\n"
        "  - {name: s1, tasks: [toy_polarity], steps: 2, ewc: {lambda: 1}}\n"
        "  - name: s2\n"
        "    tasks: [toy_copy]\n"
        "    steps: 2\n"
        "    train_layers: [3, 1]\n"
        "    ewc:\n"
        "      lambda: 0\n"
        "      gamma: 1.5\n"
        "      lamda: 2\n"
        "adapter: {layers: [1, 2, 3]}\n"
        "train:\n"
        "  gradient_surgery: pcgrad\n"
        "  loss_balancing: gradnorm\n"
        "  layer_lr_decay: 0\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(cfg, ["train.unfreeze_every=-1"])
    text = str(e.value)
    for want in (
        "run.yaml:11: stages[1].ewc.lamda: unknown key (did you mean 'lambda'?)",
        "run.yaml:3: stages[0].ewc: the first stage has no earlier stage to protect",
        "run.yaml:9: stages[1].ewc.lambda: must be > 0",
        "run.yaml:10: stages[1].ewc.gamma: must be in [0, 1]",
        "run.yaml:7: stages[1].train_layers: first block 3 is above last block 1",
        "run.yaml:12: adapter.layers: expected [first, last], got [1, 2, 3]",
        "run.yaml:14: train.gradient_surgery: pcgrad cannot be combined with train.loss_balancing",
        "run.yaml:16: train.layer_lr_decay: must be in (0, 1]",
        "<override>: train.unfreeze_every=-1: train.unfreeze_every: must be >= 0",
    ):
        assert want in text, want
    ok = load_config(
        data={
            "tasks": [{"template": "a"}, {"template": "b"}],
            "stages": [
                {"name": "s1", "tasks": ["a"], "steps": 1},
                {"name": "s2", "tasks": ["b"], "steps": 1, "ewc": {"lambda": 5, "samples": 3}},
            ],
        }
    )
    d = config_to_dict(ok)  # what RUN/config.yaml holds: the YAML key, and it loads back
    assert d["stages"][1]["ewc"] == {"lambda": 5.0, "samples": 3, "gamma": 1.0}
    assert load_config(data=d).stages[1].ewc == ok.stages[1].ewc


def test_backends_that_cannot_run_a_setting_refuse_it_at_its_line(tmp_path, monkeypatch):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "tasks: [{template: toy_polarity}, {template: toy_copy}]\n"
        "stages:\n"
        "  - {name: s1, tasks: [toy_polarity], steps: 2}\n"
        "  - {name: s2, tasks: [toy_copy], steps: 2, ewc: {lambda: 1}}\n"
        "train:\n"
        "  gradient_surgery: pcgrad\n"
        "  unfreeze_every: 2\n"
        "  layer_lr_decay: 0.9\n"
        "  mixed_precision: 'no'\n"
    )
    cfg = load_config(cfg_file)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    text = "\n".join(p.format() for p in preflight.backend_problems(cfg))
    for want in (
        "run.yaml:4: stages[1].ewc is not supported with FSDP or DeepSpeed ZeRO-3",
        "run.yaml:6: train.gradient_surgery is not supported with FSDP",
        "run.yaml:7: train.unfreeze_every is not supported with FSDP",
        "run.yaml:8: train.layer_lr_decay is not supported with FSDP",
    ):
        assert want in text, text
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    text = "\n".join(p.format() for p in preflight.backend_problems(cfg))
    assert "stages[1].ewc is not supported with DeepSpeed" in text
    assert "layer_lr_decay" not in text  # whole parameters: the groups work under ZeRO-1/2
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert preflight.backend_problems(cfg) == []
    fp16 = load_config(cfg_file, ["train.mixed_precision=fp16"])
    assert any(
        "pcgrad does not work with fp16" in p.message for p in preflight.backend_problems(fp16)
    )


def test_layer_ranges_are_checked_against_the_model(tmp_path, tiny_causal_dir):
    cfg = make_cfg(
        tmp_path / "r",
        tiny_causal_dir,
        "adapter.layers=[0, 5]",
        "stages=[{name: s1, tasks: [toy_polarity], steps: 1}, "
        "{name: s2, tasks: [toy_copy], steps: 1, train_layers: [-3, -1]}]",
    )
    with pytest.raises(T2TError) as e:
        preflight.check_run(cfg)
    text = str(e.value)
    assert "adapter.layers: [0, 5] is outside the model's 2 blocks" in text
    assert "stages[1].train_layers: [-3, -1] is outside the model's 2 blocks" in text
    # a stage range outside the blocks that have adapters trains nothing: refused with the config
    # when both count from the same end, else before training (when the model's depth is known)
    with pytest.raises(ConfigError, match=r"stages\[0\].train_layers: \[0, 0\] covers none"):
        make_cfg(
            tmp_path / "r2",
            tiny_causal_dir,
            "adapter.layers=[1, 1]",
            "stages=[{name: s1, tasks: [toy_polarity], steps: 1, train_layers: [0, 0]}]",
        )
    cfg = make_cfg(
        tmp_path / "r3",
        tiny_causal_dir,
        "adapter.layers=[1, 1]",
        "stages=[{name: s1, tasks: [toy_polarity], steps: 1, train_layers: [-2, -2]}]",
    )
    with pytest.raises(ConfigError, match=r"stages\[0\].train_layers: \[-2, -2\] covers none"):
        trainer.train(cfg, eval_fn=None)


# ------------------------------------------------------------------ two processes


@pytest.mark.parametrize("surgery", ["none", "pcgrad"])
def test_ddp_two_cpu_processes_match_one_with_ewc_and_unfreezing(
    tmp_path, tiny_causal_dir, surgery
):
    """Fisher summed over the processes' disjoint records; blocks frozen under DDP's own backward
    (find_unused_parameters), or PCGrad's per-task gradients reduced by hand: two processes = one
    process with accum 2."""
    over = [
        f"model.name={tiny_causal_dir}",
        "stages=[{name: s1, tasks: [sentiment_sst2, qa_squad], steps: 2}, "
        "{name: s2, tasks: [qa_squad, sentiment_sst2], steps: 2, ewc: {lambda: 1000, samples: 5}}]",
        f"train.gradient_surgery={surgery}",
        "train.unfreeze_every=1",
    ]
    run = tmp_path / "ddp"
    proc = accelerate_launch(
        TWO_CPU_PROCESSES,
        ["--config", str(REPO / "launch/configs/tiny_cpu.yaml"), *over, f"output_dir={run}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads((run / "train_summary.json").read_text())["weight_checksums"]
    assert a == b
    single = trainer.train(
        load_config(
            REPO / "launch/configs/tiny_cpu.yaml",
            over + ["train.grad_accum=2", f"output_dir={tmp_path / 'one'}"],
        ),
        eval_fn=None,
    )
    assert_close(
        load_file(str(run / "ewc" / "after-s1.safetensors")),
        load_file(str(single / "ewc" / "after-s1.safetensors")),
        1e-7,
    )
    assert_close(trainable(run, 4), trainable(single, 4), 1e-5)
    pen = [r.get("ewc_penalty") for r in metrics(run) if r["stage"] == "s2"]
    assert pen and all(p is not None for p in pen)
