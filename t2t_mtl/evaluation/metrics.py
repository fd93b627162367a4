"""Task metrics on already-parsed predictions: accuracy, macro-F1, label-set F1 (multi-label), SQuAD
EM/F1, entity span F1, ROUGE, BLEU and chrF (translation), Pearson and Spearman correlation.

Conventions shared by every function here:
- Scores are on a 0..100 scale (percent), so `primary_score` can compare tasks directly.
- A prediction of `None` means "the output could not be parsed"; it always counts as wrong
  (accuracy/EM/F1/ROUGE 0 for that example, no entities for span F1). `invalid_rate` reports how often
  it happened, so a low score can be told apart from a format problem. For the correlations (numbers)
  an unparsed prediction stands at the mean of the gold values: it carries no information, and
  correlation has no "wrong" value to give it.
- Correlations are reported ×100 (Pearson r = 0.873 -> 87.3), as GLUE reports STS-B; a constant
  prediction (or gold) column has no correlation and scores 0.
- `preds` and `golds` are parallel sequences; a length mismatch or an empty input is a programming error
  (ValueError), never silently scored.

Span F1, ROUGE, BLEU and chrF delegate to the reference libraries (seqeval, rouge-score, sacrebleu
with its default signatures: BLEU 13a tokenisation and exponential smoothing, chrF2 with character
6-grams) so numbers match what papers report; they are imported lazily because each costs ~1.5 s and
most commands never score. BLEU and chrF are corpus metrics: sums of per-row n-gram statistics
(`sacrebleu_stats`), which is also what the bootstrap resamples.
This module imports no torch / transformers (the `compare` verb and reports use it without them).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from t2t_mtl.core.errors import did_you_mean

__all__ = [
    "MAIN_KEY",
    "METRIC_NAMES",
    "ROUGE_TYPES",
    "accuracy",
    "bleu",
    "chrf",
    "compute",
    "invalid_rate",
    "macro_f1",
    "normalize_answer",
    "number_pairs",
    "pearson",
    "primary_score",
    "reference_list",
    "rouge",
    "rouge_example",
    "set_counts",
    "set_f1",
    "sacrebleu_scores",
    "sacrebleu_stats",
    "span_counts",
    "span_f1",
    "spearman",
    "squad",
    "squad_example",
]

# Metric name (as written in a template's `metric:` list) -> the result key that is its main number.
MAIN_KEY: dict[str, str] = {
    "accuracy": "accuracy",
    "macro_f1": "macro_f1",
    "squad": "f1",
    "span_f1": "span_f1",
    "rouge": "rougeL",
    "set_f1": "set_f1",
    "pearson": "pearson",
    "spearman": "spearman",
    "bleu": "bleu",
    "chrf": "chrf",
}
METRIC_NAMES = tuple(MAIN_KEY)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check_pair(preds: Sequence, golds: Sequence) -> int:
    """Return the number of examples; reject empty or mismatched inputs (caller bugs)."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold values")
    if len(preds) == 0:
        raise ValueError("no examples to score")
    return len(preds)


# ---------------------------------------------------------------- labels


