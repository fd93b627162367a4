"""Constrained decoding (`eval_mode: constrained`): the rules of `tasks.constraints`, that they admit
every gold answer of every shipped and unusual template (through the oracle), and decoding under them
on tiny local models (both decoding paths, T5 too) and in a whole evaluation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_templates_engine import REAL  # shipped task -> (real data folder, split with gold labels)

from t2t_mtl.core.config import SourceConfig
from t2t_mtl.core.records import Record
from t2t_mtl.tasks import catalogue, sources
from t2t_mtl.tasks.constraints import (
    ChoiceConstraint,
    CopyConstraint,
    EntityConstraint,
    admits,
    for_task,
)
from t2t_mtl.tasks.parsing import ENTITY_TYPES, ner_parse

ORACLE_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "oracle"
SENT = "Somerset beat Leicestershire at Taunton .".split()


@pytest.fixture(autouse=True)
def _no_user_dirs(monkeypatch):
    monkeypatch.delenv(catalogue.ENV_VAR, raising=False)


# ------------------------------------------------------------------ the rules


def test_choice_rule_allows_exactly_the_choices_as_spelled():
    c = ChoiceConstraint(["positive", "negative", "Sci/Tech"])
    assert all(c.viable(t) for t in ("", " ", "pos", " posit", "Sci/", "Sci/Tech"))
    bad = ("neutral", "positive.", "positive\n", "posx", "Posit", "sci/", "  pos")
    assert not any(c.viable(t) for t in bad)
    assert c.complete("positive") and c.complete(" negative ") and c.complete("Sci/Tech")
    assert not any(c.complete(t) for t in ("", "pos", "positive!", "positive\n", "sci/tech"))


def test_copy_rule_allows_text_of_the_input_only():
    c = CopyConstraint("Context: The capital of  France is Paris.\nQuestion: What is it?")
    assert all(c.viable(t) for t in ("", " Par", "capital of France", "Paris.", "the capital"))
    assert not any(c.viable(t) for t in ("Lyon", "capital  of", "Paris\n", "Parisx"))
    assert c.complete(" Paris") and c.complete("capital of France ") and c.complete("paris.")
    assert c.complete("The capital")  # case as the span metrics read it
    assert not c.complete("") and not c.complete("  ")
    assert not c.complete("Par") and not c.complete("capital of Fr")  # a word cut short
    # half of a multi-byte character (a byte-level BPE step) may go on where the input has such a
    # character next, but may not end the answer; with nothing non-ASCII to copy it is never viable
    assert not c.viable("Par\ufffd") and not c.viable("\ufffd\ufffd")
    z = CopyConstraint("Zürich and Zoë")
    assert z.viable("Z\ufffd") and z.viable("Zo\ufffd") and not z.complete("Z\ufffd")
    assert not z.viable("Zu\ufffd") and not z.viable("Z\ufffd\ufffd\ufffd\ufffd")


def test_entity_rule_types_words_separators_and_no_entity_listed_twice():
    c = EntityConstraint(SENT, list(ENTITY_TYPES))
    good = "ORG: Somerset | ORG: Leicestershire | LOC: Taunton"
    assert admits(c, good) and admits(c, "none") and admits(c, "LOC: Taunton")
    assert all(c.viable(t) for t in ("PE", "PER:", "PER: ", "PER: Som", "ORG: Somerset |"))
    assert c.viable("ORG: Somerset beat Leic")  # a run of whole tokens may be longer than one
    assert not c.viable("PERSON: Somerset")  # types as the task spells them
    assert not c.viable("PER:Somerset") and not c.viable("PER: Somerset  |")
    assert not c.viable("PER: Somer set") and not c.viable("PER: Bath")
    assert admits(c, "ORG: somerset | LOC: TAUNTON")  # case ignored, as the parser aligns words
    assert not c.viable("ORG: Somerset | ORG: SOMERSET")  # ... and still listed once
    assert not c.complete("PER: Somer")  # whole tokens only
    assert not c.complete("none | PER: Somerset") and not c.viable("nonex")
    # the repeated entity of the issue: Leicestershire occurs once, so it is listed once
    assert not c.viable("LOC: Leicestershire | ORG: Leic")
    assert not c.complete("LOC: Leicestershire | ORG: Leicestershire")
    twice = EntityConstraint("Smith met Smith .".split(), ["PER"])
    assert admits(twice, "PER: Smith | PER: Smith")
    assert not twice.viable("PER: Smith | PER: Smith | PER: S")
    # every token taken: nothing more may be listed
    assert not EntityConstraint(["Paris"], ["LOC"]).viable("LOC: Paris | L")


def test_entity_rule_with_any_type_name_and_line_breaks_never_viable():
    c = EntityConstraint(["Acme", "Widget", "2"], None)
    assert admits(c, "Product Name: Acme Widget 2") and admits(c, "creative-work: Acme")
    assert not c.complete("bad|type: Acme") and not c.viable("PER: Acme\n")
    for kind, kw in (("label", {"answer_choices": ["a"]}), ("span", {"source": "a b"})):
        assert not for_task(kind, **kw).viable("a\n")  # type: ignore[union-attr]


def test_for_task_gives_no_rule_where_there_is_nothing_to_constrain():
    assert for_task("text", source="x") is None
    assert for_task("label", answer_choices=[]) is None
    assert for_task("entities", tokens=None) is None
    assert isinstance(for_task("entities", tokens=SENT, entity_types=None), EntityConstraint)


def test_entity_rule_agrees_with_the_parser_on_what_it_admits():
    """Whatever the rule admits parses back as a valid canonical answer."""
    c = EntityConstraint(SENT, list(ENTITY_TYPES))
    for text in ("ORG: Somerset | LOC: Taunton", "MISC: beat Leicestershire", "none"):
        assert admits(c, text)
        assert ner_parse(text, SENT)[2], text


# ------------------------------------------------------------------ gold answers are admitted


def _kinds_to_check(tpl) -> bool:
    return tpl.parse in ("label", "span", "entities")


def test_constraints_admit_every_gold_answer_of_every_shipped_template_and_sample():
    from t2t_mtl.evaluation import oracle

    checked = 0
    for f in sorted(catalogue.SHIPPED_DIR.glob("[!_]*.yaml")):
        tpl = catalogue.load_task(str(f))
        if not _kinds_to_check(tpl):
            continue
        for split in catalogue.sample_splits(tpl):
            rows = sources.load_rows(tpl, None, split, bad_rows="skip", render=False)
            for r in oracle.oracle_check(tpl, rows, mode="constrained"):
                assert r.ok, (tpl.name, r.variant, [f.note or f.output for f in r.failures])
                checked += r.n
    assert checked > 100


def test_constraints_admit_gold_answers_of_the_unusual_fixture_templates():
    from t2t_mtl.evaluation import oracle

    files = sorted(ORACLE_FIXTURES.glob("*.yaml"))
    assert files
    n = 0
    for f in files:
        tpl = catalogue.load_task(str(f))
        if not _kinds_to_check(tpl):
            continue
        for split in catalogue.sample_splits(tpl):
            rows = sources.load_rows(tpl, None, split, bad_rows="skip", render=False)
            for r in oracle.oracle_check(tpl, rows, mode="constrained"):
                assert r.ok, (f.name, [x.note or x.output for x in r.failures])
                n += r.n
    assert n > 0


@pytest.mark.parametrize("task", ["sentiment_sst2", "nli_3way", "qa_squad", "ner_conll2003"])
def test_constraints_admit_the_gold_answers_of_the_real_slices(task, real_data_dir):
    from t2t_mtl.evaluation import oracle

    folder, split = REAL[task]
    tpl = catalogue.load_task(task)
    src = SourceConfig(path=str(real_data_dir / folder))
    rows = sources.load_rows(tpl, src, split, bad_rows="skip", limit=300, render=False)
    results = oracle.oracle_check(tpl, rows, mode="constrained")
    assert results and all(r.n > 0 for r in results)
    for r in results:
        assert r.ok, [(x.row, x.output, x.note) for x in r.failures]


def test_oracle_reports_gold_answers_a_constrained_task_cannot_generate(tmp_path):
    """A `span` task whose answers are not in the input (abstractive QA) is refused for
    constrained mode, row by row, with the fix."""
    from t2t_mtl.evaluation import oracle
    from t2t_mtl.tasks.task import load_task_file

    data = tmp_path / "qa.jsonl"
    data.write_text(
        '{"q": "Capital of France?", "a": "Paris"}\n{"q": "Two plus two?", "a": "four"}\n',
        encoding="utf-8",
    )
    f = tmp_path / "abstractive_qa.yaml"
    f.write_text(
        "name: abstractive_qa\ntask_type: qa\nversion: 1\nparse: span\nmetric: squad\n"
        "eval_mode: constrained\nfields: {q: str, a: str}\n"
        f"source: {{path: {data}}}\n"
        "variants:\n  - id: v1\n    instruction: Answer.\n    input: '{{ q }}'\n    output: '{{ a }}'\n",
        encoding="utf-8",
    )
    tpl = load_task_file(f)
    rows = sources.load_rows(tpl, None, "train", bad_rows="skip", render=False)
    (r,) = oracle.oracle_check(tpl, rows)
    assert not r.ok and r.failed == 2
    assert (
        "cannot generate it" in r.failures[0].note and "eval_mode: generate" in r.failures[0].note
    )
    (free,) = oracle.oracle_check(tpl, rows, mode="generate")
    assert free.ok


# ------------------------------------------------------------------ decoding on tiny models


INPUTS = (
    "Somerset beat Leicestershire at Taunton .",
    "the movie was good and Paris is nice",
    "Peter Blackburn visited New York .",
    "a bad film , really bad",
)


def _records():
    return [Record("t", "Answer.", x, "") for x in INPUTS]


def _rules(kind: str):
    if kind == "label":
        return [ChoiceConstraint(["positive", "negative", "neutral"]) for _ in INPUTS]
    if kind == "span":
        return [CopyConstraint(x) for x in INPUTS]
    return [EntityConstraint(x.split(), ["PER", "LOC", "ORG"]) for x in INPUTS]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["label", "span", "entities"])
def test_constrained_decoding_on_a_random_model_gives_only_allowed_answers(causal, kind):
    from t2t_mtl.model.generation import generate_texts

    model, tok, fmt = causal
    rules = _rules(kind)
    free = generate_texts(model, tok, fmt, _records(), max_new_tokens=24)
    assert not all(r.complete(t) for r, t in zip(rules, free))  # free decoding breaks the rule
    fast = generate_texts(model, tok, fmt, _records(), max_new_tokens=24, constraints=rules)
    slow = generate_texts(
        model, tok, fmt, _records(), max_new_tokens=24, constraints=rules, compact=False
    )
    assert fast == slow  # the compact loop and transformers' generate pick the same tokens
    for r, t in zip(rules, fast):
        assert r.viable(t), t  # never outside the rule, even when the budget ends it early
    if kind == "label":  # a choice fits the budget: every answer is one
        assert all(r.complete(t) for r, t in zip(rules, fast)), fast


@pytest.mark.usefixtures("one_thread")
def test_rows_without_a_rule_decode_as_before(causal):
    from t2t_mtl.model.generation import generate_texts

    model, tok, fmt = causal
    free = generate_texts(model, tok, fmt, _records(), max_new_tokens=12)
    rules = [None, ChoiceConstraint(["yes", "no"]), None, None]
    mixed = generate_texts(model, tok, fmt, _records(), max_new_tokens=12, constraints=rules)
    assert [mixed[i] for i in (0, 2, 3)] == [free[i] for i in (0, 2, 3)]
    assert mixed[1] in ("yes", "no")
    with pytest.raises(ValueError, match="constraints for"):
        generate_texts(model, tok, fmt, _records(), constraints=rules[:2])


@pytest.mark.usefixtures("one_thread")
def test_constrained_decoding_on_t5(tiny_t5_dir):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from t2t_mtl.model.generation import generate_texts
    from t2t_mtl.model.prompt_format import PromptFormat

    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval()
    fmt = PromptFormat.for_tokenizer(tok, "seq2seq")
    rules = _rules("label")
    out = generate_texts(model, tok, fmt, _records(), max_new_tokens=16, constraints=rules)
    assert all(r.complete(t) for r, t in zip(rules, out)), out


@pytest.mark.usefixtures("one_thread")
def test_evaluation_in_constrained_mode_has_no_invalid_label_answers(causal):
    from t2t_mtl.evaluation.evaluator import EvalTask, evaluate

    model, tok, fmt = causal
    tpl = catalogue.load_task("sentiment_sst2")
    free, con = (
        evaluate(
            model,
            tok,
            fmt,
            [EvalTask("s", tpl, None, mode)],
            split="train",
            limit=6,
            progress=False,
            ci_resamples=0,
            max_new_tokens=24,
        )
        for mode in ("generate", "constrained")
    )
    assert free["tasks"]["s"]["invalid_rate"] > 0  # a random model does not name a choice
    assert con["tasks"]["s"]["invalid_rate"] == 0.0 and con["tasks"]["s"]["mode"] == "constrained"


def test_a_run_config_asking_constrained_decoding_of_summaries_is_refused():
    from t2t_mtl.core.config import load_config

    cfg = load_config(
        data={
            "tasks": [
                {"template": "summarization", "eval_mode": "constrained"},
                {"template": "qa_squad", "eval_mode": "constrained"},
            ]
        }
    )
    problems = catalogue.check_config(cfg)
    msgs = [p.message for p in problems]
    assert msgs == ["tasks[0].eval_mode: constrained needs an answer of fixed form"], msgs


class _PieceTokenizer:
    """A tokenizer whose ids are text pieces (id 0 = end of answer), to drive the picker by hand."""

    def __init__(self, pieces):
        self.pieces = ["</s>", *pieces]
        self.all_special_ids = [0]

    def id(self, piece):
        return self.pieces.index(piece)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if i != 0)


def _run_picker(tok, rule, wanted, runner_up=None):
    """Feed the picker, step by step, logits whose argmax is the next piece of `wanted` (then the end;
    `runner_up[i]`: the second most likely piece at step i); returns the decoded answer after cuts,
    as generate_texts would."""
    import torch

    from t2t_mtl.model.generation import _Constrainer

    picker = _Constrainer(tok, [0], [], None).for_rows([rule])
    ids: list[int] = []
    for i, piece in enumerate([*wanted, "</s>"]):
        logits = torch.zeros(len(tok.pieces))
        logits[tok.id(piece)] = 5.0
        logits[0] = 1.0  # the end is the next choice everywhere
        if runner_up and i in runner_up:
            logits[tok.id(runner_up[i])] = 3.0
        t = picker(0, ids, logits)
        ids.append(tok.id(piece) if t is None else t)
        if ids[-1] == 0:
            break
    (row,) = picker.apply([ids])
    return tok.decode([i for i in row if i != 0])


def test_where_the_model_leaves_the_form_the_answer_ends_at_its_last_complete_point():
    pieces = [
        "LOC",
        "ORG",
        "PER",
        ":",
        " ",
        " |",
        "Leicestershire",
        "Somerset",
        "Opel",
        "50",
        "Pa",
        "ris",
        ".",
        "H",
        "ess",
        "es",
        "burgh",
        " Library",
        " the",
    ]
    tok = _PieceTokenizer(pieces)
    rule = EntityConstraint(SENT, list(ENTITY_TYPES))
    # a repeated entity: the unfinished item is dropped, not replaced by a made-up one
    wanted = ["LOC", ":", " ", "Leicestershire", " |", " ", "ORG", ":", " ", "Leicestershire"]
    assert _run_picker(tok, rule, wanted) == "LOC: Leicestershire"
    # a span that runs on beyond the input ends where it left it
    span = CopyConstraint("The capital is Paris, of course")
    assert _run_picker(tok, span, ["Pa", "ris", "."]) == "Paris"
    # a misspelt copy is mended inside the word (even where its start is a word of the input,
    # like the H of "H 2"); the answer ends where the model adds a word the input lacks there
    hes = CopyConstraint("the Theodore M. Hesburgh Library of H 2")
    assert _run_picker(tok, hes, ["H", "ess", "burgh", " Library"], {1: "es"}) == "Hesburgh Library"
    assert _run_picker(tok, CopyConstraint("Paris is big"), ["Pa", "ris", " the"]) == "Paris"
    # no complete answer yet: the most likely allowed token is taken instead of the model's
    assert _run_picker(tok, rule, ["PER", ":", " ", "50"]) in (
        "PER: Somerset",
        "PER: Leicestershire",
    )
