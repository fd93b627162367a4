"""Is our training TRL's training? Our trainer against a plain TRL `SFTTrainer`, step for step.

    .venv/bin/python bench/bench_trl_parity.py [DATA_DIR] [--steps 4] [--work runs/bench_trl_parity]
        [--out bench/results/trl_parity.json] [--doc docs/benchmarks.md] [--no-doc]

The default recipe (embedded SmolLM2-135M-Instruct, LoRA r16 on all linear layers, packing, the five
real slices of DATA_DIR, default ../shared/data/real), made deterministic: float32 and LoRA dropout 0.
Both trainers start from the *same* LoRA initialisation (the one peft draws for our run is copied into
TRL's) and see the same records in the same order: ours trains with `trainer.train`, TRL with the
`trl_ours` baseline of the quality study (bench/bench_quality.py `train_trl`: our stream's records as
prompt/completion texts, TRL's own tokenisation, padding, loss, AdamW and schedule). If the two
adapters agree after --steps steps, a quality gap between `multi` and `trl_ours` is seed noise (LoRA
init, dropout), not a defect of our training; the gap to the hand-written TRL baseline is then prompts
and data. tests/test_training.py pins the same on the tiny model.

Writes --out and the "Training parity with TRL" section of --doc.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

SECTION = "## Training parity with TRL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data_dir", nargs="?", default=str(common.DEFAULT_DATA))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_trl_parity"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trl_parity.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    missing = common.check_data_dir(data, [f for _, f in common.SLICES])
    if missing:
        print("\n".join(missing), file=sys.stderr)
        return 2
    import bench_quality
    from safetensors.torch import load_file

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)  # the bench's own folder: both runs start afresh
    work.mkdir(parents=True)
    system = bench_quality.System(
        "parity",
        "ours",
        "multi, deterministic",
        # one logged loss, the mean over the run (TRL's train_loss is that mean too)
        overrides=(
            ("adapter.dropout", 0.0),
            ("train.mixed_precision", "no"),
            ("train.logging_steps", args.steps),
            # warm-up, peak and cosine decay inside the short run: the whole schedule is compared
            ("train.warmup_steps", max(1, args.steps // 4)),
        ),
    )
    dirs = {t: data / f for t, f in common.SLICES}
    opts = SimpleNamespace(steps=args.steps, batch_size=8, rows=0, work=str(work))
    cfg = bench_quality.run_config(opts, system, 1, dirs, work / "ours")
    with common.same_lora_init() as init:  # our run's LoRA draw, copied into TRL's
        ours_s = bench_quality.train_ours(cfg)
        trl_s = bench_quality.train_trl(cfg, work / "trl", hand=False)
    ours = load_file(str(work / "ours" / "adapter" / "adapter_model.safetensors"))
    trl = load_file(str(work / "trl" / "adapter" / "adapter_model.safetensors"))
    start = {k.replace(".default", ""): v for k, v in init.items()}
    assert ours.keys() == trl.keys() == start.keys(), "adapters name different weights"
    diff = sum(float((ours[k] - trl[k]).double().pow(2).sum()) for k in ours)
    upd_o = sum(float((ours[k] - start[k]).double().pow(2).sum()) for k in ours)
    upd_t = sum(float((trl[k] - start[k]).double().pow(2).sum()) for k in ours)
    s_o = json.loads((work / "ours" / "train_summary.json").read_text(encoding="utf-8"))
    s_t = json.loads((work / "trl" / "train_summary.json").read_text(encoding="utf-8"))
    trl_loss = next((x["train_loss"] for x in s_t["log"] if "train_loss" in x), None)
    res = {
        "machine": common.machine(
            command="python bench/bench_trl_parity.py " + " ".join(argv or sys.argv[1:])
        ),
        "steps": args.steps,
        "batch_size": 8,
        "update_norm": {"ours": upd_o**0.5, "trl": upd_t**0.5},
        "relative_difference": (diff / upd_o) ** 0.5,
        "mean_loss": {"ours": s_o.get("final_loss"), "trl": trl_loss},
        "seconds": {"ours": ours_s, "trl": trl_s},
    }
    common.write_json(Path(args.out), res)
    print(json.dumps({k: res[k] for k in ("update_norm", "relative_difference", "mean_loss")}))
    if not args.no_doc:
        common.update_doc(Path(args.doc), SECTION, report(res))
    return 0


def report(res: dict) -> str:
    """The docs section for one parity result."""
    m = res["machine"]
    return "\n\n".join(
        [
            "Command (repository root): `.venv/bin/python bench/bench_trl_parity.py`. Results: "
            "`bench/results/trl_parity.json`.",
            common.machine_line(m),
            f"The default recipe in float32 with LoRA dropout 0, {res['steps']} steps × "
            f"{res['batch_size']} records of the five real slices; our trainer and TRL's "
            "`SFTTrainer` (the quality study's `trl_ours`: our records as prompt/completion "
            "texts, TRL's own tokenisation, padding, loss, AdamW and schedule) from the same LoRA "
            "initialisation.",
            "| | ours | TRL |\n|---|---:|---:|\n"
            f"| adapter update ‖θ − θ₀‖ | {res['update_norm']['ours']:.6f} | "
            f"{res['update_norm']['trl']:.6f} |\n"
            f"| training loss (mean over the run) | {res['mean_loss']['ours']:.5f} | "
            f"{res['mean_loss']['trl']:.5f} |",
            f"Relative difference of the two updates ‖Δours − Δtrl‖ / ‖Δours‖: "
            f"**{res['relative_difference']:.1e}**, float32 summation order. Our training is TRL's "
            "training step for step, so a quality gap between our runs and TRL's on the same "
            "records is seed noise (LoRA init, dropout), and a gap to the hand-written TRL "
            "baseline comes from prompts and data, not from the trainer.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
