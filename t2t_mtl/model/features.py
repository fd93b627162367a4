"""Tokenisation, completion-only labels, packing and collators (uses torch).

- `prompt_ids` is the one way to tokenise a prompt: training (`encode`) and inference
  both call it, so the model sees the same tokens in both (BOS and template markers are
  in the prompt text; see `PromptFormat.add_special_tokens`).
- `encode` tokenises prompt and target *separately* and concatenates them (causal), so
  labels are -100 exactly over the prompt without searching for the answer; an input
  that is too long is shortened on its input field, never the answer.
- `CausalCollator` pads or packs. Packing is attention-correct through transformers'
  own mechanism: a packed row carries `position_ids` that restart at 0 per example and
  *no* `attention_mask`; transformers then keeps attention within each example. How depends
  on the attention implementation, and so does the layout (`packing_layout`):
  SDPA / eager / flex build a block-diagonal mask (masking_utils `find_packed_sequence_indices`,
  any number of rows): layout "rows", examples packed into rows of <= max_length;
  flash-attention kernels (flash_attention_2/3, hub kernels) get `cu_seq_lens` from position_ids,
  but transformers derives them only for a single-row batch (`_is_packed_sequence`): layout
  "flat", the whole micro-batch as one row without padding (padding-free), run by the varlen
  kernel per example. Detection only runs without a 2D mask and without a KV cache, hence
  `model_inputs` drops nothing but adds `use_cache=False` (a model whose config says
  use_cache=True would otherwise build a cache and silently attend across examples).
  `packing_check` verifies on the actual (prepared) model that packed examples stay apart.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, TypedDict

import torch

from t2t_mtl.core.records import Record
from t2t_mtl.model.prompt_format import PromptFields, PromptFormat

if TYPE_CHECKING:  # type-only: transformers is imported where models are loaded
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "MIDDLE_MARK",
    "PACKING_LAYOUTS",
    "CausalCollator",
    "Features",
    "Seq2SeqCollator",
    "encode",
    "fitted_prompt",
    "length_grouped_batches",
    "model_inputs",
    "pack_bins",
    "packing_check",
    "packing_layout",
    "prompt_ids",
    "stop_token_ids",
    "target_ids",
]

IGNORE_INDEX = -100
PACKING_LAYOUTS = ("rows", "flat")
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ tokenising


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


MIDDLE_MARK = " … "  # joins the kept head and tail of a middle-truncated input
# Stands in for the input in one extra render of an over-long prompt, to find where the input lies
# in the prompt text (NUL characters; a record that holds it anyway fails `_input_slicer`'s checks).
_INPUT_PROBE = "\x00t2t-mtl-input\x00"

# (h, t) -> (the input's text up to its token h, its text from its t-th last token on)
_Slicer = Callable[[int, int], tuple[str, str]]


def _with_input(record: PromptFields, text: str) -> SimpleNamespace:
    return SimpleNamespace(
        instruction=record.instruction, input=text, output=getattr(record, "output", "")
    )


def _input_slicer(
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    record: PromptFields,
    text: str,
    offsets: Sequence[tuple[int, int]] | None,
) -> tuple[int, _Slicer]:
    """(number of tokens of `record.input`, a slicer of its text at token boundaries), for the
    over-long prompt `text` = `fmt.prompt(record)`.

    From the prompt's own token offsets when the tokenizer gave them and the input appears
    verbatim in the prompt (found by rendering the prompt once with a probe in its place): no
    further tokenizer call, the prompt is tokenised once. Tokens that straddle the input's edge
    belong to the layout and are not counted. Otherwise (a tokenizer without offsets, a chat
    template that rewrites the content) from the input tokenised alone, cut by decoding."""
    inp = record.input
    if offsets is not None:
        probe = fmt.prompt(_with_input(record, _INPUT_PROBE))
        a = probe.find(_INPUT_PROBE)
        b = a + len(inp)
        if (
            a >= 0
            and len(probe) - len(_INPUT_PROBE) + len(inp) == len(text)
            and text[:a] == probe[:a]
            and text[a:b] == inp
            and text[b:] == probe[a + len(_INPUT_PROBE) :]
        ):
            starts = [s - a for s, e in offsets if e > s and s >= a and e <= b]
            n = len(starts)
            return n, lambda h, t: (
                inp[: starts[h]] if h < n else inp,
                inp[starts[n - t] :] if 0 < t <= n else "",
            )
    ids = _ids(tokenizer, inp, False)
    dec = lambda x: tokenizer.decode(x, clean_up_tokenization_spaces=False)  # noqa: E731
    return len(ids), lambda h, t: (dec(ids[:h]), dec(ids[-t:]) if t > 0 else "")


def _shortened(cut: _Slicer, keep: int, side: str) -> str:
    """The input's text cut to about `keep` tokens: its start ("end") or start + end ("middle")."""
    if keep <= 0:
        return ""
    tail = keep // 2 if side == "middle" else 0
    head, end = cut(keep - tail, tail)
    if tail == 0:
        return head
    return head.rstrip() + MIDDLE_MARK + end.lstrip()


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    record: PromptFields,
    max_tokens: int | None = None,
) -> tuple[list[int], bool]:
    """Token ids of `fmt.prompt(record)`, shortened to `max_tokens` by cutting the record's
    *input* field (the layout, instruction and generation header stay): its middle when
    `fmt.truncation == "middle"` (the first and last halves of the budget stay, joined by
    " … "), its end when "end".

    Why the middle: inputs often put what the answer depends on last ("Passage: ...
    Question: ..."); cutting the end of a long SQuAD passage dropped the question from a
    fifth of the prompts (docs/benchmarks.md). LongBench truncates in the middle for the
    same reason. Returns (ids, truncated). Inference must call this too (with its own
    budget) so the model sees exactly the training-time prompt tokens.
    """
    ids, used = fitted_prompt(tokenizer, fmt, record, max_tokens)
    return ids, used is not record