def accuracy(preds: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """Percent of predictions equal to the gold label; a None (unparsed) prediction is wrong."""
    n = _check_pair(preds, golds)
    return 100.0 * sum(p is not None and p == g for p, g in zip(preds, golds)) / n


def macro_f1(
    preds: Sequence[Hashable], golds: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> float:
    """Unweighted mean over classes of per-class F1 = 2TP / (2TP + FP + FN), in percent.

    `labels` is the label set (a template's answer choices); None means the set of gold labels.
    A None prediction, or one outside the label set, is a false negative for the gold class and a false
    positive for no class. Labels that occur in neither golds nor predictions are left out of the mean
    (their F1 is undefined), as sklearn does; a gold label outside `labels` is a ValueError.
    """
    _check_pair(preds, golds)
    label_set = list(dict.fromkeys(labels)) if labels is not None else list(dict.fromkeys(golds))
    known = set(label_set)
    unknown = sorted({str(g) for g in golds if g not in known})
    if unknown:
        raise ValueError(f"gold labels {unknown} are not in the label set {label_set}")
    tp: Counter = Counter()
    fp: Counter = Counter()
    fn: Counter = Counter()
    for p, g in zip(preds, golds):
        if p is not None and p == g:
            tp[g] += 1
            continue
        fn[g] += 1
        fp[p] += 1  # None / out-of-set keys are never read back: a false positive for no class
    present = [c for c in label_set if tp[c] + fp[c] + fn[c] > 0]
    f1s = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in present]
    return 100.0 * sum(f1s) / len(f1s)


# ---------------------------------------------------------------- SQuAD v1.1

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Official SQuAD v1.1 normalisation: lower case, drop punctuation, drop a/an/the, squeeze spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _token_f1(pred: str, gold: str) -> float:
    """SQuAD v1.1 bag-of-tokens F1 in 0..1 (two empty answers score 0, as in the v1.1 script)."""
    p_toks = normalize_answer(pred).split()
    g_toks = normalize_answer(gold).split()
    same = sum((Counter(p_toks) & Counter(g_toks)).values())
    if same == 0:
        return 0.0
    precision = same / len(p_toks)
    recall = same / len(g_toks)
    return 2 * precision * recall / (precision + recall)


def reference_list(golds: str | Sequence[str]) -> list[str]:
    """A row's gold text or texts as a list (one string: one reference)."""
    return [golds] if isinstance(golds, str) else list(golds)


def _as_list(golds: str | Sequence[str], what: str) -> list[str]:
    """One gold string or a list of alternatives -> a non-empty list."""
    out = reference_list(golds)
    if not out:
        raise ValueError(f"an example has no {what}")
    return out


def squad_example(pred: str | None, golds: str | Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction in 0..1, each the max over the gold answers; None scores 0."""
    answers = _as_list(golds, "gold answer")
    if pred is None:
        return 0.0, 0.0
    norm = normalize_answer(pred)
    em = max(float(norm == normalize_answer(a)) for a in answers)
    f1 = max(_token_f1(pred, a) for a in answers)
    return em, f1


def squad(
    preds: Sequence[str | None], gold_lists: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """SQuAD v1.1 `{"exact_match", "f1"}` in 0..100: per-example max over gold answers, then the mean."""
    n = _check_pair(preds, gold_lists)
    ems, f1s = zip(*(squad_example(p, g) for p, g in zip(preds, gold_lists)))
    return {"exact_match": 100.0 * sum(ems) / n, "f1": 100.0 * sum(f1s) / n}


# ---------------------------------------------------------------- entity spans (seqeval)


def _pred_tags(
    preds: Sequence[Sequence[str] | None], golds: Sequence[Sequence[str]]
) -> list[list[str]]:
    """Unparsed predictions become all-O; a length mismatch means tags not aligned to the tokens (a bug)."""
    out = []
    for i, (p, g) in enumerate(zip(preds, golds)):
        if p is None:
            out.append(["O"] * len(g))
            continue
        if len(p) != len(g):
            raise ValueError(f"example {i}: {len(p)} predicted tags for {len(g)} gold tags")
        out.append(list(p))
    return out


def span_f1(
    pred_tag_seqs: Sequence[Sequence[str] | None],
    gold_tag_seqs: Sequence[Sequence[str]],
    *,
    per_type: bool = False,
    strict: bool = False,
) -> dict[str, Any]:
    """Entity-level micro precision / recall / F1 (0..100) of IOB2 tag sequences, computed by seqeval.

    An entity counts only when type and both boundaries match. The default is seqeval's default mode
    (conlleval-compatible: a stray I-X starts an entity); `strict=True` uses seqeval's strict IOB2 mode,
    where malformed chunks count as nothing. A None prediction (unparsed) predicts no entity.
    With no entity on either side all three are 0 (seqeval's zero_division=0).
    Returns `{"precision", "recall", "f1"}`, plus `"per_type": {TYPE: {"precision", "recall", "f1",
    "support"}}` when `per_type` is true.
    """
    _check_pair(pred_tag_seqs, gold_tag_seqs)
    y_true = [list(g) for g in gold_tag_seqs]
    y_pred = _pred_tags(pred_tag_seqs, gold_tag_seqs)
    if strict:
        from seqeval.metrics.v1 import precision_recall_fscore_support as prfs
        from seqeval.scheme import IOB2, Entities

        kw: dict[str, Any] = {"scheme": IOB2}

        def type_names() -> list[str]:
            return sorted(Entities(y_true, IOB2).unique_tags | Entities(y_pred, IOB2).unique_tags)
    else:
        from seqeval.metrics.sequence_labeling import get_entities
        from seqeval.metrics.sequence_labeling import precision_recall_fscore_support as prfs

        kw = {}

        def type_names() -> list[str]:
            return sorted(
                {t for t, _, _ in get_entities(y_true)} | {t for t, _, _ in get_entities(y_pred)}
            )

    p, r, f, _ = prfs(y_true, y_pred, average="micro", zero_division=0, **kw)
    result: dict[str, Any] = {
        "precision": 100.0 * float(p),
        "recall": 100.0 * float(r),
        "f1": 100.0 * float(f),
    }
    if per_type:
        names = type_names()  # prfs(average=None) returns arrays in this sorted order
        ps, rs, fs, ss = prfs(y_true, y_pred, average=None, zero_division=0, **kw)
        result["per_type"] = {
            name: {
                "precision": 100.0 * float(a),
                "recall": 100.0 * float(b),
                "f1": 100.0 * float(c),
                "support": int(s),
            }
            for name, a, b, c, s in zip(names, ps, rs, fs, ss)
        }
    return result


def span_counts(pred_tags: Sequence[str] | None, gold_tags: Sequence[str]) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) entity counts of one tag sequence, in
    seqeval's default mode (a None prediction predicts no entity).

    seqeval's micro span F1 over many sequences is exactly 2tp / (2tp + fp + fn) of these counts
    summed over the sequences (its entities carry their sequence's offsets, so none match across
    sequences); the confidence intervals recompute span F1 on resamples from them.
    """
    from seqeval.metrics.sequence_labeling import get_entities

    pred = _pred_tags([pred_tags], [gold_tags])[0]
    true_set = set(get_entities(list(gold_tags)))
    pred_set = set(get_entities(pred))
    tp = len(true_set & pred_set)
    return tp, len(pred_set) - tp, len(true_set) - tp


# ---------------------------------------------------------------- ROUGE (rouge-score)


@lru_cache(maxsize=1)
def _rouge_scorer():
    """One shared scorer (Porter stemmer, as in the ROUGE-1.5.5 `-m` option most papers use)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_example(pred: str | None, refs: str | Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (0..1) of one prediction; with several references each type takes the max."""
    ref_list = _as_list(refs, "reference summary")
    scores = _rouge_scorer().score_multi(ref_list, pred or "")
    return {k: float(scores[k].fmeasure) for k in ROUGE_TYPES}


def rouge(
    preds: Sequence[str | None], refs_or_ref_lists: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures in 0..100 (`{"rouge1", "rouge2", "rougeL"}`), by rouge-score.

    Each reference is a string or a list of alternatives (max per type over them, rouge-score's
    `score_multi`). A None prediction scores 0. Tokenisation is rouge-score's: lower-cased [a-z0-9] runs.
    """
    n = _check_pair(preds, refs_or_ref_lists)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for p, refs in zip(preds, refs_or_ref_lists):
        for k, v in rouge_example(p, refs).items():
            totals[k] += v
    return {k: 100.0 * v / n for k, v in totals.items()}


# ---------------------------------------------------------------- label sets (multi-label)


def set_counts(pred: Sequence[Hashable] | None, gold: Sequence[Hashable]) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one row's predicted label set against
    its gold set (a None prediction names no label)."""
    p, g = set(pred or ()), set(gold)
    tp = len(p & g)
    return tp, len(p) - tp, len(g) - tp


def set_f1(
    preds: Sequence[Sequence[Hashable] | None], golds: Sequence[Sequence[Hashable]]
) -> dict[str, float]:
    """Micro-averaged precision, recall and F1 over every (row, label) decision of a multi-label
    task: the summed `set_counts`, F1 = 2tp / (2tp + fp + fn) (sklearn's `average="micro"` on
    binarised labels). Rows whose gold and predicted sets are both empty add nothing; with no label
    anywhere there is nothing to score and F1 is 0, as seqeval's span F1 without entities."""
    _check_pair(preds, golds)
    tp = fp = fn = 0
    for p, g in zip(preds, golds):
        a, b, c = set_counts(p, g)
        tp, fp, fn = tp + a, fp + b, fn + c
    return {
        "set_precision": 100.0 * tp / (tp + fp) if tp + fp else 0.0,
        "set_recall": 100.0 * tp / (tp + fn) if tp + fn else 0.0,
        "set_f1": 200.0 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
    }


# ---------------------------------------------------------------- BLEU / chrF (sacrebleu)


@lru_cache(maxsize=2)
def _sacrebleu(name: str):
    from sacrebleu.metrics import BLEU, CHRF

    if name == "bleu":
        return BLEU()
    if name == "chrf":
        return CHRF()
    raise ValueError(f"no sacrebleu metric {name!r}")


def sacrebleu_stats(
    name: str, preds: Sequence[str | None], refs_or_ref_lists: Sequence[str | Sequence[str]]
) -> np.ndarray:
    """Per-row sufficient statistics (n, k) of `name` (bleu | chrf): n-gram matches and totals,
    lengths. A row may have several references (its own number); None scores as the empty answer."""
    n = _check_pair(preds, refs_or_ref_lists)
    refs = [_as_list(r, name) for r in refs_or_ref_lists]
    width = max(len(r) for r in refs)
    # sacrebleu takes reference *streams*; None pads a row that has fewer references
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    hyps = ["" if p is None else str(p) for p in preds]
    stats = _sacrebleu(name)._extract_corpus_statistics(hyps, streams)
    return np.asarray(stats, dtype=float).reshape(n, -1)


def sacrebleu_scores(name: str, stats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`name`'s corpus score (0..100) for each row of `weights` (b, n): the metric of the weighted sum
    of the per-row statistics, as sacrebleu's corpus_score (and its paired bootstrap) compute it."""
    metric = _sacrebleu(name)
    sums = np.atleast_2d(np.asarray(weights, dtype=float)) @ stats
    return np.array([metric._compute_score_from_stats(list(row)).score for row in sums])


def bleu(preds: Sequence[str | None], refs_or_ref_lists: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults), 0..100; a row's references may be several."""
    stats = sacrebleu_stats("bleu", preds, refs_or_ref_lists)
    return float(sacrebleu_scores("bleu", stats, np.ones(len(stats)))[0])


def chrf(preds: Sequence[str | None], refs_or_ref_lists: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF2 (sacrebleu defaults), 0..100; a row's references may be several."""
    stats = sacrebleu_stats("chrf", preds, refs_or_ref_lists)
    return float(sacrebleu_scores("chrf", stats, np.ones(len(stats)))[0])


# ---------------------------------------------------------------- numbers (regression)


def number_pairs(preds: Sequence[float | None], golds: Sequence[float]) -> np.ndarray:
    """(n, 2) float array of (prediction, gold); an unparsed prediction (None) stands at the golds' mean."""
    _check_pair(preds, golds)
    gold = np.asarray(golds, dtype=float)
    if not np.isfinite(gold).all():
        raise ValueError("gold values of a correlation must be finite numbers")
    mean = float(gold.mean())
    pred = np.array([mean if p is None else float(p) for p in preds], dtype=float)
    return np.stack([pred, gold], axis=1)


def weighted_pearson(pairs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pearson r x 100 of the (prediction, gold) `pairs` (n, 2) for each row of `weights` (b, n):
    example i counted weights[k, i] times (a bootstrap resample's draw counts; ones = as evaluated).
    0 where either column is constant."""
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    x, y = pairs[:, 0], pairs[:, 1]
    # centred first (on the unweighted means) so the sums below do not cancel catastrophically
    x, y = x - x.mean(), y - y.mean()
    n = w.sum(axis=1)
    sx, sy = w @ x, w @ y
    sxx, syy, sxy = w @ (x * x), w @ (y * y), w @ (x * y)
    vx, vy = n * sxx - sx * sx, n * syy - sy * sy
    cov = n * sxy - sx * sy
    ok = (vx > 1e-12 * np.maximum(n * sxx, 1e-300)) & (vy > 1e-12 * np.maximum(n * syy, 1e-300))
    return np.where(ok, 100.0 * cov / np.sqrt(np.where(ok, vx * vy, 1.0)), 0.0)


def _average_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each example's rank (1-based, ties averaged) among the examples repeated by `weights` (b, n)."""
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first position of each value
    group = np.cumsum(np.r_[True, ranked[1:] != ranked[:-1]]) - 1  # sorted position -> value group
    per_group = np.add.reduceat(
        weights[:, order], starts, axis=1
    )  # (b, groups) copies of each value
    before = np.cumsum(per_group, axis=1) - per_group
    avg = before + (per_group + 1.0) / 2.0  # copies fill ranks before+1 .. before+count
    out = np.empty_like(weights, dtype=float)
    out[:, order] = avg[:, group]
    return out


def weighted_spearman(pairs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Spearman rho x 100 (Pearson r of average ranks) for each row of `weights`, as `weighted_pearson`."""
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    rx, ry = _average_ranks(pairs[:, 0], w), _average_ranks(pairs[:, 1], w)
    out = np.empty(len(w))
    for k in range(len(w)):  # the ranks differ per resample
        out[k] = weighted_pearson(np.stack([rx[k], ry[k]], axis=1), w[k])[0]
    return out


def pearson(preds: Sequence[float | None], golds: Sequence[float]) -> float:
    """Pearson correlation x 100 of parsed numbers with the gold numbers (see module conventions)."""
    pairs = number_pairs(preds, golds)
    return float(weighted_pearson(pairs, np.ones(len(pairs)))[0])


def spearman(preds: Sequence[float | None], golds: Sequence[float]) -> float:
    """Spearman rank correlation x 100 (ties get their average rank), as `pearson`."""
    pairs = number_pairs(preds, golds)
    return float(weighted_spearman(pairs, np.ones(len(pairs)))[0])


# ---------------------------------------------------------------- dispatch


def _check_names(metric_names: Iterable[str]) -> list[str]:
    names = [metric_names] if isinstance(metric_names, str) else list(metric_names)
    if not names:
        raise ValueError("no metric named")
    for name in names:
        if name not in MAIN_KEY:
            hint = did_you_mean(name, METRIC_NAMES)
            raise ValueError(f"unknown metric {name!r}" + (f" ({hint})" if hint else ""))
    return names


def compute(
    metric_names: str | Sequence[str],
    preds: Sequence[Any],  # per metric: labels, answer texts or tag lists (see below)
    golds: Sequence[Any],
    *,
    labels: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """Run the named metrics on one task's predictions; returns one flat dict of 0..100 numbers.

    Keys per metric: accuracy -> `accuracy`; macro_f1 -> `macro_f1` (uses `labels`); squad ->
    `exact_match`, `f1`; span_f1 -> `span_precision`, `span_recall`, `span_f1` (preds/golds are IOB2 tag
    sequences); rouge -> `rouge1`, `rouge2`, `rougeL`; set_f1 -> `set_precision`, `set_recall`, `set_f1` (preds/golds are label lists);
    bleu -> `bleu`; chrf -> `chrf`; pearson -> `pearson`; spearman -> `spearman`
    (preds are floats or None, golds floats). Gold values for squad/rouge may be a string or a
    list of alternatives. None in `preds` means unparsed (scored as wrong).
    """
    out: dict[str, float] = {}
    for name in _check_names(metric_names):
        if name == "accuracy":
            out["accuracy"] = accuracy(preds, golds)
        elif name == "macro_f1":
            out["macro_f1"] = macro_f1(preds, golds, labels)
        elif name == "squad":
            out.update(squad(preds, golds))
        elif name == "span_f1":
            s = span_f1(preds, golds)
            out.update(span_precision=s["precision"], span_recall=s["recall"], span_f1=s["f1"])
        elif name == "rouge":
            out.update(rouge(preds, golds))
        elif name == "set_f1":
            out.update(set_f1(preds, golds))
        elif name == "bleu":
            out["bleu"] = bleu(preds, golds)
        elif name == "chrf":
            out["chrf"] = chrf(preds, golds)
        elif name == "pearson":
            out["pearson"] = pearson(preds, golds)
        elif name == "spearman":
            out["spearman"] = spearman(preds, golds)
    return out


def primary_score(task_metric_names: str | Sequence[str], results: Mapping[str, float]) -> float:
    """The task's headline number (0..100): the main key of its first metric (`MAIN_KEY`) in `results`."""
    key = MAIN_KEY[_check_names(task_metric_names)[0]]
    if key not in results:
        raise ValueError(
            f"results have no {key!r} (got {sorted(results)}); compute the metric first"
        )
    return float(results[key])


def invalid_rate(items: Iterable[object]) -> float:
    """Percent of outputs that could not be parsed.

    Each item may be a parse result with a `.valid` attribute (parsing.Parsed), a bool validity flag
    (True = valid), or a prediction value where None means unparsed. Empty input gives 0.
    """
    n = bad = 0
    for item in items:
        n += 1
        if item is None:
            bad += 1
        elif isinstance(item, bool):
            bad += not item
        elif hasattr(item, "valid"):
            bad += not item.valid
    return 100.0 * bad / n if n else 0.0
