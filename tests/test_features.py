"""Tokenisation, completion-only labels, truncation, collators and attention-correct packing; the
per-task losses training computes (training.losses through StepRunner) on packed and plain batches."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from t2t_mtl.core.records import Record
from t2t_mtl.model.features import (
    IGNORE_INDEX,
    MIDDLE_MARK,
    CausalCollator,
    Seq2SeqCollator,
    encode,
    fitted_prompt,
    length_grouped_batches,
    model_inputs,
    pack_bins,
    packing_check,
    packing_layout,
    prompt_ids,
    stop_token_ids,
    target_ids,
)
from t2t_mtl.model.prompt_format import PromptFormat
from t2t_mtl.training import losses
from t2t_mtl.training.optimizer_step import StepRunner

INSTR = "Is the sentiment positive or negative?"


def rec(i: int, words: int = 3, out: str = "positive") -> Record:
    return Record("t", INSTR, " ".join(["the movie was good"] * words) + f" {i}.", out)


@pytest.fixture(scope="module")
def causal(tiny_causal_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_causal_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_dir, dtype=torch.float32)
    return model, tok, PromptFormat.for_tokenizer(tok, "causal")


@pytest.fixture(scope="module")
def t5(tiny_t5_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    return (
        AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir),
        tok,
        PromptFormat.for_tokenizer(tok, "seq2seq"),
    )


def test_labels_cover_exactly_the_answer(causal):
    _, tok, fmt = causal
    r = rec(1)
    f = encode(r, tok, fmt, 512, 64, task_index=2)
    p, t = prompt_ids(tok, fmt, r)[0], target_ids(tok, fmt, r)
    assert f["input_ids"] == p + t and f["task"] == 2 and not f["truncated"]
    assert f["labels"] == [IGNORE_INDEX] * len(p) + t
    assert f["labels"][-1] == tok.eos_token_id  # end-of-turn text became the EOS token
    assert tok.decode(t) == "positive<|im_end|>"


def test_stop_tokens(causal, t5):
    _, tok, fmt = causal
    assert stop_token_ids(tok, fmt) == [tok.eos_token_id]  # <|im_end|> ends the turn and is EOS
    tok_t5, fmt_t5 = t5[1], t5[2]
    assert stop_token_ids(tok_t5, fmt_t5) == [tok_t5.eos_token_id]
    gemma_like = PromptFormat(kind="chat", chat_template="x", answer_suffix="<|endoftext|>")
    assert stop_token_ids(tok, gemma_like) == [
        tok.bos_token_id,
        tok.eos_token_id,
    ]  # suffix token first


def test_prompt_tokens_are_what_inference_feeds(causal):
    _, tok, fmt = causal
    r = rec(2)
    # apply_chat_template(tokenize=True) is the reference for chat prompts (no extra BOS)
    ref = tok.apply_chat_template(
        [{"role": "user", "content": fmt.user_message(r)}],
        tokenize=True,
        add_generation_prompt=True,
    )
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert prompt_ids(tok, fmt, r)[0] == list(ref)


def test_plain_layout_has_exactly_one_bos(causal):
    _, tok, _ = causal
    fmt = PromptFormat.for_tokenizer(tok, "causal", mode="plain")
    ids = encode(rec(3), tok, fmt, 512, 64)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1


def test_truncation_cuts_the_input_and_keeps_the_answer(causal):
    _, tok, fmt = causal
    fmt = dataclasses.replace(fmt, truncation="end")
    r = rec(4, words=60, out="negative and sad")
    full = encode(r, tok, fmt, 4096, 64)
    cut = encode(r, tok, fmt, 150, 64)
    assert len(full["input_ids"]) > 150 >= len(cut["input_ids"]) and cut["truncated"]
    t = target_ids(tok, fmt, r)
    assert cut["input_ids"][-len(t) :] == t and cut["labels"][-len(t) :] == t
    assert sum(lab != IGNORE_INDEX for lab in cut["labels"]) == len(t)
    text = tok.decode(cut["input_ids"][: -len(t)])
    assert INSTR in text and text.endswith(
        "<|im_start|>assistant\n"
    )  # layout and instruction intact
    kept = text.split(INSTR + "\n\n", 1)[1].split("<|im_end|>", 1)[0]
    assert kept and r.input.startswith(kept)  # the input's beginning is what survives


def test_middle_truncation_keeps_both_ends_of_the_input(causal):
    """The default: a question after a long passage survives the cut (it did not with "end")."""
    _, tok, fmt = causal
    assert fmt.truncation == "middle"
    r = Record(
        "t",
        INSTR,
        "Passage: "
        + "the film ran long and the cast was large. " * 40
        + "\nQuestion: who directed it?",
        "Ann Lee",
    )
    for budget in (170, 220, 300):  # the tiny tokenizer is nearly per character
        p, cut = prompt_ids(tok, fmt, r, budget)
        assert cut and budget - 3 <= len(p) <= budget  # close to the budget, never over it
        text = tok.decode(p)
        assert INSTR in text and text.endswith("<|im_start|>assistant\n")
        kept = text.split(INSTR + "\n\n", 1)[1].split("<|im_end|>", 1)[0]
        head, tail = kept.split(MIDDLE_MARK)
        assert (
            r.input.startswith(head)
            and r.input.endswith(tail)
            and tail.endswith("Question: who directed it?")
        )
        assert (
            abs(len(tok(head)["input_ids"]) - len(tok(tail)["input_ids"])) <= 4
        )  # half of the room each
    f = encode(r, tok, fmt, 220, 64)
    t = target_ids(tok, fmt, r)
    assert len(f["input_ids"]) <= 220 and f["input_ids"][-len(t) :] == t and f["truncated"]
    assert prompt_ids(tok, fmt, r, 4096) == (prompt_ids(tok, fmt, r)[0], False)  # fits: untouched


def test_seq2seq_middle_truncation(t5):
    _, tok, fmt = t5
    r = Record(
        "t", "Answer the question.", "The story is long and funny. " * 30 + "is it funny?", "Ann."
    )
    ids, cut = prompt_ids(tok, fmt, r, 60)
    assert cut and len(ids) <= 60 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).rstrip().endswith("is it funny?")


class _CountingTokenizer:
    """A tokenizer that records the texts it is called on."""

    def __init__(self, tok):
        self.tok, self.texts = tok, []

    def __call__(self, text, **kw):
        self.texts.append(text)
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_record_is_tokenised_once_and_a_cut_prompt_once_more(causal):
    """Training's per-record cost: the answer and the prompt once each; an over-long prompt takes
    its cut points from that call's offsets and is tokenised again only after the cut (once, or
    twice when the first cut is a token or two over); the input is never tokenised alone, the
    whole prompt never twice."""
    _, tok, fmt = causal
    short = rec(1)
    long = Record("t", INSTR, "Passage: " + "the cast was large. " * 40 + "Question: who?", "Ann")
    for r, max_length, cut in ((short, 512, False), (long, 200, True)):
        counting = _CountingTokenizer(tok)
        f = encode(r, counting, fmt, max_length, 64)
        assert f == encode(r, tok, fmt, max_length, 64) and f["truncated"] is cut
        assert counting.texts[:2] == [fmt.target(r), fmt.prompt(r)]
        extra = counting.texts[2:]
        assert len(extra) in (1, 2) if cut else not extra
        assert all(MIDDLE_MARK in t and r.input not in t for t in extra)


@pytest.mark.parametrize("budget", range(150, 156))
def test_a_cut_keeps_the_inputs_own_characters(causal, t5, budget):
    """The cut is made in the input's text at token boundaries, not by decoding token ids: a
    character split over several tokens (CJK in byte-level BPE) is never halved into U+FFFD,
    and T5's decode (which writes unknown characters as "<unk>" and newlines as spaces) does
    not leak into the prompt. The kept text is exactly what the prompt is tokenised from."""
    r = Record("t", INSTR, "二十人七十人 qīshí rén " * 30 + "\nWhy was Northgate founded?", "x")
    for _, tok, fmt in (causal, t5):
        for truncation in ("middle", "end"):
            f = dataclasses.replace(fmt, truncation=truncation)
            ids, used = fitted_prompt(tok, f, r, budget)
            assert used is not r and len(ids) <= budget
            assert tok(f.prompt(used), add_special_tokens=f.add_special_tokens)["input_ids"] == ids
            head, *tail = used.input.split(MIDDLE_MARK)
            assert r.input.startswith(head) and "\ufffd" not in used.input
            if truncation == "middle":
                assert tail and r.input.endswith(tail[0]) and tail[0].endswith("founded?")


def test_overlong_target_is_cut_but_fits(causal):
    _, tok, fmt = causal
    r = Record("t", INSTR, "short", " ".join(["wonderful"] * 200))
    f = encode(r, tok, fmt, 160, 64)
    assert len(f["input_ids"]) <= 160 and f["target_truncated"]
    assert any(lab == IGNORE_INDEX for lab in f["labels"])  # a prompt is still there


def test_seq2seq_features(t5):
    _, tok, fmt = t5
    r = Record(
        "t", "Summarize the text.", "The story is long and funny. " * 30, "The story is funny."
    )
    f = encode(r, tok, fmt, 48, 6, task_index=1)
    assert len(f["input_ids"]) <= 48 and f["truncated"] and f["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(f["input_ids"]).startswith("Summarize the text.")
    assert f["labels"][-1] == tok.eos_token_id and len(f["labels"]) <= 6 and f["target_truncated"]
    short = encode(Record("t", "Summarize the text.", "Paris is good.", "Paris."), tok, fmt, 48, 16)
    assert short["labels"] == tok("Paris.")["input_ids"] and not short["target_truncated"]
    assert short["input_ids"] == tok("Summarize the text.\n\nParis is good.")["input_ids"]


def test_causal_collator_pads_and_marks_tasks(causal):
    _, tok, fmt = causal
    feats = [encode(rec(i, words=1 + 3 * i), tok, fmt, 512, 64, task_index=i) for i in range(3)]
    b = CausalCollator(pad_token_id=tok.eos_token_id)(feats)
    width = max(len(f["input_ids"]) for f in feats)
    assert b["input_ids"].shape == (3, width) and set(b) == {
        "input_ids",
        "labels",
        "attention_mask",
        "position_ids",
        "task_ids",
    }
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert b["labels"][i, n:].eq(IGNORE_INDEX).all()
        answer = torch.tensor(f["labels"]) != IGNORE_INDEX
        assert (
            b["task_ids"][i, :n][answer].eq(i).all() and b["task_ids"][i, :n][~answer].eq(-1).all()
        )
        assert b["task_ids"][i, n:].eq(-1).all()


def test_pack_bins_first_fit_decreasing():
    assert sorted(map(sorted, pack_bins([5, 5, 4, 3, 3], 10))) == [[0, 1], [2, 3, 4]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    bins = pack_bins(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 64) * 1.25  # FFD is close to the lower bound
    assert pack_bins([70], 64) == [[0]]  # too long: alone


def training_task_losses(model, batch, n_tasks: int, family: str = "causal"):
    """(per-task loss sums, per-task target-token counts, token losses) of a collated batch, computed
    exactly as a training step computes them: `StepRunner.token_losses` (the model's forward with
    target-only logits, shifted for causal models), `losses.task_sums`, `StepRunner.count`."""
    from accelerate import Accelerator

    names = [f"task{i}" for i in range(n_tasks)]
    balancer = losses.make_balancer("none", names, [1.0] * n_tasks)
    runner = StepRunner(Accelerator(), model, None, balancer, names, family, 0.0)
    tok_loss, tok_task = runner.token_losses(batch)
    tok_loss = tok_loss.detach().double()
    return losses.task_sums(tok_loss, tok_task, n_tasks), runner.count(batch), tok_loss


def _mixed_batch(tok, fmt):
    outs = ["positive", "negative and sad", "neutral", "a great and wonderful story", "bad"]
    return [
        encode(rec(i, words=1 + (i * 7) % 5, out=outs[i % 5]), tok, fmt, 512, 64, task_index=i % 3)
        for i in range(7)
    ]


def test_packed_loss_equals_unpacked_loss(causal):
    """The key property: packing changes the batch layout, not the loss or the gradients."""
    model, tok, fmt = causal
    feats = _mixed_batch(tok, fmt)
    unpacked = CausalCollator(tok.eos_token_id)(feats)
    packed = CausalCollator(tok.eos_token_id, packing=True, max_length=256)(feats)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]  # it really packed
    assert "attention_mask" not in packed
    assert (packed["labels"] != IGNORE_INDEX).sum() == (unpacked["labels"] != IGNORE_INDEX).sum()
    model.train()
    model_losses, grads, per_task = [], [], []
    for batch in (unpacked, packed):
        model.zero_grad()
        out = model(**model_inputs(batch))
        out.loss.backward()
        loss = float(out.loss.detach())
        model_losses.append(out.loss.detach())
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
        sums, counts, tok_loss = training_task_losses(model, batch, 3)
        assert counts.sum() == len(tok_loss) == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        assert float(tok_loss.mean()) == pytest.approx(loss, abs=1e-5)
        assert float(sums.sum() / counts.sum()) == pytest.approx(loss, abs=1e-5)
        per_task.append((sums / counts, counts))
    assert torch.allclose(model_losses[0], model_losses[1], atol=1e-5)  # overall loss
    assert torch.equal(per_task[0][1], per_task[1][1])  # per-task token counts
    assert torch.allclose(per_task[0][0], per_task[1][0], atol=1e-5)  # per-task losses
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_packed_rows_restart_positions_and_never_label_across_examples(causal):
    _, tok, fmt = causal
    feats = _mixed_batch(tok, fmt)
    packed = CausalCollator(tok.eos_token_id, packing=True, max_length=256)(feats)
    starts = 0
    for r in range(packed["input_ids"].shape[0]):
        pos = packed["position_ids"][r]
        for s in (pos == 0).nonzero().flatten().tolist():
            assert packed["labels"][r, s] == IGNORE_INDEX  # first token of every segment
            starts += 1
    assert starts >= len(feats)
    assert (packed["labels"] != IGNORE_INDEX).sum() == sum(
        sum(x != IGNORE_INDEX for x in f["labels"]) for f in feats
    )


def test_packing_needs_use_cache_false(causal):
    """Why model_inputs adds use_cache=False: with a KV cache transformers stops detecting
    packed rows and attention leaks across examples (the loss changes)."""
    model, tok, fmt = causal
    feats = _mixed_batch(tok, fmt)
    unpacked = CausalCollator(tok.eos_token_id)(feats)
    packed = CausalCollator(tok.eos_token_id, packing=True, max_length=256)(feats)
    model.eval()
    with torch.no_grad():
        ref = model(**model_inputs(unpacked)).loss
        leaky = model(**{k: v for k, v in packed.items() if k != "task_ids"}, use_cache=True).loss
    assert abs(leaky - ref) > 1e-3


def test_packing_layout_follows_the_attention_implementation():
    """Flash-attention kernels get cu_seq_lens from position_ids only for a one-row batch, so they
    get the whole micro-batch as one row; block-diagonal masks (sdpa, eager, flex) take rows."""
    for name in ("flash_attention_2", "flash_attention_3", "paged|flash_attention_2"):
        assert packing_layout(name) == "flat", name
    assert packing_layout("kernels-community/flash-attn") == "flat"  # a hub kernel (varlen)
    for name in (None, "sdpa", "eager", "flex_attention", "paged|sdpa"):
        assert packing_layout(name) == "rows", name


def test_flat_layout_is_one_row_with_the_same_loss(causal):
    """The flash layout: the micro-batch as one row in batch order, no padding, positions
    restarting per example; on SDPA (no flash kernel here) it gives the same loss as padding."""
    model, tok, fmt = causal
    feats = _mixed_batch(tok, fmt)
    flat = CausalCollator(tok.eos_token_id, packing=True, layout="flat")(feats)
    lengths = [len(f["input_ids"]) for f in feats]
    assert flat["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in flat
    assert flat["input_ids"][0].tolist() == [t for f in feats for t in f["input_ids"]]
    assert flat["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    unpacked = CausalCollator(tok.eos_token_id)(feats)
    model.eval()
    with torch.no_grad():
        ref = model(**model_inputs(unpacked)).loss
        assert torch.allclose(model(**model_inputs(flat)).loss, ref, atol=1e-5)
    with pytest.raises(ValueError, match="layout"):
        CausalCollator(tok.eos_token_id, packing=True, layout="diagonal")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_packing_check_passes_on_correct_packing(tiny_causal_dir, attn, layout):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_dir, attn_implementation=attn)
    model.train()
    rng = torch.random.get_rng_state()
    collator = CausalCollator(0, packing=True, max_length=64, layout=layout)
    assert packing_check(model, collator) == (True, "")
    assert model.training and torch.equal(torch.random.get_rng_state(), rng)  # nothing disturbed


class _CausalMaskOnly(torch.nn.Module):
    """A deliberately leaking layout: a plain causal mask over the packed row (a 2D all-ones mask
    defeats transformers' packed-sequence detection), i.e. no block boundaries."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, **kw):
        kw.pop("attention_mask", None)
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)


