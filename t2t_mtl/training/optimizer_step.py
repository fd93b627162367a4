"""One optimiser step over a window of micro-batches, plus the optimiser and LR schedule.

The step (see `losses` for the objective):
1. count target tokens per task in this process's micro-batches and all-reduce them (one small
   vector), so every process knows the window's global counts N_i before any forward pass;
2. the balancer turns them into per-task coefficients c_i; each micro-batch's loss is
   Σ_t c_{task(t)} ℓ_t from per-token cross-entropy (reduction='none'), so per-task losses come
   from the same forward; causal models compute logits only at target positions (`logits_to_keep`);
3. backward through `accelerator.accumulate` (no gradient sync until the last micro-batch). The loss
   is multiplied by processes × accumulation steps because accelerate/DDP divide by both, while our
   c_i already normalise over the whole window;
4. all-reduce the per-task loss sums, clip, stop on a non-finite loss or gradient norm *before*
   the optimiser step (the last checkpoint stays good), step, update the balancer.

Host syncs: the host waits for the device once per step on the default path, when the per-task
loss sums (kept on the device through the window), the gradient norm and the EWC penalty come
back in one transfer (the non-finite check reads them there); with several processes the token
counts of step 1 are a second. Targets are picked with positions computed on the host from the
collated batch (no boolean mask on the device), and batches go to the device with
`non_blocking=True` (from pinned memory on a GPU: `trainer` pins them while prefetching).

Against interference and forgetting (`protection`): with `train.gradient_surgery: pcgrad` step 3 is
one backward pass per task on the unwrapped model, the per-task gradients are all-reduced here and
PCGrad's combination becomes the gradient; a stage's EWC penalty adds its gradient after step 3;
parameters a freezing schedule has turned off keep no gradient. `make_optimizer` builds one group
per layer-wise learning rate (`train.layer_lr_decay`), and `make_scheduler` scales them all.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from t2t_mtl.model import features, layers
from t2t_mtl.training import losses, protection
from t2t_mtl.training.batching import Window

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import PeftModel
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedModel

__all__ = [
    "StepResult",
    "StepRunner",
    "adapter_inputs_uncast",
    "load_scheduler_state",
    "logits_mode",
    "make_optimizer",
    "make_scheduler",
    "restore_4bit_for_training",
    "scheduler_state",
]


@dataclass
class StepResult:
    """Global (all-process) statistics of one optimiser step."""

    objective: float
    sums: torch.Tensor  # [K] float64: Σ token losses per task
    tokens: torch.Tensor  # [K] float64: target tokens per task
    input_tokens: float
    grad_norm: float | None
    finite: bool
    bad_tasks: list[str]
    ewc_penalty: float | None = (
        None  # (λ/2) Σ F (θ − θ*)² before this step's update, when EWC is on
    )


def logits_mode(model: PreTrainedModel | PeftModel) -> str:
    """How a causal model can be asked for logits at target positions only.

    "mask": it slices its hidden states with transformers' `slice_logits_to_keep`, which takes a 2-D
    boolean mask and returns logits for exactly the True positions (flattened), so the big vocabulary
    projection and its backward run on target tokens only; "columns": it accepts `logits_to_keep` but
    slices itself (older or remote code), so we keep the union of target columns over the rows;
    "all": it does not accept `logits_to_keep`.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
            return "all"
    except (TypeError, ValueError):
        return "all"
    module = inspect.getmodule(type(inner))
    return "mask" if hasattr(module, "slice_logits_to_keep") else "columns"


@contextlib.contextmanager
def adapter_inputs_uncast(layers: list):
    """Within the block, peft LoRA `layers` take their input in the activation dtype (no cast to the
    adapter weights' dtype). Only for autocast regions; a no-op for an empty list or a peft without
    the switch (`cast_input_dtype_enabled`: setting it is then harmless)."""
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.cast_input_dtype_enabled = True


