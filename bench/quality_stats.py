"""Statistics of the quality study (bench/bench_quality.py): means over seeds, 95 % bootstrap intervals over
examples and seeds, and paired differences between systems.

Every system is scored on the same rows. One bootstrap resample draws, per task, n row indices with
replacement (shared by all systems: the comparison is paired over rows) and, per system, its seeds with
replacement (independent between systems: seed i of one system has nothing to do with seed i of another).
A system's score in the resample is the mean over its drawn seeds of the task metric recomputed on the drawn
rows; the mean over tasks is the mean of those. Intervals are the 2.5th and 97.5th percentiles; a difference
whose interval contains 0 is reported as a tie.

The metrics are recomputed exactly on each resample from per-row statistics, with the product's own
`t2t_mtl.evaluation.confidence` (the same code behind `t2t-mtl eval`'s intervals), so corpus-level metrics
(macro-F1, span F1) are resampled correctly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from t2t_mtl.evaluation import confidence
from t2t_mtl.evaluation.confidence import RowStats

ROOT = Path(__file__).resolve().parents[1]
RESAMPLES = confidence.RESAMPLES  # the same settings as `t2t-mtl eval`'s intervals
SEED = confidence.SEED


def _cached_stats(results: dict, system: str) -> dict[str, dict[str, RowStats]]:
    """{seed: {task: RowStats}} of a system, from its cached evaluations."""
    out = {}
    for seed, info in results["runs"].get(system, {}).items():
        path = ROOT / info["eval"]
        if path.is_file():
            ev = json.loads(path.read_text(encoding="utf-8"))
            out[seed] = {t: RowStats.from_json(e["per_example"]) for t, e in ev["tasks"].items()}
    return out


def study_stats(results: dict, pairs: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The study's statistics from its cached evaluations: `bootstrap` over every system with results
    (plus "single": the five single-task runs as one column, each task scored by its own specialist).

    Zero-shot transfer systems (runs marked `transfer`) are scored on other tasks than the trained
    ones; their statistics are computed apart, under `transfer`, so that every "mean" is a mean over
    one set of tasks."""
    runs = results["runs"]
    transfer = [n for n, r in runs.items() if any(i.get("transfer") for i in r.values())]
    out = _group_stats(results, [n for n in runs if n not in transfer], pairs, default_pairs)
    if transfer:
        out["transfer"] = _group_stats(results, transfer, None, transfer_pairs)
    return out


def _group_stats(results: dict, names: list[str], pairs, pair_fn) -> dict[str, Any]:
    """`bootstrap` over the systems `names` (one set of tasks); pairs default to `pair_fn`."""
    systems: dict[str, dict[str, list[RowStats]]] = {}
    seeds_of: dict[str, list[str]] = {}
    for name in names:
        by_seed = _cached_stats(results, name)
        seeds_of[name] = sorted(by_seed)
        per_task: dict[str, list[RowStats]] = {}
        for seed in sorted(by_seed):
            for task, st in by_seed[seed].items():
                per_task.setdefault(task, []).append(st)
        if per_task:
            systems[name] = per_task
    tasks = sorted({t for per_task in systems.values() for t in per_task})
    single = {t: systems[f"single_{t}"][t] for t in tasks if t in systems.get(f"single_{t}", {})}
    if single:
        systems["single"] = single
    # An evaluation setting of another system's runs (`eval_of`) scores the same trained models:
    # its seeds are drawn together with theirs when both have the same seeds. Where that system is
    # not in this group (transfer), the first setting of the same runs anchors the others.
    linked, sources, anchors = {}, {}, {}
    for name in names:
        src = next(
            (i.get("eval_of") for i in results["runs"][name].values() if i.get("eval_of")), None
        )
        if src is None or name not in systems:
            continue
        if src in systems:
            sources[name] = src  # compared with the system whose runs it evaluates
            anchor = src
        else:
            anchor = anchors.setdefault(src, name)
        if anchor != name and seeds_of.get(anchor) == seeds_of.get(name):
            linked[name] = anchor
    return bootstrap(systems, pairs or pair_fn(list(systems), sources), linked=linked)


