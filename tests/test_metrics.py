"""Metrics against hand-computed values and against the reference libraries on real data slices."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from t2t_mtl.evaluation import metrics as M

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
TYPES = ("PER", "LOC", "ORG", "MISC")


def _rows(task: str, split: str, limit: int | None = None) -> list[dict]:
    path = REAL / task / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"real data slice {path} not present")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) == limit:
                break
    return rows


# ---------------------------------------------------------------- accuracy / macro-F1


def test_accuracy_hand_computed():
    preds = ["a", "b", None, "a", "c", "zzz"]
    golds = ["a", "a", "b", "a", "c", "c"]
    # correct: positions 0, 3, 4 -> 3 of 6; None and the out-of-set "zzz" are wrong
    assert M.accuracy(preds, golds) == pytest.approx(50.0)


def test_macro_f1_hand_computed():
    preds = ["a", "b", None, "a", "c", "zzz"]
    golds = ["a", "a", "b", "a", "c", "c"]
    # per class F1 = 2TP / (2TP + FP + FN):
    #   a: TP=2 (0,3), FP=0, FN=1 (1)              -> 4/5 = 0.8
    #   b: TP=0, FP=1 (pos 1), FN=1 (pos 2, None)  -> 0
    #   c: TP=1 (4), FP=0, FN=1 (5, "zzz")          -> 2/3
    # "zzz" is outside the label set: FN for c, FP for nobody. Mean = (0.8 + 0 + 2/3) / 3
    expected = 100 * (0.8 + 0 + 2 / 3) / 3
    assert M.macro_f1(preds, golds, ["a", "b", "c"]) == pytest.approx(expected)
    # "d" occurs in neither golds nor predictions: undefined F1, left out of the mean
    assert M.macro_f1(preds, golds, ["a", "b", "c", "d"]) == pytest.approx(expected)
    # labels=None -> the gold label set, same classes here
    assert M.macro_f1(preds, golds) == pytest.approx(expected)


def test_macro_f1_predicted_only_label_counts():
    # a: TP=1, FN=1 -> 2/3; d (predicted, never gold): TP=0, FP=1 -> 0; mean = 1/3
    assert M.macro_f1(["d", "a"], ["a", "a"], ["a", "d"]) == pytest.approx(100 / 3)
    # without the label set, "d" is not a class: only a counts
    assert M.macro_f1(["d", "a"], ["a", "a"]) == pytest.approx(200 / 3)


def test_label_metric_input_errors():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        M.accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        M.macro_f1([], [], ["a"])
    with pytest.raises(ValueError, match="not in the label set"):
        M.macro_f1(["a"], ["x"], ["a", "b"])


# ---------------------------------------------------------------- SQuAD


def test_normalize_answer_official_rules():
    assert M.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert M.normalize_answer("an apple, a pear") == "apple pear"
    # articles are removed only as whole words: "theatre"/"another" stay
    assert M.normalize_answer("Theatre of another") == "theatre of another"
    assert M.normalize_answer("  U.S.A. ") == "usa"


def test_squad_hand_computed():
    preds = [
        "The Denver Broncos!",  # -> "denver broncos" == gold 1: EM 1, F1 1
        "Carolina",  # vs "carolina panthers": common 1, P=1/1, R=1/2 -> F1 = 2/3; EM 0
        "in the year 2016",  # tokens [in, year, 2016]
        #   vs "2016": P=1/3, R=1 -> F1 = 2*(1/3)/(4/3) = 1/2
        #   vs "february 7 2016": P=1/3, R=1/3 -> 1/3; max = 1/2; EM 0
        None,  # unparsed: 0, 0
        "an apple, an apple",  # [apple, apple] vs [apple, apple, apple]: common min(2,3)=2,
        #   P=1, R=2/3 -> F1 = 2*(2/3)/(5/3) = 4/5; EM 0
    ]
    golds = [
        ["Denver Broncos", "Broncos"],
        ["Carolina Panthers"],
        ["2016", "February 7, 2016"],
        ["x"],
        "apple apple apple",  # a bare string is one gold answer
    ]
    out = M.squad(preds, golds)
    assert out["exact_match"] == pytest.approx(100 * 1 / 5)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 / 2 + 0 + 4 / 5) / 5)  # 59.33...
    assert M.squad_example("Carolina", ["Carolina Panthers"]) == pytest.approx((0.0, 2 / 3))


def test_squad_v11_empty_normalisation_quirk():
    # both normalise to "": the v1.1 script gives EM 1 but F1 0 (no shared tokens)
    assert M.squad_example("The", ["a"]) == (1.0, 0.0)


def test_squad_needs_a_gold_answer():
    with pytest.raises(ValueError, match="no gold answer"):
        M.squad(["x"], [[]])


def test_squad_on_real_slice_gold_answers_score_100():
    rows = _rows("qa_squad", "validation", limit=200)
    golds = [r["answers"]["text"] for r in rows]
    # the last listed answer is always one of the golds (max over golds), lower-cased with extra punctuation
    preds = [g[-1].upper() + " ." for g in golds]
    assert M.squad(preds, golds) == {"exact_match": 100.0, "f1": 100.0}


# ---------------------------------------------------------------- span F1


def _spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Independent IOB2 chunker (conlleval rule: an I-X that does not continue X starts a chunk)."""
    out, start, typ = set(), None, None
    for i, t in enumerate(list(tags) + ["O"]):
        continues = t.startswith("I-") and t[2:] == typ
        if not continues:
            if start is not None:
                out.add((typ, start, i - 1))
            start, typ = (i, t[2:]) if t != "O" else (None, None)
    return out


