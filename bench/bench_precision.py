"""Step time of the embedded model in float32 vs bf16 autocast on this machine's CPU.

    .venv/bin/python bench/bench_precision.py [--rounds 5] [--batch 8] [--seq 256]
        [--out bench/results/precision.json] [--doc docs/benchmarks.md] [--no-doc]

One forward + backward of the whole SmolLM2-135M-Instruct (all weights trainable, random token ids,
labels = inputs) per measurement, fp32 and bf16 autocast interleaved in one process after one warm-up
each, so load from elsewhere falls on both alike. It answers one question for the quality study: is
`train.mixed_precision=bf16` a large saving on this CPU (AMX / AVX512-BF16)? Whether bf16 costs quality
is a separate, seeded ablation (bench/bench_quality.py, system `bf16`). This is not a LoRA step.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=5)
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
                f"bf16 autocast is **{res['speedup_bf16']:.2f}x** faster per step here. Speed only: "
                'whether it changes quality is the `bf16` system of the quality study ("Quality '
                'ablations (dev split)"); until its seeds are in, `train.mixed_precision: auto` keeps '
                "float32 on CPUs.",
            ]
        )
        common.update_doc(Path(args.doc), SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
