"""Training throughput of the default recipe versus a plain TRL `SFTTrainer` (with and without packing).

    .venv/bin/python bench/bench_train.py [DATA_DIR] [--warmup 2] [--steps 10] [--profile-steps 2]
        [--variants ours,trl_packed,trl_padded] [--pool 2000] [--max-other 0.1] [--retries 2]
        [--out bench/results/train.json] [--doc docs/benchmarks.md] [--no-doc | --doc-only]

DATA_DIR (default ../shared/data/real from the repository root) holds the five real slices:
sentiment_sst2, nli_sick, qa_squad, ner_conll2003, summarization_scitldr. Every variant uses the same
settings, read from launch/configs/default.yaml (model, LoRA, batch size, max length, optimiser,
schedule, dtype), with those five slices as tasks rendered by the shipped templates:
- ours: `trainer.train(cfg)` itself (mixed stream -> lazy render/tokenise -> packing collator ->
  `StepRunner`), timed from its `on_step` hook; ours_unpacked: the same with train.packing=off;
- trl_packed / trl_padded: `trl.SFTTrainer` (prompt/completion dataset, completion-only loss) with
  `packing=True` (TRL's default BFD strategy, which implies padding-free) or `packing=False`. The
  prompt/completion texts are the decoded token ids of *our* encoding of the first `--pool` records of
  the same mixed stream, so the token content is identical (checked and reported); the LoRA adapter is
  TRL's own (`peft_config`) with our r / alpha / dropout / target modules;
Each variant runs in its own child process (sequentially, in this one invocation) so its peak RSS is
its own: `--warmup` optimiser steps, then `--steps` timed steps, then optionally `--profile-steps`
steps under torch.profiler (not timed). A variant during whose timed steps other processes used more
than `--max-other` CPU cores is measured again (at most `--retries` times). Tokens are counted
identically: *input tokens* = tokens of the real examples fed to the model in a step (prompt + target;
padding excluded; counted from example lengths, not `!= pad_id`, because SmolLM2's pad token is its
`<|im_end|>`), *target tokens* = tokens with a loss. Prints a table, writes --out and replaces the
"Training throughput vs TRL" section of --doc (`--doc-only`: rewrite that section from --out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
from common import SLICES  # noqa: E402  (template, folder) of the five training slices

VARIANTS = ("ours", "trl_packed", "trl_padded", "ours_unpacked")
DEFAULT_VARIANTS = "ours,trl_packed,trl_padded"
SECTION = "## Training throughput vs TRL"


# ------------------------------------------------------------------ shared set-up (children)


def run_config(data_dir: Path, out_dir: Path, total_steps: int, packing: str = "auto"):
    """launch/configs/default.yaml with the five real slices as tasks (absolute paths)."""
    from t2t_mtl.core.config import load_config

    data = common.default_recipe()
    data["tasks"] = common.slice_tasks(data_dir)
    data["output_dir"] = str(out_dir)
    data["train"].update(
        {
            "steps": total_steps,
            "save_steps": 10**6,
            "resume": "never",
            "packing": packing,
            # float32 like TRL's side (bf16=False): `auto` would pick bf16 on a CPU with AMX
            "mixed_precision": "no",
        }
    )
    return load_config(data=data)


class StepClock:
    """Step-end timestamps, per-step token counts, RSS at step ends and an optional profiler window."""

    def __init__(self, warmup: int, steps: int, profile_steps: int):
        import psutil

        self.warmup, self.steps, self.profile_steps = warmup, steps, profile_steps
        self.proc = psutil.Process()
        self.ends: list[float] = []
        self.tokens: list[
            tuple[int, int, int, int]
        ] = []  # (input, target, padded slots, rows) per step
        self.rss: list[int] = []
        self.cpu: list[
            tuple[float, float]
        ] = []  # (machine busy CPU s, this process's CPU s) at step ends
        self.prof = None
        self.profile_rows: list[dict] = []

    def add_tokens(self, inputs: int, targets: int, slots: int, rows: int) -> None:
        self.tokens.append((int(inputs), int(targets), int(slots), int(rows)))

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append((_cpu_jiffies()[0], time.process_time()))
        self.rss.append(self.proc.memory_info().rss)
        n = len(self.ends)
        if self.profile_steps and n == self.warmup + self.steps:
            import torch

            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.start()
        elif self.prof is not None and n == self.warmup + self.steps + self.profile_steps:
            self.prof.stop()
            self.profile_rows = profile_table(self.prof, self.profile_steps)
            self.prof = None

    def result(self) -> dict:
        w, n = self.warmup, self.steps
        seconds = self.ends[w + n - 1] - self.ends[w - 1]
        tok = self.tokens[w : w + n]
        inp, tgt, slots = (sum(t[i] for t in tok) for i in range(3))
        per_step = [
            round(b - a, 3) for a, b in zip(self.ends[w - 1 : w + n - 1], self.ends[w : w + n])
        ]
        # CPU used by other processes while the timed steps ran (machine busy time minus ours), per step
        other = [
            max((b[0] - a[0]) - (b[1] - a[1]), 0.0) / dt
            for a, b, dt in zip(self.cpu[w - 1 : w + n - 1], self.cpu[w : w + n], per_step)
        ]
        return {
            "timed_steps": n,
            "seconds": round(seconds, 3),
            "step_seconds": per_step,
            "input_tokens": inp,
            "target_tokens": tgt,
            "padded_slots": slots,
            "rows_per_step": round(sum(t[3] for t in tok) / n, 2),
            "input_tokens_per_s": round(inp / seconds, 1),
            "target_tokens_per_s": round(tgt / seconds, 1),
            "padding_efficiency": round(inp / max(slots, 1), 3),
            "input_tokens_per_step": round(inp / n, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "max_step_rss_mib": round(max(self.rss) / 2**20, 1),
            "other_cpu_cores_timed": round(
                sum(o * d for o, d in zip(other, per_step)) / seconds, 3
            ),
            "other_cpu_cores_max_step": round(max(other), 3),
            "profile": self.profile_rows,
        }


def profile_table(prof, steps: int, top: int = 16) -> list[dict]:
    """Top operators by self CPU time (ms per step) and their share of all self CPU time."""
    rows = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    return [
        {
            "op": e.key,
            "ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 1),
            "share": round(e.self_cpu_time_total / total, 4),
            "calls_per_step": round(e.count / steps, 1),
        }
        for e in rows[:top]
    ] + [
        {
            "op": "(all operators)",
            "ms_per_step": round(total / 1000 / steps, 1),
            "share": 1.0,
            "calls_per_step": None,
        }
    ]


def child_ours(spec: dict, packing: str) -> dict:
    """Run `trainer.train` for warmup + steps (+ profile) + 1 steps; the last step (final checkpoint) is not timed."""
    from t2t_mtl.training import optimizer_step, trainer

    clock = StepClock(spec["warmup"], spec["steps"], spec["profile_steps"])
    original = optimizer_step.StepRunner.run

    def counted(self, window, *args, **kw):  # instrumentation only: counts from window, result
        res = original(self, window, *args, **kw)
        clock.add_tokens(
            window.input_tokens,
            float(res.tokens.sum()),
            sum(m["input_ids"].numel() for m in window.micro),
            sum(m["input_ids"].shape[0] for m in window.micro),
        )
        return res

    total = spec["warmup"] + spec["steps"] + spec["profile_steps"] + 1
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        cfg = run_config(Path(spec["data_dir"]), Path(tmp) / "run", total, packing)
        optimizer_step.StepRunner.run = counted
        t0 = time.perf_counter()
        try:
            trainer.train(cfg, on_step=lambda step, info: clock.step_end())
        finally:
            optimizer_step.StepRunner.run = original
        wall = time.perf_counter() - t0
    res = clock.result()
    import torch

    res.update(
        {
            "setup_and_tail_seconds": round(wall - (clock.ends[-1] - clock.ends[0]), 1),
            "packing": packing,
            "torch_threads": torch.get_num_threads(),
        }
    )
    return res


def child_trl(spec: dict, packing: bool) -> dict:
    """Plain `trl.SFTTrainer` on the same texts, model, LoRA settings, batch size, max length and dtype."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from t2t_mtl.model import loading
    from t2t_mtl.model.prompt_format import PromptFormat

    clock = StepClock(spec["warmup"], spec["steps"], spec["profile_steps"])
    total = spec["warmup"] + spec["steps"] + spec["profile_steps"]
    with tempfile.TemporaryDirectory(prefix="bench-train-trl-") as tmp:
        cfg = run_config(Path(spec["data_dir"]), Path(tmp) / "run", total)
        model, tok, family = loading.load_model_and_tokenizer(cfg.model, None, for_training=True)
        fmt = PromptFormat.for_tokenizer(tok, family, cfg.model.prompt_format)
        examples = common.stream_examples(cfg, tok, fmt, spec["pool"])
        data = Dataset.from_dict(
            {
                "prompt": [e["prompt"] for e in examples],
                "completion": [e["completion"] for e in examples],
            }
        )
        args, lora = common.trl_configs(
            cfg,
            tmp,
            total,
            packing=packing,
            # sequential: step k sees exactly ours' step-k examples; packed bins come sorted by length, so
            # they keep TRL's default random order (a sequential walk would start with the longest bins)
            train_sampling_strategy="random" if packing else "sequential",
        )
        t0 = time.perf_counter()

        class Counting(SFTTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                if "attention_mask" in inputs:
                    real = int(inputs["attention_mask"].sum())
                else:  # padding-free: one flattened row, no padding (pad_to_multiple_of is None)
                    real = int(inputs["position_ids"].numel())
                clock.add_tokens(
                    real,
                    int((inputs["labels"][:, 1:] != -100).sum()),
                    inputs["input_ids"].numel(),
                    inputs["input_ids"].shape[0],
                )
                return super().training_step(model, inputs, num_items_in_batch)

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                clock.step_end()

        trainer = Counting(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=lora,
            callbacks=[Clock()],
        )
        prep = time.perf_counter() - t0
        check = token_check(trainer.train_dataset, examples, packing)
        t1 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t1
    res = clock.result()
    res.update(
        {
            "trl_dataset_prep_seconds": round(prep, 1),
            "token_check": check,
            "setup_and_tail_seconds": round(wall - (clock.ends[-1] - clock.ends[0]), 1),
            "torch_threads": torch.get_num_threads(),
            "param_dtype": str(next(model.parameters()).dtype)[6:],
        }
    )
    return res


def token_check(ds, examples: list[dict], packing: bool) -> dict:
    """Does TRL's tokenisation give our token ids and loss mask? (per example unpacked; totals packed)"""
    if packing:
        trl_total = sum(sum(x) for x in ds["seq_lengths"])
        ours = sum(len(e["ids"]) for e in examples)
        return {
            "total_tokens_trl": trl_total,
            "total_tokens_ours": ours,
            "identical": trl_total == ours,
        }
    same_ids = same_labels = 0
    for row, e in zip(ds, examples):
        same_ids += row["input_ids"] == e["ids"]
        same_labels += row["labels"] == e["labels"]
    return {
        "examples": len(ds),
        "pool": len(examples),
        "same_input_ids": same_ids,
        "same_labels": same_labels,
        "identical": len(ds) == len(examples) == same_ids == same_labels,
    }


# --------------------------------------------------------------------------- parent


def _cpu_jiffies() -> tuple[float, float]:
    """(busy, steal) seconds of all CPUs since boot, from /proc/stat."""
    f = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / hz, (f[7] if len(f) > 7 else 0.0) / hz


def run_child(variant: str, spec: dict) -> dict:
    """One variant in a fresh interpreter; returns its result dict (raises on failure).

    Also measures how busy the machine was meanwhile: CPU cores used by *other* processes (all CPU
    time minus the child's) and hypervisor steal, averaged over the child's lifetime.
    """
    with tempfile.TemporaryDirectory(prefix="bench-train-child-") as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "child.log"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            variant,
            "--spec",
            json.dumps(spec),
            "--result",
            str(out),
        ]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0, (busy0, steal0) = time.perf_counter(), _cpu_jiffies()
        with log.open("w") as fh:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
        busy1, steal1 = _cpu_jiffies()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
        if proc.returncode != 0 or not out.is_file():
            sys.stderr.write(log.read_text()[-8000:])
            raise SystemExit(f"bench_train: variant {variant} failed (exit {proc.returncode})")
        res = json.loads(out.read_text())
        res["child_wall_seconds"] = round(wall, 1)
        res["child_cpu_cores"] = round(own / wall, 2)
        res["other_processes_cpu_cores"] = round(max(busy1 - busy0 - own, 0.0) / wall, 2)
        res["steal_cpu_cores"] = round((steal1 - steal0) / wall, 2)
        return res