def _encode(spans: list[tuple[str, int, int]], n: int) -> list[str]:
    tags = ["O"] * n
    for typ, s, e in spans:
        tags[s] = f"B-{typ}"
        for i in range(s + 1, e + 1):
            tags[i] = f"I-{typ}"
    return tags


def _perturb(gold: set, n: int, rng: random.Random) -> list[tuple[str, int, int]]:
    """Drop entities, change their type, shift a boundary, add spurious ones; keep them non-overlapping."""
    out = []
    for typ, s, e in sorted(gold, key=lambda x: (x[1], x[2])):
        r = rng.random()
        if r < 0.15:
            continue
        if r < 0.30:
            typ = rng.choice([t for t in TYPES if t != typ])
        elif r < 0.45:
            if rng.random() < 0.5:
                s = min(max(0, s + rng.choice((-1, 1))), e)
            else:
                e = max(min(n - 1, e + rng.choice((-1, 1))), s)
        out.append((typ, s, e))
    if rng.random() < 0.2:
        s = rng.randrange(n)
        out.append((rng.choice(TYPES), s, min(n - 1, s + rng.randrange(3))))
    kept, last_end = [], -1
    for typ, s, e in sorted(out, key=lambda x: (x[1], x[2])):
        if s > last_end:
            kept.append((typ, s, e))
            last_end = e
    return kept


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return 100 * p, 100 * r, (200 * p * r / (p + r) if p + r else 0.0)


def test_span_f1_matches_seqeval_and_set_of_spans_on_conll():
    from seqeval.metrics import f1_score, precision_score, recall_score

    rows = _rows("ner_conll2003", "validation")
    rng = random.Random(1234)
    golds, preds = [], []
    tp = n_pred = n_gold = 0
    by_type = {t: [0, 0, 0] for t in TYPES}  # tp, pred, gold
    for row in rows:
        gold_tags = row["ner_tags"]
        gold = _spans(gold_tags)
        if rng.random() < 0.05:
            pred_spans, pred_tags = [], None  # unparsed output: predicts nothing
        else:
            pred_spans = _perturb(gold, len(gold_tags), rng)
            pred_tags = _encode(pred_spans, len(gold_tags))
        golds.append(gold_tags)
        preds.append(pred_tags)
        pred = set(pred_spans)
        tp += len(gold & pred)
        n_pred += len(pred)
        n_gold += len(gold)
        for t in TYPES:
            by_type[t][0] += len({x for x in gold & pred if x[0] == t})
            by_type[t][1] += len({x for x in pred if x[0] == t})
            by_type[t][2] += len({x for x in gold if x[0] == t})
    assert 0 < tp < n_gold and tp < n_pred  # the perturbation really hurt, but not completely

    out = M.span_f1(preds, golds, per_type=True)
    p, r, f = _prf(tp, n_pred, n_gold)
    assert out["precision"] == pytest.approx(p)
    assert out["recall"] == pytest.approx(r)
    assert out["f1"] == pytest.approx(f)

    filled = [p_ if p_ is not None else ["O"] * len(g) for p_, g in zip(preds, golds)]
    assert out["precision"] == pytest.approx(100 * precision_score(golds, filled))
    assert out["recall"] == pytest.approx(100 * recall_score(golds, filled))
    assert out["f1"] == pytest.approx(100 * f1_score(golds, filled))

    assert set(out["per_type"]) == set(TYPES)
    for t, (ttp, tpred, tgold) in by_type.items():
        tp_, tr_, tf_ = _prf(ttp, tpred, tgold)
        got = out["per_type"][t]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((tp_, tr_, tf_)), t
        assert got["support"] == tgold

    # gold against itself is perfect; the strict IOB2 mode agrees on well-formed tags
    assert M.span_f1(golds, golds)["f1"] == pytest.approx(100.0)
    assert M.span_f1(preds, golds, strict=True)["f1"] == pytest.approx(out["f1"])


