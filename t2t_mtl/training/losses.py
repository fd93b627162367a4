"""Per-token losses and multi-task loss balancing.

Every optimiser step sees one *window*: `grad_accum` micro-batches on each of the processes.
Before the window's forward passes the trainer counts target tokens per task over the whole
window (all processes, one all-reduce), and a balancer turns those counts into one coefficient
per task, c_i. The window's objective is then

    L = Σ_t c_{task(t)} · ℓ_t          (ℓ_t: cross-entropy of target token t, reduction='none')

summed over every target token of the window. Because c_i already divides by the window's
token counts, each micro-batch contributes its own part of L and the gradient does not depend
on how the window is split into micro-batches or processes (batch 2 × accum 1 == batch 1 × accum 2).

Strategies (`train.loss_balancing`), with w_i = `tasks[i].loss_weight` and N_i / N the window's
target tokens of task i / of all tasks, P the number of tasks present in the window:
- `none`: c_i = w_i / N — the plain token-mean loss (long targets weigh more).
- `equal`: c_i = w_i / (P · N_i) — mean over tasks of each task's token-mean loss.
- `uncertainty` (Kendall, Gal & Cipolla 2018): L = (1/P) Σ_i exp(-s_i) w_i L_i + s_i with a
  learned log-variance s_i per task; c_i = exp(-s_i) w_i / (P · N_i). The 1/P keeps the gradient
  scale of `equal` and does not move the optimum s_i = log(w_i L_i).
- `gradnorm` (Chen et al. 2018): c_i = g_i w_i / (P · N_i) with task weights g_i (Σ g = #tasks)
  moved so the gradient norms ‖∇_W g_i w_i L_i‖ of a shared layer W approach their mean times
  r_i^α, r_i = the task's relative inverse training rate (L_i(t)/L_i(0) over its mean).

The learned quantities (s_i, g_i) are updated in closed form from window statistics that are
already reduced over processes, so every process computes the same values and no extra
parameters go through the distributed wrapper or the model's optimiser. Both use step size
`BALANCER_LR` (0.025, GradNorm's setting); s_i uses Adam on its exact gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "Balancer",
    "EqualBalancer",
    "GradNormBalancer",
    "UncertaintyBalancer",
    "make_balancer",
    "shared_parameters",
    "target_losses",
    "task_counts",
    "task_sums",
    "token_losses",
]

BALANCER_LR = 0.025
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_EMA = 0.9  # smoothing of per-task window losses for GradNorm's training rates
_MIN_WEIGHT = 1e-3


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every target position (labels != -100), in float32, plus its task index.

    `logits` [..., V] and `labels`/`task_ids` [...] are already aligned (the caller shifts causal
    inputs). Returns (losses [n], tasks [n]) over the n target positions.
    """
    mask = labels != -100
    return target_losses(logits[mask], labels[mask], task_ids[mask])


