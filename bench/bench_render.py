"""Rendering throughput (records/s) of the shipped templates on the SST-2 and SQuAD real slices.

    .venv/bin/python bench/bench_render.py [DATA_DIR] [--split train] [--rounds 5] [--min-records 20000]
                                           [--out bench/results/render.json] [--doc docs/benchmarks.md] [--no-doc]

DATA_DIR defaults to ../shared/data/real relative to the repository root. For each task it times:
- load: `sources.load_rows` (open the split with `datasets`, map and check every row), median of 3
  after one warm-up call, so with the Arrow cache warm;
- render: `Task.render` with the variant policy on rows already materialised as dicts;
- map+render: `Rows[i]` (row from the Arrow table, column/label mapping) then render, i.e. what a
  training stream pays per record.
Each timed loop renders at least --min-records records (whole passes over the split, epoch = pass
number, so the round-robin policy rotates variants); the median of --rounds rounds is reported.
Prints a table, writes --out (JSON) and replaces the "Rendering throughput" section of --doc.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

from t2t_mtl.core.config import SourceConfig  # noqa: E402
from t2t_mtl.tasks import (
    catalogue,
    sources,
)

BENCH_TASKS = (
    ("sentiment_sst2", "sentiment_sst2"),
    ("qa_squad", "qa_squad"),
)  # (template, slice folder)
SECTION = "## Rendering throughput"


def _time_loop(fn, n_rows: int, min_records: int, rounds: int) -> dict:
    """Median records/s (wall clock and process CPU time) of `fn(i, epoch)` over passes covering >= min_records."""
    passes = max(1, -(-min_records // n_rows))
    wall, cpu = [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        for epoch in range(passes):
            for i in range(n_rows):
                fn(i, epoch)
        wall.append(passes * n_rows / (time.perf_counter() - t0))
        cpu.append(passes * n_rows / max(time.process_time() - c0, 1e-9))
    # CPU time matters on a shared machine: other processes stretch the wall clock, not our CPU seconds.
    return {
        "records_per_s": round(statistics.median(wall), 1),
        "cpu_records_per_s": round(statistics.median(cpu), 1),
        "rounds_wall": [round(x, 1) for x in wall],
        "records_per_round": passes * n_rows,
    }


def bench_task(template: str, folder: Path, split: str, rounds: int, min_records: int) -> dict:
    """Time load, render and map+render for one task; returns the measured numbers."""
    tpl = catalogue.load_task(template)
    src = SourceConfig(path=str(folder))
    rows = sources.load_rows(
        tpl, src, split, bad_rows="skip"
    )  # warm-up: imports, datasets' Arrow cache
    loads = []
    for _ in range(3):
        t0 = time.perf_counter()
        rows = sources.load_rows(tpl, src, split, bad_rows="skip")
        loads.append(time.perf_counter() - t0)
    load_s = statistics.median(loads)
    n = len(rows)
    dicts = [rows[i] for i in range(n)]
    chars = sum(
        len(r.instruction) + len(r.input) + len(r.output)
        for r in catalogue.task_records(tpl, dicts, split)
    )

    def render(i: int, epoch: int) -> None:
        tpl.render(dicts[i], row_id=str(i), split=split, epoch=epoch)

    def map_render(i: int, epoch: int) -> None:
        tpl.render(rows[i], row_id=str(i), split=split, epoch=epoch)

    return {
        "task": template,
        "data": f"{folder.name}/{split}.jsonl",
        "rows": n,
        "skipped": rows.skipped,
        "variants": len(tpl.train_variants()),
        "mean_record_chars": round(chars / max(n, 1), 1),
        "load_s": round(load_s, 3),
        "render": _time_loop(render, n, min_records, rounds),
        "map_render": _time_loop(map_render, n, min_records, rounds),
    }


def table(results: list[dict]) -> str:
    """Markdown table of the results."""
    lines = [
        "| task | rows | mean chars/record | load, warm (s) | render (records/s, wall / CPU) "
        "| map+render (records/s, wall / CPU) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        a, b = r["render"], r["map_render"]
        lines.append(
            f"| {r['task']} | {r['rows']} | {r['mean_record_chars']:.0f} | {r['load_s']:.2f} | "
            f"{a['records_per_s']:,.0f} / {a['cpu_records_per_s']:,.0f} | "
            f"{b['records_per_s']:,.0f} / {b['cpu_records_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data_dir", nargs="?", default=str(ROOT.parent / "shared" / "data" / "real"))
    ap.add_argument("--split", default="train")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-records", type=int, default=20_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "render.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = ap.parse_args(argv)

    data = Path(args.data_dir)
    missing = [f for _, f in BENCH_TASKS if not (data / f / f"{args.split}.jsonl").is_file()]
    if missing:
        print(
            f"bench_render: no {args.split}.jsonl for {', '.join(missing)} under {data}",
            file=sys.stderr,
        )
        return 2
    results = [
        bench_task(t, data / f, args.split, args.rounds, args.min_records) for t, f in BENCH_TASKS
    ]
    load1, load5, _ = os.getloadavg()
    command = "python bench/bench_render.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": common.cpu_name(),
        "python": platform.python_version(),
        "loadavg_1_5": [round(load1, 2), round(load5, 2)],
        "command": command.strip(),
        "rounds": args.rounds,
        "min_records": args.min_records,
        "split": args.split,
    }
    tbl = table(results)
    print(tbl)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n", encoding="utf-8"
    )
    print(f"wrote {out}")
    if not args.no_doc:
        body = (
            f"Measured {meta['date']} on {meta['nproc']} CPU(s), {meta['cpu']}, Python {meta['python']} "
            f"(1/5-minute load average at the end: {load1:.2f} / {load5:.2f}; the machine was shared, so "
            f"CPU-time rates are given next to wall-clock rates). Command, from the repository root:\n\n"
            f"    .venv/bin/{meta['command']}\n\n"
            f"Real slices (`{data.name}/<task>/{args.split}.jsonl`), median of {args.rounds} rounds, "
            f"each round at least {args.min_records:,} records (whole passes, variant policy applied). "
            f"*render*: `Task.render` on rows already held as dicts; *map+render*: `Rows[i]` "
            f"(Arrow row, column/label mapping) then render, the per-record cost of a training stream; "
            f"*load*: `sources.load_rows` (open with `datasets`, map and check every row; warm Arrow cache, "
            f"median of 3). Raw numbers: "
            f"`bench/results/render.json`.\n\n{tbl}\n"
        )
        common.update_doc(Path(args.doc), SECTION, body)
        print(f"updated {args.doc} ({SECTION[3:]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