def test_span_f1_hand_computed():
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    # MISC boundary wrong, PER right: 1 of 2 predicted, 1 of 2 gold
    assert M.span_f1(pred, gold) == pytest.approx({"precision": 50.0, "recall": 50.0, "f1": 50.0})
    # None = unparsed: the first sentence predicts nothing -> P = 1/1, R = 1/2, F1 = 2/3
    out = M.span_f1([None, gold[1]], gold)
    assert out == pytest.approx({"precision": 100.0, "recall": 50.0, "f1": 200 / 3})


def test_span_f1_default_vs_strict_on_stray_inside_tag():
    gold = [["B-PER", "I-PER", "O"]]
    pred = [["I-PER", "I-PER", "O"]]  # malformed IOB2
    assert M.span_f1(pred, gold)["f1"] == pytest.approx(100.0)  # conlleval: the I- starts the chunk
    assert M.span_f1(pred, gold, strict=True)["f1"] == pytest.approx(0.0)


def test_span_f1_rejects_misaligned_tags():
    with pytest.raises(ValueError, match="example 0: 2 predicted tags for 3 gold tags"):
        M.span_f1([["O", "O"]], [["O", "O", "B-PER"]])


# ---------------------------------------------------------------- ROUGE


def test_rouge_hand_computed():
    # pred [the cat sat on the mat], ref [the cat is on the mat] (all <= 3 chars: no stemming)
    #   rouge1: overlap the:2 cat on mat -> 5/6 both ways
    #   rouge2: bigrams shared: "the cat", "on the", "the mat" -> 3/5
    #   rougeL: LCS "the cat on the mat" -> 5/6
    out = M.rouge(["the cat sat on the mat"], ["The cat is on the mat."])
    assert out == pytest.approx({"rouge1": 500 / 6, "rouge2": 60.0, "rougeL": 500 / 6})
    # Porter stemming is on: running -> run, dogs -> dog
    assert M.rouge(["running dogs"], ["run dog"])["rouge1"] == pytest.approx(100.0)
    # max over several references, per example; a None prediction scores 0
    out = M.rouge(["a b c", None], [["x y", "a b c"], "a b c"])
    assert out == pytest.approx({"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0})


def _perturb_text(text: str, rng: random.Random, others: list[str]) -> str | None:
    r = rng.random()
    if r < 0.05:
        return None
    if r < 0.15:
        return rng.choice(others)  # an unrelated summary
    words = text.split()
    words = [w for w in words if rng.random() > 0.25]  # drop words
    if len(words) > 3 and rng.random() < 0.5:  # swap two words
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def test_rouge_matches_rouge_score_on_scitldr():
    from rouge_score import rouge_scorer

    rows = _rows("summarization_scitldr", "validation", limit=150)
    rng = random.Random(7)
    summaries = [r["summary"] for r in rows]
    preds = [_perturb_text(s, rng, summaries) for s in summaries]
    ref_lists = [r["summaries"] for r in rows]
    assert any(len(x) > 1 for x in ref_lists)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    single = {k: 0.0 for k in M.ROUGE_TYPES}
    multi = {k: 0.0 for k in M.ROUGE_TYPES}
    for p, s, refs in zip(preds, summaries, ref_lists):
        text = p if p is not None else ""
        one = scorer.score(s, text)
        per_ref = [scorer.score(ref, text) for ref in refs]
        for k in M.ROUGE_TYPES:
            single[k] += one[k].fmeasure
            multi[k] += max(x[k].fmeasure for x in per_ref)
    n = len(rows)
    got_single = M.rouge(preds, summaries)
    got_multi = M.rouge(preds, ref_lists)
    for k in M.ROUGE_TYPES:
        assert got_single[k] == pytest.approx(100 * single[k] / n)
        assert got_multi[k] == pytest.approx(100 * multi[k] / n)
        assert 10 < got_single[k] < 95  # perturbed: neither perfect nor unrelated
        assert got_multi[k] >= got_single[k]  # summary is the first reference, max can only help


# ---------------------------------------------------------------- dispatch


# ---------------------------------------------------------------- label sets (parse: labels)


def test_set_f1_is_sklearns_micro_f1_on_binarised_labels():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(5)
    labels = ["politics", "sports", "business", "tech", "health"]
    golds = [[x for x in labels if rng.random() < 0.35] for _ in range(60)]
    preds = [
        None if i % 13 == 0 else [x for x in labels if (x in g) == (rng.random() < 0.8)]
        for i, g in enumerate(golds)
    ]

    def onehot(rows):
        return [[int(x in (r or [])) for x in labels] for r in rows]

    got = M.set_f1(preds, golds)
    y, p = onehot(golds), onehot(preds)
    assert got["set_f1"] == pytest.approx(100 * sk.f1_score(y, p, average="micro"))
    assert got["set_precision"] == pytest.approx(100 * sk.precision_score(y, p, average="micro"))
    assert got["set_recall"] == pytest.approx(100 * sk.recall_score(y, p, average="micro"))
    assert M.compute(["set_f1", "accuracy"], preds, golds)["accuracy"] == pytest.approx(
        100 * sum(p == g for p, g in zip(preds, golds)) / 60
    )  # accuracy of label sets: the whole set right


def test_set_f1_hand_computed():
    assert M.set_counts(["a", "b"], ["b", "c"]) == (1, 1, 1)
    assert M.set_counts(None, ["a"]) == (0, 0, 1)
    got = M.set_f1([["a", "b"], [], None], [["b", "c"], [], ["a"]])
    assert got == {
        "set_precision": pytest.approx(50.0),
        "set_recall": pytest.approx(100 / 3),
        "set_f1": pytest.approx(200 / 5),
    }
    assert M.set_f1([[]], [[]])["set_f1"] == 0.0  # nothing to score, as span F1 without entities


# ---------------------------------------------------------------- BLEU / chrF (sacrebleu)


def _streams(refs):
    width = max(len(r) if isinstance(r, list) else 1 for r in refs)
    rows = [r if isinstance(r, list) else [r] for r in refs]
    return [[r[k] if k < len(r) else None for r in rows] for k in range(width)]


def test_bleu_and_chrf_are_sacrebleus_corpus_scores_with_several_references():
    import sacrebleu

    hyps = ["The cat sat on the mat.", "A quick brown fox jumps.", None, "Bonjour le monde", ""]
    refs = [
        ["The cat is on the mat.", "There is a cat on the mat."],
        "The fast brown fox jumps.",
        "Hello there, general.",
        "Bonjour tout le monde",
        ["Nothing", "Nothing at all", "Really nothing"],
    ]
    plain = ["" if h is None else h for h in hyps]  # an unparsed answer scores as the empty one
    assert M.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(plain, _streams(refs)).score)
    assert M.chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(plain, _streams(refs)).score)
    assert M.compute(["chrf", "bleu"], hyps, refs) == {
        "chrf": M.chrf(hyps, refs),
        "bleu": M.bleu(hyps, refs),
    }
    assert M.primary_score(["chrf", "bleu"], M.compute(["chrf", "bleu"], hyps, refs)) == M.chrf(
        hyps, refs
    )
    # a corpus is not the mean of its sentences: scores come from the summed statistics
    per_row = [M.chrf([h], [r]) for h, r in zip(hyps, refs)]
    assert M.chrf(hyps, refs) != pytest.approx(sum(per_row) / len(per_row))
    assert M.bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)
    assert M.bleu(["Hi there"], ["Hi there"]) == 0.0  # no 4-grams: why short answers use chrF
    assert M.chrf(["Hi there"], ["Hi there"]) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        M.bleu(["x"], [[]])