def table(results: dict) -> str:
    """Markdown table: throughput, ours ÷ each variant, padding, step time, memory."""
    lines = [
        "| variant | input tokens/s | target tokens/s | input tokens/step | rows/step | padding efficiency "
        "| s/step (median) | ours ÷ this (input tok/s) | peak RSS (MiB) | other processes (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        steps = sorted(r["step_seconds"])
        ratio = (
            f"{results['ours']['input_tokens_per_s'] / r['input_tokens_per_s']:.2f}"
            if "ours" in results
            else "–"
        )
        lines.append(
            f"| {name} | {r['input_tokens_per_s']:,.0f} | {r['target_tokens_per_s']:,.1f} | "
            f"{r['input_tokens_per_step']:,.0f} | {r['rows_per_step']:g} | {r['padding_efficiency']:.2f} | "
            f"{steps[len(steps) // 2]:.2f} | {ratio} | {r['peak_rss_mib']:,.0f} | "
            f"{r.get('other_cpu_cores_timed', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def ratios(results: dict) -> dict:
    """ours / each other variant, for input and target tokens/s."""
    if "ours" not in results:
        return {}
    o = results["ours"]
    return {
        f"ours/{k}": {
            "input": round(o["input_tokens_per_s"] / r["input_tokens_per_s"], 3),
            "target": round(o["target_tokens_per_s"] / r["target_tokens_per_s"], 3),
        }
        for k, r in results.items()
        if k != "ours"
    }


def profile_md(results: dict) -> str:
    """Per variant, the top operators by self CPU time from the profiled steps."""
    parts = []
    for name, r in results.items():
        if not r.get("profile"):
            continue
        rows = ["| operator | ms/step | share | calls/step |", "|---|---:|---:|---:|"]
        rows += [
            f"| `{p['op']}` | {p['ms_per_step']:,.1f} | {100 * p['share']:.1f} % | "
            f"{'' if p['calls_per_step'] is None else format(p['calls_per_step'], 'g')} |"
            for p in r["profile"]
        ]
        parts.append(f"*{name}*:\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


def section_body(meta: dict, results: dict, rat: dict, tbl: str, prof: str) -> str:
    """The doc section: when/where/how, the table, the ratios and what they mean."""
    lb, la, rc = meta["loadavg_1_5_15_before"], meta["loadavg_1_5_15_after"], meta["recipe"]
    out = [
        f"Measured {meta['date']} on {meta['nproc']} CPU cores ({meta['cpu']}, shared with other jobs), "
        f"torch {meta['torch']} ({meta['torch_threads']} threads), transformers {meta['transformers']}, "
        f"TRL {meta['trl']}, Python {meta['python']}. Load average (1/5/15 min) before the run: "
        f"{' / '.join(map(str, lb))}; after: {' / '.join(map(str, la))}. Command, from the repository root:",
        f"    .venv/bin/{meta['command']}",
        f"Same for every variant, from `launch/configs/default.yaml`: {rc['model']} (weights {rc['dtype']}), "
        f"LoRA r {rc['r']} / alpha {rc['alpha']} / dropout {rc['dropout']} on {rc['target_modules']}, batch size "
        f"{rc['batch_size']} × accumulation {rc['grad_accum']}, max length {rc['max_length']}, AdamW lr "
        f"{rc['learning_rate']:g} ({rc['scheduler']} schedule), gradient clipping {rc['max_grad_norm']}, gradient "
        f"checkpointing {'on' if rc['gradient_checkpointing'] else 'off'}; data: the five real slices ("
        + ", ".join(f for _, f in SLICES)
        + f") rendered by the shipped templates and mixed by our stream "
        f"(T = {rc['temperature']:g}). *ours* is `trainer.train` "
        "itself (lazy render + tokenisation inside the step, packing collator, per-task token losses); "
        "*trl_packed* / *trl_padded* are a plain `trl.SFTTrainer` with `packing=True` (BFD, which implies "
        "padding-free) / `packing=False`, `completion_only_loss=True`, `bf16=False`, "
        "`gradient_checkpointing=False` (TRL's defaults are bf16 autocast and checkpointing; set to ours), "
        "TRL's own LoRA (`peft_config`) with the same settings. TRL's dataset is the decoded token ids of our "
        f"encoding of the first {meta['pool']:,} records of the same stream (prompt / completion columns); "
        "*trl_padded* walks it in order, so its step k holds exactly our step-k examples; *trl_packed* keeps "
        f"TRL's random order of packed rows. {meta['warmup']} warm-up steps, then {meta['steps']} timed "
        "optimiser steps per variant, each variant in its own process, one after the other. *Input tokens* "
        "are the real prompt + target tokens a step feeds the model (padding excluded), *target tokens* "
        "those with a loss; *padding efficiency* = input tokens / token slots of the batch tensor; peak RSS "
        "is the process's `ru_maxrss` (model load included); *other processes* = CPU cores used by other "
        "jobs during the timed steps (machine busy time minus ours, from /proc/stat). A variant measured "
        f"while other jobs used more than {meta.get('max_other', 0.1)} cores is measured again (up to twice; "
        "discarded attempts are kept in the JSON).",
        tbl,
    ]
    for k, v in rat.items():
        if "trl" in k:
            out.append(
                f"- {k}: **{v['input']:.2f}×** input tokens/s, {v['target']:.2f}× target tokens/s."
            )
    checks = [
        f"{k}: {json.dumps(results[k]['token_check'])}"
        for k in results
        if "token_check" in results[k]
    ]
    if checks:
        out.append(
            "Token identity (TRL's tokenisation of the texts vs our ids and loss masks): "
            + "; ".join(checks)
        )
    if "ours/trl_packed" in rat:
        met = rat["ours/trl_packed"]["input"] >= 2.0
        out.append(
            f"Target ours ≥ 2× TRL-with-packing (input tokens/s): **{'met' if met else 'not met'}**."
        )
    out.append(analysis(results, rc))
    if prof:
        n = meta["profile_steps"]
        out.append(
            f"Profile (torch.profiler, CPU, {n} step{'s' if n > 1 else ''} after the timed ones, not timed; "
            "top operators by self CPU time, per step):\n\n" + prof
        )
    out.append("Raw numbers (per-step times, RSS, profile): `bench/results/train.json`.")
    return "\n\n".join(out)


def _ms(r: dict, *needles: str) -> float:
    """Self CPU ms per step of the listed top operators whose name contains any of `needles`."""
    return sum(
        p["ms_per_step"]
        for p in r.get("profile", [])
        if p["calls_per_step"] is not None and any(n in p["op"] for n in needles)
    )


def analysis(results: dict, rc: dict) -> str:
    """What limits each variant, in words, with this run's numbers (mechanisms checked in the sources)."""
    o, tp, tu = (results.get(k) for k in ("ours", "trl_packed", "trl_padded"))
    out, attn = (
        ["What the numbers say (operator times from the profile table below):"],
        "scaled_dot_product",
    )
    head = ("ChunkedLogProb", "aten::sub", "aten::exp", "aten::addmm_", "aten::mul", "aten::copy_")
    if o and tu:
        out.append(
            f"- *ours vs trl_padded* (step k holds the same {o['input_tokens_per_step']:.0f}-token examples in "
            f"both): TRL pads them to the longest ({tu['rows_per_step']:g} rows, padding efficiency "
            f"{tu['padding_efficiency']:.2f}); our collator packs them into {o['rows_per_step']:g} rows of at most "
            f"{rc['max_length']} tokens ({o['padding_efficiency']:.2f}), i.e. "
            f"{tu['padded_slots'] / o['padded_slots']:.2f}× fewer token slots. The rest is TRL's LM head on a "
            "CPU: its fused log-prob head is a Triton kernel on GPUs but falls back to torch ops here, scores "
            "every position (only Triton devices compact to the label positions), recomputes the 49,152-word "
            "projection in the backward pass and also computes entropy and top-1 for its logs: "
            f"`mul`/`sub`/`exp`/`copy_`/`addmm_`/`ChunkedLogProb*` take {_ms(tu, *head) / 1000:.1f} s per step in "
            f"trl_padded against {_ms(o, *head) / 1000:.1f} s in ours (the model body runs the same elementwise "
            "ops in both)."
        )
    if o and tp:
        out.append(
            f"- *ours vs trl_packed*: TRL's BFD packing implies padding-free batches: a step's {rc['batch_size']} "
            f"packed sequences (≤ {rc['max_length']} tokens, filled to "
            f"{tp['input_tokens_per_step'] / (rc['batch_size'] * rc['max_length']):.0%} on average) become ONE row "
            f"of ~{tp['input_tokens_per_step']:.0f} tokens with restarting `position_ids`. A CPU has no varlen "
            "FlashAttention kernel, so transformers turns those into a block-diagonal mask over the whole row "
            "and SDPA computes all L² query/key pairs, masked ones included: attention (forward + backward) "
            f"takes {_ms(tp, attn) / 1000:.1f} s per step in trl_packed against {_ms(o, attn) / 1000:.1f} s in "
            f"ours (rows ≤ {rc['max_length']}), for "
            f"{tp['input_tokens_per_step'] / o['input_tokens_per_step']:.1f}× our tokens per step. Padding-free "
            "is built for GPUs with FlashAttention-2/3, where attention costs "
            "per sequence. The CPU LM head above costs trl_packed the same way "
            f"({_ms(tp, *head) / 1000:.1f} s per step)."
        )
    if o:
        out.append(
            f"- Where we lose: (1) padding — {100 * (1 - o['padding_efficiency']):.0f} % of our token slots are "
            "padding (rows are padded to the widest packed row, and a max-length example fills a row alone), "
            "which trl_packed does not have; (2) LoRA dropout — "
            f"`aten::bernoulli_` alone takes {_ms(o, 'bernoulli') / 1000:.1f} s per step (peft draws a mask "
            f"per adapted projection, 7 per layer, for dropout {rc['dropout']}); TRL pays the same: recipe, not "
            "pipeline. The LM head is not among them: `StepRunner` asks the model for logits at target "
            "positions only (a 2-D boolean `logits_to_keep`), so only "
            f"{o['target_tokens'] / o['input_tokens']:.0%} of the input tokens go through the 49,152-word "
            "projection and its backward."
        )
    if o and o.get("profile"):
        ops = o["profile"][-1]["ms_per_step"] / 1000
        med = sorted(o["step_seconds"])[len(o["step_seconds"]) // 2]
        out.append(
            f"- Matrix multiplications (`aten::mm`) are {100 * _ms(o, 'aten::mm') / 1000 / ops:.0f} % of "
            f"our operator time. All operators together take {ops:.1f} s of a profiled step (unprofiled "
            f"steps: median {med:.1f} s), "
            + (
                "so the per-step Python work (lazy rendering and tokenisation of the step's records, per-task "
                "loss sums, logging) is not what limits us."
                if ops >= 0.85 * med
                else f"leaving ~{med - ops:.1f} s per step outside torch operators (Python work, data)."
            )
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data_dir", nargs="?", default=str(ROOT.parent / "shared" / "data" / "real"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--profile-steps", type=int, default=2, help="extra profiled steps per variant (not timed)"
    )
    ap.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}"
    )
    ap.add_argument(
        "--max-other",
        type=float,
        default=0.1,
        help="re-measure a variant when other processes used more CPU cores than this meanwhile",
    )
    ap.add_argument(
        "--retries", type=int, default=2, help="re-measurements per variant (see --max-other)"
    )
    ap.add_argument(
        "--pool", type=int, default=2000, help="stream records given to TRL (its dataset)"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument(
        "--doc-only", action="store_true", help="rewrite the doc section from --out; run nothing"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        spec = json.loads(args.spec)
        res = {
            "ours": lambda: child_ours(spec, "auto"),
            "ours_unpacked": lambda: child_ours(spec, "off"),
            "trl_packed": lambda: child_trl(spec, True),
            "trl_padded": lambda: child_trl(spec, False),
        }[args.child]()
        Path(args.result).write_text(json.dumps(res))
        return 0

    if args.doc_only:
        saved = json.loads(Path(args.out).read_text(encoding="utf-8"))
        res = saved["results"]
        common.update_doc(
            Path(args.doc),
            SECTION,
            section_body(saved["meta"], res, saved["ratios"], table(res), profile_md(res)),
        )
        print(f"updated {args.doc} ({SECTION[3:]}) from {args.out}")
        return 0
    data = Path(args.data_dir).resolve()
    missing = [f for _, f in SLICES if not (data / f / "train.jsonl").is_file()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if missing or bad or args.warmup < 1 or args.steps < 1:
        print(
            f"bench_train: missing slices {missing} under {data}"
            if missing
            else f"bench_train: unknown variant(s) {bad}; use {', '.join(VARIANTS)}"
            if bad
            else "bench_train: --warmup and --steps must be >= 1",
            file=sys.stderr,
        )
        return 2
    need = (args.warmup + args.steps + args.profile_steps + 1) * 8
    spec = {
        "data_dir": str(data),
        "warmup": args.warmup,
        "steps": args.steps,
        "profile_steps": args.profile_steps,
        "pool": max(args.pool, need),
        "max_other": args.max_other,
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(data, Path(tmp), 1)
    recipe = {
        "model": cfg.model.name,
        "max_length": cfg.model.max_length,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "learning_rate": cfg.train.learning_rate,
        "scheduler": cfg.train.scheduler,
        "warmup_steps": cfg.train.warmup_steps,
        "max_grad_norm": cfg.train.max_grad_norm,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "packing": cfg.train.packing,
        "r": cfg.adapter.r,
        "alpha": cfg.adapter.alpha,
        "dropout": cfg.adapter.dropout,
        "target_modules": cfg.adapter.target_modules,
        "temperature": cfg.mixing.temperature,
        "dtype": cfg.model.dtype,
    }
    load_before = os.getloadavg()
    results = {}
    for v in variants:
        discarded = []
        for attempt in range(1 + args.retries):
            print(f"running {v} ...", flush=True)
            r = run_child(v, spec)
            print(
                f"  {r['input_tokens_per_s']:,.0f} input tokens/s, {r['target_tokens_per_s']:,.1f} target tokens/s "
                f"({r['timed_steps']} steps, {r['seconds']:.1f} s; child {r['child_wall_seconds']:.0f} s; other "
                f"processes during the timed steps {r['other_cpu_cores_timed']:.2f} cores)",
                flush=True,
            )
            # A busy machine stretches the wall clock of whichever variant runs then: measure again.
            if r["other_cpu_cores_timed"] <= args.max_other or attempt == args.retries:
                break
            discarded.append(
                {k: r[k] for k in ("input_tokens_per_s", "other_cpu_cores_timed", "step_seconds")}
            )
            print(
                f"  other processes used > {args.max_other} cores: measuring {v} again", flush=True
            )
        results[v] = {**r, "discarded_busy_attempts": discarded}
    load_after = os.getloadavg()
    import torch
    import transformers
    import trl

    shown = [
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-doc"
    ]  # only affects the doc
    command = "python bench/bench_train.py " + " ".join(shown)
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": common.cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
        "command": command.strip(),
        **{k: v for k, v in spec.items() if k != "data_dir"},
        "data": [f"{data.name}/{f}/train.jsonl" for _, f in SLICES],
        "recipe": recipe,
    }
    dtypes = {r["param_dtype"] for r in results.values() if "param_dtype" in r}
    if dtypes:
        recipe["dtype"] = ", ".join(sorted(dtypes))
    tbl = table(results)
    print(tbl)
    rat = ratios(results)
    print(json.dumps(rat))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "ratios": rat, "results": results}, indent=1) + "\n",
        encoding="utf-8",
    )
    print(f"wrote {out}")
    if not args.no_doc:
        common.update_doc(
            Path(args.doc), SECTION, section_body(meta, results, rat, tbl, profile_md(results))
        )
        print(f"updated {args.doc} ({SECTION[3:]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
