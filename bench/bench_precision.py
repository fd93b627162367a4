"""Step time of the embedded model in float32 vs bf16 autocast on this machine's CPU.

    .venv/bin/python bench/bench_precision.py [DATA_DIR] [--rounds 5] [--batch 8] [--seq 256]
        [--lora-steps 14] [--lora-rounds 2]
        [--out bench/results/precision.json] [--doc docs/benchmarks.md] [--no-doc]

One forward + backward of the whole SmolLM2-135M-Instruct (all weights trainable, random token ids,
labels = inputs) per measurement, fp32 and bf16 autocast interleaved in one process after one warm-up
each, so load from elsewhere falls on both alike. It answers one question for the quality study: is
`train.mixed_precision=bf16` a large saving on this CPU (AMX / AVX512-BF16)? Whether bf16 costs quality
is a separate, seeded ablation (bench/bench_quality.py, system `bf16`).

Then the step users run: the default recipe (LoRA r16 on the embedded model, packing, the five real
slices of DATA_DIR, default ../shared/data/real) trained by `trainer.train` for --lora-steps steps with
`train.mixed_precision` no and bf16, --lora-rounds times each in alternating order; the same seed gives
both the same windows, so their step times compare step by step (the first two steps are warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

SECTION = "## CPU precision: float32 vs bf16 autocast"


def cpu_flags() -> list[str]:
    """The bf16-related instruction-set flags this CPU reports."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f"})


def lora_steps(data: Path, steps: int, rounds: int) -> dict | None:
    """Median optimiser-step seconds of the default recipe in float32 and bf16 (see the module
    docstring), each step's seconds per run, and the ratio; None with steps 0 or no data."""
    import tempfile

    from t2t_mtl.core.config import load_config
    from t2t_mtl.training import trainer

    if steps < 3 or common.check_data_dir(data, [f for _, f in common.SLICES]):
        return None
    per: dict[str, list[list[float]]] = {"float32": [], "bf16": []}
    for r in range(rounds):
        for mp in ("no", "bf16") if r % 2 == 0 else ("bf16", "no"):
            d = common.default_recipe()
            d["tasks"] = common.slice_tasks(data)
            d["output_dir"] = tempfile.mkdtemp(prefix="bench-precision-")
            d["train"].update(
                steps=steps, mixed_precision=mp, save_steps=10**6, resume="never", report_to="none"
            )
            stamps: list[float] = []
            t0 = [time.perf_counter()]

            def hook(step, info, stamps=stamps, t0=t0):
                now = time.perf_counter()
                stamps.append(now - t0[0])
                t0[0] = now

            trainer.train(load_config(data=d), eval_fn=None, on_step=hook)
            per["bf16" if mp == "bf16" else "float32"].append([round(x, 3) for x in stamps])
    med = {k: statistics.median(x for run in v for x in run[2:]) for k, v in per.items()}
    return {
        "steps": steps,
        "rounds": rounds,
        "step_seconds": per,
        "median_step_seconds": {k: round(v, 3) for k, v in med.items()},
        "speedup_bf16": round(med["float32"] / med["bf16"], 2),
    }


def lora_text(lora: dict | None) -> list[str]:
    if not lora:
        return []
    m = lora["median_step_seconds"]
    return [
        f"The default recipe's own step (LoRA r16, packing, the five real slices; `trainer.train`, "
        f"{lora['steps']} steps, {lora['rounds']} runs per precision alternating, the same windows "
        f"in both; median after two warm-up steps): float32 {m['float32']:.2f} s, bf16 "
        f"{m['bf16']:.2f} s — **{lora['speedup_bf16']:.2f}x**. Less than the whole-model figure: a "
        "LoRA step also runs the adapters' small matrices, the optimiser and the data path, which "
        "autocast does not speed up."
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data_dir", nargs="?", default=str(common.DEFAULT_DATA))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lora-steps", type=int, default=14, help="0 skips the default-recipe runs")
    ap.add_argument("--lora-rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "precision.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from t2t_mtl.core.config import ModelConfig
    from t2t_mtl.model import loading

    torch.manual_seed(0)
    model, _tok, _family = loading.load_model_and_tokenizer(ModelConfig(), None, for_training=True)
    x = torch.randint(0, 1000, (args.batch, args.seq))

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for bf16 in (False, True):
        step(bf16)  # warm-up (kernel selection, allocator)
    times: dict[str, list[float]] = {"float32": [], "bf16": []}
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for bf16 in order:
            times["bf16" if bf16 else "float32"].append(step(bf16))
    med = {k: statistics.median(v) for k, v in times.items()}
    lora = lora_steps(Path(args.data_dir), args.lora_steps, args.lora_rounds)
    res = {
        "machine": common.machine(
            command="python bench/bench_precision.py " + " ".join(argv or sys.argv[1:])
        ),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch,
        "seq": args.seq,
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "speedup_bf16": round(med["float32"] / med["bf16"], 2),
        "lora_default_recipe": lora,
    }
    common.write_json(Path(args.out), res)
    print(res["median_seconds"], res["speedup_bf16"])
    if not args.no_doc:
        m = res["machine"]
        body = "\n\n".join(
            [
                "Command (repository root): `.venv/bin/python bench/bench_precision.py`. Results: "
                "`bench/results/precision.json`.",
                common.machine_line(m)
                + f" CPU flags: {', '.join(res['cpu_flags']) or 'none'}; {res['torch_threads']} torch threads.",
                f"One forward + backward of the whole embedded SmolLM2-135M-Instruct (all weights, not "
                f"LoRA) on a {args.batch} x {args.seq} batch of random tokens, {args.rounds} interleaved "
                "rounds after a warm-up each; median seconds.",
                "| precision | median step (s) | every round (s) |\n|---|---:|---|\n"
                + "\n".join(
                    f"| {k} | {med[k]:.2f} | {', '.join(f'{t:.2f}' for t in times[k])} |"
                    for k in times
                ),
                f"bf16 autocast is **{res['speedup_bf16']:.2f}x** faster per step here.",
                *lora_text(lora),
                "Speed only. Quality: on the dev split of the quality study, 3 seeds each, bf16 "
                'autocast tied with float32 ("Quality ablations (dev split)": the default `multi` '
                "trains in bf16 on this CPU, `fp32` is the float32 ablation), so "
                "`train.mixed_precision: auto` picks bf16 on CPUs with AMX-BF16.",
            ]
        )
        common.update_doc(Path(args.doc), SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
