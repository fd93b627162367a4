"""Tokenisation, completion-only labels, packing and collators (layer 3, uses torch).

- `prompt_ids` is the one way to tokenise a prompt: training (`encode`) and inference
  both call it, so the model sees the same tokens in both (BOS and template markers are
  in the prompt text; see `PromptFormat.add_special_tokens`).
- `encode` tokenises prompt and target *separately* and concatenates them (causal), so
  labels are -100 exactly over the prompt without searching for the answer; an input
  that is too long is shortened on its input field, never the answer.
- `CausalCollator` pads or packs. Packing is attention-correct through transformers'
  own mechanism: a packed row carries `position_ids` that restart at 0 per example and
  *no* `attention_mask`; transformers (masking_utils `find_packed_sequence_indices`, and
  the flash-attention kwargs built from position_ids) then masks attention to stay
  within each example. That detection only runs without a 2D mask and without a KV
  cache, hence `model_inputs` drops nothing but adds `use_cache=False` (a model whose
  config says use_cache=True would otherwise build a cache and silently attend across
  examples). `packing_supported` verifies this on the actual model with a probe.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, TypedDict

import torch

from t2t_mtl.core.records import Record
from t2t_mtl.model.prompt_format import PromptFields, PromptFormat

if TYPE_CHECKING:  # type-only: transformers/peft are imported where models are loaded
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "MIDDLE_MARK",
    "CausalCollator",
    "Features",
    "Seq2SeqCollator",
    "encode",
    "length_grouped_batches",
    "model_inputs",
    "pack_bins",
    "packing_supported",
    "prompt_ids",
    "resolve_packing",
    "stop_token_ids",
    "target_ids",
]

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ tokenising


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


MIDDLE_MARK = " … "  # joins the kept head and tail of a middle-truncated input


def _shortened(tokenizer: PreTrainedTokenizerBase, inp: list[int], keep: int, side: str) -> str:
    """The input's text cut to about `keep` tokens: its start ("end") or start + end ("middle")."""
    if keep <= 0:
        return ""
    dec = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    tail = keep // 2 if side == "middle" else 0
    if tail == 0:
        return dec(inp[:keep])
    return dec(inp[: keep - tail]).rstrip() + MIDDLE_MARK + dec(inp[-tail:]).lstrip()


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
    add = fmt.add_special_tokens
    ids = _ids(tokenizer, fmt.prompt(record), add)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, False
    inp = _ids(tokenizer, record.input, False)
    keep = len(inp) - (len(ids) - max_tokens)
    for _ in range(6):  # re-tokenising at the cut can shift a token or two; converge
        keep = max(keep, 0)
        text = _shortened(tokenizer, inp, keep, fmt.truncation)
        short = SimpleNamespace(
            instruction=record.instruction, input=text, output=getattr(record, "output", "")
        )
        ids = _ids(tokenizer, fmt.prompt(short), add)
        if len(ids) <= max_tokens or keep == 0:
            break
        keep -= len(ids) - max_tokens
    if len(ids) > max_tokens:
        # Even an empty input does not fit (huge instruction): keep the end for causal
        # prompts (the generation header must touch the answer), the start + EOS for seq2seq.
        ids = ids[-max_tokens:] if not add else ids[: max_tokens - 1] + ids[-1:]
    return ids, True


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
        tgt = list(
            tokenizer(fmt.target(record), truncation=True, max_length=max_target_length)[
                "input_ids"
            ]
        )
        full = _ids(tokenizer, fmt.target(record), True)
        return {
            "input_ids": src,
            "labels": tgt,
            "task": task_index,
            "truncated": cut,
            "target_truncated": len(full) > len(tgt),
        }
    tgt = target_ids(tokenizer, fmt, record)
    p, cut = prompt_ids(tokenizer, fmt, record)
    tgt_cut = False
    if len(p) + len(tgt) > max_length:
        empty = SimpleNamespace(instruction=record.instruction, input="", output="")
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


@dataclass
class CausalCollator:
    """Batch causal features: input_ids, labels, position_ids, task_ids (+ attention_mask unpacked).

    `task_ids` is per token: the example's task index where the label is used, -1 on
    prompt and padding, so per-task loss can be summed (see `training.losses.task_sums`).
    With `packing=True` the batch's examples are packed first-fit-decreasing into rows of
    ≤ `max_length` tokens (fewer rows, same examples, same loss): positions restart at 0
    per example, the first label of each example is -100 (never predicted from the
    previous example) and there is deliberately no `attention_mask` (see module doc).
    Pass the batch through `model_inputs` before calling the model.
    """

    pad_token_id: int
    packing: bool = False
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def _width(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else -(-n // m) * m

    def __call__(self, features: list[Features]) -> dict[str, torch.Tensor]:
        if self.packing:
            if not self.max_length:
                raise ValueError("packing needs max_length")
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
        width = self._width(max(len(r[0]) for r in rows))
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
    (per label token). T5 builds decoder inputs from labels itself."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[Features]) -> dict[str, torch.Tensor]:
        m = self.pad_to_multiple_of

        def width(n: int) -> int:
            return n if not m else -(-n // m) * m

        ws, wt = (
            width(max(len(f["input_ids"]) for f in features)),
            width(max(len(f["labels"]) for f in features)),
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


@torch.no_grad()
def packing_supported(model: PreTrainedModel | PeftModel) -> bool:
    """True when packed rows give the same logits as separate sequences on this model.

    Decoder-only models only. Runs a probe (two short random sequences, separately and
    packed with restarting position_ids, no attention_mask, no cache) and compares the
    logits; this catches attention implementations or architectures that ignore packed
    position_ids. Costs three forwards of ≤ 12 tokens.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    try:
        device = next(p.device for p in model.parameters())
        gen = torch.Generator().manual_seed(0)
        vocab = int(getattr(cfg, "vocab_size", 0) or 0) or 100
        a = torch.randint(min(10, vocab - 1), vocab, (1, 7), generator=gen).to(device)
        b = torch.randint(min(10, vocab - 1), vocab, (1, 5), generator=gen).to(device)
        was_training = model.training
        model.eval()
        try:
            la = model(input_ids=a, use_cache=False).logits.float()
            lb = model(input_ids=b, use_cache=False).logits.float()
            pos = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
            lp = model(
                input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False
            ).logits.float()
        finally:
            model.train(was_training)
    except Exception as e:  # an architecture that rejects position_ids etc.: no packing
        logger.warning("packing probe failed (%s: %s); packing disabled", type(e).__name__, e)
        return False
    scale = max(la.abs().max().item(), lb.abs().max().item(), 1e-6)
    err = max((lp[:, :7] - la).abs().max().item(), (lp[:, 7:] - lb).abs().max().item()) / scale
    # Low-precision kernels differ a little between shapes; leaking attention differs a lot.
    tol = 1e-3 if all(p.dtype == torch.float32 for p in model.parameters()) else 3e-2
    return err <= tol


def resolve_packing(setting: str, model: PreTrainedModel | PeftModel) -> bool:
    """TrainConfig.packing ("auto" | "on" | "off") -> whether to pack for this model.

    "auto" packs only when `packing_supported`; "on" on a model where packing would be
    wrong logs a warning and does not pack (padding gives the same result, just slower).
    """
    if setting == "off":
        return False
    ok = packing_supported(model)
    if setting == "on" and not ok:
        logger.warning(
            "train.packing=on, but this model does not keep packed examples apart "
            "(attention would leak across examples); training without packing"
        )
    return ok