def fitted_prompt(
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    record: PromptFields,
    max_tokens: int | None = None,
) -> tuple[list[int], PromptFields | None]:
    """`prompt_ids`' ids together with the fields they were built from: `record` itself when it
    fits, a copy with the shortened input when it was cut, None when even an empty input did not
    fit and the ids were cut instead (no text layout gives them). `fmt.prompt` of the fields is
    the exact prompt text (for `t2t-mtl render`): a cut prompt's ids are its shortened text
    tokenised, never ids spliced together, so a server sent that text sees the same tokens.

    Cost: one tokenizer call when the prompt fits; an over-long one takes its cut points from
    that call's token offsets (see `_input_slicer`) and is tokenised again after the cut: once,
    or twice when the first cut is over (usual for a middle cut: the mark's own tokens). The
    cut points are the ones the input tokenised alone and decoded gave (the same prompts for
    runs trained before: tests/test_old_run_folders.py), except where decoding did not give the
    input's own text back (a character split between tokens, T5's "<unk>")."""
    add = fmt.add_special_tokens
    text = fmt.prompt(record)
    offsets = max_tokens is not None and bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(text, add_special_tokens=add, return_offsets_mapping=offsets)
    ids = list(enc["input_ids"])
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, record
    n, cut = _input_slicer(tokenizer, fmt, record, text, enc.get("offset_mapping"))
    keep = n - (len(ids) - max_tokens)
    for _ in range(6):  # re-tokenising at the cut can shift a token or two; converge
        keep = max(keep, 0)
        short = _with_input(record, _shortened(cut, keep, fmt.truncation))
        ids = _ids(tokenizer, fmt.prompt(short), add)
        if len(ids) <= max_tokens or keep == 0:
            break
        keep -= len(ids) - max_tokens
    if len(ids) > max_tokens:
        # Even an empty input does not fit (huge instruction): keep the end for causal
        # prompts (the generation header must touch the answer), the start + EOS for seq2seq.
        ids = ids[-max_tokens:] if not add else ids[: max_tokens - 1] + ids[-1:]
        return ids, None
    return ids, short


def target_ids(
    tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, record: PromptFields
) -> list[int]:
    """Token ids of `fmt.target(record)`: answer + end-of-turn (causal; the end-of-turn text
    maps to its special token) or answer + `</s>` (seq2seq, added by the tokenizer)."""
    return _ids(tokenizer, fmt.target(record), fmt.kind == "seq2seq")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat) -> list[int]:
    """Token ids that end a generated answer: the last token of the trained end-of-turn text
    (e.g. Gemma's <end_of_turn>, which is not its EOS) and the tokenizer's EOS."""
    ids = []
    if fmt.kind != "seq2seq" and fmt.answer_suffix:
        ids += _ids(tokenizer, fmt.answer_suffix, False)[-1:]
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


