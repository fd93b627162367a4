"""Statistics of the quality study (bench/bench_quality.py): means over seeds, 95 % bootstrap intervals over
examples and seeds, and paired differences between systems.

Every system is scored on the same rows. One bootstrap resample draws, per task, n row indices with
replacement (shared by all systems: the comparison is paired over rows) and, per system, its seeds with
replacement (independent between systems: seed i of one system has nothing to do with seed i of another).
A system's score in the resample is the mean over its drawn seeds of the task metric recomputed on the drawn
rows; the mean over tasks is the mean of those. Intervals are the 2.5th and 97.5th percentiles; a difference
whose interval contains 0 is reported as a tie.

The metrics are recomputed exactly on each resample from per-row statistics (`t2t_mtl.evaluation.metrics`
decomposes every metric into such rows), so corpus-level metrics (macro-F1, span F1) are resampled correctly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

RESAMPLES = 1000
SEED = 0


class RowStats:
    """Per-row statistics of one task's primary metric on one run, recomputable on any row resample.

    mean metrics (accuracy, SQuAD F1, ROUGE-L): one value per row, the metric is their mean.
    span_f1: per row (tp, fp, fn) entity counts; F1 = 2tp / (2tp + fp + fn) of the summed counts (seqeval's
    micro F1 is exactly that). macro_f1: per row (predicted class, gold class); per-class F1 averaged over the
    classes present in the resample's golds or predictions (as metrics.macro_f1 does).
    """

    def __init__(self, kind: str, data: np.ndarray, classes: int = 0):
        self.kind, self.data, self.classes = kind, data, classes

    def score(self, idx: np.ndarray) -> float:
        d = self.data[idx]
        if self.kind == "mean":
            return float(d.mean())
        if self.kind == "span":
            tp, fp, fn = d.sum(axis=0)
            return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        pred, gold = d[:, 0], d[:, 1]  # macro: pred -1 = unparsed / outside the label set
        f1s = []
        for c in range(self.classes):
            tp = np.sum((pred == c) & (gold == c))
            fp = np.sum((pred == c) & (gold != c))
            fn = np.sum((pred != c) & (gold == c))
            if tp + fp + fn:
                f1s.append(2 * tp / (2 * tp + fp + fn))
        return 100.0 * float(np.mean(f1s)) if f1s else 0.0


def row_statistics(task, examples, texts) -> RowStats:
    """RowStats of `texts` (generated answers, in `examples` order) under the task's primary metric."""
    from t2t_mtl.evaluation import evaluator, metrics

    tpl = task if not hasattr(task, "template") else task.template
    preds = evaluator.parse_answers(tpl, examples, texts)
    golds = [ex.gold for ex in examples]
    primary = tpl.metric[0]
    if primary == "accuracy":
        vals = [100.0 * (p is not None and p == g) for p, g in zip(preds, golds)]
        return RowStats("mean", np.array(vals))
    if primary == "squad":
        return RowStats(
            "mean", np.array([100.0 * metrics.squad_example(p, g)[1] for p, g in zip(preds, golds)])
        )
    if primary == "rouge":
        return RowStats(
            "mean",
            np.array([100.0 * metrics.rouge_example(p, g)["rougeL"] for p, g in zip(preds, golds)]),
        )
    if primary == "span_f1":
        return RowStats("span", np.array([metrics.span_counts(p, g) for p, g in zip(preds, golds)]))
    if primary == "macro_f1":
        labels = list(dict.fromkeys(tpl.answer_choices or golds))
        pos = {c: i for i, c in enumerate(labels)}
        data = np.array([[pos.get(p, -1), pos[g]] for p, g in zip(preds, golds)])
        return RowStats("macro", data, len(labels))
    raise ValueError(f"no row statistics for metric {primary!r}")


def _texts(results: dict, system: str) -> dict[str, dict[str, list[str]]]:
    """{seed: {task: generated texts}} of a system, from its cached evaluations."""
    out = {}
    for seed, info in results["runs"].get(system, {}).items():
        path = (
            Path(info["dir"])
            / f"eval-{results['settings']['split']}-{results['settings']['rows']}.json"
        )
        if path.is_file():
            ev = json.loads(path.read_text(encoding="utf-8"))
            out[seed] = {t: e["texts"] for t, e in ev["tasks"].items()}
    return out


