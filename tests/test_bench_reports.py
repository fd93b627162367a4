"""The benchmark scripts' pure parts: doc sections, tables, plots, bootstrap statistics, hand prompts.

The benchmarks themselves take minutes to hours (docs/benchmarks.md); these tests check that the
numbers they measure end up in the right cells, on synthetic results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_forgetting  # noqa: E402
import bench_gpu  # noqa: E402
import bench_quality  # noqa: E402
import common  # noqa: E402
import quality_stats  # noqa: E402
import report_quality  # noqa: E402

TASKS = report_quality.TASKS


def _scores(base: float) -> dict:  # points (0-100), as the evaluation reports them
    return {t: round(100 * base + i, 4) for i, t in enumerate(TASKS)}


def test_update_doc_replaces_only_its_section(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nkeep b\n", encoding="utf-8")
    common.update_doc(doc, "## A", "new a")
    common.update_doc(doc, "## C", "new c")
    text = doc.read_text(encoding="utf-8")
    assert "old a" not in text and "new a" in text and "keep b" in text
    assert text.index("## A") < text.index("## B") < text.index("## C")


def test_bootstrap_intervals_and_ties():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(1)
    n = 300
    good = [quality_stats.RowStats("mean", 100.0 * (rng.random(n) < 0.8)) for _ in range(3)]
    same = [quality_stats.RowStats("mean", 100.0 * (rng.random(n) < 0.8)) for _ in range(3)]
    bad = [quality_stats.RowStats("mean", 100.0 * (rng.random(n) < 0.5)) for _ in range(3)]
    # seeds of one system that disagree widen its interval: the seed spread is part of the noise
    spread = [quality_stats.RowStats("mean", 100.0 * (rng.random(n) < p)) for p in (0.6, 0.8, 1.0)]
    out = quality_stats.bootstrap(
        {"a": {"t": good}, "b": {"t": same}, "c": {"t": bad}, "d": {"t": spread}},
        [("a", "b"), ("a", "c")],
        resamples=400,
    )
    a = out["systems"]["a"]["t"]
    assert a["low"] < a["mean"] < a["high"] and 70 < a["mean"] < 90 and a["high"] - a["low"] < 15
    assert out["pairs"]["a - b"]["t"]["tie"]  # two draws of the same 80 % system
    c = out["pairs"]["a - c"]["t"]
    assert not c["tie"] and c["low"] > 0  # 80 % vs 50 % on 300 rows is no tie
    assert out["systems"]["a"]["mean"]["mean"] == a["mean"]  # one task: the mean is that task
    d = out["systems"]["d"]["t"]
    assert d["high"] - d["low"] > a["high"] - a["low"] and len(d["seeds"]) == 3


def test_linked_systems_resample_seeds_together():
    """An evaluation setting of the same trained runs (`eval_of`) is paired over seeds too: with seeds
    that differ widely, the linked difference is narrower than the unlinked one."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(2)
    n = 300
    base = [100.0 * (rng.random(n) < p) for p in (0.5, 0.7, 0.9)]
    runs = [quality_stats.RowStats("mean", x) for x in base]
    # the same models, one more row right per seed
    plus = [
        quality_stats.RowStats("mean", np.where(np.arange(n) == k, 100.0, x))
        for k, x in enumerate(base)
    ]
    systems = {"multi": {"t": runs}, "multi_c": {"t": plus}}
    pairs = [("multi_c", "multi")]
    free = quality_stats.bootstrap(systems, pairs, resamples=400)["pairs"]["multi_c - multi"]["t"]
    tied = quality_stats.bootstrap(systems, pairs, resamples=400, linked={"multi_c": "multi"})
    link = tied["pairs"]["multi_c - multi"]["t"]
    assert link["high"] - link["low"] < 0.5 * (free["high"] - free["low"])
    assert link["diff"] == free["diff"]


def _summary(m: float, w: float = 2.0, seeds=(1.0, 2.0, 3.0)) -> dict:
    return {"mean": m, "low": m - w, "high": m + w, "seeds": list(seeds)}


