"""Against interference and forgetting: EWC, PCGrad and the layer-freezing schedule.

- **EWC** (Kirkpatrick et al. 2017; online EWC, Schwarz et al. 2018). After a stage i that a later
  stage protects (`stages[j].ewc`, j > i), `estimate_fisher` computes the empirical diagonal Fisher
  F_i = (1/S) Σ_s (∇_θ ℓ_s)² over the run's trainable parameters θ (LoRA weights for (Q)LoRA, all
  trainable weights for full fine-tuning) from the first S records of stage i's stream, one record at a
  time; ℓ_s is the objective the stage trained, for a window of that one record (per-token
  cross-entropy times the balancer's coefficients). Under DDP every process takes every N-th record
  and the sums are all-reduced. The online Fisher F ← γ F_old + F_i and the anchor θ* (the weights at
  the end of stage i) are saved to `RUN/ewc/after-<stage>.safetensors` (`fisher.<param>`,
  `anchor.<param>`). Stage j then adds (λ/2) Σ F (θ − θ*)² to its objective (`EwcPenalty`): its
  gradient λ F (θ − θ*) is added to the gradients after the window's backward passes, before clipping.
  A stage reads its penalty from the file, so a resumed run uses exactly what the uninterrupted one did.
- **PCGrad** (Yu et al. 2020, `pcgrad`): per-task gradients of one window; each task's gradient loses
  its component along every other task gradient it conflicts with (negative dot product), the tasks
  taken in a random order drawn from (seed, step), then they are summed.
- **Freezing** (`LayerSchedule`): which blocks train at a step of a stage: `stages[i].train_layers`,
  and with `train.unfreeze_every` N the top block of the stage's range first, one more block below it
  every N steps (gradual unfreezing, Howard & Ruder 2018). Frozen parameters get requires_grad False
  (no gradient, no optimiser update: AdamW skips them, bitwise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from t2t_mtl.core.config import RunConfig
from t2t_mtl.core.errors import ConfigError, Problem, T2TError
from t2t_mtl.model import layers

if TYPE_CHECKING:
    from t2t_mtl.training.optimizer_step import StepRunner

__all__ = [
    "EwcPenalty",
    "LayerSchedule",
    "dynamic_freezing",
    "estimate_fisher",
    "ewc_file",
    "fisher_needed",
    "load_ewc",
    "order_generator",
    "pcgrad",
    "save_ewc",
    "stage_ewc",
]

EWC_DIR = "ewc"

# ------------------------------------------------------------------ PCGrad


def order_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of PCGrad's task orders at optimiser step `step`: a function of (seed, step)
    only, so a resumed run draws the same orders and the global RNG (dropout) is not touched."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))


def pcgrad(task_grads: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PCGrad's combined gradient from per-task gradients `task_grads` [P, d].

    For each task i, the other tasks j in a random order (from `generator`): when g_i · g_j < 0,
    g_i ← g_i − (g_i · g_j / |g_j|²) g_j, with g_i the projected-so-far and g_j the original gradient.
    Returns Σ_i g_i. Without conflicts this is the plain sum; with two tasks the result has a
    non-negative dot product with both.
    """
    p = task_grads.shape[0]
    out = task_grads.clone()
    sq = (task_grads.double() ** 2).sum(1)
    for i in range(p):
        for j in torch.randperm(p, generator=generator).tolist():
            if j == i or sq[j] == 0:
                continue
            dot = torch.dot(out[i].double(), task_grads[j].double())
            if dot < 0:
                out[i] -= (dot / sq[j]).to(out.dtype) * task_grads[j]
    return out.sum(0)


# ------------------------------------------------------------------ EWC


def stage_ewc(cfg: RunConfig, si: int):
    """The EwcConfig that sizes the Fisher estimated after stage `si` (that of the first later stage
    with `ewc`), or None when no later stage protects it."""
    return next((s.ewc for s in cfg.stage_list()[si + 1 :] if s.ewc is not None), None)


