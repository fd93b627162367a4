"""Faster evaluation must not change a prediction: compact greedy decoding (ended rows leave the
batch) against transformers' generate, the first-line stop against the parsers, per-task budgets,
and whole evaluations with every speed-up on and off (tiny model; the embedded SmolLM2 under -m slow).
"""

from __future__ import annotations

import pytest
import torch

from t2t_mtl.core.records import Record
from t2t_mtl.evaluation.evaluator import EvalTask, answer_budget, evaluate, load_examples
from t2t_mtl.model import generation as G
from t2t_mtl.model.features import stop_token_ids, target_ids
from t2t_mtl.model.prompt_format import PromptFormat
from t2t_mtl.tasks.catalogue import load_task
from t2t_mtl.tasks.parsing import FIRST_LINE_KINDS, parse

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one torch thread

TEXTS = (
    "the movie is good",
    "a bad film. " * 6,
    "Paris",
    "the river was sad and long, 12 times.",
    "my friend looks wonderful",
    "Berlin remains terrible and the story became boring",
)
RECS = [Record("s", "Is the sentiment positive or negative?", t, "") for t in TEXTS]


def _hf_greedy(model, ids, mask, n, stops, pad):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=list(stops),
        pad_token_id=pad,
    )[:, ids.shape[1] :].tolist()
    cut = []
    for row in out:  # transformers pads ended rows: keep up to and with the first stop token
        k = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
        cut.append(row[: k + 1])
    return cut


def test_compact_greedy_equals_transformers_with_rows_ending_at_different_steps(causal):
    model, tok, fmt = causal
    pad = G.pad_id(tok)
    prompts = G.encode_prompts(tok, fmt, RECS, None)
    ids, mask = G._left_pad(prompts, pad, "cpu")
    free = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=pad
    )[:, ids.shape[1] :].tolist()
    # Stop tokens chosen so each row ends at its own step: the rows leave the batch one by one.
    stops = {row[2 + k] for k, row in enumerate(free[:4])}
    with torch.no_grad():
        ours = G._compact_greedy(model, ids, mask, 14, stops)
        ref = _hf_greedy(model, ids, mask, 14, stops, pad)
    assert ours == ref
    ended_at = sorted(len(r) for r in ours)
    assert len(set(ended_at)) >= 3 and ended_at[0] < 14  # really different ends, some early
    assert ours == [r[: len(o)] for r, o in zip(free, ours)]  # and the same tokens as unstopped


def test_shared_prefix_prefill_gives_the_same_tokens(causal):
    model, tok, fmt = causal
    pad = G.pad_id(tok)
    prompts = G.encode_prompts(tok, fmt, RECS, None)
    shared = G.shared_prefix_len(prompts)
    assert shared >= G.MIN_SHARED_PREFIX  # chat header + system message + instruction
    assert all(p[:shared] == prompts[0][:shared] for p in prompts)
    assert len({p[shared] for p in prompts}) > 1 or min(map(len, prompts)) == shared + 1
    ids, mask = G._left_pad(prompts, pad, "cpu")
    with torch.no_grad():
        free = G._compact_greedy(model, ids, mask, 12, [])
        stops = {row[3 + k] for k, row in enumerate(free[:3])}  # rows end at different steps
        for st in ([], stops):
            plain = G._compact_greedy(model, ids, mask, 12, st)
            assert G._compact_greedy(model, ids, mask, 12, st, prefix_len=shared) == plain
        assert plain == _hf_greedy(model, ids, mask, 12, stops, pad)
    assert G.shared_prefix_len([[1, 2, 3]]) == 0
    assert G.shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # each keeps a token of its own
    assert G.shared_prefix_len([[1, 2, 3], [1, 5]]) == 1


@pytest.mark.parametrize("batch_size,budget", [(16, 8), (4, 5), (1, 3)])
def test_generate_texts_compact_equals_the_transformers_path(causal, batch_size, budget):
    model, tok, fmt = causal
    run = lambda **kw: G.generate_texts(  # noqa: E731
        model, tok, fmt, RECS, max_new_tokens=budget, batch_size=batch_size, **kw
    )
    plain = run(compact=False)
    assert run() == run(share_prefix=False) == plain
    assert all(plain) and len(set(plain)) > 2


