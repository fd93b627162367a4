"""Evaluation: rank classification (planted logits, batching), generation, scoring per task kind,
eval of a trained run (CLI), the training hook, the forgetting math and report, run comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from t2t_mtl.cli.main import main
from t2t_mtl.core.config import SourceConfig, load_config
from t2t_mtl.core.errors import ConfigError
from t2t_mtl.core.records import Record
from t2t_mtl.evaluation import metrics
from t2t_mtl.evaluation.evaluator import (
    EvalTask,
    eval_tasks,
    evaluate,
    load_examples,
    score_task,
    training_eval_fn,
)
from t2t_mtl.evaluation.reports import (
    compare_table,
    forgetting,
    forgetting_heatmap,
    forgetting_markdown,
)
from t2t_mtl.model.features import prompt_ids, target_ids
from t2t_mtl.model.generation import generate_texts, rank_choices
from t2t_mtl.model.prompt_format import PromptFormat
from t2t_mtl.tasks.catalogue import load_task
from t2t_mtl.tasks.task import load_task_file

ROOT = Path(__file__).resolve().parents[1]

CHOICES = ["negative", "positive"]
RECS = [
    Record("s", "Is the sentiment positive or negative?", text, "")
    for text in (
        "the movie is good",
        "a bad film. " * 6,
        "Paris",
        "the river was sad and long, 12 times.",
    )
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one torch thread


class Bigram(torch.nn.Module):
    """A 'language model' whose next-token logits are a fixed table row of the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.config = SimpleNamespace(is_encoder_decoder=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


def _direct_score(table: torch.Tensor, prompt: list[int], target: list[int]) -> float:
    seq = prompt + target
    lp = torch.log_softmax(table.double(), dim=-1)
    return sum(float(lp[seq[k - 1], seq[k]]) for k in range(len(prompt), len(seq)))


@pytest.mark.parametrize("favour", CHOICES)
def test_rank_picks_the_planted_choice_and_scores_are_summed_log_probs(causal, favour):
    _, tok, fmt = causal
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(len(tok), len(tok), generator=gen)
    tgt = {c: target_ids(tok, fmt, Record("s", "", "", c)) for c in CHOICES}
    assert tgt["positive"] != tgt["negative"] and tgt["positive"][-1] == tok.convert_tokens_to_ids(
        "<|im_end|>"
    )
    last = prompt_ids(tok, fmt, RECS[0])[0][-1]  # every chat prompt ends with "assistant\n"
    table[last, tgt[favour][0]] = (
        12.0  # planted: the favoured choice's first token after the prompt
    )
    model = Bigram(table)
    ranked = rank_choices(model, tok, fmt, RECS, CHOICES, batch_size=16)
    for rec, r in zip(RECS, ranked):
        p = prompt_ids(tok, fmt, rec)[0]
        direct = {c: _direct_score(table, p, tgt[c]) for c in CHOICES}
        assert r.choice == favour == max(direct, key=direct.get)
        for c in CHOICES:
            assert r.scores[c] == pytest.approx(direct[c], abs=1e-4)


def _full_forward_score(model, prompt, target, seq2seq=False):
    with torch.no_grad():
        if seq2seq:
            logits = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([target])).logits[
                0
            ]
            lp = torch.log_softmax(logits.double(), -1)
            return sum(float(lp[k, t]) for k, t in enumerate(target))
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0]
        lp = torch.log_softmax(logits.double(), -1)
        return sum(float(lp[len(prompt) + k - 1, t]) for k, t in enumerate(target))


def test_batched_rank_equals_one_sequence_at_a_time_causal(causal):
    model, tok, fmt = causal
    ranked = rank_choices(
        model, tok, fmt, RECS, CHOICES, batch_size=8
    )  # 4 records x 2 choices, left-padded
    for rec, r in zip(RECS, ranked):
        p = prompt_ids(tok, fmt, rec)[0]
        direct = {
            c: _full_forward_score(model, p, target_ids(tok, fmt, Record("s", "", "", c)))
            for c in CHOICES
        }
        assert r.scores == pytest.approx(direct, abs=1e-3)
        assert r.choice == max(direct, key=direct.get)