def fisher_needed(cfg: RunConfig, si: int) -> bool:
    """Whether the Fisher is estimated after stage `si`: some later stage sets `ewc`."""
    return stage_ewc(cfg, si) is not None


def ewc_file(run_dir: Path, stage: str) -> Path:
    """`RUN/ewc/after-<stage>.safetensors`."""
    return Path(run_dir) / EWC_DIR / f"after-{stage}.safetensors"


def estimate_fisher(
    runner: StepRunner,
    model: torch.nn.Module,
    named: list[tuple[str, torch.nn.Parameter]],
    batches: Iterable[dict],
    seed: int,
) -> dict[str, torch.Tensor]:
    """Σ over `batches` (one record each) of the squared gradient of its objective, per parameter
    (float32, on the parameters' device); the caller reduces over processes and divides by S.

    `model` is the unwrapped model (no DDP hooks fire: the gradients come from `autograd.grad`). Every
    parameter of `named` takes part, also those a freezing schedule has turned off; dropout runs as in
    training, from a generator seeded with `seed`, inside a forked RNG so training's stream is untouched.
    """
    params = [p for _, p in named]
    flags = [p.requires_grad for p in params]
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    dev = next(iter(params)).device if params else torch.device("cpu")
    devices = [dev] if dev.type == "cuda" else []
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for b in batches:
                coef = runner.balancer.coefficients(runner.count(b)).to(dev, torch.float32)
                tok_loss, tok_task = runner.token_losses(b, model=model)
                objective = (coef[tok_task] * tok_loss).sum()
                grads = torch.autograd.grad(objective, params, allow_unused=True)
                for (n, _), g in zip(named, grads):
                    if g is not None:
                        sums[n] += g.detach().float() ** 2
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return sums