def test_quality_report_tables_plot_and_targets(tmp_path):
    keys = (*TASKS, "mean")
    stats = {
        "systems": {
            "multi": {t: _summary(50.0 + i) for i, t in enumerate(keys)},
            "trl_hand": {t: _summary(45.0) for t in keys},
            "single": {t: _summary(60.0) for t in keys},
            "multi_equal": {t: _summary(59.0) for t in keys},
        },
        "pairs": {
            "multi - trl_hand": {
                **{
                    t: {"diff": 5.0 + i, "low": 1.0, "high": 9.0, "tie": False}
                    for i, t in enumerate(TASKS)
                },
                "ner_conll2003": {"diff": 1.0, "low": -2.0, "high": 4.0, "tie": True},
                "mean": {"diff": 6.0, "low": 2.0, "high": 10.0, "tie": False},
            }
        },
        "ratios": {"multi_equal / single": {"ratio": 98.3, "low": 96.0, "high": 100.5}},
    }
    results = {
        "settings": {
            "split": "validation",
            "rows": 300,
            "steps": 200,
            "batch_size": 8,
            "examples": 1600,
            "seeds": [1, 2, 3],
        },
        "runs": {"multi": {"1": {}, "2": {}, "3": {}}},
        "machine": common.machine(),
        "stats": stats,
    }
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    report_quality.write(results, doc)
    text = doc.read_text(encoding="utf-8")
    assert "## Multi-task quality with seeds" in text
    assert (
        "| SST-2 (accuracy) | 50.0 [48.0, 52.0] | 45.0 [43.0, 47.0] | 60.0 [58.0, 62.0] | 59.0 [57.0, 61.0] |"
        in text
    )
    assert "| CoNLL-2003 (span F1) | ≈ +1.0 [-2.0, +4.0] |" in text
    assert "| SST-2 (accuracy) | ▲ +5.0 [+1.0, +9.0] |" in text
    assert "**met** (mean difference +6.0 [+2.0, +10.0])" in text
    assert "≥ 97 % of the single-task mean: **missed** (98.3 % [96.0, 100.5]" in text
    assert (doc.parent / "img" / "quality_seeds.png").stat().st_size > 1000
    assert "Partial study" not in text
    assert "| multi | 3 | – | – |" in text  # no times recorded: dashes, not zeros
    results["runs"]["multi"] = {
        str(k): {"train_seconds": 600.0 * k, "eval_seconds": 300.0} for k in (1, 2, 3)
    }
    results["runs"]["multi_c"] = {
        "1": {"train_seconds": 600.0, "eval_seconds": 120.0, "eval_of": "multi"}
    }
    report_quality.write(results, doc)
    text = doc.read_text(encoding="utf-8")
    assert "| multi | 3 | 20.0 | 5.0 |" in text and "| multi_c | 1 | – | 2.0 |" in text
    assert "Cost so far: 1.3 h of this machine in all." in text  # (3600 + 900 + 120) s
    results["runs"]["bf16"] = {"1": {}}  # one seed so far: the report says the intervals lack it
    report_quality.write(results, doc)
    text = doc.read_text(encoding="utf-8")
    assert "**Partial study: bf16, multi_c have one seed so far.**" in text
    assert "| bf16 | 1 | – | – |" in text