class StepRunner:
    """Runs windows through a prepared model/optimiser; one instance per run."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        balancer: losses.Balancer,
        task_names: list[str],
        family: str,
        max_grad_norm: float,
        *,
        gradient_surgery: str = "none",
        seed: int = 0,
    ):
        self.acc = accelerator
        self.model = model
        self.optimizer = optimizer
        self.balancer = balancer
        self.tasks = list(task_names)
        self.k = len(self.tasks)
        self.causal = family != "seq2seq"
        self.max_grad_norm = max_grad_norm
        self.surgery = gradient_surgery
        self.seed = seed
        self.ewc: protection.EwcPenalty | None = None  # set by the trainer for stages with `ewc`
        inner = self.inner = accelerator.unwrap_model(model)
        self.logits_mode = logits_mode(inner) if self.causal else "all"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shared = (
            [p for _, p in losses.shared_parameters(inner)] if balancer.needs_task_grads else []
        )
        # Under bf16/fp16 autocast (accelerate --mixed_precision) peft would still cast every LoRA
        # input to the adapters' float32 and add the float32 update to a low-precision result: on an
        # H100 that elementwise traffic cost more GPU time than the matmuls (docs/benchmarks.md,
        # "GPU training throughput"). Autocast already runs the adapter matmuls in low precision
        # against float32 master weights, so the casts are pure overhead there.
        self.uncast = (
            [m for m in inner.modules() if hasattr(m, "lora_A")]
            if getattr(accelerator, "mixed_precision", "no") in ("bf16", "fp16")
            else []
        )

    # ----------------------------------------------------------- forward

    def _targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and task ids aligned with the logits the model produces for them."""
        if self.causal:
            return batch["labels"][:, 1:], batch["task_ids"][:, 1:]
        return batch["labels"], batch["task_ids"]

    def count(self, batch: dict) -> torch.Tensor:
        """Target tokens per task in a collated micro-batch ([K], float64)."""
        labels, tasks = self._targets(batch)
        return losses.task_counts(tasks[labels != features.IGNORE_INDEX], self.k)

    def token_losses(
        self, batch: dict, model: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-target-token cross-entropy and task index for one micro-batch (on the model's device).
        `model`: another forward than the prepared model's (the unwrapped one: no DDP hooks)."""
        model = self.model if model is None else model
        dev = self.acc.device

        def to_dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(dev, non_blocking=True)  # host to device: safe without waiting

        # Which positions are targets is read where the batch was collated (the host), so the
        # device never has to report how many there are (a boolean index would wait for it).
        labels, tasks = self._targets(batch)
        used = labels != features.IGNORE_INDEX
        inputs = {k: to_dev(v) for k, v in batch.items() if k not in ("task_ids", "labels")}
        inputs = features.model_inputs(inputs)
        rows = None  # target positions in the logits' flattened leading dimensions
        if self.causal:  # the loss is ours (per token): the model gets no labels
            if self.logits_mode == "mask":
                # With packed rows nearly every column holds some target, so a per-column selection
                # would still send most positions through the head; the mask sends only targets.
                keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
                keep[:, :-1] = used  # hidden state t predicts label t + 1
                logits = model(**inputs, logits_to_keep=to_dev(keep)).logits  # [targets, vocab]
            elif self.logits_mode == "columns":
                keep = used.any(0).nonzero().flatten()
                logits = model(**inputs, logits_to_keep=to_dev(keep)).logits  # [B, columns, V]
                labels, tasks, used = labels[:, keep], tasks[:, keep], used[:, keep]
                rows = used.flatten().nonzero().flatten()
            else:
                logits = model(**inputs).logits  # [B, T, V]: position t predicts label t + 1
                at = used.nonzero()
                rows = at[:, 0] * logits.shape[1] + at[:, 1]
        else:  # T5 builds decoder inputs from the labels
            logits = model(**inputs, labels=to_dev(batch["labels"])).logits
            rows = used.flatten().nonzero().flatten()
        if rows is not None:
            logits = logits.reshape(-1, logits.shape[-1]).index_select(0, to_dev(rows))
        return losses.target_losses(logits, to_dev(labels[used]), to_dev(tasks[used]))

    # -------------------------------------------------------------- step

    def run(self, window: Window, step: int = 0) -> StepResult:
        """Forward/backward every micro-batch of `window`, then one optimiser step (unless non-finite).

        With `gradient_surgery: pcgrad` each task present gets its own backward pass (on the unwrapped
        model; the per-task gradients are summed over micro-batches and processes here) and PCGrad's
        combination, with task orders drawn from (seed, `step`), becomes the gradient. With `ewc` set,
        the penalty's gradient joins after the backward passes. Parameters a freezing schedule has
        turned off (requires_grad False) keep no gradient, so the optimiser leaves them as they are.
        """
        dev = self.acc.device
        local = torch.zeros(self.k + 1, dtype=torch.float64)
        for m in window.micro:  # on the host: the batches are still there
            local[: self.k] += self.count(m)
        local[self.k] = float(window.input_tokens)
        if self.acc.num_processes > 1:  # the whole window's counts: one round trip
            local = self.acc.reduce(local.to(dev), "sum").cpu()
        tokens, input_tokens = local[: self.k], float(local[self.k])
        coef = self.balancer.coefficients(tokens)
        coef_dev = coef.to(dev, torch.float32, non_blocking=True)
        scale = self.acc.num_processes * self.acc.gradient_accumulation_steps
        sums = torch.zeros(self.k, dtype=torch.float64, device=dev)  # stays there until the end
        tgrads = (
            torch.zeros(
                self.k, sum(p.numel() for p in self.shared), dtype=torch.float32, device=dev
            )
            if self.shared
            else None
        )
        surgery = self.surgery == "pcgrad"
        live = [p for p in self.params if p.requires_grad] if surgery else []
        task_flat = (
            torch.zeros(self.k, sum(p.numel() for p in live), dtype=torch.float32, device=dev)
            if surgery
            else None
        )
        with adapter_inputs_uncast(
            self.uncast
        ):  # through backward: checkpointing recomputes the forward
            for m in window.micro:
                with self.acc.accumulate(self.model):
                    if task_flat is not None:
                        tok_loss, tok_task = self.token_losses(m, model=self.inner)
                        self._surgery_grads(tok_loss, tok_task, coef_dev, live, task_flat)
                    else:
                        tok_loss, tok_task = self.token_losses(m)
                        if tgrads is not None:
                            self._task_grads(tok_loss, tok_task, tokens, tgrads)
                        objective = (coef_dev[tok_task] * tok_loss).sum()
                        self.acc.backward(objective * scale)
                sums += losses.task_sums(tok_loss.detach().double(), tok_task, self.k)
        if task_flat is not None:
            task_flat = self.acc.reduce(task_flat, "sum")
            self._write_surgery(task_flat, tokens > 0, live, step)
        ewc_sum = None
        if self.ewc is not None:
            scaler = getattr(self.acc, "scaler", None)  # fp16: gradients are still scaled here
            ewc_sum = self.ewc.sum_and_grad(scaler.get_scale() if scaler is not None else 1.0)
        for p in self.params:
            if not p.requires_grad:
                p.grad = None  # DDP may have written zeros; AdamW must skip a frozen parameter
        sums = self.acc.reduce(sums, "sum")
        if tgrads is not None:
            tgrads = self.acc.reduce(tgrads, "sum").cpu()
        gn = None
        if self.max_grad_norm and self.max_grad_norm > 0:
            # Clipped before the checks below: a non-finite step is abandoned (its gradients
            # dropped), so clipping it first changes nothing, and the norm joins the transfer.
            gn = self.acc.clip_grad_norm_(self.params, self.max_grad_norm)
        sums, grad_norm, ewc_sum = self._to_host(sums, gn, ewc_sum)
        ewc_value = self.ewc.value(ewc_sum) if self.ewc is not None else None
        present = tokens > 0
        bad = [t for t, ok in zip(self.tasks, torch.isfinite(sums).tolist()) if not ok]
        if bad:
            return self._abort(sums, tokens, input_tokens, None, bad)
        if grad_norm is not None and not math.isfinite(grad_norm):
            return self._abort(
                sums,
                tokens,
                input_tokens,
                grad_norm,
                [t for t, p in zip(self.tasks, present.tolist()) if p],
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float((coef * sums).sum())
        if isinstance(self.balancer, losses.UncertaintyBalancer):
            value += self.balancer.objective_extra(tokens)
        self.balancer.observe(sums, tokens, tgrads)
        return StepResult(value, sums, tokens, input_tokens, grad_norm, True, [], ewc_value)

    @staticmethod
    def _to_host(
        sums: torch.Tensor, grad_norm: torch.Tensor | float | None, ewc: torch.Tensor | None
    ) -> tuple[torch.Tensor, float | None, float | None]:
        """The step's statistics on the host in one transfer (the step's one wait for the device):
        per-task loss sums ([K] float64), gradient norm and EWC sum (when they are tensors there)."""
        extra = [x for x in (grad_norm, ewc) if torch.is_tensor(x)]
        if extra:
            parts = [sums] + [x.detach().reshape(1).to(sums.device, sums.dtype) for x in extra]
            host = torch.cat(parts).cpu()
        else:
            host = sums.cpu()
        k, out = sums.numel(), []
        for x in (grad_norm, ewc):
            if torch.is_tensor(x):
                out.append(float(host[k]))
                k += 1
            else:
                out.append(None if x is None else float(x))
        return host[: sums.numel()], out[0], out[1]

    def _abort(self, sums, tokens, input_tokens, grad_norm, bad) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(float("nan"), sums, tokens, input_tokens, grad_norm, False, bad)

    def _task_grads(
        self,
        tok_loss: torch.Tensor,
        tok_task: torch.Tensor,
        tokens: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        """Add ∇_W (w_i L_i) of this micro-batch for every task present (GradNorm's per-task norms)."""
        if not all(p.requires_grad for p in self.shared):
            return  # the shared layer is frozen at this step: no norms to balance
        for i in tok_task.unique().tolist():
            part = tok_loss[tok_task == i].sum() * float(self.balancer.w[i] / tokens[i])
            grads = torch.autograd.grad(part, self.shared, retain_graph=True, allow_unused=True)
            out[i] += torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten().float()
                    for g, p in zip(grads, self.shared)
                ]
            )

    def _surgery_grads(
        self,
        tok_loss: torch.Tensor,
        tok_task: torch.Tensor,
        coef: torch.Tensor,
        live: list[torch.nn.Parameter],
        out: torch.Tensor,
    ) -> None:
        """Add ∇ Σ_{t of task i} c_i ℓ_t of this micro-batch to out[i] for every task present
        (one backward pass each; together they are the micro-batch's share of the window gradient)."""
        present = tok_task.unique().tolist()
        for n, i in enumerate(present):
            part = (coef[i] * tok_loss[tok_task == i]).sum()
            grads = torch.autograd.grad(
                part, live, retain_graph=n < len(present) - 1, allow_unused=True
            )
            out[i] += torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten().float()
                    for g, p in zip(grads, live)
                ]
            )

    def _write_surgery(
        self, task_flat: torch.Tensor, present: torch.Tensor, live: list, step: int
    ) -> None:
        """PCGrad's combination of the window's per-task gradients into the parameters' .grad."""
        idx = present.nonzero().flatten().tolist()
        if not idx:
            return
        combined = protection.pcgrad(task_flat[idx], protection.order_generator(self.seed, step))
        offset = 0
        for p in live:
            g = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
            offset += p.numel()


