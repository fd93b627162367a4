"""Step-time cost of the protections against interference and forgetting (EWC, PCGrad, freezing).

    .venv/bin/python bench/bench_protection.py [--rounds 6] [--fisher-samples 16] [--model NAME]
        [--batch-size 8] [--max-length 256] [--variants none,ewc,pcgrad,freeze_half]
        [--out bench/results/protection_cost.json] [--doc docs/benchmarks.md] [--no-doc | --doc-only]

The default recipe (launch/configs/default.yaml: LoRA r16 on the embedded SmolLM2-135M-Instruct, the
seven shipped tasks on their bundled samples, batch 8, max_length 256) is set up once through the
trainer's own setup steps (model, packing, optimiser, `StepRunner`). Then, in one process, each round
takes the next window of the mixed stream and runs one optimiser step of it under every variant, the
variants in a rotated order per round (interleaved, so a slow patch of a shared machine hits them all):
- none: the plain step;
- ewc: the same with a stage's EWC penalty on (Fisher estimated first from --fisher-samples records;
  the penalty's cost does not depend on the Fisher's values); each round also times the Fisher of one
  more record (its cost per record, paid once per protected stage);
- pcgrad: `train.gradient_surgery: pcgrad` (one backward pass per task present in the window);
- freeze_half: only the top half of the blocks train (`stages[i].train_layers: [L/2, L-1]`).
Timed: `StepRunner.run` (forward, backward, penalty or projection, clipping, AdamW step); rendering and
tokenising the window are not (done before). The EWC penalty itself (`EwcPenalty.value_and_grad`) is
also timed on its own, repeated, against the plain step's median: the step-time difference of two
noisy medians is a poorer estimate of a cost this small. Fisher estimation (once per protected
stage) is reported per record.

The machine these numbers come from is shared with other jobs: medians over rounds, the load average
before and after, and the spread are reported; compare variants within one run only.
Writes --out and the "Cost of protection against forgetting" section of --doc.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

SECTION = "## Cost of protection against forgetting"
VARIANTS = ("none", "ewc", "pcgrad", "freeze_half")
TARGET_EWC = 0.10  # EWC penalty: under 10 % of the plain step time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_config(args, out_dir: Path):
    from t2t_mtl.core.config import load_config

    d = common.default_recipe()
    d.update(run_name="bench_protection", output_dir=str(out_dir))
    if args.model:
        d["model"]["name"] = args.model
    d["model"]["max_length"] = args.max_length
    d["train"].update(
        batch_size=args.batch_size, report_to="none", resume="never", mixed_precision="no"
    )
    d["eval"]["every_steps"] = 0
    return load_config(data=d)


def measure(args) -> dict:
    import torch

    from t2t_mtl.mixing import mixture
    from t2t_mtl.model import layers
    from t2t_mtl.training import preflight, protection, trainer
    from t2t_mtl.training.batching import Batcher

    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(args, Path(tmp) / "run")
        members, templates = preflight.check_run(cfg)
        log(f"setting up {cfg.model.name} (LoRA r{cfg.adapter.r}), {len(members)} tasks")
        tr = trainer._Trainer(cfg, members, templates, None, None, time.time())
        try:
            plan = mixture.plan_stage(cfg, 0, members)
            batcher = Batcher(
                plan.stream(),
                encode=tr.encode,
                collate=tr.collate,
                batch_size=cfg.train.batch_size,
                grad_accum=cfg.train.grad_accum,
            )
            windows = [batcher.next_window() for _ in range(args.rounds + 1)]
            inner = tr.acc.unwrap_model(tr.model)
            named = layers.trainable_named(inner)
            n_blocks = layers.block_count(inner)

            # EWC: a real Fisher from the stage's first records, anchored at the current weights
            stream = plan.stream()
            t = time.perf_counter()
            sums = protection.estimate_fisher(
                tr.runner,
                inner,
                named,
                (tr.collate([tr.encode(next(stream))]) for _ in range(args.fisher_samples)),
                seed=0,
            )
            fisher_warmup_s = (time.perf_counter() - t) / args.fisher_samples
            fisher = {k: v / args.fisher_samples for k, v in sums.items()}
            anchor = {k: p.detach().clone() for k, p in named}
            penalty = protection.EwcPenalty(named, fisher, anchor, lam=1000.0)
            half = (n_blocks // 2, n_blocks - 1)

            def setup(variant: str) -> None:
                tr.runner.surgery = "pcgrad" if variant == "pcgrad" else "none"
                tr.runner.ewc = penalty if variant == "ewc" else None
                for name, p in named:
                    pos = layers.position(name, n_blocks)
                    p.requires_grad_(
                        variant != "freeze_half" or layers.covers(pos, *half, n_blocks)
                    )

            variants = [v for v in VARIANTS if v in args.variants]
            times: dict[str, list[float]] = {v: [] for v in variants}
            fisher_times: list[float] = []
            load_before = os.getloadavg()
            for v in variants:  # warm-up: one untimed step each (allocations, first-call costs)
                setup(v)
                tr.runner.run(windows[0], step=0)
            for r in range(args.rounds):
                order = variants[r % len(variants) :] + variants[: r % len(variants)]
                for v in order:
                    setup(v)
                    t = time.perf_counter()
                    tr.runner.run(windows[r + 1], step=r + 1)
                    times[v].append(time.perf_counter() - t)
                setup("none")  # one Fisher record per round, interleaved with the steps
                batch = [tr.collate([tr.encode(next(stream))])]
                t = time.perf_counter()
                protection.estimate_fisher(tr.runner, inner, named, batch, seed=r)
                fisher_times.append(time.perf_counter() - t)
                log(
                    f"round {r + 1}/{args.rounds}: "
                    + ", ".join(f"{v} {times[v][-1]:.2f} s" for v in variants)
                )
            setup("none")
            # the penalty on its own (gradients present, as after a backward pass)
            for _, p in named:
                p.grad = torch.zeros_like(p)
            pen_times = []
            for _ in range(args.penalty_repeats):
                t = time.perf_counter()
                penalty.value_and_grad()
                pen_times.append(time.perf_counter() - t)
            for _, p in named:
                p.grad = None
            load_after = os.getloadavg()
        finally:
            tr.telemetry.close()
    med = {v: statistics.median(ts) for v, ts in times.items()}
    base = med.get("none")
    pen = statistics.median(pen_times)
    return {
        "settings": {
            "model": cfg.model.name,
            "adapter": f"{cfg.adapter.method} r{cfg.adapter.r}",
            "trainable_parameters": sum(p.numel() for _, p in named),
            "blocks": n_blocks,
            "tasks": len(members),
            "batch_size": cfg.train.batch_size,
            "max_length": cfg.model.max_length,
            "rounds": args.rounds,
            "fisher_samples": args.fisher_samples,
            "freeze_half_blocks": list(half),
            "torch_threads": torch.get_num_threads(),
        },
        "variants": {
            v: {
                "step_s": [round(x, 4) for x in ts],
                "median_s": round(med[v], 4),
                "min_s": round(min(ts), 4),
                "vs_none": round(med[v] / base, 3) if base else None,
            }
            for v, ts in times.items()
        },
        "ewc_penalty": {
            "median_s": round(pen, 5),
            "share_of_plain_step": round(pen / base, 4) if base else None,
            "repeats": args.penalty_repeats,
        },
        "fisher_s_per_record": round(statistics.median(fisher_times), 3),
        "fisher_s_per_record_all": [round(x, 3) for x in fisher_times],
        "fisher_warmup_s_per_record": round(fisher_warmup_s, 3),
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in load_after],
        },
    }


def section(res: dict) -> str:
    st, m, var = res["settings"], res["machine"], res["variants"]
    rows = "\n".join(
        f"| {v} | {x['median_s']:.2f} | {x['min_s']:.2f} | {x['vs_none']:.2f}× |"
        for v, x in var.items()
    )
    pen = res["ewc_penalty"]
    share = pen["share_of_plain_step"]
    if share is None:
        verdict = "not measured"
    else:
        met = "met" if share < TARGET_EWC else "**not met**"
        verdict = f"{met} ({100 * share:.2f} % of the plain step)"
    la = res["load_average"]
    return "\n\n".join(
        [
            "Command: `.venv/bin/python bench/bench_protection.py` (one process; results: "
            "`bench/results/protection_cost.json`).",
            common.machine_line(m) + f" {st['torch_threads']} torch threads.",
            f"Setting: the default recipe ({st['model']}, {st['adapter']}, {st['trainable_parameters']:,} "
            f"trainable parameters, {st['blocks']} blocks), {st['tasks']} tasks, batch {st['batch_size']}, "
            f"max_length {st['max_length']}. {st['rounds']} rounds; each round runs one optimiser step of "
            "the same window under every variant, in a rotated order (interleaved). Timed: "
            "`StepRunner.run` (forward, backward, penalty or projection, clipping, AdamW); not the "
            "rendering and tokenising of the window. *freeze_half*: only blocks "
            f"{st['freeze_half_blocks'][0]}..{st['freeze_half_blocks'][1]} train.",
            "**This machine is shared with other jobs** (load average "
            f"{la['before'][0]:.1f} before, {la['after'][0]:.1f} after, on {m.get('nproc')} cores): "
            "single step times vary by tens of percent, so read the medians as rough ratios.",
            "| variant | median step (s) | fastest step (s) | median vs none |\n|---|---:|---:|---:|\n"
            + rows,
            f"EWC penalty on its own (`EwcPenalty.value_and_grad`, value and gradient over every "
            f"trainable parameter, median of {pen['repeats']}): {1000 * pen['median_s']:.1f} ms per "
            f"step. Target (< {100 * TARGET_EWC:.0f} % of the step time): {verdict}. "
            f"Fisher estimation, once at the end of a protected stage: {res['fisher_s_per_record']:.2f} s "
            f"per record (one forward and backward pass each; median of one record per round, timed "
            "between the steps), so "
            "`ewc.samples: 100` adds about 100 × that per stage.",
            "PCGrad runs one backward pass per task present in the window (up to seven here), so its "
            "step costs roughly that many backward passes; freezing the lower half of the blocks "
            "saves the backward pass through them.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--fisher-samples", type=int, default=16)
    ap.add_argument("--penalty-repeats", type=int, default=20)
    ap.add_argument(
        "--model", default=None, help="model.name (default: the recipe's embedded model)"
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "protection_cost.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--doc-only", action="store_true", help="rewrite the doc section from --out")
    args = ap.parse_args(argv)
    if args.doc_only:
        res = json.loads(Path(args.out).read_text(encoding="utf-8"))
        common.update_doc(Path(args.doc), SECTION, section(res))
        return 0
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    errors = [
        f"error: --variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)})" for v in bad
    ]
    errors += ["error: --rounds must be > 0"] if args.rounds <= 0 else []
    errors += ["error: --fisher-samples must be > 0"] if args.fisher_samples <= 0 else []
    if errors:
        return common.report_errors(errors)
    res = measure(args)
    res["machine"] = common.machine(
        command="python bench/bench_protection.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    )
    common.write_json(Path(args.out), res)
    log(f"wrote {args.out}")
    for v, x in res["variants"].items():
        print(f"{v:12s} median {x['median_s']:.3f} s  ({x['vs_none']}× none)")
    print(f"ewc penalty {1000 * res['ewc_penalty']['median_s']:.1f} ms per step")
    if not args.no_doc:
        common.update_doc(Path(args.doc), SECTION, section(res))
        log(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