def study_stats(results: dict, ecfg, pairs: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The study's statistics from its cached evaluations: `bootstrap` over every system with results
    (plus "single": the five single-task runs as one column, each task scored by its own specialist)."""
    from t2t_mtl.evaluation import evaluator

    tasks = {t.name: t for t in evaluator.eval_tasks(ecfg)}
    examples = {n: evaluator.load_examples(t, "validation", None)[0] for n, t in tasks.items()}
    systems: dict[str, dict[str, list[RowStats]]] = {}
    for name in results["runs"]:
        by_seed = _texts(results, name)
        per_task = {}
        for task in tasks:
            seeds = [s for s in sorted(by_seed) if task in by_seed[s]]
            if seeds:
                per_task[task] = [
                    row_statistics(tasks[task], examples[task], by_seed[s][task]) for s in seeds
                ]
        if per_task:
            systems[name] = per_task
    single = {t: systems[f"single_{t}"][t] for t in tasks if t in systems.get(f"single_{t}", {})}
    if single:
        systems["single"] = single
    return bootstrap(systems, pairs or default_pairs(list(systems)))


def bootstrap(
    systems: dict[str, dict[str, list[RowStats]]],
    pairs: list[tuple[str, str]],
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, Any]:
    """Means over seeds with 95 % intervals per system and task (and the mean over all tasks, for systems
    that have every task), paired differences for `pairs`, and the equal-exposure ratio when present.

    `systems[name][task]` holds one RowStats per seed, all on the same rows of that task.
    """
    rng = np.random.default_rng(seed)
    task_names = sorted({t for per_task in systems.values() for t in per_task})
    n_rows = {t: next(len(s[t][0].data) for s in systems.values() if t in s) for t in task_names}
    row_draws = [
        {t: rng.integers(0, n_rows[t], n_rows[t]) for t in task_names} for _ in range(resamples)
    ]
    boot: dict[str, dict[str, np.ndarray]] = {}
    point: dict[str, dict[str, float]] = {}
    per_seed: dict[str, dict[str, list[float]]] = {}
    for name, per_task in systems.items():
        boot[name], point[name], per_seed[name] = {}, {}, {}
        for task, stats in per_task.items():
            full = np.arange(n_rows[task])
            per_seed[name][task] = [st.score(full) for st in stats]
            point[name][task] = float(np.mean(per_seed[name][task]))
            k = len(stats)
            vals = np.empty(resamples)
            for b in range(resamples):
                idx = row_draws[b][task]
                vals[b] = np.mean([stats[j].score(idx) for j in rng.integers(0, k, k)])
            boot[name][task] = vals
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
        lo, hi = np.percentile(vals, [2.5, 97.5])
        out["ratios"]["multi_equal / single"] = {
            "ratio": round(100.0 * point["multi_equal"]["mean"] / point["single"]["mean"], 2),
            "low": round(float(lo), 2),
            "high": round(float(hi), 2),
        }
    return out


def default_pairs(names: list[str]) -> list[tuple[str, str]]:
    """The differences the study reports: ours against each baseline and each ablation."""
    pairs = [("multi", x) for x in ("trl_hand", "trl_ours", "base") if x in names]
    pairs += [("trl_ours", "trl_hand")] if {"trl_ours", "trl_hand"} <= set(names) else []
    if "multi_equal" in names:
        pairs.append(("multi_equal", "single"))
    pairs += [
        (x, "multi")
        for x in names
        if x not in ("multi", "base", "single")
        and not x.startswith(("trl", "single_", "multi_equal"))
    ]
    return pairs


def _summary(mean: float, per_seed: list[float], vals: np.ndarray) -> dict[str, Any]:
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return {
        "mean": round(mean, 2),
        "low": round(float(lo), 2),
        "high": round(float(hi), 2),
        "seeds": [round(float(x), 2) for x in per_seed],
    }


def _diff(delta: float, vals: np.ndarray) -> dict[str, Any]:
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return {
        "diff": round(float(delta), 2),
        "low": round(float(lo), 2),
        "high": round(float(hi), 2),
        "tie": bool(lo <= 0.0 <= hi),
    }