def target_losses(
    logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_losses` for targets the caller has already picked: `logits` [n, V], `labels` and
    `task_ids` [n], every one a target (no -100). The training step picks them with positions it
    computed on the host, so no boolean mask has to ask the device how many targets there are."""
    return F.cross_entropy(logits.float(), labels, reduction="none"), task_ids.long()


def task_sums(losses: torch.Tensor, tasks: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """Σ of losses per task ([n_tasks]); used for the objective and for logging."""
    out = torch.zeros(n_tasks, dtype=losses.dtype, device=losses.device)
    return out.index_add(0, tasks, losses)


def task_counts(tasks: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """Number of target tokens per task ([n_tasks], float64 so counts stay exact when summed)."""
    return torch.bincount(tasks, minlength=n_tasks).to(torch.float64)


class Balancer:
    """Strategy `none`: c_i = w_i / N. Subclasses override `coefficients` and `observe`."""

    name = "none"
    needs_task_grads = False

    def __init__(self, task_names: Sequence[str], loss_weights: Sequence[float]):
        self.tasks = list(task_names)
        self.w = torch.tensor([float(x) for x in loss_weights], dtype=torch.float64)

    def coefficients(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-task coefficients c_i ([K], float64) for a window with `tokens[i]` target tokens of task i."""
        total = float(tokens.sum())
        return self.w / total if total > 0 else torch.zeros_like(self.w)

    def observe(
        self, sums: torch.Tensor, tokens: torch.Tensor, task_grads: torch.Tensor | None = None
    ) -> None:
        """Update learned state from the window's global per-task loss sums and token counts."""

    def weights(self) -> dict[str, float]:
        """Current task weights for logging (beyond `loss_weight`); empty when there are none."""
        return {}

    def state_dict(self) -> dict:
        """JSON-serialisable state (saved in checkpoints)."""
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; the task list must be the same."""
        if state.get("name") != self.name:
            raise ValueError(f"balancer state is for '{state.get('name')}', not '{self.name}'")

    @staticmethod
    def _present(tokens: torch.Tensor) -> torch.Tensor:
        return tokens > 0

    def _task_means(
        self, sums: torch.Tensor, tokens: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(present tasks, per-task token-mean loss shaped and placed like the balancer's own state
        `like`, 0 where absent); None when no task of the window has target tokens."""
        present = self._present(tokens)
        if not bool(present.any()):
            return present, None
        mean = torch.zeros_like(like)
        mean[present] = sums.double()[present] / tokens[present].double()
        return present, mean


class EqualBalancer(Balancer):
    """`equal`: the mean over present tasks of each task's token-mean loss."""

    name = "equal"

    def coefficients(self, tokens: torch.Tensor) -> torch.Tensor:
        present = self._present(tokens)
        p = int(present.sum())
        out = torch.zeros_like(self.w)
        if p:
            out[present] = self.w[present] / (p * tokens[present].double())
        return out


class UncertaintyBalancer(Balancer):
    """`uncertainty`: learned log-variance s_i per task (Kendall et al. 2018), Adam on the exact gradient."""

    name = "uncertainty"

    def __init__(self, task_names: Sequence[str], loss_weights: Sequence[float]):
        super().__init__(task_names, loss_weights)
        k = len(self.tasks)
        self.s = torch.zeros(k, dtype=torch.float64)
        self._m = torch.zeros(k, dtype=torch.float64)
        self._v = torch.zeros(k, dtype=torch.float64)
        self._t = torch.zeros(
            k, dtype=torch.float64
        )  # Adam step count per task (only updated when present)

    def coefficients(self, tokens: torch.Tensor) -> torch.Tensor:
        present = self._present(tokens)
        p = int(present.sum())
        out = torch.zeros_like(self.w)
        if p:
            out[present] = (
                torch.exp(-self.s[present]) * self.w[present] / (p * tokens[present].double())
            )
        return out

    def objective_extra(self, tokens: torch.Tensor) -> float:
        """The regulariser (1/P) Σ s_i over present tasks (no gradient reaches the model from it)."""
        present = self._present(tokens)
        p = int(present.sum())
        return float(self.s[present].sum() / p) if p else 0.0

    def observe(
        self, sums: torch.Tensor, tokens: torch.Tensor, task_grads: torch.Tensor | None = None
    ) -> None:
        present, mean = self._task_means(sums, tokens, self.s)
        if mean is None:
            return
        # d/ds_i [exp(-s_i) w_i L_i + s_i] = 1 - exp(-s_i) w_i L_i (the common 1/P only rescales; Adam ignores it)
        grad = 1.0 - torch.exp(-self.s) * self.w * mean
        b1, b2 = _ADAM_BETAS
        idx = present.nonzero().flatten()
        self._t[idx] += 1
        self._m[idx] = b1 * self._m[idx] + (1 - b1) * grad[idx]
        self._v[idx] = b2 * self._v[idx] + (1 - b2) * grad[idx] ** 2
        mhat = self._m[idx] / (1 - b1 ** self._t[idx])
        vhat = self._v[idx] / (1 - b2 ** self._t[idx])
        self.s[idx] -= BALANCER_LR * mhat / (vhat.sqrt() + _ADAM_EPS)

    def weights(self) -> dict[str, float]:
        return {t: math.exp(-float(s)) for t, s in zip(self.tasks, self.s)}

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "s": self.s.tolist(),
            "m": self._m.tolist(),
            "v": self._v.tolist(),
            "t": self._t.tolist(),
            "tasks": self.tasks,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for key, attr in (("s", "s"), ("m", "_m"), ("v", "_v"), ("t", "_t")):
            setattr(self, attr, torch.tensor(state[key], dtype=torch.float64))


class GradNormBalancer(Balancer):
    """`gradnorm`: task weights g_i moved to equalise shared-layer gradient norms (Chen et al. 2018).

    Per window the trainer passes `task_grads` [K, d]: ∇_W (w_i L_i) for the shared parameters W,
    summed over micro-batches and processes. With G_i = g_i ‖∇_W w_i L_i‖, Ḡ their mean over present
    tasks and target_i = Ḡ · r_i^α, GradNorm's loss Σ|G_i − target_i| has gradient
    sign(G_i − target_i) · ‖∇_W w_i L_i‖ in g_i; that gradient is divided by the mean norm so the
    step does not depend on the layer's gradient scale, then Σ g over present tasks is restored.
    """

    name = "gradnorm"
    needs_task_grads = True

    def __init__(
        self, task_names: Sequence[str], loss_weights: Sequence[float], alpha: float = 1.5
    ):
        super().__init__(task_names, loss_weights)
        k = len(self.tasks)
        self.alpha = float(alpha)
        self.g = torch.ones(k, dtype=torch.float64)
        self.initial = torch.full(
            (k,), float("nan"), dtype=torch.float64
        )  # L_i(0), first window with task i
        self.ema = torch.full((k,), float("nan"), dtype=torch.float64)

    def coefficients(self, tokens: torch.Tensor) -> torch.Tensor:
        present = self._present(tokens)
        p = int(present.sum())
        out = torch.zeros_like(self.w)
        if p:
            out[present] = self.g[present] * self.w[present] / (p * tokens[present].double())
        return out

    def observe(
        self, sums: torch.Tensor, tokens: torch.Tensor, task_grads: torch.Tensor | None = None
    ) -> None:
        present, loss = self._task_means(sums, tokens, self.g)
        if loss is None:
            return
        first = present & torch.isnan(self.initial)
        self.initial[first] = loss[first]
        self.ema[first] = loss[first]
        again = present & ~first
        self.ema[again] = _EMA * self.ema[again] + (1 - _EMA) * loss[again]
        if task_grads is None or int(present.sum()) < 2:
            return  # one task alone has nothing to be balanced against
        idx = present.nonzero().flatten()
        norms = task_grads.double().norm(dim=1)[idx]
        mean_norm = float(norms.mean())
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            return
        rate = self.ema[idx] / self.initial[idx].clamp_min(1e-12)
        rel = rate / rate.mean()
        big_g = self.g[idx] * norms
        target = big_g.mean() * rel**self.alpha
        grad = torch.sign(big_g - target) * norms / mean_norm
        before = float(self.g[idx].sum())
        new = (self.g[idx] - BALANCER_LR * grad).clamp_min(_MIN_WEIGHT)
        self.g[idx] = new * (before / float(new.sum()))

    def weights(self) -> dict[str, float]:
        return {t: float(g) for t, g in zip(self.tasks, self.g)}

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "alpha": self.alpha,
            "g": self.g.tolist(),
            "initial": self.initial.tolist(),
            "ema": self.ema.tolist(),
            "tasks": self.tasks,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.g = torch.tensor(state["g"], dtype=torch.float64)
        self.initial = torch.tensor(state["initial"], dtype=torch.float64)
        self.ema = torch.tensor(state["ema"], dtype=torch.float64)


def make_balancer(
    strategy: str,
    task_names: Sequence[str],
    loss_weights: Sequence[float],
    gradnorm_alpha: float = 1.5,
) -> Balancer:
    """The balancer for `train.loss_balancing` (none | equal | uncertainty | gradnorm)."""
    if strategy == "equal":
        return EqualBalancer(task_names, loss_weights)
    if strategy == "uncertainty":
        return UncertaintyBalancer(task_names, loss_weights)
    if strategy == "gradnorm":
        return GradNormBalancer(task_names, loss_weights, gradnorm_alpha)
    if strategy == "none":
        return Balancer(task_names, loss_weights)
    raise ValueError(f"unknown loss balancing strategy {strategy!r}")


def shared_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The 'last shared layer' for GradNorm: the last trainable weight matrix outside embeddings/heads.

    With LoRA that is the last adapter matrix of the final block (shared by every task).
    """
    skip = ("lm_head", "embed", "shared", "wte", "wpe")
    cands = [
        (n, p)
        for n, p in model.named_parameters()
        if p.requires_grad and p.dim() >= 2 and not any(s in n for s in skip)
    ]
    if not cands:
        cands = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return cands[-1:]