def test_packing_check_fails_where_attention_leaks(causal, t5):
    model = causal[0].train()
    collator = CausalCollator(0, packing=True, max_length=64)
    ok, why = packing_check(_CausalMaskOnly(model), collator)
    assert not ok and "leaks across packed examples" in why and "moved by" in why
    ok, why = packing_check(model, dataclasses.replace(collator, max_length=1))
    assert not ok and "cannot hold two examples" in why
    assert packing_check(t5[0], collator) == (False, "not a decoder-only model")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_packing_check_exact_in_bf16_and_with_dropout(tiny_causal_dir, method):
    """Exactness does not rely on float32 or eval mode: bf16 weights (LoRA) or a 4-bit base with
    bf16 compute (QLoRA) under LoRA dropout pass too (same shapes, same kernels, same dropout
    masks), and a leak still fails there."""
    from t2t_mtl.core.config import AdapterConfig, ModelConfig
    from t2t_mtl.model.loading import load_model_and_tokenizer

    model, _, _ = load_model_and_tokenizer(
        ModelConfig(name=str(tiny_causal_dir), dtype="bfloat16"),
        AdapterConfig(method=method, r=4, dropout=0.3),
    )
    collator = CausalCollator(0, packing=True, max_length=64)
    assert packing_check(model, collator) == (True, "")
    assert not packing_check(_CausalMaskOnly(model), collator)[0]