class Features(TypedDict):
    """One encoded record (`encode`), the item the collators batch."""

    input_ids: list[int]
    labels: list[int]
    task: int  # task_index; the collators spread it over the label tokens as task_ids
    truncated: bool  # the prompt's input was cut
    target_truncated: bool


def encode(
    record: Record,
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    max_length: int,
    max_target_length: int,
    *,
    task_index: int = 0,
) -> Features:
    """Features for one record.

    causal: `input_ids` = prompt + target tokens (≤ max_length), `labels` = -100 over the
    prompt then the target ids. The target keeps priority: the prompt's input is cut first;
    only a target longer than the room left next to the shortest prompt is cut (losing its
    end-of-turn). `max_target_length` does not apply to causal models.
    seq2seq: `input_ids` = source (≤ max_length, input cut first), `labels` = target
    (≤ max_target_length, ends with `</s>`).
    Both: `task` = task_index, `truncated` (input cut), `target_truncated`.
    """
    if fmt.kind == "seq2seq":
        src, cut = prompt_ids(tokenizer, fmt, record, max_length)
        tgt = target_ids(tokenizer, fmt, record)
        tgt_cut = len(tgt) > max_target_length
        if tgt_cut:  # the tokenizer's own truncation keeps the closing </s>
            tgt = list(
                tokenizer(fmt.target(record), truncation=True, max_length=max_target_length)[
                    "input_ids"
                ]
            )
        return {
            "input_ids": src,
            "labels": tgt,
            "task": task_index,
            "truncated": cut,
            "target_truncated": tgt_cut,
        }
    tgt = target_ids(tokenizer, fmt, record)
    tgt_cut = False
    # Only a target longer than half of max_length can need cutting (the room next to the
    # shortest prompt is at least that), so only then is the shortest prompt tokenised.
    if len(tgt) > max_length - max_length // 2:
        empty = _with_input(record, "")
        room = max_length - min(len(_ids(tokenizer, fmt.prompt(empty), False)), max_length // 2)
        if len(tgt) > room:
            tgt, tgt_cut = tgt[:room], True
    p, cut = prompt_ids(tokenizer, fmt, record, max_length - len(tgt))
    return {
        "input_ids": p + tgt,
        "labels": [IGNORE_INDEX] * len(p) + tgt,
        "task": task_index,
        "truncated": cut,
        "target_truncated": tgt_cut,
    }


# --------------------------------------------------------------------- packing


def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing: group example indices into bins of at most `max_length` tokens.

    An example longer than `max_length` gets a bin of its own. Bins keep the original
    order inside (sorted indices) so results do not depend on tie-breaking.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return [sorted(b) for b in bins]


def _task_ids(labels: list[int], task: int) -> list[int]:
    return [task if lab != IGNORE_INDEX else -1 for lab in labels]


def _width(n: int, multiple: int | None, cap: int | None) -> int:
    """A batch's width for a longest row of `n`: rounded up to `multiple`, but not past `cap`
    when the row fits it (a flat packed row, longer than `cap`, is only rounded)."""
    w = n if not multiple else -(-n // multiple) * multiple
    return min(w, cap) if cap and n <= cap else w


@dataclass
class CausalCollator:
    """Batch causal features: input_ids, labels, position_ids, task_ids (+ attention_mask unpacked).

    `task_ids` is per token: the example's task index where the label is used, -1 on
    prompt and padding, so per-task loss can be summed (see `training.losses.task_sums`).
    With `packing=True` the batch's examples are packed (fewer rows, same examples, same loss):
    layout "rows" packs them first-fit-decreasing into rows of ≤ `max_length` tokens, layout
    "flat" puts all of them in one row in batch order (for flash-attention varlen kernels; see
    `packing_layout`). Positions restart at 0 per example, the first label of each example is
    -100 (never predicted from the previous example) and there is deliberately no
    `attention_mask` (see module doc). Pass the batch through `model_inputs` before calling the
    model. `pad_to_multiple_of` rounds the batch width up, but not past `max_length` (a flat
    row longer than that is only rounded).
    """

    pad_token_id: int
    packing: bool = False
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    layout: str = "rows"  # "rows" | "flat" (packing only)

    def __post_init__(self) -> None:
        if self.layout not in PACKING_LAYOUTS:
            raise ValueError(f"layout must be one of {PACKING_LAYOUTS}, not {self.layout!r}")

    def __call__(self, features: list[Features]) -> dict[str, torch.Tensor]:
        if self.packing:
            if self.layout == "flat":
                bins = [list(range(len(features)))]
            elif not self.max_length:
                raise ValueError("packing needs max_length")
            else:
                bins = pack_bins([len(f["input_ids"]) for f in features], self.max_length)
            rows = []
            for b in bins:
                ids, labels, pos, tasks = [], [], [], []
                for i in b:
                    f = features[i]
                    lab = list(f["labels"])
                    lab[0] = (
                        IGNORE_INDEX  # would be predicted from the previous example's last token
                    )
                    ids += f["input_ids"]
                    labels += lab
                    pos += range(len(f["input_ids"]))
                    tasks += _task_ids(lab, f.get("task", 0))
                rows.append((ids, labels, pos, tasks))
        else:
            rows = [
                (
                    list(f["input_ids"]),
                    list(f["labels"]),
                    list(range(len(f["input_ids"]))),
                    _task_ids(f["labels"], f.get("task", 0)),
                )
                for f in features
            ]
        width = _width(max(len(r[0]) for r in rows), self.pad_to_multiple_of, self.max_length)
        out = {
            k: torch.full((len(rows), width), v, dtype=torch.long)
            for k, v in (
                ("input_ids", self.pad_token_id),
                ("labels", IGNORE_INDEX),
                ("task_ids", -1),
            )
        }
        # Padding positions restart at 0: in a packed row they form their own segment
        # (never attended to by real tokens, which precede them causally).
        out["position_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
        if not self.packing:
            out["attention_mask"] = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, labels, pos, tasks) in enumerate(rows):
            n = len(ids)
            out["input_ids"][r, :n] = torch.tensor(ids)
            out["labels"][r, :n] = torch.tensor(labels)
            out["task_ids"][r, :n] = torch.tensor(tasks)
            out["position_ids"][r, :n] = torch.tensor(pos)
            out["position_ids"][r, n:] = torch.arange(width - n)
            if not self.packing:
                out["attention_mask"][r, :n] = 1
        return out


@dataclass
class Seq2SeqCollator:
    """Batch seq2seq features: input_ids, attention_mask, labels (-100 padded), task_ids
    (per label token). T5 builds decoder inputs from labels itself.

    Widths: the longest source rounded up to `pad_to_multiple_of`, the longest target to
    `label_pad_to_multiple_of`, capped at `max_length` / `max_target_length` (the longest
    `encode` makes). Padding is masked (sources) or -100 (labels), so it changes no loss; it
    bounds the number of distinct batch shapes (why: `trainer._setup_data`)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    label_pad_to_multiple_of: int | None = None
    max_length: int | None = None
    max_target_length: int | None = None

    def __call__(self, features: list[Features]) -> dict[str, torch.Tensor]:
        ws = _width(
            max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of, self.max_length
        )
        wt = _width(
            max(len(f["labels"]) for f in features),
            self.label_pad_to_multiple_of,
            self.max_target_length,
        )
        b = len(features)
        out = {
            "input_ids": torch.full((b, ws), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((b, ws), dtype=torch.long),
            "labels": torch.full((b, wt), IGNORE_INDEX, dtype=torch.long),
            "task_ids": torch.full((b, wt), -1, dtype=torch.long),
        }
        for r, f in enumerate(features):
            n, t = len(f["input_ids"]), len(f["labels"])
            out["input_ids"][r, :n] = torch.tensor(f["input_ids"])
            out["attention_mask"][r, :n] = 1
            out["labels"][r, :t] = torch.tensor(f["labels"])
            out["task_ids"][r, :t] = torch.tensor(_task_ids(f["labels"], f.get("task", 0)))
        return out


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, window: int = 50
) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding for T5).

    Works window by window (`window * batch_size` consecutive items, so the mixture's
    order is roughly kept): sort by length, cut into batches, shuffle the batches with
    `seed`. Deterministic for a given seed.
    """
    rng = random.Random(seed)
    out: list[list[int]] = []
    span = max(1, window) * batch_size
    for start in range(0, len(lengths), span):
        idx = sorted(range(start, min(start + span, len(lengths))), key=lambda i: (-lengths[i], i))
        batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        rng.shuffle(batches)
        out += batches
    return out


# ------------------------------------------------------------ model interface


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The model's keyword arguments from a collated batch: drops `task_ids`, adds
    `use_cache=False` (needed for packed rows, harmless otherwise)."""
    return {**{k: v for k, v in batch.items() if k != "task_ids"}, "use_cache": False}


def packing_layout(attn_implementation: str | None) -> str:
    """The packed layout `attn_implementation` keeps apart (see the module doc): "flat" (the
    micro-batch as one row) for flash-attention kernels — flash_attention_2/3, their "paged|"
    forms, and hub kernels ("org/name") that transformers runs as varlen flash attention — and
    "rows" for sdpa, eager, flex_attention and a hub kernel registered with SDPA masks. None is
    what transformers picks by default (sdpa). A hub kernel not registered yet gets "flat": that
    layout is also correct under block-diagonal masks (only slower), while "rows" under a varlen
    kernel would attend across examples."""
    name = attn_implementation or "sdpa"
    base = name.split("|")[-1]
    if base.startswith("flash_attention"):
        return "flat"
    if "/" not in base:
        return "rows"
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    registered = ALL_MASK_ATTENTION_FUNCTIONS.get(name)
    if registered is None or registered is ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"]:
        return "flat"
    return "rows"


def _inner_config(model: torch.nn.Module):
    """The transformers config of a model, also through DDP / FSDP / DeepSpeed wrappers."""
    while getattr(model, "config", None) is None and hasattr(model, "module"):
        model = model.module
    return getattr(model, "config", None)


@torch.no_grad()
def packing_check(
    model: torch.nn.Module, collator: CausalCollator, device: torch.device | str | None = None
) -> tuple[bool, str]:
    """(ok, why not): whether `collator`'s packed rows keep examples apart on `model`.

    Run it on the model as it trains: after `accelerator.prepare` (the wrapped model, on its
    device, in its dtype and autocast) and in train mode (no eval-only kernels; bitsandbytes
    repacks 4-bit weights for CPU inference in eval mode). Perturbation check: two random examples
    A (7 tokens) and B (5) are packed by `collator` itself into one row, which runs three times:
    twice as is and once with A's tokens replaced, each forward under the same RNG seed (dropout
    draws the same masks). B's logits must not move when only A changes. With attention kept
    within examples B's logits are computed from exactly the same numbers by the same kernels on
    the same shapes, so they are bit-identical: the check demands a difference of exactly 0. The
    one allowance is the difference between the two identical forwards, 0 on deterministic
    kernels; a nondeterministic kernel (atomic reductions) cannot be asked for less than its own
    run-to-run noise. A leak moves B by far more (tests/test_features.py).

    Decoder-only models only; any error (e.g. a model that rejects position_ids) fails the check.
    The RNG state is restored afterwards.
    """
    cfg = _inner_config(model)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False, "not a decoder-only model"
    room = 12 if collator.layout == "flat" else (collator.max_length or 0)
    lb = min(5, room // 2)
    la = min(7, room - lb)
    if lb < 1:
        return False, f"max_length {collator.max_length} cannot hold two examples"
    if device is None:
        device = next(p.device for p in model.parameters())
    device = torch.device(device)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0) or 100
    gen = torch.Generator().manual_seed(0)
    low = min(10, vocab - 1)  # clear of the usual special tokens
    a, a2 = (torch.randint(low, vocab, (la,), generator=gen).tolist() for _ in range(2))
    b = torch.randint(low, vocab, (lb,), generator=gen).tolist()
    feats = [
        {
            "input_ids": x,
            "labels": list(x),
            "task": 0,
            "truncated": False,
            "target_truncated": False,
        }
        for x in (a, b)
    ]
    batch = collator(feats)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    if batch["input_ids"].shape[0] != 1 or len(starts) < 2 or starts[1] != la:
        return False, "the collator did not pack two examples into one row"
    other = collator([{**feats[0], "input_ids": a2, "labels": list(a2)}, feats[1]])
    devices = [device.index or 0] if device.type == "cuda" else []

    def b_logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = model_inputs({k: v.to(device) for k, v in batch.items() if k != "labels"})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            logits = model(**inputs).logits
        return logits[0, la : la + lb].float()

    try:
        first, again, moved_b = b_logits(batch), b_logits(batch), b_logits(other)
    except Exception as e:  # an architecture that rejects position_ids etc.: no packing
        return False, f"a packed forward failed ({type(e).__name__}: {e})"
    noise = (again - first).abs().max().item()
    moved = (moved_b - first).abs().max().item()
    if moved > noise or not torch.isfinite(first).all():
        return False, (
            f"B's logits moved by {moved:.3g} when only A's tokens changed (run-to-run difference "
            f"{noise:.3g}): attention leaks across packed examples"
        )
    return True, ""