def save_ewc(
    path: Path,
    fisher: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    meta: dict,
) -> None:
    """Write fisher.* and anchor.* (CPU copies) atomically; `meta` goes into the file's metadata."""
    tensors = {f"fisher.{n}": t.detach().float().cpu().contiguous() for n, t in fisher.items()}
    tensors.update({f"anchor.{n}": t.detach().cpu().contiguous() for n, t in anchor.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata={"t2t": json.dumps(meta)})
    os.replace(tmp, path)


def load_ewc(path: Path, device: torch.device) -> tuple[dict, dict]:
    """(fisher, anchor) of a file written by `save_ewc`, on `device`. A missing file (a run resumed
    after `ewc` was added to a later stage) is a T2TError."""
    if not Path(path).is_file():
        raise T2TError(
            Problem.at(
                str(path),
                "the EWC Fisher of this stage is missing: it is estimated when the stage ends, and "
                "the run was resumed after `ewc` was set on a later stage",
                "start the run over (train.resume=never) to estimate it",
            )
        )
    device = torch.device(device)
    state = load_file(str(path), device="cpu" if device.type == "cpu" else str(device))  # not cpu:0
    fisher = {k[len("fisher.") :]: v for k, v in state.items() if k.startswith("fisher.")}
    anchor = {k[len("anchor.") :]: v for k, v in state.items() if k.startswith("anchor.")}
    return fisher, anchor


class EwcPenalty:
    """(λ/2) Σ F (θ − θ*)² over the parameters `named` (matched to the Fisher by name)."""

    def __init__(
        self,
        named: list[tuple[str, torch.nn.Parameter]],
        fisher: dict[str, torch.Tensor],
        anchor: dict[str, torch.Tensor],
        lam: float,
    ):
        missing = [n for n, _ in named if n not in fisher or n not in anchor]
        if missing:
            raise ValueError(
                f"the EWC file has no Fisher for {len(missing)} parameter(s), e.g. {missing[0]}"
            )
        self.lam = float(lam)
        self.params = [p for _, p in named]
        self.fisher = [fisher[n].to(p.device, torch.float32) for n, p in named]
        self.anchor = [anchor[n].to(p.device, torch.float32) for n, p in named]

    def value_and_grad(self, scale: float = 1.0) -> float:
        """Add λ F (θ − θ*) · `scale` to every trainable parameter's .grad (None: created); returns
        the penalty (over every parameter, frozen ones included). `scale` is a gradient scaler's
        factor when gradients are still scaled (fp16)."""
        return self.value(self.sum_and_grad(scale))

    def value(self, total: torch.Tensor | float) -> float:
        """The penalty (λ/2) · Σ F (θ − θ*)² from the sum `sum_and_grad` returned."""
        return 0.5 * self.lam * float(total)

    @torch.no_grad()
    def sum_and_grad(self, scale: float = 1.0) -> torch.Tensor:
        """`value_and_grad` without waiting for the device: adds the gradient and returns
        Σ F (θ − θ*)² as a 0-d tensor where the parameters are (the training step reads it with
        the step's other statistics, in one transfer)."""
        diffs = torch._foreach_sub([p.float() for p in self.params], self.anchor)
        fd = torch._foreach_mul(diffs, self.fisher)
        total = torch.stack([torch.dot(f.flatten(), d.flatten()) for f, d in zip(fd, diffs)]).sum()
        for p, g in zip(self.params, fd):
            if not p.requires_grad:
                continue
            add = (g * (self.lam * scale)).to(p.dtype)
            if p.grad is None:
                p.grad = add
            else:
                p.grad.add_(add)
        return total


# ------------------------------------------------------------------ freezing


def dynamic_freezing(cfg: RunConfig) -> bool:
    """Whether the set of training blocks changes during the run (stages[i].train_layers or
    train.unfreeze_every): DDP must then be told that some parameters get no gradient."""
    return cfg.train.unfreeze_every > 0 or any(s.train_layers for s in cfg.stage_list())


class LayerSchedule:
    """Which of the run's trainable parameters train at each step of each stage.

    A stage's range is `stages[i].train_layers` (else every block); with `train.unfreeze_every` N > 0
    it starts with only its top block and adds the next block below every N steps of the stage:
    at stage step s it is [max(first, last − s // N), last] (`layers.covers` extends a range to the
    embeddings and the LM head). Raises ConfigError for a range outside the model or one that
    covers none of the trainable parameters (e.g. outside adapter.layers).
    """

    def __init__(self, cfg: RunConfig, model: torch.nn.Module):
        self.n = layers.block_count(model)
        self.named = layers.trainable_named(model)
        self.pos = [layers.position(n, self.n) for n, _ in self.named]
        self.every = cfg.train.unfreeze_every
        self.ranges: list[tuple[int, int] | None] = []
        problems = []
        for i, st in enumerate(cfg.stage_list()):
            key = f"stages[{i}].train_layers"
            rng = None
            if st.train_layers:
                why = layers.range_problem(st.train_layers, self.n)
                if why:
                    problems.append(Problem.at("<config>", f"{key}: {why}", "use [first, last]"))
                else:
                    rng = layers.resolve_range(st.train_layers, self.n)
                    if not any(layers.covers(p, *rng, self.n) for p in self.pos):
                        problems.append(
                            Problem.at(
                                "<config>",
                                f"{key}: {st.train_layers} covers none of the parameters that train",
                                "keep it within adapter.layers",
                            )
                        )
            self.ranges.append(rng)
        if problems:
            raise ConfigError(problems)
        self.current: tuple[int, int] | None = None  # what `apply` set last
        self._applied = False

    def range_at(self, si: int, step: int) -> tuple[int, int] | None:
        """The block range that trains at (0-based) step `step` of stage `si`; None = all."""
        rng = self.ranges[si]
        if self.every <= 0:
            return rng
        first, last = rng if rng is not None else (0, self.n - 1)
        return max(first, last - step // self.every), last

    def apply(self, si: int, step: int) -> bool:
        """Set requires_grad for step `step` of stage `si` (the range: `current`); True when the
        set of training parameters changed."""
        rng = self.range_at(si, step)
        if self._applied and rng == self.current:
            return False
        for (_, p), pos in zip(self.named, self.pos):
            p.requires_grad_(rng is None or layers.covers(pos, *rng, self.n))
        self.current, self._applied = rng, True
        return True
