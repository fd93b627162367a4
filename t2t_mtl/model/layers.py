"""Transformer blocks of a model: where each parameter sits, layer ranges, the run's trainable set.

A parameter's *position* orders it from the bottom of the network to the top: -1 for embeddings
(names containing `embed`, `wte`, `wpe` or T5's `shared`), b for anything inside block b (the number
after `layers.`, `h.`, `block.` or `blocks.` in its name), and L (the number of blocks) for the rest
(final norm, LM head). T5's encoder block b and decoder block b share position b. A tied LM head is
the embedding matrix and sits at -1.

A layer range `[first, last]` (0-based, inclusive; negative values count from the top, -1 = the last
block) covers the blocks first..last, plus the embeddings when first is 0 and the parts above the
blocks when last is the top block, so `[0, L-1]` covers everything (`covers`). It is used by
`adapter.layers` (LoRA adapters only on covered modules, `lora_targets`; full fine-tuning trains only
covered parameters, `freeze_outside`) and by the training loop's freezing schedule and layer-wise
learning rates.

The run's *trainable set* is what the optimiser holds: `mark_trainable` records it on the model once
after loading, so a parameter that a freezing schedule turns off for a while (requires_grad False)
still belongs to checkpoints (`trainable_named`).
"""

from __future__ import annotations

import re

import torch

from t2t_mtl.core.errors import ConfigError, Problem

__all__ = [
    "block_count",
    "covers",
    "freeze_outside",
    "lora_targets",
    "mark_trainable",
    "position",
    "range_problem",
    "resolve_range",
    "trainable_named",
]

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|block|blocks)\.(\d+)(?:\.|$)")
_EMBED = ("embed", "wte", "wpe", "shared")
TRAINABLE_ATTR = "_t2t_trainable"


def block_index(name: str) -> int | None:
    """The block number in a parameter or module name, or None outside the blocks."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def block_count(model: torch.nn.Module) -> int:
    """Number of transformer blocks (1 + the highest block number among the parameter names)."""
    found = [block_index(n) for n, _ in model.named_parameters(remove_duplicate=False)]
    return 1 + max((b for b in found if b is not None), default=-1)


def position(name: str, n_blocks: int) -> int:
    """-1 (embeddings), the block number, or `n_blocks` (above the blocks); see the module docstring."""
    b = block_index(name)
    if b is not None:
        return b
    modules = name.split(".")[:-1] or [name]  # the attribute (weight, bias) is not a module name
    if any(e in part for part in modules for e in _EMBED):
        return -1
    return n_blocks


def resolve_range(rng: list[int], n_blocks: int) -> tuple[int, int]:
    """`[first, last]` with negative values counted from the top, as non-negative block numbers.
    Call `range_problem` first: an invalid range raises ValueError."""
    why = range_problem(rng, n_blocks)
    if why:
        raise ValueError(why)
    first, last = (v + n_blocks if v < 0 else v for v in rng)
    return first, last


def range_problem(rng: list[int], n_blocks: int) -> str:
    """Why `rng` is not a block range of a model with `n_blocks` blocks ("" when it is one)."""
    if len(rng) != 2:
        return f"expected [first, last], got {rng}"
    first, last = (v + n_blocks if v < 0 else v for v in rng)
    if not (0 <= first < n_blocks and 0 <= last < n_blocks):
        return (
            f"{rng} is outside the model's {n_blocks} blocks (0..{n_blocks - 1}, or "
            f"-{n_blocks}..-1 from the top)"
        )
    if first > last:
        return f"{rng} starts above its end (blocks {first}..{last})"
    return ""


def check_range(key: str, rng: list[int], n_blocks: int) -> tuple[int, int]:
    """`resolve_range`, or a ConfigError naming `key` (e.g. "adapter.layers")."""
    why = range_problem(rng, n_blocks)
    if why:
        raise ConfigError(
            Problem.at("<config>", f"{key}: {why}", "use [first, last] block numbers")
        )
    return resolve_range(rng, n_blocks)


def covers(pos: int, first: int, last: int, n_blocks: int) -> bool:
    """Whether position `pos` lies in blocks first..last, extended to the embeddings (-1) when
    first is 0 and to the parts above the blocks (`n_blocks`) when last is the top block."""
    lo = -1 if first == 0 else first
    hi = n_blocks if last == n_blocks - 1 else last
    return lo <= pos <= hi


def lora_targets(model: torch.nn.Module, targets: str | list[str], rng: list[int]) -> list[str]:
    """Full names of the modules that get LoRA adapters when only `rng` (adapter.layers) may train:
    the linear layers peft's `all-linear` would pick (every Linear / GPT-2 Conv1D but the output
    layer), or those whose last name part is in `targets`, covered by the range. peft does not take a
    layer range together with `all-linear`, so the selection is spelt out module by module."""
    n = block_count(model)
    first, last = check_range("adapter.layers", rng, n)
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, m in model.named_modules():
        if not (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"):
            continue
        if targets == "all-linear":
            if m is out_layer:
                continue
        elif name.rsplit(".", 1)[-1] not in targets:
            continue
        if covers(position(name, n), first, last, n):
            names.append(name)
    if not names:
        raise ConfigError(
            Problem.at(
                "<config>",
                f"adapter.layers: no adapter target ({targets}) lies in blocks {first}..{last}",
                "widen the range or change adapter.target_modules",
            )
        )
    return names


def freeze_outside(model: torch.nn.Module, rng: list[int]) -> None:
    """Full fine-tuning of a layer range: parameters the range does not cover stop training."""
    n = block_count(model)
    first, last = check_range("adapter.layers", rng, n)
    for name, p in model.named_parameters():
        if not covers(position(name, n), first, last, n):
            p.requires_grad_(False)


def mark_trainable(model: torch.nn.Module) -> None:
    """Record the parameters that train now as the run's trainable set (call once after loading)."""
    setattr(
        model, TRAINABLE_ATTR, frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    )


def trainable_named(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the run's trainable set, whether or not a freezing schedule has turned
    a parameter off right now; without `mark_trainable`, the parameters with requires_grad."""
    marked = getattr(model, TRAINABLE_ATTR, None)
    if marked is None:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in model.named_parameters() if n in marked]
