"""Confidence intervals: the bootstrap on hand-checkable cases, metrics recomputed exactly on resamples,
paired differences, the results-file helpers and the compare table's noise marks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from t2t_mtl.evaluation import confidence as C
from t2t_mtl.evaluation import metrics as M
from t2t_mtl.evaluation.reports import compare_table, results_markdown


def _acc(correct: list[bool], digest: str | None = None) -> C.RowStats:
    st = C.row_stats("accuracy", ["y" if c else "n" for c in correct], ["y"] * len(correct))
    st.digest = digest
    return st


def _resamples(n: int, k: int, seed: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, n) for _ in range(k)]


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(idx, minlength=n)


# ------------------------------------------------------------------ the bootstrap itself


@pytest.mark.parametrize("correct", [True, False])
def test_constant_per_example_scores_have_a_zero_width_interval(correct):
    st = _acc([correct] * 40)
    lo, hi = C.interval(C.bootstrap(st, resamples=200, seed=1))
    assert lo == hi == (100.0 if correct else 0.0)
    rouge = C.RowStats("mean", np.full(30, 37.5))  # the same ROUGE-L on every example
    assert C.interval(C.bootstrap(rouge, resamples=200)) == (37.5, 37.5)


def test_bernoulli_interval_brackets_the_mean_and_shrinks_with_n():
    widths = []
    for n in (100, 400, 1600):
        correct = [i % 10 < 7 for i in range(n)]  # exactly 70 % right
        lo, hi = C.interval(C.bootstrap(_acc(correct), resamples=2000, seed=3))
        assert lo < 70.0 < hi
        # the normal approximation of a proportion's 95 % interval: ±1.96 sqrt(p(1-p)/n)
        half = 1.96 * math.sqrt(0.7 * 0.3 / n) * 100
        assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.2)  # width ∝ 1/sqrt(n)


def test_bootstrap_is_seeded_and_tasks_get_their_own_stream():
    st = _acc([i % 3 == 0 for i in range(50)])
    a = C.bootstrap(st, resamples=300, seed=C.task_seed(0, "sst2"))
    assert np.array_equal(a, C.bootstrap(st, resamples=300, seed=C.task_seed(0, "sst2")))
    assert not np.array_equal(a, C.bootstrap(st, resamples=300, seed=C.task_seed(0, "squad")))
    assert not np.array_equal(a, C.bootstrap(st, resamples=300, seed=C.task_seed(1, "sst2")))
    with pytest.raises(ValueError):
        C.bootstrap([st, _acc([True] * 49)])  # a paired bootstrap needs the same rows
    with pytest.raises(ValueError):
        C.bootstrap(st, resamples=0)


def test_chunked_draws_equal_one_big_draw(monkeypatch):
    st = _acc([i % 4 == 0 for i in range(30)])
    whole = C.bootstrap(st, resamples=100, seed=9)
    monkeypatch.setattr(C, "_CELLS_PER_CHUNK", 30 * 7)  # 7 resamples per chunk
    assert np.array_equal(whole, C.bootstrap(st, resamples=100, seed=9))


# ------------------------------------------------------------------ metrics recomputed per resample


def test_macro_f1_is_recomputed_on_each_resample_not_averaged():
    rng = np.random.default_rng(0)
    labels = ["entailment", "neutral", "contradiction"]
    golds = [labels[i] for i in rng.integers(0, 3, 60)]
    preds = [
        g if rng.random() < 0.6 else rng.choice(labels + ["garbage", None]) for g in golds
    ]  # some wrong, some out of the label set, some unparsed
    st = C.row_stats("macro_f1", preds, golds, labels)
    assert st.point() == pytest.approx(M.macro_f1(preds, golds, labels))
    for idx in _resamples(60, 25):
        expected = M.macro_f1([preds[i] for i in idx], [golds[i] for i in idx], labels)
        assert st.score(_counts(idx, 60))[0] == pytest.approx(expected)
    # a resample in which a class never occurs leaves it out of the mean, as macro_f1 does
    idx = np.array([i for i, g in enumerate(golds) if g != "neutral" and preds[i] != "neutral"])
    expected = M.macro_f1([preds[i] for i in idx], [golds[i] for i in idx], labels)
    assert st.score(_counts(idx, 60))[0] == pytest.approx(expected)
    # macro-F1 of a resample is not the mean of per-example anything: check it differs from
    # averaging the full-sample F1 (a wrong shortcut would give the same number every time)
    scores = C.bootstrap(st, resamples=200, seed=2)
    assert scores.std() > 1.0


@pytest.mark.parametrize("metric", ["pearson", "spearman"])
def test_correlations_are_recomputed_exactly_on_each_resample(metric):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    golds = [float(x) for x in rng.choice([1.0, 2.0, 3.5, 4.0, 5.0], 50)]
    preds = [
        None if k % 9 == 0 else float(round(g + rng.normal(0, 1))) for k, g in enumerate(golds)
    ]
    st = C.row_stats(metric, preds, golds)
    assert st.point() == pytest.approx(getattr(M, metric)(preds, golds))
    filled = np.array([np.mean(golds) if p is None else p for p in preds])
    ref = stats.pearsonr if metric == "pearson" else stats.spearmanr
    for idx in _resamples(50, 20):  # an example drawn k times counts as k tied copies
        expected = 100 * ref(filled[idx], np.array(golds)[idx])[0]
        assert st.score(_counts(idx, 50))[0] == pytest.approx(expected)
    back = C.RowStats.from_json(json.loads(json.dumps(st.to_json())))
    assert back.kind == metric and np.array_equal(
        back.data, st.data
    )  # floats kept, not cut to ints
    lo, hi = C.interval(C.bootstrap(st, resamples=300, seed=1))
    assert lo < st.point() < hi


def test_set_f1_is_recomputed_on_each_resample():
    rng = np.random.default_rng(7)
    labels = ["a", "b", "c", "d"]
    golds = [[x for x in labels if rng.random() < 0.4] for _ in range(40)]
    preds = [None if k % 7 == 0 else [x for x in labels if rng.random() < 0.4] for k in range(40)]
    st = C.row_stats("set_f1", preds, golds)
    assert st.kind == "span" and st.point() == pytest.approx(M.set_f1(preds, golds)["set_f1"])
    for idx in _resamples(40, 15):
        expected = M.set_f1([preds[i] for i in idx], [golds[i] for i in idx])["set_f1"]
        assert st.score(_counts(idx, 40))[0] == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_sacrebleu_metrics_are_recomputed_exactly_on_each_resample(metric):
    import sacrebleu

    rng = np.random.default_rng(6)
    words = "the a cat dog sat ran on under mat sofa quickly today".split()
    refs = [" ".join(rng.choice(words, rng.integers(4, 9))) for _ in range(40)]
    hyps = [
        None if k % 11 == 0 else " ".join(w for w in r.split() if rng.random() < 0.8)
        for k, r in enumerate(refs)
    ]
    st = C.row_stats(metric, hyps, refs)
    assert st.point() == pytest.approx(getattr(M, metric)(hyps, refs))
    corpus = sacrebleu.corpus_bleu if metric == "bleu" else sacrebleu.corpus_chrf
    for idx in _resamples(40, 10):
        plain = ["" if hyps[i] is None else hyps[i] for i in idx]
        expected = corpus(plain, [[refs[i] for i in idx]]).score
        assert st.score(_counts(idx, 40))[0] == pytest.approx(expected)
    back = C.RowStats.from_json(json.loads(json.dumps(st.to_json())))
    assert back.kind == metric and np.array_equal(back.data, st.data)


def test_span_f1_is_recomputed_on_each_resample():
    golds = [
        ["B-PER", "I-PER", "O", "B-LOC"],
        ["O", "O", "B-ORG"],
        ["B-MISC", "O"],
        ["O", "O", "O"],
        ["B-LOC", "I-LOC", "O"],
    ]
    preds = [
        ["B-PER", "I-PER", "O", "O"],  # one right, one missed
        ["O", "B-ORG", "I-ORG"],  # wrong boundary: fp + fn
        None,  # unparsed: predicts nothing
        ["B-PER", "O", "O"],  # a false positive
        ["I-LOC", "I-LOC", "O"],  # stray I- starts an entity (seqeval default mode): right
    ]
    counts = [M.span_counts(p, g) for p, g in zip(preds, golds)]
    assert counts == [(1, 0, 1), (0, 1, 1), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
    st = C.row_stats("span_f1", preds, golds)
    assert st.point() == pytest.approx(M.span_f1(preds, golds)["f1"])
    for idx in _resamples(5, 30, seed=1):
        expected = M.span_f1([preds[i] for i in idx], [golds[i] for i in idx])["f1"]
        assert st.score(_counts(idx, 5))[0] == pytest.approx(expected)


def test_mean_metrics_match_their_metric_functions():
    preds = ["the cat sat", None, "a dog", "on the mat"]
    refs = [["the cat sat on the mat"], ["x"], ["a dog ran", "dogs"], ["mat"]]
    st = C.row_stats("rouge", preds, refs)
    assert st.point() == pytest.approx(M.rouge(preds, refs)["rougeL"])
    st = C.row_stats("squad", preds, refs)
    assert st.point() == pytest.approx(M.squad(preds, refs)["f1"])
    for idx in _resamples(4, 10):
        assert st.score(_counts(idx, 4))[0] == pytest.approx(
            M.squad([preds[i] for i in idx], [refs[i] for i in idx])["f1"]
        )
    with pytest.raises(ValueError, match="no row statistics"):
        C.row_stats("meteor", preds, refs)
    with pytest.raises(ValueError, match="not in the label set"):
        C.row_stats("macro_f1", ["a"], ["z"], ["a", "b"])


def test_row_stats_survive_a_json_round_trip():
    st = C.row_stats("macro_f1", ["a", None, "b"], ["a", "b", "b"], ["a", "b"])
    st.digest = "abc"
    back = C.RowStats.from_json(json.loads(json.dumps(st.to_json())))
    assert back.kind == "macro" and back.labels == ["a", "b"] and back.digest == "abc"
    assert np.array_equal(back.data, st.data) and back.point() == st.point()


# ------------------------------------------------------------------ paired differences


def test_paired_difference_tie_and_clear_difference():
    base = [i % 2 == 0 for i in range(200)]  # 50 %
    same_but_two = base.copy()
    same_but_two[1] = same_but_two[3] = True  # +1 point: inside the noise
    tie = C.paired_difference(_acc(base), _acc(same_but_two), resamples=2000)
    assert tie["diff"] == pytest.approx(1.0) and tie["tie"] and tie["low"] <= 0 <= tie["high"]
    better = base.copy()
    for i in range(1, 40, 2):
        better[i] = True  # +10 points, gained on 20 rows and lost on none
    clear = C.paired_difference(_acc(base), _acc(better), resamples=2000)
    assert clear["diff"] == pytest.approx(10.0) and not clear["tie"] and clear["low"] > 0
    # the same +10 points judged by the overlap of the two runs' own intervals: a tie. Pairing
    # removes the row-to-row variation both systems share, which is why it is the test to use.
    a, b = _acc(base, "rows1"), _acc(better, "rows1")
    assert (
        C.compare_entries(["t"], [{"per_example": a.to_json()}], [{"per_example": b.to_json()}])[
            "method"
        ]
        == "paired"
    )
    b.digest = "rows2"
    overlap = C.compare_entries(
        ["t"], [{"per_example": a.to_json()}], [{"per_example": b.to_json()}]
    )
    assert overlap["method"] == "overlap" and overlap["tie"]
    assert overlap["first_ci"][0] < 50 < overlap["first_ci"][1]


def test_compare_entries_needs_per_example_statistics():
    st = _acc([True, False])
    assert C.compare_entries(["t"], [{"primary": 50.0}], [{"per_example": st.to_json()}]) is None


# ------------------------------------------------------------------ results files and tables


def _entry(correct: list[bool], digest: str = "rows") -> dict:
    st = _acc(correct, digest)
    return {
        "mode": "generate",
        "variant": "v",
        "n": st.n,
        "primary_metric": "accuracy",
        "metrics": {"accuracy": st.point()},
        "primary": st.point(),
        "invalid_rate": 0.0,
        "per_example": st.to_json(),
    }


def test_add_intervals_per_task_and_for_the_combined_mean():
    res = {
        "tasks": {
            "a": _entry([i % 2 == 0 for i in range(100)]),
            "b": _entry([True] * 50),
            "broken": {"n": 0, "error": "no such split"},
        },
        "combined": 75.0,
    }
    C.add_intervals(res, resamples=500, seed=4)
    a, b = res["tasks"]["a"], res["tasks"]["b"]
    assert a["ci_low"] < 50 < a["ci_high"] and (b["ci_low"], b["ci_high"]) == (100.0, 100.0)
    assert a["ci"] == {"level": 0.95, "resamples": 500, "seed": 4, "method": C.METHOD}
    # combined: a's interval halved (b has none), centred on 75
    assert res["combined_ci_low"] == pytest.approx(50 + a["ci_low"] / 2)
    assert res["combined_ci_high"] == pytest.approx(50 + a["ci_high"] / 2)
    assert "ci_low" not in res["tasks"]["broken"]
    table = results_markdown(res, "t")
    assert f"| 50.00 [{a['ci_low']:.2f}, {a['ci_high']:.2f}] |" in table
    assert "| 100.00 [100.00, 100.00] |" in table
    assert f"| mean primary | 75.00 [{res['combined_ci_low']:.2f}, " in table
    assert "500 resamples, seed 4" in table
    off = {"tasks": {"a": _entry([True, False])}, "combined": 50.0}
    C.add_intervals(off, resamples=0)
    assert "ci_low" not in off["tasks"]["a"] and "| 50.00 |" in results_markdown(off)


def test_compare_table_marks_ties_and_unpaired_comparisons():
    base = [i % 2 == 0 for i in range(200)]
    better = [b or (i % 4 == 1) for i, b in enumerate(base)]  # +25 points
    near = base.copy()
    near[1] = True  # +0.5 points
    res = lambda tasks: {"tasks": tasks}  # noqa: E731
    table, data = compare_table(
        [
            ("A", res({"x": _entry(base), "y": _entry(base)})),
            ("B", res({"x": _entry(better), "y": _entry(near)})),
            ("C", res({"x": _entry(better, digest="other rows"), "y": _entry(near)})),
        ]
    )
    assert "| x | accuracy | 50.00 | 75.00 (+25.00) | 75.00 (+25.00†) |" in table
    assert "| y | accuracy | 50.00 | 50.50 (≈ +0.50) | 50.50 (≈ +0.50) |" in table
    assert "| **mean (2 shared)** | | 50.00 | 62.75 (+12.75) | 62.75 (+12.75†) |" in table
    assert data["differences"]["B"]["x"]["method"] == "paired"
    assert data["differences"]["C"]["x"]["method"] == "overlap"
    assert data["differences"]["B"]["y"]["tie"] and not data["differences"]["B"]["x"]["tie"]
    assert "paired bootstrap" in table and "different rows" in table