def test_seq2seq_collator_and_loss(t5):
    model, tok, fmt = t5
    recs = [
        Record("t", "Summarize the text.", "The movie was good " * (i + 1), "Good " * (i + 1))
        for i in range(3)
    ]
    feats = [encode(r, tok, fmt, 64, 16, task_index=i % 2) for i, r in enumerate(recs)]
    b = Seq2SeqCollator(tok.pad_token_id)(feats)
    assert b["labels"].shape[1] == max(len(f["labels"]) for f in feats)
    assert b["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in feats)
    assert (b["task_ids"] >= 0).eq(b["labels"] != IGNORE_INDEX).all()
    model.eval()  # two forwards (the model's loss, training's) must agree: no dropout
    out = model(**{k: v for k, v in b.items() if k != "task_ids"})
    sums, counts, tok_loss = training_task_losses(model, b, 2, "seq2seq")
    assert counts.tolist() == [
        sum(x != IGNORE_INDEX for f in feats if f["task"] == t for x in f["labels"]) for t in (0, 1)
    ]
    assert float(sums.sum() / counts.sum()) == pytest.approx(float(out.loss.detach()), abs=1e-5)


def test_seq2seq_collator_buckets_widths_up_to_the_caps(t5):
    _, tok, fmt = t5
    recs = [
        Record("t", "Summarize the text.", "The movie was good " * n, "Good " * n) for n in (2, 9)
    ]
    feats = [encode(r, tok, fmt, 40, 12) for r in recs]  # the longer is cut to 40 and 12
    longest = [max(len(f[k]) for f in feats) for k in ("input_ids", "labels")]
    assert longest[0] == 40 and longest[1] == 12
    bucketed = Seq2SeqCollator(
        tok.pad_token_id, 64, label_pad_to_multiple_of=8, max_length=40, max_target_length=12
    )
    b = bucketed(feats)
    assert b["input_ids"].shape[1] == 40 and b["labels"].shape[1] == 12  # the caps, not 64 / 16
    b = bucketed(feats[:1])
    short = [len(feats[0][k]) for k in ("input_ids", "labels")]
    assert short[0] < 40 and b["input_ids"].shape[1] == 40  # 64 would pass the cap
    assert 8 < short[1] < 12 and b["labels"].shape[1] == 12  # 16 would pass the cap
    b = Seq2SeqCollator(tok.pad_token_id, 64, label_pad_to_multiple_of=8)(feats)
    assert b["input_ids"].shape[1] == 64 and b["labels"].shape[1] == 16  # no caps given
    assert b["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in feats)


def test_length_grouped_batches():
    rng = random.Random(1)
    lengths = [rng.randint(5, 300) for _ in range(400)]
    batches = length_grouped_batches(lengths, 8, seed=3, window=10)
    assert sorted(i for b in batches for i in b) == list(range(400))
    assert batches == length_grouped_batches(lengths, 8, seed=3, window=10)
    assert batches != length_grouped_batches(lengths, 8, seed=4, window=10)

    def padding(bs):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)

    plain = [list(range(i, min(i + 8, 400))) for i in range(0, 400, 8)]
    assert padding(batches) < padding(plain) / 4
    assert all(max(b) - min(b) < 80 for b in batches)  # items stay within their window