def test_batched_rank_equals_one_sequence_at_a_time_t5(tiny_t5_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    fmt = PromptFormat.for_tokenizer(tok, "seq2seq")
    ranked = rank_choices(model, tok, fmt, RECS, CHOICES, batch_size=8)
    for rec, r in zip(RECS, ranked):
        p = prompt_ids(tok, fmt, rec)[0]
        direct = {
            c: _full_forward_score(model, p, target_ids(tok, fmt, Record("s", "", "", c)), True)
            for c in CHOICES
        }
        assert target_ids(tok, fmt, Record("s", "", "", "positive"))[-1] == tok.eos_token_id
        assert r.scores == pytest.approx(direct, abs=1e-3)


def test_left_padded_batched_generation_equals_single_generation(causal):
    model, tok, fmt = causal
    batched = generate_texts(model, tok, fmt, RECS, max_new_tokens=8, batch_size=4)
    single = [generate_texts(model, tok, fmt, [r], max_new_tokens=8, batch_size=1)[0] for r in RECS]
    assert batched == single
    assert len(set(batched)) == len(RECS) and all(
        batched
    )  # varied, non-empty answers: a real check
    ids = prompt_ids(tok, fmt, RECS[1])[0]  # and the same as a plain transformers greedy call
    out = model.generate(
        input_ids=torch.tensor([ids]),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )[0, len(ids) :].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    assert batched[1] == tok.decode(out, skip_special_tokens=True).strip()


# ------------------------------------------------------------------ scoring per task kind


def _task(name: str, **kw) -> EvalTask:
    return EvalTask(name, load_task(name), **kw)


def test_scoring_label_task_counts_unparseable_answers_as_wrong_and_invalid():
    t = _task("sentiment_sst2")
    examples, _ = load_examples(t, "validation", 6)
    golds = [ex.gold for ex in examples]
    assert set(golds) <= set(t.template.answer_choices) and len(set(golds)) == 2
    other = {"negative": "positive", "positive": "negative"}
    texts = [golds[0], golds[1].upper() + ".", other[golds[2]], "I cannot tell", golds[4], ""]
    summary, rows = score_task(t.template, examples, texts)
    preds = [golds[0], golds[1], other[golds[2]], None, golds[4], None]
    assert summary["metrics"] == metrics.compute(
        ["accuracy", "macro_f1"], preds, golds, labels=t.template.answer_choices
    )
    assert summary["primary"] == pytest.approx(300 / 6)
    assert summary["invalid_rate"] == pytest.approx(200 / 6)
    assert [r["valid"] for r in rows] == [True, True, True, False, True, False]


def test_scoring_a_regression_task_reads_numbers_and_correlates(tmp_path):
    """A user's `parse: number` task end to end without a model: golds are the rows' numbers, an
    answer without a number is invalid, the primary metric is Pearson x 100 with an interval, and a
    row whose output holds no number is a bad row (skipped, reported), not a crash."""
    tpl = load_task_file(ROOT / "tests" / "fixtures" / "oracle" / "relatedness.yaml")
    t = EvalTask("relatedness", tpl)
    examples, _ = load_examples(t, "validation", None)
    golds = [ex.gold for ex in examples]
    assert golds == [4.0, 1.1, 4.6, 3.9, 1.0, 4.2, 4.9, 4.2]
    texts = ["4", "Score: 1.5", "4,5", "I think 3", "1", "three", "5/5", "no idea\n4.0"]
    summary, rows = score_task(tpl, examples, texts)
    # the first line's number ("I think 3" -> 3), else invalid ("three", "no idea")
    preds = [4.0, 1.5, 4.5, 3.0, 1.0, None, 5.0, None]
    assert [r["prediction"] for r in rows] == preds
    assert summary["metrics"] == metrics.compute(["pearson", "spearman"], preds, golds)
    assert summary["primary"] == summary["metrics"]["pearson"] > 80.0
    assert summary["invalid_rate"] == pytest.approx(200 / 8)
    assert summary["per_example"]["kind"] == "pearson"

    # scores kept as text: a row whose output holds no number is a bad row
    data = tmp_path / "d"
    data.mkdir()
    lines = [
        json.dumps({"sentence1": "a", "sentence2": "b", "score": v}) for v in ("4.5", "n/a", "2")
    ]
    (data / "validation.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = (ROOT / "tests" / "fixtures" / "oracle" / "relatedness.yaml").read_text(encoding="utf-8")
    (tmp_path / "relatedness.yaml").write_text(
        text.replace("score: float", "score: str")
        .replace("samples: tests/fixtures/data/relatedness", "")
        .replace("    output: \"{{ '%.2f' | format(score) }}\"", '    output: "{{ score }}"'),
        encoding="utf-8",
    )
    loose = load_task_file(tmp_path / "relatedness.yaml")
    examples, rows = load_examples(
        EvalTask("relatedness", loose, SourceConfig(path=str(data))), "validation", None
    )
    assert [ex.gold for ex in examples] == [4.5, 2.0]
    assert rows.skipped == 1 and "holds no number" in rows.problems[-1].message
    assert rows.problems[-1].line == 2


def test_scoring_a_multi_label_task_reads_sets_of_choices():
    tpl = load_task_file(ROOT / "tests" / "fixtures" / "oracle" / "topics_multi.yaml")
    examples, rows = load_examples(EvalTask("topics_multi", tpl), "validation", None)
    assert [ex.gold for ex in examples] == [
        ["sports"],
        ["politics", "business", "tech"],
        [],
        ["politics", "sports", "business"],
    ]  # in answer_choices order, whatever order the row lists them in
    texts = ["Sports", "tech, politics", "none", "sports, politics, cooking"]
    summary, out = score_task(tpl, examples, texts)
    assert [r["prediction"] for r in out] == [
        ["sports"],
        ["politics", "tech"],
        [],
        ["politics", "sports"],
    ]
    assert [r["valid"] for r in out] == [True, True, True, False]
    assert summary["metrics"]["set_f1"] == pytest.approx(200 * 5 / (2 * 5 + 0 + 2))
    assert summary["metrics"]["accuracy"] == pytest.approx(50.0)
    assert summary["invalid_rate"] == pytest.approx(25.0)
    assert summary["per_example"]["kind"] == "span"


def test_scoring_a_translation_task_with_other_references(tmp_path):
    """`references` (like `summaries`) adds correct alternatives: an answer matching any of them is
    scored against all, as sacrebleu does with several references."""
    data = tmp_path / "d"
    data.mkdir()
    rows = [
        {"en": "The shop closes at seven.", "fr": "Le magasin ferme à sept heures.",
         "references": ["La boutique ferme à sept heures."]},
        {"en": "It rained all night long.", "fr": "Il a plu toute la nuit."},
    ]  # fmt: skip
    (data / "validation.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8"
    )
    text = (ROOT / "tests" / "fixtures" / "oracle" / "translation.yaml").read_text(encoding="utf-8")
    text = text.replace(
        "  fr: str\n", "  fr: str\n  references: {type: 'list[str]', required: false}\n"
    )
    (tmp_path / "translation.yaml").write_text(text, encoding="utf-8")
    tpl = load_task_file(tmp_path / "translation.yaml")
    examples, _ = load_examples(
        EvalTask("translation", tpl, SourceConfig(path=str(data))), "validation", None
    )
    assert examples[0].gold == [rows[0]["fr"], rows[0]["references"][0]]
    assert examples[1].gold == [rows[1]["fr"]]
    texts = ["La boutique ferme à sept heures.", "Il a plu toute la nuit."]
    summary, _ = score_task(tpl, examples, texts)
    assert summary["metrics"] == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    assert summary["per_example"]["kind"] == "bleu"
    summary, _ = score_task(tpl, examples, ["Le chat dort.", "Il a plu toute la nuit."])
    assert 0 < summary["metrics"]["chrf"] < 100


def test_scoring_squad_uses_every_gold_answer():
    t = _task("qa_squad")
    examples, rows = load_examples(t, "validation", 4)
    multi = [i for i, ex in enumerate(examples) if len(ex.gold) > 1]
    assert multi, "the bundled SQuAD samples have questions with several answers"
    i = multi[0]
    raw = rows[i]["answers"]["text"]
    assert examples[i].gold == list(dict.fromkeys(raw)) and examples[i].record.output == raw[0]
    texts = [
        ex.gold[-1] if k == i else "zzz" for k, ex in enumerate(examples)
    ]  # an alternative, not the target
    summary, _ = score_task(t.template, examples, texts)
    assert summary["metrics"]["exact_match"] == pytest.approx(100 / len(examples))
    assert summary["invalid_rate"] == 0.0


def test_scoring_ner_recovers_bio_tags_from_the_rows_tokens():
    t = _task("ner_conll2003")
    examples, rows = load_examples(t, "validation", 4)
    assert all(
        ex.tokens == rows[k]["tokens"] and ex.gold == rows[k]["ner_tags"]
        for k, ex in enumerate(examples)
    )
    texts = [ex.record.output for ex in examples]  # the gold linearisation: perfect
    summary, _ = score_task(t.template, examples, texts)
    assert summary["primary"] == 100.0 and summary["invalid_rate"] == 0.0
    with_entities = [k for k, ex in enumerate(examples) if any(tag != "O" for tag in ex.gold)]
    texts[with_entities[0]] = "none"  # misses that sentence's entities (valid output, wrong)
    texts[with_entities[-1]] = "garbage without a type"
    summary, out = score_task(t.template, examples, texts)
    expected = metrics.span_f1(
        [t.template.parse_output(x, tokens=ex.tokens).value for x, ex in zip(texts, examples)],
        [ex.gold for ex in examples],
    )
    assert summary["primary"] == pytest.approx(expected["f1"]) and summary["primary"] < 100
    assert summary["invalid_rate"] == pytest.approx(100 / len(examples))
    assert out[with_entities[0]]["prediction"] == "none"


def test_scoring_rouge_on_generated_text():
    from t2t_mtl.evaluation.evaluator import Example

    tpl = load_task("summarization")
    recs = [
        Record("summarization", "Summarize.", "doc", s)
        for s in ("the cat sat on the mat", "a dog ran home")
    ]
    examples = [Example(r, [r.output]) for r in recs]
    summary, _ = score_task(tpl, examples, ["the cat sat on the mat", "\n"])
    assert summary["metrics"]["rougeL"] == pytest.approx(50.0)
    assert summary["invalid_rate"] == 50.0


def test_eval_tasks_modes_variants_and_mistakes(tmp_path):
    cfg = load_config(
        data={
            "tasks": [{"template": "sentiment_sst2", "eval_mode": "rank"}, {"template": "qa_squad"}]
        }
    )
    a, b = eval_tasks(cfg)
    assert (a.mode, b.mode) == ("rank", "generate")
    assert a.variant_id() == a.template.train_variants()[0].id
    a, b = eval_tasks(cfg, mode="generate", variant="heldout")
    assert a.mode == "generate" and a.template.variant(a.variant_id()).heldout
    assert eval_tasks(cfg, mode="rank")[1].mode == "generate"  # QA cannot rank: it still generates
    with pytest.raises(ConfigError) as e:
        eval_tasks(cfg, names=["sentiment_sst"], variant="nope")
    assert "did you mean 'sentiment_sst2'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        eval_tasks(cfg, variant="nope")
    assert "has no variant 'nope'" in str(e.value)


def test_evaluate_reports_a_missing_split_per_task_and_scores_the_rest(causal, repo_root):
    from t2t_mtl.core.config import SourceConfig

    model, tok, fmt = causal

    def local(name):  # local folders: no hub look-up for the missing split
        return SourceConfig(path=str(repo_root / "data" / name))

    tasks = [
        _task("sentiment_sst2", mode="rank", source=local("sentiment_sst2")),
        _task("qa_squad", source=local("qa_squad")),
    ]
    res = evaluate(model, tok, fmt, tasks, split="test", limit=2, progress=False, max_new_tokens=4)
    assert (
        "no test.jsonl" in res["tasks"]["qa_squad"]["error"]
        and "primary" not in res["tasks"]["qa_squad"]
    )
    assert res["combined"] is None
    res = evaluate(
        model,
        tok,
        fmt,
        tasks,
        split="validation",
        limit=2,
        progress=False,
        keep_predictions=True,
        max_new_tokens=4,
        max_prompt_tokens=96,
    )
    sent = res["tasks"]["sentiment_sst2"]
    assert sent["invalid_rate"] == 0.0 and all(
        "scores" in p for p in sent["predictions"]
    )  # rank never invalid
    assert res["combined"] == pytest.approx(
        (sent["primary"] + res["tasks"]["qa_squad"]["primary"]) / 2
    )


# ------------------------------------------------------------------ a trained run


@pytest.fixture(scope="module")
def run_dir(tiny_models_root, tiny_causal_dir):
    from tiny_runs import tiny_staged_run

    return tiny_staged_run(tiny_models_root / "runs", tiny_causal_dir)


def test_eval_cli_on_a_trained_run_writes_json_markdown_and_predictions(run_dir, capsys):
    assert main(["eval", "--run", str(run_dir), "--limit", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((run_dir / "eval" / "validation.json").read_text())
    assert set(res["tasks"]) == {"sentiment_sst2", "ner_conll2003", "qa_squad"}
    preds = [
        json.loads(x)
        for x in (run_dir / "eval" / "validation.predictions.jsonl").read_text().splitlines()
    ]
    for name, e in res["tasks"].items():
        mine = [p for p in preds if p["task"] == name]
        assert e["n"] == len(mine) == 3
        assert e["invalid_rate"] == pytest.approx(100 * sum(not p["valid"] for p in mine) / 3)
        assert f"| {name} | generate |" in printed
        # the 95 % interval: stored with its settings, printed next to the score
        assert e["ci_low"] <= e["primary"] <= e["ci_high"]
        assert e["ci"]["resamples"] == 1000 and e["per_example"]["digest"]
        assert f"| {e['primary']:.2f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}] |" in printed
    assert res["combined"] == pytest.approx(sum(e["primary"] for e in res["tasks"].values()) / 3)
    assert res["combined_ci_low"] <= res["combined"] <= res["combined_ci_high"]
    assert "| score [95 % CI] |" in printed and "1000 resamples, seed 0" in printed
    assert (
        (run_dir / "eval" / "validation.md").read_text().startswith("### tiny-staged: validation")
    )

    assert (
        main(
            [
                "eval",
                "--run",
                str(run_dir),
                "--tasks",
                "sentiment_sst2",
                "--limit",
                "2",
                "--base",
                "--mode",
                "rank",
                "--no-progress",
            ]
        )
        == 0
    )
    base = json.loads((run_dir / "eval" / "validation-base-rank.json").read_text())
    assert base["base"] is True and list(base["tasks"]) == ["sentiment_sst2"]
    assert base["tasks"]["sentiment_sst2"]["mode"] == "rank"


def test_compare_cli_tests_differences_paired_on_the_same_rows(run_dir, tmp_path, capsys):
    args = ["eval", "--run", str(run_dir), "--tasks", "sentiment_sst2,qa_squad", "--no-progress"]
    assert main(args + ["--limit", "3", "--name", "tuned3"]) == 0
    assert main(args + ["--limit", "3", "--name", "base3", "--base"]) == 0
    assert main(args + ["--limit", "2", "--name", "base2", "--base"]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp.json"
    ev = run_dir / "eval"
    cmp = [f"tuned={ev / 'tuned3.json'}", f"base={ev / 'base3.json'}", f"base2={ev / 'base2.json'}"]
    assert main(["compare", *cmp, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    diffs = json.loads(out.read_text())["differences"]
    assert {d["method"] for d in diffs["base"].values()} == {"paired"}  # same rows: paired
    assert {d["method"] for d in diffs["base2"].values()} == {"overlap"}  # 2 rows vs 3
    assert "paired bootstrap" in table and "different rows" in table
    for d in diffs["base"].values():  # a tie exactly when the interval of the difference holds 0
        assert d["low"] <= d["high"] and d["tie"] == (d["low"] <= 0 <= d["high"])


def test_eval_cli_mistakes_are_one_line_problems(run_dir, tmp_path, capsys):
    assert main(["eval", "--run", str(run_dir), "--tasks", "qa_sqad"]) == 2
    assert "did you mean 'qa_squad'" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "not a t2t-mtl run folder" in capsys.readouterr().err


def test_training_logs_the_hooks_scores_every_eval_steps(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/combined" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval/combined"] == pytest.approx(
            sum(r[f"eval/{t}"] for t in ("sentiment_sst2", "ner_conll2003", "qa_squad")) / 3
        )
    during = [
        json.loads(x) for x in (run_dir / "eval" / "during_training.jsonl").read_text().splitlines()
    ]
    assert [(d["step"], d["stage"]) for d in during[:2]] == [(2, "first"), (4, "second")]


def test_training_hook_returns_primary_scores_and_combined(run_dir):
    from t2t_mtl.model.loading import load_for_inference

    model, tok, _, manifest = load_for_inference(run_dir / "adapter")
    cfg = load_config(run_dir / "config.yaml", ["eval.limit=2"])
    ctx = SimpleNamespace(
        cfg=cfg,
        model=model,
        tokenizer=tok,
        prompt_format=PromptFormat.from_dict(manifest["prompt_format"]),
        run_dir=run_dir,
        stage="second",
        step=4,
        accelerator=None,
    )
    model.train()
    out = training_eval_fn(cfg)(ctx)
    assert model.training  # the hook gives the model back in training mode
    assert set(out) == {
        "combined",
        "sentiment_sst2",
        "ner_conll2003",
        "qa_squad",
        "sentiment_sst2/invalid_rate",
        "ner_conll2003/invalid_rate",
        "qa_squad/invalid_rate",
    }
    assert out["combined"] == pytest.approx(
        (out["sentiment_sst2"] + out["ner_conll2003"] + out["qa_squad"]) / 3
    )
    logged = json.loads((run_dir / "eval" / "during_training.jsonl").read_text().splitlines()[-1])
    assert logged["step"] == 4 and logged["tasks"]["qa_squad"]["n"] == 2


def test_forgetting_cli_on_a_staged_run(run_dir, capsys):
    assert (
        main(
            [
                "eval",
                "--run",
                str(run_dir),
                "--forgetting",
                "--limit",
                "2",
                "--mode",
                "rank",
                "--no-progress",
            ]
        )
        == 0
    )
    rep = json.loads((run_dir / "eval" / "forgetting-rank.json").read_text())
    assert rep["stages"] == ["first", "second"] and rep["learned_at"]["sentiment_sst2"] == "first"
    stage1 = json.loads((run_dir / "eval" / "stage-first-validation-rank.json").read_text())
    assert rep["matrix"][0] == [stage1["tasks"][t]["primary"] for t in rep["tasks"]]
    j = rep["tasks"].index("sentiment_sst2")
    assert rep["forgetting"]["sentiment_sst2"] == pytest.approx(
        rep["matrix"][0][j] - rep["matrix"][1][j]
        if rep["matrix"][0][j] > rep["matrix"][1][j]
        else 0.0
    )
    assert (run_dir / "eval" / "forgetting-rank.png").read_bytes()[:4] == b"\x89PNG"
    assert "average forgetting" in capsys.readouterr().out
    # learned_only: a stage's bundle skips the tasks not trained yet; forgetting and BWT unchanged
    from t2t_mtl.evaluation.run_eval import forgetting_run

    short, _ = forgetting_run(run_dir, limit=2, mode="rank", progress=False, learned_only=True)
    first = [t for t in rep["tasks"] if rep["learned_at"].get(t) == "first"]
    later = [t for t in rep["tasks"] if t not in first]
    assert later and all(short["matrix"][0][rep["tasks"].index(t)] is None for t in later)
    assert short["matrix"][1] == rep["matrix"][1]
    assert short["forgetting"] == rep["forgetting"]
    assert short["backward_transfer"] == rep["backward_transfer"]


def test_forgetting_reuses_stages_evaluated_on_the_same_inputs(run_dir, tmp_path, monkeypatch):
    """A stage evaluated before on the same inputs (weights, tasks, limit, settings) is read back,
    also from a copy of the run under another name; other weights or another limit evaluate anew."""
    import shutil

    from safetensors.torch import load_file, save_file

    from t2t_mtl.evaluation import run_eval

    first, _ = run_eval.forgetting_run(run_dir, limit=2, mode="rank", progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for conf in copy.glob("stages/*/adapter/adapter_config.json"):  # peft writes sets in any order
        d = json.loads(conf.read_text())
        assert isinstance(d["target_modules"], list) and len(d["target_modules"]) > 1
        d["target_modules"] = list(reversed(d["target_modules"]))
        conf.write_text(json.dumps(d))
    real, calls = run_eval.evaluate_bundle, []

    def counting(run, bundle, *a, **k):
        calls.append(bundle.parent.name)
        return real(run, bundle, *a, **k)

    monkeypatch.setattr(run_eval, "evaluate_bundle", counting)
    again, _ = run_eval.forgetting_run(copy, limit=2, mode="rank", progress=False)
    assert calls == [] and again["matrix"] == first["matrix"]
    weights = next((copy / "stages" / "second" / "adapter").glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v + 0.01 for k, v in state.items()}, weights)
    run_eval.forgetting_run(copy, limit=2, mode="rank", progress=False)
    assert calls == ["second"]
    run_eval.forgetting_run(copy, limit=1, mode="rank", progress=False)
    assert calls == ["second", "first", "second"]
    run_eval.forgetting_run(copy, limit=1, mode="rank", progress=False, reuse=False)
    assert calls[3:] == ["first", "second"]


# ------------------------------------------------------------------ forgetting math and reports


def test_forgetting_and_transfer_on_a_hand_made_matrix(tmp_path):
    stages, tasks = ["s1", "s2", "s3"], ["a", "b", "c"]
    matrix = [[80.0, 10.0, 5.0], [60.0, 70.0, 20.0], [70.0, 50.0, 90.0]]
    base = {"a": 1.0, "b": 4.0, "c": 8.0}
    rep = forgetting(stages, tasks, matrix, {"a": 0, "b": 1, "c": 2}, base=base)
    # Chaudhry: a: max(80, 60) - 70 = 10; b: max(70) - 50 = 20 -> 15.  c is learned in the last stage.
    assert rep["forgetting"] == {"a": 10.0, "b": 20.0} and rep["average_forgetting"] == 15.0
    # Lopez-Paz & Ranzato BWT: ((70 - 80) + (50 - 70)) / 2 = -15
    assert rep["backward_transfer"] == -15.0
    # FWT: b: R[s1][b] - base b = 10 - 4 = 6; c: R[s2][c] - 8 = 12 -> 9
    assert rep["forward_transfer"] == 9.0
    assert rep["final_average"] == pytest.approx(70.0)
    md = forgetting_markdown(rep, {"a": "accuracy", "b": "f1", "c": "rougeL"})
    assert (
        "| s1 | 80.00* | 10.00 | 5.00 |" in md
        and "| backward transfer (Lopez-Paz & Ranzato 2017) | -15.00 |" in md
    )
    assert "| base model | 1.00 | 4.00 | 8.00 |" in md
    png = forgetting_heatmap(rep, tmp_path / "f.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_forgetting_with_tasks_learned_together_and_missing_cells():
    rep = forgetting(
        ["s1", "s2"], ["a", "b", "z"], [[50.0, 40.0, None], [30.0, None, 10.0]], {"a": 0, "b": 0}
    )  # z is never trained; b was not evaluated after s2
    assert rep["forgetting"] == {"a": 20.0} and rep["backward_transfer"] == -20.0
    assert rep["forward_transfer"] is None and rep["final_average"] == 30.0
    assert not math.isnan(rep["average_forgetting"])
    with pytest.raises(ValueError):
        forgetting(["s1"], ["a"], [[1.0], [2.0]], {"a": 0})


def _res(scores: dict) -> dict:
    return {"tasks": {t: {"primary": v, "primary_metric": "accuracy"} for t, v in scores.items()}}


def test_compare_table_merges_labels_and_shows_differences(tmp_path, capsys):
    table, data = compare_table(
        [
            ("multi", _res({"a": 80.0, "b": 60.0})),
            ("single", _res({"a": 75.0})),
            ("single", _res({"b": 70.0})),
            ("base", _res({"a": 50.0})),
        ]
    )
    assert data["columns"] == ["multi", "single", "base"]
    assert "| a | accuracy | 80.00 | 75.00 (-5.00) | 50.00 (-30.00) |" in table
    assert "| b | accuracy | 60.00 | 70.00 (+10.00) | — |" in table
    assert data["shared_tasks"] == ["a"] and data["mean"]["single"] == 72.5
    f1, f2 = tmp_path / "x.json", tmp_path / "y.json"
    f1.write_text(json.dumps(_res({"a": 10.0})))
    f2.write_text(json.dumps(_res({"a": 30.0})))
    assert main(["compare", f"one={f1}", str(f2), "--out", str(tmp_path / "t.md")]) == 0
    assert "| a | accuracy | 10.00 | 30.00 (+20.00) |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "no such run folder or results file" in capsys.readouterr().err


def test_eval_cli_constrained_mode_on_a_trained_run(run_dir, capsys):
    """`t2t-mtl eval --mode constrained`: every label answer is a choice, every QA answer is copied
    from its input, every entity answer has the declared form; the mode is shown per task.
    Its results are written as `validation-constrained`, beside the default mode's."""
    args = ["eval", "--run", str(run_dir), "--limit", "4", "--no-progress", "--mode", "constrained"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    res = json.loads((run_dir / "eval" / "validation-constrained.json").read_text())
    lines = (run_dir / "eval" / "validation-constrained.predictions.jsonl").read_text().splitlines()
    preds = [json.loads(x) for x in lines]
    for name in ("sentiment_sst2", "ner_conll2003", "qa_squad"):
        assert res["tasks"][name]["mode"] == "constrained"
        assert f"| {name} | constrained |" in printed
    assert res["tasks"]["sentiment_sst2"]["invalid_rate"] == 0.0
    assert all(p["raw"] in ("negative", "positive") for p in preds if p["task"] == "sentiment_sst2")
    ner = [p["raw"] for p in preds if p["task"] == "ner_conll2003"]
    assert ner and all(x == "none" or ": " in x for x in ner)
    from t2t_mtl.evaluation.evaluator import eval_tasks, load_examples
    from t2t_mtl.runs.folder import Run
    from t2t_mtl.tasks.constraints import CopyConstraint

    run = Run.load(run_dir)
    (task,) = eval_tasks(run.cfg, names=["qa_squad"], template_dir=run.dir / "templates")
    examples, _ = load_examples(task, "validation", 4)
    inputs = {ex.record.meta["row_id"]: ex.record.input for ex in examples}
    qa = [p for p in preds if p["task"] == "qa_squad"]
    assert qa and set(inputs) == {p["row_id"] for p in qa}
    for p in qa:  # copied from the row's input (the rule the decoding followed)
        assert CopyConstraint(inputs[p["row_id"]]).viable(p["raw"]), p["raw"]