def restore_4bit_for_training(model: torch.nn.Module) -> None:
    """Undo bitsandbytes' CPU inference layout of 4-bit weights before training continues.

    On CPUs with AVX512-BF16, the first eval-mode forward of a `Linear4bit` repacks its weight for a
    fast inference kernel that has no backward: gradients would silently stop at every 4-bit layer
    (only LoRA adapters right before the residual stream would train). Converting back is cheap.
    """
    try:  # optional, and slow to import
        from bitsandbytes.nn.modules import Linear4bit, _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes (then there are no 4-bit layers either)
        return
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if (
            isinstance(m, Linear4bit)
            and qs is not None
            and getattr(qs, "packing_format_for_cpu", False)
        ):
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                m.weight.data, qs
            )


# ------------------------------------------------------------- optimiser and schedule


def make_optimizer(
    model: torch.nn.Module,
    learning_rate: float,
    weight_decay: float,
    layer_lr_decay: float = 1.0,
    optim: str = "adamw",
) -> torch.optim.Optimizer:
    """AdamW over the run's trainable set (`layers.trainable_named`); no weight decay on biases and
    norm weights (1-d tensors). `optim` (TrainConfig.optim): "adamw" is torch's; "adamw_8bit",
    "paged_adamw" and "paged_adamw_8bit" are bitsandbytes' AdamW8bit / PagedAdamW /
    PagedAdamW8bit (same update rule and defaults; 8-bit state for tensors of >= 4096 elements,
    bitsandbytes' threshold; `preflight.backend_problems` refuses what a machine cannot run).

    Layer-wise learning rates: with `layer_lr_decay` d < 1 a parameter in block l of L trains at
    lr · d^(L−1−l), the embeddings at lr · d^L (lowest), the parts above the top block (final norm,
    LM head) at lr. One group per (scale, weight decay), highest scale first (so group 0 carries the
    schedule's own rate); each group's `lr_scale` is what `make_scheduler` multiplies in.
    """
    named = layers.trainable_named(model)
    n = layers.block_count(model) if layer_lr_decay != 1 else 0

    def scale(name: str) -> float:
        if layer_lr_decay == 1:
            return 1.0
        return layer_lr_decay ** (n - 1 - min(layers.position(name, n), n - 1))

    by_key: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in named:
        by_key.setdefault((scale(name), p.dim() >= 2), []).append(p)
    groups = [
        {
            "params": ps,
            "weight_decay": weight_decay if decay else 0.0,
            "lr": learning_rate * s,
            "lr_scale": s,
        }
        for (s, decay), ps in sorted(by_key.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))
    ]
    if optim == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate)
    import bitsandbytes as bnb  # optional: checked by preflight

    cls = {
        "adamw_8bit": "AdamW8bit",
        "paged_adamw": "PagedAdamW",
        "paged_adamw_8bit": "PagedAdamW8bit",
    }
    return getattr(bnb.optim, cls[optim])(groups, lr=learning_rate)


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int, peak_lr: float
) -> LRScheduler:
    """Warm-up to `peak_lr`, then cosine/linear decay (or constant) over one stage's steps."""
    from transformers import get_scheduler  # ~3 s to import (transformers.optimization)

    inner = getattr(
        optimizer, "optimizer", optimizer
    )  # accelerate's wrapper -> the torch optimiser
    # Every stage restarts its schedule at its own peak; LambdaLR keeps a group's first `initial_lr`
    # (setdefault), so a later stage's peak must be written explicitly.
    for group in inner.param_groups:  # a layer-wise group peaks at its share of peak_lr
        group["initial_lr"] = group["lr"] = peak_lr * group.get("lr_scale", 1.0)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[kind]
    return get_scheduler(
        name, inner, num_warmup_steps=min(warmup_steps, total_steps), num_training_steps=total_steps
    )


def scheduler_state(sched: LRScheduler) -> dict:
    """JSON-serialisable LR-scheduler state."""
    return {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}


def load_scheduler_state(sched: LRScheduler, state: dict) -> None:
    """Restore a scheduler and put the learning rate of the next step back into the optimiser."""
    sd = sched.state_dict()
    sd.update(state)
    sched.load_state_dict(sd)
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr
