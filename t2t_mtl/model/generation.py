"""Batched greedy generation and rank classification on records (uses torch).

Both build prompts with `features.prompt_ids` and targets with `features.target_ids`, the
functions training uses, so the model is asked exactly what it was taught:

- `generate_texts`: causal prompts are *left*-padded (every row's next token sits in the
  last column; transformers derives position ids from the attention mask), seq2seq
  sources right-padded as in training. Greedy decoding; generation stops at the EOS
  token or at the prompt format's end-of-turn token; the reply frame the chat template
  writes before an answer (`PromptFormat.answer_prefix`) is removed from the text. With
  `constraints` (one `tasks.constraints.AnswerConstraint` or None per record) each step takes
  the most likely token that keeps the row's answer viable (constrained decoding, `_Constrainer`).
- `rank_choices`: for each answer choice, the summed log-probability of the choice's
  training target tokens (`PromptFormat.target`: answer prefix + choice + end-of-turn for
  causal models, choice + `</s>` for T5) given the prompt; the highest sum wins. Summed,
  not averaged: a choice is the whole sequence the model would have to produce.
  Causal scoring left-pads prompt+target so all targets end in the last column and asks
  the model only for the logits it needs (`logits_to_keep`) where the model supports it.

`progress(n)` callbacks report records done (a tqdm bar's `update`, say).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from t2t_mtl.core.records import Record
from t2t_mtl.model.features import prompt_ids, stop_token_ids, target_ids
from t2t_mtl.model.prompt_format import PromptFormat
from t2t_mtl.tasks.constraints import AnswerConstraint

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import (
        Cache,
        GenerationConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        StoppingCriteriaList,
    )

__all__ = ["Ranked", "encode_prompts", "generate_texts", "pad_id", "place", "rank_choices"]


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def place(model: PreTrainedModel | PeftModel) -> PreTrainedModel | PeftModel:
    """Move a model loaded on the CPU to the GPU when there is one. Quantised and device-mapped
    models stay where loading put them."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (
        torch.cuda.is_available()
        and _device(model).type == "cpu"
        and getattr(inner, "hf_device_map", None) is None
        and not getattr(inner, "is_loaded_in_4bit", False)
        and not getattr(inner, "is_loaded_in_8bit", False)
    ):
        model.to("cuda")
    return model


def _is_seq2seq(model: PreTrainedModel | PeftModel, fmt: PromptFormat) -> bool:
    return fmt.kind == "seq2seq" or bool(
        getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    )


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS (never attended to)."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid) if pid is not None else 0


def _left_pad(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _right_pad(
    rows: Sequence[Sequence[int]], pad: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _greedy_config(
    model: PreTrainedModel | PeftModel, max_new_tokens: int, stops: list[int], pad: int
) -> GenerationConfig:
    """The model's generation config made greedy: sampling knobs cleared, our stop ids and budget."""
    from transformers import GenerationConfig  # transformers stays out of this module's import

    base = getattr(model, "generation_config", None)
    gc = copy.deepcopy(base) if base is not None else GenerationConfig()
    gc.do_sample, gc.num_beams, gc.num_return_sequences = False, 1, 1
    gc.temperature = gc.top_p = gc.top_k = None
    gc.max_new_tokens, gc.max_length, gc.min_new_tokens = int(max_new_tokens), None, None
    gc.pad_token_id = pad
    if stops:
        gc.eos_token_id = stops
    return gc


class _EvalMode:
    """`with _EvalMode(model):` eval mode + no grad, restoring training mode afterwards
    (the training loop's eval hook calls in mid-run)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was = model, bool(getattr(model, "training", False))

    def __enter__(self):
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        torch.set_grad_enabled(self.grad)
        self.model.train(self.was)
        return False


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    records: Sequence[Record],
    max_prompt_tokens: int | None,
) -> list[list[int]]:
    """Prompt ids of each record, exactly as training tokenises them (`features.prompt_ids`)."""
    return [prompt_ids(tokenizer, fmt, r, max_prompt_tokens)[0] for r in records]


def _length_order(lengths: Sequence[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # fewer pad tokens per batch


def generate_texts(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    records: Sequence[Record],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    progress: Callable[[int], object] | None = None,
    stop_after_line: bool = False,
    compact: bool = True,
    share_prefix: bool = True,
    constraints: Sequence[AnswerConstraint | None] | None = None,
) -> list[str]:
    """Greedy answers (decoded text, stripped) for `records`, in input order.

    Batches hold prompts of similar length (fewer pad tokens). A row ends at a stop token, after
    `max_new_tokens`, or, with `stop_after_line`, once its answer's first non-empty line is
    complete: for parsers that read only that line (label, span) later tokens cannot change the
    prediction, only the raw text. With `compact` a causal model decodes in `_compact_greedy`,
    where ended rows leave the batch instead of being fed padding until the batch's longest row
    ends; it runs only when the generation config asks for nothing but the argmax of the logits
    (`_plain_greedy`), and yields transformers' greedy tokens. Otherwise (seq2seq, a repetition
    penalty or other logits processors, `compact=False`) transformers' `generate` runs, with the
    line stop as a per-row stopping criterion. With `compact` and `share_prefix`, the tokens all
    prompts of a batch start with (chat header, system message, instruction) are prefilled once
    for the batch instead of once per row. `constraints[i]` (None: free) constrains record i's
    answer (`_Constrainer`), on either decoding path.
    """
    if not records:
        return []
    device, pad = _device(model), pad_id(tokenizer)
    stops = stop_token_ids(tokenizer, fmt)
    seq2seq = _is_seq2seq(model, fmt)
    gc = _greedy_config(model, max_new_tokens, stops, pad)
    start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
    start = (
        pad if start is None else int(start)
    )  # seq2seq output begins with the decoder start token
    prefix = (
        []
        if seq2seq or not fmt.answer_prefix
        else list(tokenizer(fmt.answer_prefix, add_special_tokens=False)["input_ids"])
    )
    drop_first = start if seq2seq else None
    line_done = _FirstLineDone(tokenizer, stops, prefix, drop_first) if stop_after_line else None
    use_compact = compact and not seq2seq and _plain_greedy(gc)
    if constraints is not None and len(constraints) != len(records):
        raise ValueError(f"{len(constraints)} constraints for {len(records)} records")
    picker = (
        _Constrainer(tokenizer, stops, prefix, drop_first)
        if constraints is not None and any(c is not None for c in constraints)
        else None
    )
    prompts = encode_prompts(tokenizer, fmt, records, max_prompt_tokens)
    order = _length_order([len(p) for p in prompts])
    out: list[str] = [""] * len(records)
    with _EvalMode(model):
        for s in range(0, len(order), max(1, batch_size)):
            idx = order[s : s + batch_size]
            rows = [prompts[i] for i in idx]
            ids, mask = (_right_pad if seq2seq else _left_pad)(rows, pad, device)
            pick = None
            if picker is not None:
                pick = picker.for_rows([constraints[i] for i in idx])  # type: ignore[index]
            if use_compact:
                shared = shared_prefix_len(rows) if share_prefix else 0
                new = _compact_greedy(
                    model,
                    ids,
                    mask,
                    int(max_new_tokens),
                    stops,
                    line_done,
                    prefix_len=shared if shared >= MIN_SHARED_PREFIX else 0,
                    pick=pick,
                )
            else:
                kw: dict[str, object] = {}
                if line_done is not None:
                    kw["stopping_criteria"] = _line_criteria(
                        line_done, 0 if seq2seq else ids.shape[1]
                    )
                if pick is not None:
                    kw["logits_processor"] = _pick_processor(
                        pick, 0 if seq2seq else ids.shape[1], stops
                    )
                gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc, **kw)
                new = (gen if seq2seq else gen[:, ids.shape[1] :]).tolist()
            if pick is not None:
                new = pick.apply(new)
            for i, row in zip(idx, new):
                out[i] = _decode_answer(tokenizer, row, stops, prefix, drop_first)
            if progress is not None:
                progress(len(idx))
    return out


def _answer_ids(
    ids: list[int], stops: Sequence[int], prefix: list[int], drop_first: int | None
) -> list[int]:
    """Generated ids -> the answer's ids: up to the first stop token, without the reply prefix."""
    if drop_first is not None and ids and ids[0] == drop_first:
        ids = ids[1:]  # T5's decoder start token
    for k, t in enumerate(ids):
        if t in stops:
            ids = ids[:k]
            break
    if prefix and ids[: len(prefix)] == prefix:
        ids = ids[len(prefix) :]
    return ids


def _decode_answer(
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    stops: list[int],
    prefix: list[int],
    drop_first: int | None,
) -> str:
    """Generated ids -> answer text: up to the first stop token, without the reply prefix."""
    ids = _answer_ids(ids, stops, prefix, drop_first)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# Shorter shared prefixes are not worth the extra forward pass that runs them.
MIN_SHARED_PREFIX = 8

# Where `str.splitlines` (which the label and span parsers use) ends a line.
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


class _FirstLineDone:
    """`done(generated ids)`: has the answer's first non-empty line ended (a line break after it)?

    Then `parsing._first_line` of the final text is already fixed. The full answer is decoded only
    when the newest token's own text holds a line break (cached per token id), so the check costs
    next to nothing per step. A break it misses (one split over byte tokens) only means the row
    runs on to its stop token, as without the check."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stops: Sequence[int],
        prefix: list[int],
        drop_first: int | None,
    ):
        self.tokenizer, self.stops = tokenizer, stops
        self.prefix, self.drop_first = prefix, drop_first
        self._breaks: dict[int, bool] = {}

    def _has_break(self, tid: int) -> bool:
        hit = self._breaks.get(tid)
        if hit is None:
            text = self.tokenizer.decode([tid], skip_special_tokens=True)
            hit = self._breaks[tid] = any(ch in _LINE_BREAKS for ch in text)
        return hit

    def __call__(self, ids: list[int]) -> bool:
        if not ids or not self._has_break(ids[-1]):
            return False
        if self.prefix and ids == self.prefix[: len(ids)]:
            return False  # still inside the reply frame, whose line breaks are not the answer's
        answer = _answer_ids(ids, self.stops, self.prefix, self.drop_first)
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        for line in text.splitlines(keepends=True):
            if line.strip():
                return line[-1] in _LINE_BREAKS
        return False


def _line_criteria(done: _FirstLineDone, skip: int) -> StoppingCriteriaList:
    """`done` as a transformers stopping criterion (per row; `skip` = prompt columns)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _LineStop(StoppingCriteria):
        def __call__(
            self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
        ) -> torch.BoolTensor:
            flags = [done(row[skip:]) for row in input_ids.tolist()]
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_LineStop()])


# Generation-config settings under which transformers' greedy search changes the logits before its
# argmax (logits processors) or stops rows by rules of its own; `_compact_greedy` applies none.
_PROCESSOR_SETTINGS = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "forced_decoder_ids",
    "exponential_decay_length_penalty",
    "min_length",
    "min_new_tokens",
    "renormalize_logits",
    "remove_invalid_values",
    "guidance_scale",
    "watermarking_config",
    "stop_strings",
    "max_time",
    "token_healing",
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
    "dola_layers",
)


def _plain_greedy(gc: GenerationConfig) -> bool:
    """True when every logits-changing setting of `gc` is at transformers' default (off), so the
    greedy tokens are the argmax of the raw logits."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    return all(getattr(gc, k, None) == getattr(default, k, None) for k in _PROCESSOR_SETTINGS)


def _compact_greedy(
    model: PreTrainedModel | PeftModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    stops: Sequence[int],
    line_done: Callable[[list[int]], bool] | None = None,
    prefix_len: int = 0,
    pick: Callable[[int, list[int], torch.Tensor], int | None] | None = None,
) -> list[list[int]]:
    """Greedy decoding of a left-padded causal batch in which ended rows leave the batch.

    The same computation as transformers' greedy search (prefill with the attention mask and
    position ids counted from it, then one token per step on the key/value cache, argmax), except
    that rows which ended (stop token, budget, `line_done`) are dropped from the batch and its
    cache. Dropping copies the cache, so it happens once a quarter of the batch has ended (or the
    batch is small). Returns each row's new ids, its stop token included.

    `prefix_len`: the first `prefix_len` tokens of every row's prompt are the same (chat header,
    system message, instruction: often half the prompt or more), so they are run once and their
    keys/values copied to every row; each row's rest is then prefilled after them, left-padded
    in between (masked, with position ids counted from the mask as before). The attention sums
    the same terms, so the tokens are the same up to floating-point rounding.

    `pick(row, ids so far, logits)`: a token other than the argmax for a row (constrained
    decoding), or None for the argmax.
    """
    n = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    rows = list(range(n))  # batch row -> input row
    ended: set[int] = set()
    cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"
    kw: dict[str, object] = {"use_cache": True}
    if _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = 1
    if prefix_len > 0:
        res, mask, next_pos = _shared_prefix_prefill(model, ids, mask, prefix_len, cache_kw, kw)
    else:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)
        next_pos = mask.sum(-1, keepdim=True)
    stop_set = set(stops)
    for _ in range(max(1, max_new_tokens)):
        cache = _cache_of(res)
        tokens = res.logits[:, -1].argmax(-1)
        if pick is not None:
            chosen = tokens.tolist()
            for b, r in enumerate(rows):
                if r not in ended:
                    t = pick(r, out[r], res.logits[b, -1])
                    chosen[b] = chosen[b] if t is None else t
            tokens = torch.tensor(chosen, dtype=tokens.dtype, device=tokens.device)
        for b, t in enumerate(tokens.tolist()):
            r = rows[b]
            if r in ended:
                continue
            out[r].append(t)
            if t in stop_set or len(out[r]) >= max_new_tokens or (line_done and line_done(out[r])):
                ended.add(r)
        done_here = [b for b, r in enumerate(rows) if r in ended]
        if len(done_here) == len(rows):
            break
        if done_here and (len(done_here) * 4 >= len(rows) or len(rows) <= 4):
            keep = [b for b, r in enumerate(rows) if r not in ended]
            sel = torch.tensor(keep, device=ids.device)
            try:
                cache.batch_select_indices(sel)
            except (AttributeError, NotImplementedError):
                pass  # a cache that cannot drop rows: ended rows stay, fed like the others
            else:
                rows = [rows[b] for b in keep]
                tokens, mask, next_pos = tokens[sel], mask[sel], next_pos[sel]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        kw[cache_kw] = cache
        res = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos, **kw)
        next_pos = next_pos + 1
    return out


class _Constrainer:
    """Constrained decoding: rows follow the model while its choice keeps the answer viable under
    the row's `AnswerConstraint`; where it does not, the row ends at its last complete answer.

    Each step, for a row with a rule: the argmax is taken when it is allowed (a stop token only
    where the answer may end). When the model's own choice breaks the rule:
    - inside a word (the answer ends in a letter or digit and the rejected token goes on with
      one), the most likely allowed token is taken: a misspelt copy (`Hessburgh`) is mended
      into the input's word (`Hesburgh`) instead of being cut to `H`;
    - otherwise the row ends: now if its answer is complete (a span the model wanted to run on
      beyond the input), else cut back to the last point where its answer was complete
      (`LOC: Leicestershire | ORG: Leicestershire` with Leicestershire named once drops the
      unfinished item). Forcing a continuation there instead wrote items the model never meant
      (`PER: 50 | LOC: 1,305`; measured, docs/benchmarks.md).
    When there is no complete answer yet (the first item, a label half written) the most likely
    allowed token is taken as well: the `TOP_K` best first, then the rest of the vocabulary in
    order of likelihood. When no token is allowed at all the row takes the argmax (free decoding
    for that step).

    The answer text is decoded from the generated ids as `_decode_answer` does, so the rules see
    exactly the text the parser will; tokens of the reply frame (`prefix`) pass unchecked.
    """

    TOP_K = 64

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stops: Sequence[int],
        prefix: list[int],
        drop_first: int | None,
    ):
        self.tokenizer, self.stops, self.stop_set = tokenizer, list(stops), set(stops)
        self.prefix, self.drop_first = prefix, drop_first
        # special tokens other than the stops decode to nothing: taking one would write no text
        self.silent = set(getattr(tokenizer, "all_special_ids", None) or ()) - self.stop_set

    def _text(self, ids: list[int]) -> str:
        answer = _answer_ids(ids, self.stops, self.prefix, self.drop_first)
        return self.tokenizer.decode(answer, skip_special_tokens=True)

    def _allowed(self, c: AnswerConstraint, ids: list[int], t: int, may_end: bool) -> bool:
        if t in self.stop_set:
            return may_end
        return t not in self.silent and c.viable(self._text([*ids, t]))

    def _inside_word(self, text: str, ids: list[int], t: int) -> bool:
        """Would token `t` go on with the word `text` ends in?"""
        if t in self.stop_set or not text[-1:].isalnum():
            return False
        nxt = self._text([*ids, t])
        inc = nxt[len(text) :] if nxt.startswith(text) else nxt
        return inc[:1].isalnum()

    def choose(
        self, c: AnswerConstraint, ids: list[int], logits: torch.Tensor, last_complete: int | None
    ) -> tuple[int | None, int | None, bool]:
        """(token to take after `ids` under `c` or None for the argmax, length to cut the row's ids
        back to or None, whether the answer is complete now)."""
        p = self.prefix
        if p and len(ids) < len(p) and ids == p[: len(ids)]:
            return None, None, False  # inside the reply frame the chat template writes
        text = self._text(ids)
        may_end = c.complete(text)
        scores = logits.float()
        best = int(scores.argmax())
        if self._allowed(c, ids, best, may_end):
            return None, None, may_end
        inside = self._inside_word(text, ids, best)
        if not inside:
            if self.stops and may_end:
                return self.stops[0], None, True
            if self.stops and last_complete is not None:
                return self.stops[0], last_complete, False
        k = min(self.TOP_K, scores.shape[-1])
        first = torch.topk(scores, k).indices.tolist()
        seen = set(first)
        rest = (t for t in torch.argsort(scores, descending=True).tolist() if t not in seen)
        # inside a word the model meant to go on, the end is no choice
        for t in itertools.chain(first, rest):
            if t != best and self._allowed(c, ids, t, may_end and not inside):
                return t, None, may_end
        if self.stops and may_end:
            return self.stops[0], None, True
        return None, None, may_end

    def for_rows(self, constraints: Sequence[AnswerConstraint | None]) -> _RowPicker:
        """The picker of one batch whose row i has `constraints[i]`."""
        return _RowPicker(self, list(constraints))


class _RowPicker:
    """`pick(row, ids, logits)` -> token or None (the argmax) for one batch; `cut[row]` holds the
    length a row's ids are cut back to after decoding (its last complete answer)."""

    def __init__(self, owner: _Constrainer, constraints: list[AnswerConstraint | None]):
        self.owner, self.constraints = owner, constraints
        self.last_complete: dict[int, int] = {}
        self.cut: dict[int, int] = {}

    def __call__(self, row: int, ids: list[int], logits: torch.Tensor) -> int | None:
        c = self.constraints[row]
        if c is None:
            return None
        token, cut, complete = self.owner.choose(c, ids, logits, self.last_complete.get(row))
        if complete:
            self.last_complete[row] = len(ids)
        if cut is not None:
            self.cut[row] = cut
        return token

    def apply(self, rows: list[list[int]]) -> list[list[int]]:
        """The batch's generated ids with each cut applied."""
        return [r[: self.cut[i]] if i in self.cut else r for i, r in enumerate(rows)]