def transfer_pairs(
    names: list[str], sources: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """Transfer differences: the tuned runs against the untuned model, for each way of asking."""
    out = []
    for a in names:
        if a.startswith("transfer_multi"):
            b = a.replace("transfer_multi", "transfer_base", 1)
            if b in names:
                out.append((a, b))
    return out


def bootstrap(
    systems: dict[str, dict[str, list[RowStats]]],
    pairs: list[tuple[str, str]],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    linked: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Means over seeds with 95 % intervals per system and task (and the mean over all tasks, for systems
    that have every task), paired differences for `pairs`, and the equal-exposure ratio when present.

    `systems[name][task]` holds one RowStats per seed, all on the same rows of that task.
    `linked[a] = b`: a's seed j is b's seed j (another evaluation of the same trained models), so a's
    seeds are resampled with b's draws (paired over seeds as well as rows) instead of independently.
    """
    linked = linked or {}
    rng = np.random.default_rng(seed)
    task_names = sorted({t for per_task in systems.values() for t in per_task})
    boot: dict[str, dict[str, np.ndarray]] = {n: {} for n in systems}
    point: dict[str, dict[str, float]] = {n: {} for n in systems}
    per_seed: dict[str, dict[str, list[float]]] = {n: {} for n in systems}
    for task in task_names:
        draws: dict[str, np.ndarray] = {}  # per system: which of its seeds each resample averages
        # every run of every system on this task, resampled with the same example draws (paired)
        owners = [(n, j) for n, pt in systems.items() if task in pt for j in range(len(pt[task]))]
        runs = [systems[n][task][j] for n, j in owners]
        scores = confidence.bootstrap(
            runs, resamples=resamples, seed=confidence.task_seed(seed, task)
        )
        # systems linked to another come after it, so that its draws exist
        for name in sorted(systems, key=lambda n: n in linked):
            rows = [i for i, (n, _) in enumerate(owners) if n == name]
            if not rows:
                continue
            per_seed[name][task] = [runs[i].point() for i in rows]
            point[name][task] = float(np.mean(per_seed[name][task]))
            # resample the seeds too: each bootstrap draw averages k seeds drawn with replacement
            src = draws.get(linked.get(name, ""))
            if src is None or src.shape[1] != len(rows):
                src = rng.integers(0, len(rows), size=(resamples, len(rows)))
            draws[name] = src
            pick = np.array(rows)[src]
            boot[name][task] = scores[pick, np.arange(resamples)[:, None]].mean(axis=1)
    for name in systems:
        if all(t in boot[name] for t in task_names):
            boot[name]["mean"] = np.mean([boot[name][t] for t in task_names], axis=0)
            point[name]["mean"] = float(np.mean([point[name][t] for t in task_names]))
            per_seed[name]["mean"] = [point[name]["mean"]]
    out: dict[str, Any] = {"resamples": resamples, "systems": {}, "pairs": {}, "ratios": {}}
    for name in boot:
        out["systems"][name] = {
            key: _summary(point[name][key], per_seed[name][key], boot[name][key])
            for key in boot[name]
        }
    for a, b in pairs:
        if a in boot and b in boot:
            out["pairs"][f"{a} - {b}"] = {
                key: _diff(point[a][key] - point[b][key], boot[a][key] - boot[b][key])
                for key in boot[a]
                if key in boot[b]
            }
    if "mean" in boot.get("multi_equal", {}) and "mean" in boot.get("single", {}):
        vals = 100.0 * boot["multi_equal"]["mean"] / boot["single"]["mean"]
        lo, hi = confidence.interval(vals)
        out["ratios"]["multi_equal / single"] = {
            "ratio": round(100.0 * point["multi_equal"]["mean"] / point["single"]["mean"], 2),
            "low": round(float(lo), 2),
            "high": round(float(hi), 2),
        }
    return out


def default_pairs(names: list[str], sources: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The differences the study reports: ours against each baseline and each ablation; an
    evaluation setting of another system's runs (`sources`: setting -> that system) against it."""
    sources = sources or {}
    pairs = [("multi", x) for x in ("trl_hand", "trl_ours", "base") if x in names]
    pairs += [("trl_ours", "trl_hand")] if {"trl_ours", "trl_hand"} <= set(names) else []
    if "multi_equal" in names:
        pairs.append(("multi_equal", "single"))
    pairs += [
        (x, sources.get(x, "multi"))
        for x in names
        if x not in ("multi", "base", "single")
        and not x.startswith(("trl", "single_", "multi_equal"))
    ]
    return pairs


def _summary(mean: float, per_seed: list[float], vals: np.ndarray) -> dict[str, Any]:
    lo, hi = confidence.interval(vals)
    return {
        "mean": round(mean, 2),
        "low": round(float(lo), 2),
        "high": round(float(hi), 2),
        "seeds": [round(float(x), 2) for x in per_seed],
    }


def _diff(delta: float, vals: np.ndarray) -> dict[str, Any]:
    lo, hi = confidence.interval(vals)
    return {
        "diff": round(float(delta), 2),
        "low": round(float(lo), 2),
        "high": round(float(hi), 2),
        "tie": bool(lo <= 0.0 <= hi),
    }