def test_logits_processors_fall_back_to_transformers(causal, monkeypatch):
    model, tok, fmt = causal
    gc = G._greedy_config(model, 8, stop_token_ids(tok, fmt), G.pad_id(tok))
    assert G._plain_greedy(gc)
    gc.repetition_penalty = 1.3
    assert not G._plain_greedy(gc)
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.3)
    calls = []
    monkeypatch.setattr(G, "_compact_greedy", lambda *a, **k: calls.append(a))
    penalised = G.generate_texts(model, tok, fmt, RECS, max_new_tokens=8, compact=True)
    assert not calls  # transformers applied the penalty
    assert penalised == G.generate_texts(model, tok, fmt, RECS, max_new_tokens=8, compact=False)


# ------------------------------------------------------------------ the first-line stop


@pytest.mark.parametrize(
    "text,ends_after",
    [
        ("positive\nThe review is kind.", "positive\n"),
        ("\n\n  Answer: Paris\r\nBecause", "\n\n  Answer: Paris\r"),
        ("no line break at all", None),
        ("\n\n\n", None),
    ],
)
def test_first_line_done_fires_exactly_when_the_first_non_empty_line_ends(causal, text, ends_after):
    _, tok, fmt = causal
    stops = stop_token_ids(tok, fmt)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    done = G._FirstLineDone(tok, stops, [], None)
    fired = next((k for k in range(1, len(ids) + 1) if done(ids[:k])), None)
    if ends_after is None:
        assert fired is None
        return
    assert fired is not None and tok.decode(ids[:fired]).startswith(ends_after)
    assert not tok.decode(ids[: fired - 1]).startswith(ends_after)
    # the parsers that read only the first line see the same thing in the cut text
    cut = tok.decode(ids[:fired]).strip()
    for kind in FIRST_LINE_KINDS:
        kw = (
            {"answer_choices": ["positive", "negative", "Paris"]}
            if kind in ("label", "labels")
            else {}
        )
        assert parse(kind, cut, **kw) == parse(kind, text, **kw)


def test_first_line_done_ignores_line_breaks_of_the_reply_frame(causal):
    _, tok, fmt = causal
    prefix = tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    done = G._FirstLineDone(tok, stop_token_ids(tok, fmt), prefix, None)
    assert not any(done(prefix[:k]) for k in range(1, len(prefix) + 1))
    answer = tok("yes\nmore", add_special_tokens=False)["input_ids"]
    fired = [k for k in range(1, len(answer) + 1) if done(prefix + answer[:k])]
    assert fired and tok.decode(answer[: fired[0]]).startswith("yes\n")


@pytest.fixture(scope="module")
def multiline(causal):
    """The tiny model made to write line breaks: the newline token's output row becomes a copy of
    the most often generated token's (nudged up), so it wins wherever that token would."""
    import copy

    model, tok, fmt = causal
    model = copy.deepcopy(model)
    raw = G.generate_texts(model, tok, fmt, RECS, max_new_tokens=24)
    ids = [t for x in raw for t in tok(x, add_special_tokens=False)["input_ids"][1:]]
    common = max(set(ids), key=ids.count)
    nl = tok("\n", add_special_tokens=False)["input_ids"][-1]
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w[nl] = w[common] * 1.01
    return model, tok, fmt


def test_line_stop_keeps_every_label_and_span_prediction(multiline):
    model, tok, fmt = multiline
    full = G.generate_texts(model, tok, fmt, RECS, max_new_tokens=24)
    short = G.generate_texts(model, tok, fmt, RECS, max_new_tokens=24, stop_after_line=True)
    assert sum("\n" in t.strip() for t in full) >= 2, "the model must write several lines here"
    assert short != full  # it did stop early
    choices = ["good", "bad", "the movie"]
    for a, b in zip(full, short):
        assert a.startswith(b)
        assert parse("label", a, answer_choices=choices) == parse(
            "label", b, answer_choices=choices
        )
        assert parse("span", a) == parse("span", b)
    # the transformers path (stopping criterion per row) stops at the same tokens
    hf = G.generate_texts(
        model, tok, fmt, RECS, max_new_tokens=24, stop_after_line=True, compact=False
    )
    assert hf == short