def _pick_processor(
    pick: Callable[[int, list[int], torch.Tensor], int | None], skip: int, stops: Sequence[int]
):
    """`pick` as a transformers logits processor (the `generate` path): the picked token keeps
    its score, every other token of that row gets -inf. `skip`: prompt columns of `input_ids`."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stop_set = set(stops)

    class _Pick(LogitsProcessor):
        def __call__(
            self, input_ids: torch.LongTensor, scores: torch.FloatTensor
        ) -> torch.FloatTensor:
            for b, row in enumerate(input_ids.tolist()):
                gen = row[skip:]
                if any(t in stop_set for t in gen):
                    continue  # the row has ended; generate pads it
                t = pick(b, gen, scores[b])
                if t is not None:
                    keep = scores[b, t].clone()
                    scores[b] = float("-inf")
                    scores[b, t] = keep
            return scores

    return LogitsProcessorList([_Pick()])


def _cache_of(res: object) -> Cache:
    cache = getattr(res, "cache", None)
    return res.past_key_values if cache is None else cache


def _shared_prefix_prefill(
    model: PreTrainedModel | PeftModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    prefix_len: int,
    cache_kw: str,
    kw: dict[str, object],
) -> tuple[object, torch.Tensor, torch.Tensor]:
    """Prefill of a left-padded batch whose prompts share their first `prefix_len` tokens: the
    prefix once (batch of one), its cache repeated for every row, then each row's rest.
    Returns (model output, attention mask [prefix | padding | rest], next position ids)."""
    n, width = ids.shape
    starts = width - mask.sum(-1)  # first real column of each row
    first = int(starts[0])
    prefix = ids[:1, first : first + prefix_len]
    ones = mask.new_ones((1, prefix_len))
    pos = torch.arange(prefix_len, device=ids.device)[None]
    res = model(input_ids=prefix, attention_mask=ones, position_ids=pos, **kw)
    cache = _cache_of(res)
    cache.batch_repeat_interleave(n)
    rest = [ids[r, int(starts[r]) + prefix_len :].tolist() for r in range(n)]
    padded = ids[mask == 0]
    pad = int(padded[0]) if len(padded) else 0  # the batch's pad id (masked wherever it sits)
    rest_ids, rest_mask = _left_pad(rest, pad, ids.device)
    full = torch.cat([ones.expand(n, -1), rest_mask], dim=-1)
    pos = prefix_len + (rest_mask.cumsum(-1) - 1).clamp(min=0)
    res = model(
        input_ids=rest_ids, attention_mask=full, position_ids=pos, **{**kw, cache_kw: cache}
    )
    return res, full, prefix_len + rest_mask.sum(-1, keepdim=True)


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one token of its own (the last
    prompt token's logits start the answer)."""
    if len(prompts) < 2:
        return 0
    shortest = min(len(p) for p in prompts) - 1
    k = 0
    first = prompts[0]
    while k < shortest and all(p[k] == first[k] for p in prompts):
        k += 1
    return k