# ---------------------------------------------------------------- correlations (parse: number)


def test_pearson_and_spearman_match_scipy_with_ties_and_unparsed_answers():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    golds = [rng.choice([1.0, 2.0, 2.5, 3.0, 4.0, 4.5, 5.0]) for _ in range(80)]  # many ties
    preds = [round(g + rng.gauss(0, 1.2)) for g in golds]  # integer answers: ties too
    assert M.pearson(preds, golds) == pytest.approx(100 * stats.pearsonr(preds, golds)[0])
    assert M.spearman(preds, golds) == pytest.approx(100 * stats.spearmanr(preds, golds)[0])
    # an unparsed answer stands at the mean of the golds
    holes = [None if i % 7 == 0 else p for i, p in enumerate(preds)]
    filled = [sum(golds) / len(golds) if p is None else p for p in holes]
    assert M.pearson(holes, golds) == pytest.approx(100 * stats.pearsonr(filled, golds)[0])
    assert M.spearman(holes, golds) == pytest.approx(100 * stats.spearmanr(filled, golds)[0])
    assert M.compute(["pearson", "spearman"], holes, golds) == {
        "pearson": M.pearson(holes, golds),
        "spearman": M.spearman(holes, golds),
    }


def test_correlations_hand_computed_and_degenerate():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(100.0)
    assert M.pearson([3, 2, 1], [1, 2, 3]) == pytest.approx(-100.0)
    assert M.spearman([1, 10, 100], [1, 2, 3]) == pytest.approx(100.0)  # monotone, not linear
    assert M.pearson([1, 10, 100], [1, 2, 3]) < 95.0
    # no variation in the answers (or golds): no correlation, scored 0 rather than NaN
    assert M.pearson([3, 3, 3], [1, 2, 3]) == 0.0
    assert M.spearman([None, None, None], [1, 2, 3]) == 0.0
    assert M.pearson([1, 2, 3], [4, 4, 4]) == 0.0
    # large offsets do not cancel
    assert M.pearson([1e9 + 1, 1e9 + 2, 1e9 + 4], [1, 2, 4]) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        M.pearson([1.0], [float("nan")])
    with pytest.raises(ValueError):
        M.spearman([], [])


