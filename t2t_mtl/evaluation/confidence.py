"""95 % confidence intervals of evaluation scores: the percentile bootstrap over examples (numpy only).

A task's primary metric is recomputed on resamples of its examples (n draws with replacement, the
same n as evaluated). Every metric here is a function of *sums* of per-example statistics, so one
resample is a vector of draw counts `w` (how often each example was drawn) and its score is the metric
of `w @ stats` — exact for corpus-level metrics too, not an average of per-example scores:

- `mean` (accuracy, SQuAD F1, ROUGE-L): one value per example in points; the metric is their mean.
- `span` (seqeval span F1, label-set F1): per example the counts (tp, fp, fn) of entities
  (`metrics.span_counts`) or labels (`metrics.set_counts`); micro F1 = 2tp / (2tp + fp + fn) of the
  summed counts, which is what seqeval (and sklearn's micro average) computes.
- `macro` (macro-F1): per example (predicted class, gold class), -1 for an unparsed prediction or
  one outside the label set; per-class F1 from the resample's counts, averaged over the classes that
  occur in the resample's golds or predictions, as `metrics.macro_f1` does.
- `pearson`, `spearman` (correlations of `parse: number` answers): per example (prediction, gold),
  an unparsed prediction at the golds' mean (`metrics.number_pairs`); Pearson r from the resample's
  weighted sums, Spearman rho from its average ranks (an example drawn k times is k tied copies), by
  `metrics.weighted_pearson` / `weighted_spearman` — exactly what scipy gives on the resampled rows.
- `bleu`, `chrf` (sacrebleu corpus metrics): per example its n-gram statistics
  (`metrics.sacrebleu_stats`); the score of the summed statistics, as sacrebleu's own paired
  bootstrap computes it.

`RowStats` holds these statistics (and travels in results JSON as `per_example`, so `t2t-mtl compare`
can test differences later); `bootstrap` is the one resampling function: given several RowStats of
*the same rows* it draws the example indices jointly (a paired bootstrap), which is what a
difference between two systems on one test set needs. Intervals are the 2.5th and 97.5th percentiles
of the resampled scores (or differences). Seeds are fixed, so a results file's intervals are
reproducible; each task draws from its own stream (`task_seed`), so tasks are resampled
independently when a mean over tasks is bootstrapped.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from t2t_mtl.evaluation import metrics

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
KINDS = ("mean", "span", "macro", "pearson", "spearman", "bleu", "chrf")
METHOD = "percentile bootstrap over examples"
_CELLS_PER_CHUNK = 2_000_000  # resamples x examples held at once (16 MB of float64 weights)


@dataclass
class RowStats:
    """Per-example statistics of one task's primary metric (see the module docstring).

    `data`: `mean` -> shape (n,) values in points; `span` -> (n, 3) tp, fp, fn; `macro` -> (n, 2)
    predicted and gold class indices into `labels`; `pearson`, `spearman` -> (n, 2) predicted and
    gold numbers; `bleu`, `chrf` -> (n, k) sacrebleu statistics.
    """

    kind: str
    data: np.ndarray
    labels: list[str] | None = None  # macro: the label set, in order
    digest: str | None = None  # `rows_digest` of the evaluated rows: equal digests = the same rows

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown row statistics kind {self.kind!r}")
        self.data = np.asarray(self.data, dtype=float)
        want = 1 if self.kind == "mean" else 2
        if self.data.ndim != want or len(self.data) == 0:
            raise ValueError(f"{self.kind} row statistics need a non-empty {want}-D array")

    @property
    def n(self) -> int:
        return len(self.data)

    def score(self, weights: np.ndarray) -> np.ndarray:
        """The metric (points) for each row of `weights` (resamples x n draw counts); shape (resamples,)."""
        w = np.atleast_2d(np.asarray(weights, dtype=float))
        if self.kind == "mean":
            return (w @ self.data) / w.sum(axis=1)
        if self.kind == "pearson":
            return metrics.weighted_pearson(self.data, w)
        if self.kind == "spearman":
            return metrics.weighted_spearman(self.data, w)
        if self.kind in ("bleu", "chrf"):
            return metrics.sacrebleu_scores(self.kind, self.data, w)
        if self.kind == "span":
            tp, fp, fn = (w @ self.data).T
            denom = 2 * tp + fp + fn
            return np.where(denom > 0, 200.0 * tp / np.maximum(denom, 1e-300), 0.0)
        pred, gold = self.data[:, 0], self.data[:, 1]
        classes = np.arange(len(self.labels or []))
        is_pred = pred[:, None] == classes  # n x C
        is_gold = gold[:, None] == classes
        tp = w @ (is_pred & is_gold)
        fp = w @ (is_pred & ~is_gold)
        fn = w @ (~is_pred & is_gold)
        denom = 2 * tp + fp + fn
        present = denom > 0
        f1 = np.where(present, 2 * tp / np.maximum(denom, 1e-300), 0.0)
        count = present.sum(axis=1)
        return np.where(count > 0, 100.0 * f1.sum(axis=1) / np.maximum(count, 1), 0.0)

    def point(self) -> float:
        """The metric on the examples as evaluated (every example drawn once)."""
        return float(self.score(np.ones(self.n))[0])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "mean":
            out["values"] = [float(x) for x in self.data]
        elif self.kind in ("pearson", "spearman"):  # numbers, not counts
            out["rows"] = [[float(x) for x in r] for r in self.data]
        else:
            out["rows"] = [[int(x) for x in r] for r in self.data]
        if self.labels is not None:
            out["labels"] = list(self.labels)
        if self.digest is not None:
            out["digest"] = self.digest
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RowStats:
        data = d["values"] if d["kind"] == "mean" else d["rows"]
        return cls(d["kind"], np.asarray(data, dtype=float), d.get("labels"), d.get("digest"))


def row_stats(
    metric_name: str,
    preds: Sequence[Any],
    golds: Sequence[Any],
    labels: Sequence[Any] | None = None,
) -> RowStats:
    """RowStats of `metric_name`'s main key (`metrics.MAIN_KEY`) on parsed predictions, with the
    conventions of `metrics.compute` (None = unparsed = wrong; `labels`: macro-F1's label set,
    default the golds' labels)."""
    if len(preds) != len(golds) or not preds:
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold values")
    if metric_name == "accuracy":
        vals = [100.0 * (p is not None and p == g) for p, g in zip(preds, golds)]
        return RowStats("mean", np.array(vals))
    if metric_name == "squad":
        return RowStats(
            "mean", np.array([100.0 * metrics.squad_example(p, g)[1] for p, g in zip(preds, golds)])
        )
    if metric_name == "rouge":
        return RowStats(
            "mean",
            np.array([100.0 * metrics.rouge_example(p, g)["rougeL"] for p, g in zip(preds, golds)]),
        )
    if metric_name in ("pearson", "spearman"):
        return RowStats(metric_name, metrics.number_pairs(preds, golds))
    if metric_name in ("bleu", "chrf"):
        return RowStats(metric_name, metrics.sacrebleu_stats(metric_name, preds, golds))
    if metric_name == "set_f1":
        return RowStats("span", np.array([metrics.set_counts(p, g) for p, g in zip(preds, golds)]))
    if metric_name == "span_f1":
        return RowStats("span", np.array([metrics.span_counts(p, g) for p, g in zip(preds, golds)]))
    if metric_name == "macro_f1":
        names = list(dict.fromkeys(labels if labels is not None else golds))
        pos = {c: i for i, c in enumerate(names)}
        unknown = sorted({str(g) for g in golds if g not in pos})
        if unknown:
            raise ValueError(f"gold labels {unknown} are not in the label set {names}")
        rows = [[pos.get(p, -1) if p is not None else -1, pos[g]] for p, g in zip(preds, golds)]
        return RowStats("macro", np.array(rows), [str(c) for c in names])
    raise ValueError(f"no row statistics for metric {metric_name!r}")


def rows_digest(keys: Sequence[str]) -> str:
    """One fingerprint of an ordered list of row keys: equal digests = the same rows in the same order."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def row_key(row: Mapping[str, Any]) -> str:
    """A short fingerprint of one source row (its fields, whatever the prompt variant)."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def task_seed(seed: int, task: str) -> list[int]:
    """The seed of one task's resampling stream: fixed by (seed, task name), different per task."""
    return [int(seed), zlib.crc32(task.encode("utf-8"))]


def _weights(n: int, resamples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Draw counts of `resamples` bootstrap resamples of n examples, in chunks (chunk x n)."""
    chunk = max(1, _CELLS_PER_CHUNK // max(n, 1))
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + np.arange(b)[:, None] * n).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(float)


def bootstrap(
    stats: RowStats | Sequence[RowStats],
    *,
    resamples: int = RESAMPLES,
    seed: int | Sequence[int] = SEED,
) -> np.ndarray:
    """Scores of `resamples` bootstrap resamples of the examples.

    One RowStats -> shape (resamples,). Several (scores of different systems on the *same rows*, in
    the same order) -> shape (len(stats), resamples): every resample draws the same example indices
    for all of them (the paired bootstrap; subtract rows for the distribution of a difference).
    """
    single = isinstance(stats, RowStats)
    group = [stats] if single else list(stats)
    if not group or resamples < 1:
        raise ValueError("bootstrap needs row statistics and at least one resample")
    n = group[0].n
    if any(s.n != n for s in group):
        raise ValueError("a paired bootstrap needs every system scored on the same rows")
    rng = np.random.default_rng(seed)
    parts = [[] for _ in group]
    for w in _weights(n, resamples, rng):
        for k, s in enumerate(group):
            parts[k].append(s.score(w))
    out = np.stack([np.concatenate(p) for p in parts])
    return out[0] if single else out


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval holding `level` of the resampled values."""
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(np.asarray(values, dtype=float), [tail, 100.0 - tail])
    return float(lo), float(hi)


def paired_difference(
    a: RowStats,
    b: RowStats,
    *,
    resamples: int = RESAMPLES,
    seed: int | Sequence[int] = SEED,
    level: float = LEVEL,
) -> dict[str, Any]:
    """b - a on the same rows: the point difference, its paired-bootstrap interval and `tie`
    (the interval contains 0: the difference is inside the noise of this test set)."""
    va, vb = bootstrap([a, b], resamples=resamples, seed=seed)
    lo, hi = interval(vb - va, level)
    return {"diff": b.point() - a.point(), "low": lo, "high": hi, "tie": bool(lo <= 0.0 <= hi)}


# ------------------------------------------------------------------ results files


def ci_settings(resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """The `ci` block stored next to intervals in results JSON."""
    return {"level": level, "resamples": int(resamples), "seed": int(seed), "method": METHOD}


def task_stats(entry: Mapping[str, Any]) -> RowStats | None:
    """A results entry's RowStats (None for entries written without per-example statistics)."""
    pe = entry.get("per_example")
    return RowStats.from_json(pe) if isinstance(pe, Mapping) and "kind" in pe else None


def add_intervals(
    results: dict[str, Any], *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> dict[str, Any]:
    """Add `ci_low`/`ci_high` and the `ci` settings to every scored task of `evaluate`'s results, and
    `combined_ci_low`/`combined_ci_high` to the mean over tasks (each task resampled over its own
    examples, then the mean across tasks per resample). `resamples=0` adds nothing. Returns `results`."""
    if resamples <= 0:
        return results
    boots = {}
    for name, entry in results["tasks"].items():
        st = task_stats(entry) if "primary" in entry else None
        if st is None:
            continue
        vals = bootstrap(st, resamples=resamples, seed=task_seed(seed, name))
        boots[name] = vals
        entry["ci_low"], entry["ci_high"] = interval(vals, level)
        entry["ci"] = ci_settings(resamples, seed, level)
    scored = [n for n, e in results["tasks"].items() if "primary" in e]
    if scored and all(n in boots for n in scored):
        mean = np.mean([boots[n] for n in scored], axis=0)
        results["combined_ci_low"], results["combined_ci_high"] = interval(mean, level)
        results["ci"] = ci_settings(resamples, seed, level)
    return results


def compare_entries(
    tasks: Sequence[str], first: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """Is the mean primary score of `other` minus that of `first` outside the noise? `first[i]` and
    `other[i]` are two systems' results entries for task `tasks[i]` (one task: a plain difference).
    Returns `{"diff", "tie", "method", ...}`, or None when an entry has no per-example statistics.

    method `paired` (every pair was scored on the same rows: equal row digests): the example indices
    are drawn jointly and `low`/`high` is the 95 % interval of the difference; `tie` = it contains 0.
    method `overlap` (the rows differ): each side is resampled on its own (the same draws as its
    `ci_low`/`ci_high`), `first_ci`/`other_ci` are their intervals and `tie` = they overlap, a
    weaker test (two intervals can overlap while the difference is real)."""
    sa = [task_stats(e) for e in first]
    sb = [task_stats(e) for e in other]
    if not tasks or len(sa) != len(tasks) or len(sb) != len(tasks):
        raise ValueError("one entry per task on each side")
    if any(s is None for s in sa + sb):
        return None
    ci = first[0].get("ci") or {}
    resamples, seed = int(ci.get("resamples", RESAMPLES)), int(ci.get("seed", SEED))
    level = float(ci.get("level", LEVEL))
    diff = float(np.mean([y.point() for y in sb]) - np.mean([x.point() for x in sa]))
    paired = all(
        x.n == y.n and x.digest is not None and x.digest == y.digest for x, y in zip(sa, sb)
    )
    if paired:
        delta = np.mean(
            [
                np.subtract(*bootstrap([y, x], resamples=resamples, seed=task_seed(seed, t)))
                for t, x, y in zip(tasks, sa, sb)
            ],
            axis=0,
        )
        lo, hi = interval(delta, level)
        return {
            "diff": diff,
            "low": lo,
            "high": hi,
            "tie": bool(lo <= 0.0 <= hi),
            "method": "paired",
        }

    def mean_interval(side: list[RowStats]) -> tuple[float, float]:
        draws = [
            bootstrap(s, resamples=resamples, seed=task_seed(seed, t)) for t, s in zip(tasks, side)
        ]
        return interval(np.mean(draws, axis=0), level)

    (alo, ahi), (blo, bhi) = mean_interval(sa), mean_interval(sb)
    return {
        "diff": diff,
        "first_ci": [alo, ahi],
        "other_ci": [blo, bhi],
        "tie": bool(alo <= bhi and blo <= ahi),
        "method": "overlap",
    }