class _WordTokenizer:
    """Whitespace 'tokenizer': enough for the prompt-length budget of the hand-written prompts."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}

    def decode(self, ids):
        return " ".join(ids)


@pytest.mark.parametrize("task", TASKS)
def test_hand_prompts_cover_every_task_and_cut_long_inputs(task):
    row = {
        "text": "a fine film",
        "premise": "p",
        "hypothesis": "h",
        "question": "who?",
        "tokens": ["EU", "rejects"],
        "context": "word " * 500,
        "document": "word " * 500,
    }
    prompt = bench_quality.hand_prompt(task, row, _WordTokenizer(), budget=50)
    assert prompt.endswith(":") and len(prompt.split()) < 80


def test_forgetting_section_reports_target_per_setting(tmp_path):
    def rep(f):
        return {
            "tasks": list(TASKS),
            "stages": ["stage1", "stage2"],
            "matrix": [[80.0, 60.0, 50.0, 0.0, 10.0], [80.0 - f, 60.0, 50.0, 70.0, 30.0]],
            "average_forgetting": f / 3,
            "forgetting": {"sentiment_sst2": f, "nli_3way": 0.0, "qa_squad": 0.0},
            "backward_transfer": -f / 3,
            "final_average": 50.0,
            "run": str(tmp_path),
            "limit": 100,
        }

    results = {
        "settings": {"stage_steps": 100, "batch_size": 8, "per_task": 200, "limit": 100},
        "machine": common.machine(),
        "settings_results": {
            "0": rep(30.0),
            "10": rep(3.0),
            "30": rep(9.0),
            "10_lr0.0001": rep(1.5),
        },
    }
    text = bench_forgetting.section(results, tmp_path / "benchmarks.md")
    assert "| 0 % | 100 | 10.0 | 10.0 | -10.0 | 50.0 | – |" in text
    assert "| 10 % | 100 | 1.0 | 1.0 | -1.0 | 50.0 | met / met |" in text
    assert "| 30 % | 100 | 3.0 | 3.0 | -3.0 | 50.0 | **not met** / **not met** |" in text
    assert "| 10 %, stage-2 LR 0.0001 | 100 | 0.5 | 0.5 | -0.5 | 50.0 | met / met |" in text
    assert (
        bench_forgetting.setting_key(0.1, 1e-4) == "10_lr0.0001"
        and bench_forgetting.setting_key(0.3, None) == "30"
    )
    # a gain on one task hides a loss on another in the standard average, not in "losses only"
    mixed = {"forgetting": {"sentiment_sst2": 14.0, "nli_3way": -21.0, "qa_squad": 0.6}}
    assert bench_forgetting.losses_only(mixed) == pytest.approx((14.0 + 0.0 + 0.6) / 3)
    assert "| stage2 | 50.0 | 60.0 | 50.0 | 70.0 | 30.0 |" in text
    assert "**Replay 10 %** — scores after each stage:" in text


def test_forgetting_named_settings_and_seeds(tmp_path):
    """--settings / --seeds: the run config of each named setting, result keys, and the
    mean-over-seeds table."""
    import argparse

    args = argparse.Namespace(
        stage2_lr=None,
        share=0.2,
        ewc_lambda=500.0,
        ewc_samples=50,
        freeze_layers=[-15, -1],
        stage_steps=10,
        per_task=20,
        batch_size=8,
        limit=10,
        work=str(tmp_path),
    )
    cfgs = {
        n: bench_forgetting.run_config(args, tmp_path, 0.0, n, 2)
        for n in ("replay_balanced", "replay_ewc", "freeze", "ewc", "none")
    }
    got = {
        n: (
            c.seed,
            c.replay.enabled,
            c.replay.label_balanced,
            c.stages[1].ewc,
            c.stages[1].train_layers,
        )
        for n, c in cfgs.items()
    }
    assert got["replay_balanced"] == (2, True, True, None, None)
    assert cfgs["replay_balanced"].replay.share == 0.2
    assert got["replay_ewc"][:3] == (2, True, False) and got["replay_ewc"][3].lam == 500.0
    assert got["ewc"][1] is False and got["ewc"][3].samples == 50
    assert got["freeze"] == (2, False, False, None, [-15, -1])
    assert got["none"] == (2, False, False, None, None)
    assert cfgs["freeze"].output_dir == str(tmp_path / "freeze_s2")
    plain = bench_forgetting.run_config(args, tmp_path, 0.1)  # the share runs keep their folders
    assert plain.output_dir == str(tmp_path / "replay_10") and plain.seed == 42
    assert bench_forgetting.setting_key(0, 1e-4, "replay_ewc", 3) == "replay_ewc_lr0.0001_s3"
    assert bench_forgetting.setting_label("replay_ewc_lr0.0001_s3") == (
        "replay + EWC (lambda 1000), stage-2 LR 0.0001, seed 3"
    )
    # Another lambda is another setting (its own key, folder and label); the other settings keep
    # theirs, and a report stands when only what does not shape its run changed.
    assert cfgs["ewc"].output_dir == str(tmp_path / "ewc_lam500_s2")
    assert cfgs["freeze"].output_dir == str(tmp_path / "freeze_s2")
    assert bench_forgetting.setting_key(0, None, "ewc", 1, 1000.0) == "ewc_s1"
    assert bench_forgetting.setting_key(0, None, "replay", 1, 500.0) == "replay_s1"
    assert bench_forgetting.setting_label("ewc_lam10000_s1") == "EWC (lambda 10000), seed 1"
    before = {"limit": 300, "share": 0.1, "ewc_lambda": 1000.0, "freeze_layers": [-15, -1]}
    now = dict(before, ewc_lambda=1e4)
    rel = bench_forgetting.relevant_settings
    assert rel(before, "replay_s1") == rel(now, "replay_s1")
    assert rel(before, "freeze_s1") == rel(now, "freeze_s1")
    assert rel(before, "replay_ewc_s1") != rel(now, "replay_ewc_s1")
    assert rel(before, "none_s2") == {"limit": 300}

    def rep(f, bwt):
        return {
            "tasks": list(TASKS),
            "stages": ["stage1", "stage2"],
            "matrix": [[80.0] * 5, [80.0 - f] + [80.0] * 4],
            "average_forgetting": f,
            "forgetting": {"sentiment_sst2": f},
            "backward_transfer": bwt,
            "final_average": 50.0,
        }

    results = {
        "settings": {
            "stage_steps": 100,
            "batch_size": 8,
            "per_task": 200,
            "limit": 100,
            "share": 0.1,
            "ewc_lambda": 1000.0,
            "ewc_samples": 100,
            "freeze_layers": [-15, -1],
        },
        "machine": common.machine(),
        "settings_results": {
            "ewc_s1": rep(1.0, -1.0),
            "ewc_s2": rep(3.0, -2.0),
            "none_s1": rep(9.0, 0.0),
        },
    }
    text = bench_forgetting.section(results, tmp_path / "benchmarks.md")
    assert "| EWC (lambda 1000) | 2 | 2.0 ± 1.4 | 2.0 ± 1.4 | -1.5 ± 0.7 | 50.0 ± 0.0 |" in text
    assert "| none | 1 | 9.0 ± 0.0 |" in text
    assert (
        "| EWC (lambda 1000), seed 2 | – | 3.0 | 3.0 | -2.0 | 50.0 | **not met** / **not met** |"
        in text
    )
    assert "| none, seed 1 | – | 9.0 | 9.0 | 0.0 | 50.0 | – |" in text
    assert "`ewc: {lambda: 1000, samples: 100}`" in text
    assert "**Setting: EWC (lambda 1000), seed 1** — scores after each stage:" in text


def _tiny_model_dir(tmp_path, kind: str) -> Path:
    from transformers import AutoConfig

    spec = dict(bench_gpu.SHAPES["t5-base" if kind == "t5" else "qwen2.5-1.5b"])
    spec.update(bench_gpu.TINY["t5-base" if kind == "t5" else "qwen2.5-1.5b"], vocab_size=100)
    spec.pop("model_type")
    AutoConfig.for_model(kind, **spec).save_pretrained(tmp_path / kind)
    return tmp_path / kind


def test_gpu_flop_model_counts_every_linear_weight_once(tmp_path):
    """Causal: body + head = all linear weights; FLOPs = 4·N·s + 4·V·h·targets + 6·N_lora·s + 6·L·d·s²."""
    fm = bench_gpu.flop_model(_tiny_model_dir(tmp_path, "qwen2"), r=4)
    h, inter, layers, kv = (
        64,
        128,
        2,
        2 * 16,
    )  # TINY: hidden 64, MLP 128, 2 layers, 2 KV heads of 16
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q, o (h×h) + k, v (h×kv) + gate, up, down
    assert fm["body"] == layers * per_layer and fm["head"] == 100 * h and not fm["enc_dec"]
    assert fm["lora"] == layers * 4 * (2 * (h + h) + 2 * (h + kv) + 2 * (h + inter) + (inter + h))
    s, k = 10, 3
    want = 4 * fm["body"] * s + 4 * fm["head"] * k + 6 * fm["lora"] * s + 6 * layers * h * s * s
    assert bench_gpu.example_flops(fm, s, 0, k) == want


def test_gpu_flop_model_splits_t5_into_encoder_decoder_and_cross_kv(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    folder = _tiny_model_dir(tmp_path, "t5")
    fm = bench_gpu.flop_model(folder, r=4)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(folder))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert fm["enc"] + fm["dec"] + fm["cross_kv"] + fm["head"] == linear
    assert fm["cross_kv"] == 2 * 2 * 64 * 64  # 2 decoder layers × (k, v) of d_model × heads·d_kv
    # a longer source costs more through the encoder and the cross-attention K/V, a longer target through the decoder
    base = bench_gpu.example_flops(fm, 8, 4, 4)
    assert bench_gpu.example_flops(fm, 9, 4, 4) - base > 4 * (fm["enc"] + fm["cross_kv"])
    assert bench_gpu.example_flops(fm, 8, 5, 4) - base > 4 * fm["dec"]


def _gpu_result(tokens_per_s: float, packed: bool) -> dict:
    return {
        "tokens_per_s": tokens_per_s,
        "packing_applied": packed,
        "peak_alloc_gib": 7.0,
        "tokens_per_step": 100,
        "padding_efficiency": 0.9,
        "step_s": 1.0,
        "tflops": 50.0,
        "mfu": 0.05,
        "mfu_6n": 0.08,
        "outside_step_share": 0.1,
        "peak_reserved_gib": 8.0,
    }


def test_gpu_table_and_packing_ratios_say_when_the_probe_refused():
    v = dict(bench_gpu.VARIANTS)
    results = {
        "lora-1.5b-s1024-packed": {
            "variant": v["lora-1.5b-s1024-packed"],
            **_gpu_result(2500.0, True),
        },
        "lora-1.5b-s1024-padded": {
            "variant": v["lora-1.5b-s1024-padded"],
            **_gpu_result(1000.0, False),
        },
        "qlora-7b-s1024-packed": {
            "variant": v["qlora-7b-s1024-packed"],
            **_gpu_result(300.0, False),
        },
        "qlora-7b-s1024-padded": {
            "variant": v["qlora-7b-s1024-padded"],
            **_gpu_result(300.0, False),
        },
        "qlora-7b-s2048-packed": {"variant": v["qlora-7b-s2048-packed"], "error": "out of memory"},
    }
    rat = bench_gpu.ratios(results)
    assert any(r.startswith("lora-1.5b-s1024: packed/padded tokens/s = 2.50×") for r in rat)
    assert any(r.startswith("qlora-7b-s1024: no comparison") for r in rat)
    tbl = bench_gpu.table(results)
    assert "off (probe refused)" in tbl and "| 2,500 |" in tbl and "out of memory" in tbl


def _gpu_meta() -> dict:
    return {
        "machine": {"cuda": "NVIDIA H200", "torch": "2.11", "date": "2026-12-02"},
        "bitsandbytes": "0.50.2",
        "steps": 5,
        "warmup": 2,
        "peak_flops": bench_gpu.H100_BF16_DENSE,
        "mixed_precision": "bf16",
    }


def test_gpu_table_and_section_show_memory_by_phase_and_dashes_without_cuda():
    v = dict(bench_gpu.VARIANTS)
    measured = {
        **_gpu_result(2500.0, True),
        "mem_load_gib": 5.1,
        "mem_load_peak_gib": 6.2,
        "mem_prepare_gib": 6.0,
        "mem_prepare_peak_gib": 6.5,
        "step_peak_first_gib": 9.25,
        "step_peak_median_gib": 8.0,
        "step_peak_max_gib": 8.4,
        "peak_alloc_gib": 9.5,
        "peak_reserved_gib": 11.0,
    }
    cpu = {**_gpu_result(300.0, False), "padding_efficiency": 0.41}
    cpu.update(dict.fromkeys(bench_gpu.PhaseMemory(False).fields([None, None], 1, 1)))
    results = {
        "qlora-7b-s1024-packed": {"variant": v["qlora-7b-s1024-packed"], **measured},
        "t5base-lora-s1024": {"variant": v["t5base-lora-s1024"], **cpu},
    }
    tbl = bench_gpu.table(results)
    head = tbl.splitlines()[0]
    assert "load GiB (after / peak)" in head and "step peak GiB (first / median / max)" in head
    assert "| padding eff. |" in head
    assert tbl.splitlines()[1].count("|") == head.count("|")
    assert "| 5.10 / 6.20 | 6.00 / 6.50 | 9.25 / 8.00 / 8.40 | 9.50 | 11.00 |" in tbl
    assert "| 0.41 |" in tbl and "| – / – | – / – | – / – / – | – | – |" in tbl
    body = bench_gpu.section_body(_gpu_meta(), results)
    assert tbl in body and "`--mixed-precision bf16`" in body
    assert "*load* = after the product's loader returns" in body and "*step peak*" in body


def test_gpu_phase_memory_keeps_each_phase_and_the_run_peak(monkeypatch):
    import torch

    gib = 2**30
    state = {"now": 0, "peak": 0, "reserved": 0, "resets": 0}

    def alloc(n):  # allocate n GiB and free it again: the peak rises, the current level stays
        state["peak"] = max(state["peak"], state["now"] + n)
        state["reserved"] = max(state["reserved"], state["now"] + n + 1)

    def hold(n):  # n GiB stay allocated
        state["now"] = n
        alloc(0)

    def reset():
        state.update(peak=state["now"], reserved=state["now"], resets=state["resets"] + 1)

    for name, fn in {
        "synchronize": lambda: None,
        "memory_allocated": lambda: state["now"] * gib,
        "max_memory_allocated": lambda: state["peak"] * gib,
        "max_memory_reserved": lambda: state["reserved"] * gib,
        "reset_peak_memory_stats": reset,
    }.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    mem = bench_gpu.PhaseMemory(True)
    hold(4)
    alloc(3)  # the loader's transient (e.g. quantising a layer)
    assert mem.mark("load") == (4.0, 7.0)
    hold(5)
    assert mem.mark("prepare") == (5.0, 5.0)
    alloc(1)  # the packing check
    mem.mark("before_steps")
    peaks = []
    for extra in (6, 2, 3, 2):  # step 1 (optimiser state), then the timed ones (warmup 1, timed 3)
        alloc(extra)
        peaks.append(mem.mark(None)[1])
    out = mem.fields(peaks, 1, 3)
    assert out["mem_load_gib"] == 4.0 and out["mem_load_peak_gib"] == 7.0
    assert out["mem_prepare_gib"] == 5.0 and out["mem_before_steps_peak_gib"] == 6.0
    assert (out["step_peak_first_gib"], out["step_peak_median_gib"], out["step_peak_max_gib"]) == (
        11.0,
        7.0,
        8.0,
    )
    assert out["peak_alloc_gib"] == 11.0 and out["peak_reserved_gib"] == 12.0
    assert out["step_peaks_gib"] == [11.0, 7.0, 8.0, 7.0]
    assert out["mem_phases"] == ["before_steps", "load", "prepare"] and state["resets"] == 8


def test_gpu_targets_say_met_not_met_or_failed():
    v = dict(bench_gpu.VARIANTS)
    fast = {**_gpu_result(4100.0, True), "peak_alloc_gib": 9.0, "mfu": 0.3}
    results = {
        "qlora-7b-s1024-packed": {"variant": v["qlora-7b-s1024-packed"], **fast},
        "lora-1.5b-s1024-packed": {"variant": v["lora-1.5b-s1024-packed"], **_gpu_result(1, True)},
        "t5base-lora-s1024": {"variant": v["t5base-lora-s1024"], "error": "out of memory"},
    }
    lines = bench_gpu.targets(results)
    assert lines[0].startswith("qlora-7b-s1024-packed: peak alloc ≤ 10 GiB: met")
    assert lines[1].startswith("qlora-7b-s1024-packed: ≥ 2× 2,000 tokens/s: met")
    assert lines[2].startswith("lora-1.5b-s1024-packed: MFU ≥ 25 %: not met")
    assert lines[3] == "t5base-lora-s1024: ≥ 3× 6,637 tokens/s: run failed (out of memory)"


def test_gpu_child_run_on_cpu_counts_padding_and_leaves_memory_null(tiny_causal_dir, real_data_dir):
    """The child process of one variant at toy size: every hook fires, memory fields are null."""
    spec = {
        "variant": {
            "shape": "qwen2.5-1.5b",
            "method": "lora",
            "seq": 256,
            "packing": "on",
            "batch": 4,
        },
        "folder": str(tiny_causal_dir),
        "data_dir": str(real_data_dir),
        "warmup": 1,
        "steps": 1,
        "tiny": True,
        "peak_flops": 1e12,
    }
    r = bench_gpu.run_child("run", spec)
    assert "error" not in r, r.get("error")
    assert r["steps"] == 1 and r["tokens_per_s"] > 0 and 0 < r["padding_efficiency"] <= 1
    assert r["mem_phases"] == ["before_steps", "load", "prepare"]
    keys = [k for k in r if k.endswith("_gib")]
    assert {
        "mem_load_gib",
        "mem_prepare_peak_gib",
        "step_peak_median_gib",
        "peak_alloc_gib",
    } <= set(keys)
    assert all(r[k] is None for k in keys)


def test_train_bench_child_runs_our_trainer(tiny_causal_dir, real_data_dir, monkeypatch):
    """bench_train's `ours` child at toy size: its StepRunner wrapper keeps up with the trainer's
    calls (a wrapper that dropped `step=` made every run of the benchmark fail)."""
    import bench_train

    original = bench_train.run_config

    def tiny(data_dir, out_dir, total_steps, packing="auto"):
        cfg = original(data_dir, out_dir, total_steps, packing)
        cfg.model.name, cfg.model.max_length, cfg.train.batch_size = str(tiny_causal_dir), 128, 2
        return cfg

    monkeypatch.setattr(bench_train, "run_config", tiny)
    spec = {"data_dir": str(real_data_dir), "warmup": 1, "steps": 2, "profile_steps": 0}
    r = bench_train.child_ours(spec, "auto")
    assert r["input_tokens_per_s"] > 0 and r["timed_steps"] == 2, r


def test_forgetting_study_reuses_reports_measured_with_the_same_settings(
    real_data_dir, tmp_path, monkeypatch
):
    """A machine that lost the work folder does not retrain what --out already holds."""
    calls = []

    def fake(args, data, share, setting=None, seed=None):
        calls.append((share, setting, seed))
        return {"average_forgetting": 1.0}

    monkeypatch.setattr(bench_forgetting, "one_setting", fake)
    argv = [str(real_data_dir), "--replay", "0", "--settings", "ewc", "--seeds", "1,2"]
    argv += ["--out", str(tmp_path / "f.json"), "--work", str(tmp_path / "w"), "--no-doc"]
    assert bench_forgetting.main(argv) == 0 and len(calls) == 4
    assert bench_forgetting.main(argv) == 0 and len(calls) == 4  # all reused
    assert bench_forgetting.main([*argv, "--limit", "50"]) == 0 and len(calls) == 8  # new settings


def test_forgetting_intervals_over_examples_and_seeds(tmp_path):
    """With per-example rows (attached from the run folder's stage results), the seeded settings get
    means over seeds with bootstrap intervals; the means are the reports' own numbers, the new tasks
    are compared with no protection, and the target needs the interval's upper end ≤ 2."""
    import json

    import numpy as np

    rng = np.random.default_rng(0)

    def rows(p):  # 60 examples right with probability p, as accuracy per row (0 or 100)
        return {"kind": "mean", "values": list(100.0 * (rng.random(60) < p))}

    def rep(name, drop, new):  # stage-1 tasks lose `drop`; the new tasks reach `new`
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        scores = {"stage1": [0.8, 0.6, 0.5, 0.0, 0.1], "stage2": [0.8 - drop, 0.6, 0.5, new, new]}
        matrix = []
        for st, ps in scores.items():
            # stage 1 scores only what it trained (`learned_only`), stage 2 every task
            res = {
                t: {"per_example": rows(p)}
                for t, p in zip(TASKS, ps)
                if st == "stage2" or t in TASKS[:3]
            }
            (run / "eval" / f"stage-{st}-validation.json").write_text(json.dumps({"tasks": res}))
            matrix.append(
                [
                    float(np.mean(res[t]["per_example"]["values"])) if t in res else None
                    for t in TASKS
                ]
            )
        forg = {t: matrix[0][i] - matrix[1][i] for i, t in enumerate(TASKS[:3])}
        return bench_forgetting.attach_rows(
            {
                "tasks": list(TASKS),
                "stages": ["stage1", "stage2"],
                "learned_at": {t: "stage1" if i < 3 else "stage2" for i, t in enumerate(TASKS)},
                "matrix": matrix,
                "forgetting": forg,
                "average_forgetting": float(np.mean(list(forg.values()))),
                "backward_transfer": -float(np.mean(list(forg.values()))),
                "final_average": float(np.mean(matrix[1])),
                "run": str(run),
                "split": "validation",
                "stage2_step_seconds": 1.0 if name.startswith("none") else 1.1,
            }
        )

    reports = {
        **{f"none_s{s}": rep(f"none_s{s}", 0.4, 0.7 if s < 3 else 0.2) for s in (1, 2, 3)},
        **{f"replay_s{s}": rep(f"replay_s{s}", 0.0, 0.7) for s in (1, 2, 3)},
        **{f"ewc_s{s}": rep(f"ewc_s{s}", 0.0, 0.3) for s in (1, 2)},
    }
    assert set(reports["none_s1"]["rows"]) == {"stage1", "stage2"}
    st = bench_forgetting.forgetting_stats(reports, resamples=200)
    assert st["old_tasks"] == list(TASKS[:3]) and st["new_tasks"] == list(TASKS[3:])
    none, replay, ewc = (st["settings"][g] for g in ("none", "replay", "ewc"))
    assert (none["seeds"], ewc["seeds"]) == (3, 2)
    want = np.mean([reports[f"none_s{s}"]["average_forgetting"] for s in (1, 2, 3)])
    assert none["avg_forgetting"]["mean"] == pytest.approx(want)
    for r in (none, replay, ewc):
        for k in ("avg_forgetting", "losses_only", "bwt", "final_mean"):
            assert r[k]["low"] <= r[k]["mean"] <= r[k]["high"]
    assert none["avg_forgetting"]["low"] > 5 and none["bwt"]["high"] < 0  # 0.4 of SST-2 lost
    assert none[f"vs_none:{TASKS[3]}"] == pytest.approx(
        {"mean": 100.0, "low": 100.0, "high": 100.0, "seeds": 3}
    )
    assert ewc[f"vs_none:{TASKS[3]}"]["high"] < 95  # EWC starves the new tasks here

    # against the unprotected runs of its own seeds (1 and 2), not of seed 3 as well
    def final(name, seeds):
        return np.mean([reports[f"{name}_s{s}"]["matrix"][1][3] for s in seeds])

    paired = 100 * final("ewc", (1, 2)) / final("none", (1, 2))
    assert ewc[f"vs_none:{TASKS[3]}"]["mean"] == pytest.approx(paired)
    assert abs(paired - 100 * final("ewc", (1, 2)) / final("none", (1, 2, 3))) > 3
    assert ewc[f"vs_none:{TASKS[3]}"]["seeds"] == 2
    text = bench_forgetting.ci_table(reports)
    assert "| EWC (lambda 1000) | 2 |" in text and "new tasks) | 1.10× |" in text
    assert "| none | 3 |" in text and "| 100.0 % [100.0, 100.0] |" in text
    assert "| none | 3 |" in text
    # without rows (a report from before, or a lost run folder) the plain mean ± sd table is kept
    bare = {k: {kk: v for kk, v in r.items() if kk != "rows"} for k, r in reports.items()}
    assert bench_forgetting.ci_table(bare) == ""


def test_every_trained_quality_system_has_a_valid_run_config(tmp_path):
    """Each system our trainer runs (ablations, the joint-training knobs of issue 16) turns into a run
    config that validates, with its overrides applied: a typo in a dotted key fails here, not an hour
    into the study."""
    import argparse

    args = argparse.Namespace(steps=10, batch_size=4, rows=5)
    dirs = {t: tmp_path / "data" / t for t in TASKS}
    for d in dirs.values():
        d.mkdir(parents=True)
    for s in bench_quality.SYSTEMS:
        if s.kind != "ours" or s.eval_of or s.one_variant:
            continue
        cfg = bench_quality.run_config(args, s, 3, dirs, tmp_path / "runs" / s.name / "s3")
        assert cfg.seed == 3 and cfg.train.steps == 10 * s.steps_factor
        for key, value in s.overrides:
            obj = cfg
            for part in key.split("."):
                obj = getattr(obj, part)
            assert obj == value, (s.name, key)
    picked = {n: bench_quality.BY_NAME[n].overrides for n in ("uncertainty", "gradnorm", "pcgrad")}
    assert picked["pcgrad"] == (("train.gradient_surgery", "pcgrad"),)


def test_forgetting_borrows_the_same_seeds_stage_results(tmp_path):
    """Each setting after the first gets the same seed's stage results to check against its own
    bundle (forgetting_run reads one back only when its fingerprint matches)."""
    (tmp_path / "none_s1" / "eval").mkdir(parents=True)
    (tmp_path / "none_s1" / "eval" / "stage-stage1-validation.json").write_text("{}")
    (tmp_path / "none_s2" / "eval").mkdir(parents=True)
    (tmp_path / "none_s2" / "eval" / "stage-stage1-validation.json").write_text('{"s": 2}')
    (tmp_path / "ewc_s1" / "eval").mkdir(parents=True)
    bench_forgetting.borrow_stage_results(tmp_path / "ewc_s1", 1)
    assert (tmp_path / "ewc_s1" / "eval" / "stage-stage1-validation.json").read_text() == "{}"
    bench_forgetting.borrow_stage_results(tmp_path / "freeze_s2", 2)
    assert (tmp_path / "freeze_s2" / "eval" / "stage-stage1-validation.json").read_text() == (
        '{"s": 2}'
    )


def test_forgetting_settings_start_from_the_seeds_stage1_exactly(tmp_path, tiny_causal_dir):
    """`borrow_stage1`: a setting started from another setting's checkpoint at the end of stage 1
    (same seed) ends exactly as if it had trained stage 1 itself, with replay and EWC (both act
    after stage 1: the buffer is filled and the Fisher estimated on resume), and is timed per
    stage-2 step like one that trained it."""
    from test_training import assert_close, make_cfg, trainable

    from t2t_mtl.training import trainer

    stages = (
        "stages=[{name: s1, tasks: [toy_polarity, toy_copy], steps: 4}, "
        "{name: s2, tasks: [toy_copy], steps: 4%s}]"
    )
    keep = ("train.save_steps=2", "train.save_total_limit=0", "train.logging_steps=1")
    protect = (
        stages % ", ewc: {lambda: 1000, samples: 6}",
        "replay.enabled=true",
        "replay.per_task=6",
        "replay.share=0.25",
        *keep,
    )
    trainer.train(make_cfg(tmp_path / "none_s1", tiny_causal_dir, stages % "", *keep), eval_fn=None)
    full = trainer.train(make_cfg(tmp_path / "full", tiny_causal_dir, *protect), eval_fn=None)
    run = tmp_path / "replay_ewc_s1"
    assert bench_forgetting.borrow_stage1(run, 1, 4) == tmp_path / "none_s1"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4"]
    assert bench_forgetting.borrow_stage1(run, 1, 4) is None  # it has a checkpoint now
    assert bench_forgetting.borrow_stage1(tmp_path / "x_s2", 2, 4) is None  # no such seed
    trainer.train(make_cfg(run, tiny_causal_dir, *protect), eval_fn=None)
    assert_close(trainable(full, 8), trainable(run, 8), 1e-7)
    assert (full / "replay").is_dir() and (run / "replay").is_dir()
    for sub in ("ewc", "replay"):
        a = sorted(p.relative_to(full) for p in (full / sub).rglob("*") if p.is_file())
        b = sorted(p.relative_to(run) for p in (run / sub).rglob("*") if p.is_file())
        assert a == b and all((full / x).read_bytes() == (run / x).read_bytes() for x in a), sub
    assert bench_forgetting.stage2_step_seconds(run, 4) > 0
    assert bench_forgetting.stage2_step_seconds(tmp_path / "missing", 4) is None


def test_transfer_systems_score_heldout_tasks_three_ways_and_apart(
    tiny_causal_dir, real_data_dir, tmp_path, monkeypatch
):
    """The zero-shot transfer settings at toy size: the untuned model on RTE and AG News through the
    template, a free instruction and ranked choices, each kept as an evaluation with per-row statistics;
    their statistics come out under `transfer`, apart from the five trained tasks (whose mean must stay
    a mean over those five)."""
    import argparse
    import json

    from t2t_mtl.tasks.catalogue import load_task

    original = common.default_recipe

    def tiny():
        d = original()
        d["model"].update(name=str(tiny_causal_dir), max_length=128)
        d["eval"].update(max_new_tokens=4, batch_size=4)
        return d

    monkeypatch.setattr(common, "default_recipe", tiny)
    monkeypatch.setattr(bench_quality, "ROOT", tmp_path)
    monkeypatch.setattr(bench_quality, "EVALS", tmp_path / "evals")
    monkeypatch.setattr(quality_stats, "ROOT", tmp_path)
    work = tmp_path / "work"
    args = argparse.Namespace(split="validation", rows=5, steps=1, batch_size=2, work=str(work))
    dirs = bench_quality.transfer_data(real_data_dir, work, args.rows)
    assert set(dirs) == set(bench_quality.TRANSFER_TASKS)
    for d in dirs.values():  # seeded draw: the same rows every time, and only `rows` of them
        assert len((d / "validation.jsonl").read_text().splitlines()) == 5
    five = {t: real_data_dir / f for t, f in common.SLICES}
    ecfg = bench_quality.eval_config(args, five, dirs)
    runs = {}
    for mode in bench_quality.TRANSFER_MODES:
        name = "transfer_base" + ("" if mode == "template" else f"_{mode}")
        system = bench_quality.BY_NAME[name]
        info = bench_quality.run_one(args, system, 1, (five, five), ecfg)
        assert info["transfer"] == mode
        runs[name] = {"0": info}
        ev = json.loads((tmp_path / info["eval"]).read_text())
        assert set(ev["tasks"]) == set(bench_quality.TRANSFER_TASKS)
        for task, e in ev["tasks"].items():
            assert len(e["texts"]) == len(e["row_ids"]) == 5
            assert e["per_example"] and e["primary"] is not None
            if mode == "rank":  # no answer can be unreadable: every text is one of the choices
                choices = load_task(task).answer_choices
                assert set(e["texts"]) <= set(choices) and e["invalid_rate"] == 0
    # one of the five trained tasks' systems next to them, from a fake cached evaluation
    fake = {t: ev["tasks"]["nli_2way"] for t in TASKS}
    (tmp_path / "evals" / "multi.json").write_text(json.dumps({"tasks": fake}))
    runs["multi"] = {"1": {"eval": "evals/multi.json"}}
    stats = quality_stats.study_stats({"runs": runs})
    assert set(stats["systems"]) == {"multi"} and "mean" in stats["systems"]["multi"]
    tr = stats["transfer"]["systems"]
    assert set(tr) == {"transfer_base", "transfer_base_free", "transfer_base_rank"}
    assert set(tr["transfer_base_rank"]) == {"nli_2way", "topic_ag_news", "mean"}
    doc = tmp_path / "benchmarks.md"
    report_quality.write_transfer(
        {"settings": {"rows": 5}, "runs": runs, "stats": {"transfer": stats["transfer"]}}, doc
    )
    text = doc.read_text()
    assert "## Zero-shot transfer with seeds" in text
    assert "| RTE (accuracy) |" in text and "| **mean of the 2** |" in text