def test_seq2seq_keeps_transformers_generate_with_the_line_stop(tiny_t5_dir, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    fmt = PromptFormat.for_tokenizer(tok, "seq2seq")
    monkeypatch.setattr(G, "_compact_greedy", None)  # never used for encoder-decoder models
    plain = G.generate_texts(model, tok, fmt, RECS, max_new_tokens=6)
    lined = G.generate_texts(model, tok, fmt, RECS, max_new_tokens=6, stop_after_line=True)
    assert [parse("span", x) for x in lined] == [parse("span", x) for x in plain]


# ------------------------------------------------------------------ per-task budgets


def test_answer_budget_from_training_answers_template_key_and_cap(causal):
    _, tok, fmt = causal
    task = EvalTask("qa_squad", load_task("qa_squad"))
    from t2t_mtl.tasks import sources

    rows = sources.load_rows(task.template, None, "train")
    longest = max(
        len(
            target_ids(
                tok,
                fmt,
                sources.render_row(
                    task.template, rows, i, task.variant_id(), row_id="x", split="train"
                ),
            )
        )
        for i in range(len(rows))
    )
    assert answer_budget(task, tok, fmt, 500) == (2 * longest + 8, "train")
    assert answer_budget(task, tok, fmt, 10) == (10, "train")  # capped by eval.max_new_tokens
    tpl = load_task("sentiment_sst2")
    tpl.max_new_tokens = 3
    assert answer_budget(EvalTask("s", tpl), tok, fmt, 64) == (3, "template")
    from t2t_mtl.core.config import SourceConfig

    nowhere = EvalTask("q2", load_task("qa_squad"), source=SourceConfig(path="/nonexistent/dir"))
    assert answer_budget(nowhere, tok, fmt, 64) == (64, "cap")


def test_template_max_new_tokens_is_checked(tmp_path):
    from t2t_mtl.core.errors import TemplateError
    from t2t_mtl.tasks.task import load_task_file

    src = (load_task("sentiment_sst2").path).read_text(encoding="utf-8")
    inc = load_task("sentiment_sst2").path.parent / "_shared"
    (tmp_path / "_shared").symlink_to(inc)
    f = tmp_path / "sentiment_sst2.yaml"
    f.write_text(src + "max_new_tokens: 0\n", encoding="utf-8")
    with pytest.raises(TemplateError, match="max_new_tokens must be a positive integer"):
        load_task_file(f)
    f.write_text(src + "max_new_tokens: 5\n", encoding="utf-8")
    assert load_task_file(f).max_new_tokens == 5


# ------------------------------------------------------------------ whole evaluations


def _tasks() -> list[EvalTask]:
    return [EvalTask(n, load_task(n)) for n in ("sentiment_sst2", "qa_squad", "ner_conll2003")]


def _strip(res: dict) -> dict:
    keep = ("primary", "metrics", "invalid_rate", "per_example", "ci_low", "ci_high")
    return {n: {k: e[k] for k in keep} for n, e in res["tasks"].items()}


def test_evaluate_gives_the_same_scores_with_every_speedup_on_or_off(causal):
    model, tok, fmt = causal
    kw = dict(split="validation", limit=6, progress=False, max_new_tokens=20, batch_size=4)
    fast = evaluate(model, tok, fmt, _tasks(), **kw)
    off = dict(task_budgets=False, line_stop=False, compact=False, share_prefix=False)
    slow = evaluate(model, tok, fmt, _tasks(), **off, **kw)
    assert _strip(fast) == _strip(slow) and fast["combined"] == slow["combined"]
    assert fast["tasks"]["sentiment_sst2"]["budget_from"] == "train"
    assert fast["tasks"]["sentiment_sst2"]["max_new_tokens"] < 20  # a label needs few tokens
    assert slow["tasks"]["sentiment_sst2"]["max_new_tokens"] == 20


@pytest.mark.slow
def test_embedded_smollm2_answers_are_unchanged_by_the_speedups():
    from t2t_mtl.core.config import ModelConfig
    from t2t_mtl.model.loading import load_model_and_tokenizer

    model, tok, family = load_model_and_tokenizer(
        ModelConfig(name="embedded:smollm2-135m-instruct"), for_training=False
    )
    fmt = PromptFormat.for_tokenizer(tok, family)
    for name in ("sentiment_sst2", "qa_squad", "summarization"):
        task = EvalTask(name, load_task(name))
        recs = [ex.record for ex in load_examples(task, "validation", 8)[0]]
        old = G.generate_texts(model, tok, fmt, recs, max_new_tokens=40, compact=False)
        new = G.generate_texts(model, tok, fmt, recs, max_new_tokens=40)
        assert new == old, name  # compact decoding, shared prefix prefilled once
        line = G.generate_texts(model, tok, fmt, recs, max_new_tokens=40, stop_after_line=True)
        tpl = task.template
        if tpl.parse in FIRST_LINE_KINDS:
            assert [tpl.parse_output(x).value for x in line] == [
                tpl.parse_output(x).value for x in old
            ]