# ------------------------------------------------------------------ rank classification


def _accepts(model: PreTrainedModel | PeftModel, name: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def _causal_target_logprobs(
    model: PreTrainedModel | PeftModel,
    seqs: list[tuple[list[int], list[int]]],
    pad: int,
    device: torch.device,
) -> list[float]:
    """Summed log p(target | prompt) for (prompt ids, target ids) pairs, one forward."""
    rows = [p + t for p, t in seqs]
    ids, mask = _left_pad(rows, pad, device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(len(t) for _, t in seqs) + 1  # logits at positions that predict target tokens
    kw: dict[str, torch.Tensor | bool | int] = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos,
        "use_cache": False,
    }
    if _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = keep
    logits = model(**kw).logits
    logits = logits[:, -keep:].float()
    out = []
    for r, (_, tgt) in enumerate(seqs):
        n = len(tgt)
        if n == 0:
            out.append(0.0)
            continue
        # The target fills the last n columns; its k-th token is predicted by the logits one
        # column earlier, i.e. index keep-n-1+k of the kept slice.
        lp = torch.log_softmax(logits[r, keep - n - 1 : keep - 1], dim=-1)
        tgt_t = torch.tensor(tgt, device=lp.device)
        out.append(float(lp.gather(-1, tgt_t[:, None]).sum()))
    return out


def _seq2seq_target_logprobs(
    model: PreTrainedModel | PeftModel,
    seqs: list[tuple[list[int], list[int]]],
    pad: int,
    device: torch.device,
) -> list[float]:
    ids, mask = _right_pad([p for p, _ in seqs], pad, device)
    width = max(len(t) for _, t in seqs)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for r, (_, t) in enumerate(seqs):
        labels[r, : len(t)] = torch.tensor(t, dtype=torch.long)
    labels = labels.to(device)
    logits = model(
        input_ids=ids, attention_mask=mask, labels=labels, use_cache=False
    ).logits.float()
    lp = torch.log_softmax(logits, dim=-1)
    used = labels != -100
    tok = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * used
    return [float(x) for x in tok.sum(-1)]


@dataclasses.dataclass
class Ranked:
    """Rank-classification result for one record: the best choice and every choice's summed log-prob."""

    choice: str
    scores: dict[str, float]


def rank_choices(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    records: Sequence[Record],
    choices: Sequence[str],
    *,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[Ranked]:
    """Pick, for each record, the answer choice whose training target has the highest summed
    log-likelihood given the record's prompt (ties: the earlier choice)."""
    if not records:
        return []
    if not choices:
        raise ValueError("rank classification needs answer choices")
    device, pad = _device(model), pad_id(tokenizer)
    seq2seq = _is_seq2seq(model, fmt)
    score_fn = _seq2seq_target_logprobs if seq2seq else _causal_target_logprobs
    prompts = encode_prompts(tokenizer, fmt, records, max_prompt_tokens)
    # A target depends only on the output text (PromptFormat.target), not on the prompt.
    targets = {c: target_ids(tokenizer, fmt, _Out(c)) for c in choices}
    per_forward = max(
        1, batch_size // len(choices)
    )  # records per forward pass (each has len(choices) rows)
    order = _length_order([len(p) for p in prompts])
    results: list[Ranked | None] = [None] * len(records)
    with _EvalMode(model):
        for s in range(0, len(order), per_forward):
            idx = order[s : s + per_forward]
            seqs = [(prompts[i], targets[c]) for i in idx for c in choices]
            scores = score_fn(model, seqs, pad, device)
            for k, i in enumerate(idx):
                row = dict(zip(choices, scores[k * len(choices) : (k + 1) * len(choices)]))
                best = max(choices, key=lambda c: (row[c], -choices.index(c)))
                results[i] = Ranked(best, row)
            if progress is not None:
                progress(len(idx))
    return results  # type: ignore[return-value]


@dataclasses.dataclass
class _Out:
    output: str
    instruction: str = ""
    input: str = ""