def test_compute_dispatch_and_primary_score():
    res = M.compute(["accuracy", "macro_f1"], ["a", "b", None], ["a", "a", "b"], labels=["a", "b"])
    # accuracy 1/3; macro: a TP=1 FN=1 -> 2/3, b TP=0 FP=1 FN=1 -> 0 -> 1/3
    assert res == pytest.approx({"accuracy": 100 / 3, "macro_f1": 100 / 3})
    assert M.primary_score(["accuracy", "macro_f1"], res) == pytest.approx(100 / 3)

    res = M.compute(["squad"], ["Carolina"], [["Carolina Panthers"]])
    assert res == pytest.approx({"exact_match": 0.0, "f1": 200 / 3})
    assert M.primary_score(["squad"], res) == pytest.approx(200 / 3)

    res = M.compute("span_f1", [None], [["B-PER", "O"]])
    assert res == {"span_precision": 0.0, "span_recall": 0.0, "span_f1": 0.0}
    assert M.primary_score("span_f1", res) == 0.0

    res = M.compute(["rouge"], ["a b c"], ["a b c"])
    assert res == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert M.primary_score(["rouge"], res) == pytest.approx(100.0)
    assert set(M.METRIC_NAMES) == set(M.MAIN_KEY)


def test_compute_and_primary_score_errors():
    with pytest.raises(ValueError, match="did you mean 'accuracy'"):
        M.compute(["acuracy"], ["a"], ["a"])
    with pytest.raises(ValueError, match="no 'rougeL'"):
        M.primary_score(["rouge"], {"accuracy": 1.0})


def test_template_metric_names_are_all_computable():
    from t2t_mtl.tasks.schema import METRICS

    assert set(METRICS) == set(M.METRIC_NAMES)
    from t2t_mtl.inference.lm_eval_task import RESULT_KEYS
    from t2t_mtl.tasks.schema import METRIC_PARSES

    assert set(RESULT_KEYS) == set(METRICS) == set(METRIC_PARSES)
    for name in METRICS:  # the export names every key compute() returns, the main one included
        assert M.MAIN_KEY[name] in RESULT_KEYS[name]


def test_invalid_rate():
    class Parsed:
        def __init__(self, valid):
            self.valid = valid

    assert M.invalid_rate([Parsed(True), Parsed(False), Parsed(True), Parsed(True)]) == 25.0
    assert M.invalid_rate([True, False]) == 50.0
    assert M.invalid_rate(["a", None, ["O"], None, "b"]) == 40.0
    assert M.invalid_rate([]) == 0.0


def test_metrics_never_import_torch():
    code = (
        "import sys, t2t_mtl.evaluation.metrics as M; M.span_f1([['B-PER']], [['B-PER']]); M.rouge(['a'], ['a']); "
        "bad = [m for m in ('torch', 'transformers', 'peft', 'trl', 'accelerate', 'bitsandbytes') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
