"""Mixing throughput: render-only vs render+mix records/s on the five real slices, side by side.

    .venv/bin/python bench/bench_mix.py [--config launch/configs/mix_real.yaml] [--records 20000] [--rounds 5]
                                        [--profile] [--out bench/results/mix.json]

Both loops render exactly the same (task, row, epoch) sequence: "render-only" calls each member's
`get` on a precomputed index list, "render+mix" pulls the same records from `MixedStream` (task draws,
permutations, cursors, meta). Within a round the two loops alternate in 500-record chunks (order
flipped every chunk), so bursts of load from other processes hit both alike; wall and CPU time are
both recorded and the median round is reported. The mixer's own cost (index walk without rendering)
is timed separately. Run from the repository root; needs /work/shared/data/real (or the config's paths).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

from t2t_mtl.core.config import load_config  # noqa: E402
from t2t_mtl.mixing import mixture  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="launch/configs/mix_real.yaml")
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--profile", action="store_true", help="cProfile one render+mix pass, print the top 15"
    )
    ap.add_argument("--out", default="bench/results/mix.json")
    args = ap.parse_args(argv)

    cfg = load_config(args.config)
    t0 = time.perf_counter()
    members = mixture.build_members(cfg)
    setup_s = time.perf_counter() - t0
    plan = mixture.plan_stage(cfg, 0, members)
    n = args.records

    walk = plan.stream()
    order = [walk.next_index() for _ in range(n)]
    gets = [m.get for m in plan.members]

    chunk = 500

    def one_round(flip: bool) -> dict:
        """Alternate 500-record chunks of both loops so bursts of load from other processes hit both."""
        s = plan.stream()  # yields exactly `order`, rendered, plus the mixer's work
        t = {"render_only": [0.0, 0.0], "render_mix": [0.0, 0.0]}  # [wall s, CPU s]

        def timed(key, fn, lo, hi):
            w, c = time.perf_counter(), time.process_time()
            fn(lo, hi)
            t[key][0] += time.perf_counter() - w
            t[key][1] += time.process_time() - c

        def ro(lo, hi):
            for i, row, e in order[lo:hi]:
                gets[i](row, e)

        def rm(lo, hi):
            for _ in range(hi - lo):
                next(s)

        for c, lo in enumerate(range(0, n, chunk)):
            hi = min(n, lo + chunk)
            pair = [("render_only", ro), ("render_mix", rm)]
            for key, fn in pair[::-1] if (c % 2) ^ flip else pair:
                timed(key, fn, lo, hi)
        w, c = time.perf_counter(), time.process_time()
        m = plan.stream()
        for _ in range(n):
            m.next_index()
        return {
            "render_only_wall_s": t["render_only"][0],
            "render_mix_wall_s": t["render_mix"][0],
            "render_only_cpu_s": t["render_only"][1],
            "render_mix_cpu_s": t["render_mix"][1],
            "mix_only_wall_s": time.perf_counter() - w,
            "mix_only_cpu_s": time.process_time() - c,
        }

    one_round(False)  # warm-up: compiled templates, Arrow pages, permutations
    rounds = []
    for r in range(args.rounds):
        x = one_round(bool(r % 2))
        rounds.append(x)
        print(
            f"round {r}: render-only {n / x['render_only_wall_s']:,.0f} rec/s, render+mix "
            f"{n / x['render_mix_wall_s']:,.0f} rec/s (wall ratio {x['render_mix_wall_s'] / x['render_only_wall_s']:.3f}, "
            f"CPU ratio {x['render_mix_cpu_s'] / x['render_only_cpu_s']:.3f})",
            flush=True,
        )
    med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
    ratios = [x["render_mix_wall_s"] / x["render_only_wall_s"] for x in rounds]
    cpu_ratios = [x["render_mix_cpu_s"] / x["render_only_cpu_s"] for x in rounds]
    ratio, cpu_ratio = statistics.median(ratios), statistics.median(cpu_ratios)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "cpu": common.cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "command": " ".join(
            ["python", "bench/bench_mix.py"] + (argv if argv is not None else sys.argv[1:])
        ),
        "config": args.config,
        "records": n,
        "rounds": args.rounds,
        "setup_s": round(setup_s, 3),
        "tasks": {
            m.name: {
                "rows": m.size,
                "target_tokens": round(m.tokens),
                "rate": round(plan.rates[m.name], 4),
            }
            for m in plan.members
        },
        "render_only_rec_per_s": round(n / med["render_only_wall_s"]),
        "render_mix_rec_per_s": round(n / med["render_mix_wall_s"]),
        "mix_only_rec_per_s": round(n / med["mix_only_wall_s"]),
        "ratio_wall": round(ratio, 4),
        "ratio_cpu": round(cpu_ratio, 4),
        "ratios_wall_per_round": [round(x, 4) for x in ratios],
        "ratios_cpu_per_round": [round(x, 4) for x in cpu_ratios],
        "mixer_overhead_pct_wall": round((ratio - 1) * 100, 2),
        "mixer_overhead_pct_cpu": round((cpu_ratio - 1) * 100, 2),
        "mix_only_pct_of_render": round(100 * med["mix_only_cpu_s"] / med["render_only_cpu_s"], 2),
        "target_overhead_pct": 10.0,
        "rounds_detail": [{k: round(v, 4) for k, v in x.items()} for x in rounds],
    }
    result["target_met"] = (
        max(result["mixer_overhead_pct_wall"], result["mixer_overhead_pct_cpu"]) < 10.0
    )
    print(json.dumps({k: v for k, v in result.items() if k != "rounds_detail"}, indent=1))
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if args.profile:
        prof = cProfile.Profile()
        s = plan.stream()
        prof.runcall(lambda: [next(s) for _ in range(n)])
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(15)
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
