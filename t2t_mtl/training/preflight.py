"""Checks before any heavy work, and launch-environment glue for training.

`check_run(cfg)` collects every problem a run would hit early — config cross-checks and templates
(`catalogue.check_config`), sources (every training row is read and checked by `mixture.build_members`),
the model (name, family, position limit), device options (`loading.check_device_options`) and the
accelerate backend (FSDP / ZeRO-3 limits, bf16/fp16 support) — and raises one T2TError listing them all.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

from t2t_mtl.core import yaml_lines
from t2t_mtl.core.config import EMBEDDED_MODEL, RunConfig
from t2t_mtl.core.errors import Problem, T2TError
from t2t_mtl.mixing import mixture
from t2t_mtl.model import layers, loading
from t2t_mtl.tasks import catalogue
from t2t_mtl.tasks.task import Task

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "backend_problems",
    "check_run",
    "configure_deepspeed",
    "cpu_processes",
    "layer_range_problems",
    "mixed_precision",
]

logger = logging.getLogger(__name__)


def check_run(cfg: RunConfig) -> tuple[dict[str, mixture.Member], dict[str, Task]]:
    """Check templates, sources, model name and device options together; returns (members, templates).

    Raises one T2TError with every problem found.
    """
    problems = list(catalogue.check_config(cfg))
    members: dict[str, mixture.Member] = {}
    if not problems:
        try:
            members = mixture.build_members(cfg)
        except T2TError as e:
            problems += e.problems
    empty = [n for n, m in members.items() if m.size == 0]
    problems += [
        Problem.at(
            "<config>",
            f"task '{n}' has no training rows",
            "check its source and the bad-row report",
        )
        for n in empty
    ]
    try:
        loading.check_device_options(cfg.model, cfg.adapter)
    except T2TError as e:
        problems += e.problems
    name = cfg.model.name
    try:
        if name == EMBEDDED_MODEL:
            loading.embedded_gguf()
        else:
            local = cfg.resolve_path(name)
            _, _, hf_cfg = loading.resolve_model(
                str(local) if local.exists() else name, cfg.model.trust_remote_code
            )
            loading.detect_family(hf_cfg, cfg.model.family, name)
            blocks = max(
                getattr(hf_cfg, k, 0) or 0
                for k in ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer")
            )
            if blocks:  # else the check waits for the loaded model
                problems += layer_range_problems(cfg, blocks)
            limit = getattr(hf_cfg, "max_position_embeddings", None) or getattr(
                hf_cfg, "n_positions", None
            )
            if (
                limit
                and not getattr(hf_cfg, "is_encoder_decoder", False)
                and cfg.model.max_length > limit
            ):
                problems.append(
                    Problem.at(
                        "<config>",
                        f"model.max_length: {cfg.model.max_length} is more than the model's "
                        f"{limit} positions",
                        f"use model.max_length <= {limit}",
                    )
                )
    except T2TError as e:
        problems += e.problems
    problems += backend_problems(cfg)
    if cfg.replay.enabled and len(cfg.stage_list()) < 2:
        logger.warning("note: replay.enabled has no effect with a single stage")
    if problems:
        raise T2TError(problems)
    extra = [cfg.resolve_path(d) for d in cfg.template_dirs]
    templates = {
        n: catalogue.load_task(t.template, extra) for n, t in zip(cfg.task_names(), cfg.tasks)
    }
    return members, templates


def backend_problems(cfg: RunConfig) -> list[Problem]:
    """Settings the launch environment (accelerate config, GPU generation) cannot run."""
    out = []
    sharded = _sharded_backend()
    if cfg.train.loss_balancing == "gradnorm" and sharded:
        out.append(
            Problem.at(
                "<config>",
                "train.loss_balancing: gradnorm needs whole parameters on every process",
                "use it with one GPU, DDP or DeepSpeed ZeRO-1/2, not FSDP or ZeRO-3",
            )
        )
    if cfg.adapter.method == "qlora" and sharded:
        out.append(
            Problem.at(
                "<config>",
                "adapter.method: qlora is not supported with FSDP or DeepSpeed ZeRO-3 here",
                "use launch/accelerate/ddp.yaml or deepspeed_zero2.yaml, or method: lora",
            )
        )
    mixed = mixed_precision(cfg)
    out += _protection_problems(cfg, sharded, mixed)
    cuda = torch.cuda.is_available()
    if mixed == "fp16" and not cuda:
        out.append(
            Problem.at(
                "<config>",
                "mixed precision fp16 needs a GPU (train.mixed_precision or accelerate's setting)",
                "use train.mixed_precision=bf16 or no on a CPU",
            )
        )
    wants_bf16 = (
        cfg.model.dtype == "bfloat16"
        or mixed == "bf16"
        or (cfg.adapter.method == "qlora" and cfg.adapter.compute_dtype == "bfloat16")
    )
    if cuda and wants_bf16 and not torch.cuda.is_bf16_supported():
        out.append(
            Problem.at(
                "<config>",
                "bfloat16 is not supported by this GPU (needs compute capability 8.0+)",
                "set model.dtype/adapter.compute_dtype to float16 or float32 and mixed_precision fp16",
            )
        )
    return out


def _located(cfg: RunConfig):
    """`bad(key_path, message, hint)`: a Problem at the key's line of the config file when known."""
    loc = None
    if cfg.config_path:
        try:
            loc = yaml_lines.load(cfg.config_path)
        except T2TError:
            loc = None

    def bad(kp: tuple, msg: str, hint: str = "") -> Problem:
        return loc.problem(kp, msg, hint) if loc is not None else Problem.at("<config>", msg, hint)

    return bad


def _protection_problems(cfg: RunConfig, sharded: bool, mixed: str) -> list[Problem]:
    """Where EWC, PCGrad, freezing schedules and layer-wise learning rates cannot run: they read
    or write whole parameters and their .grad between backward and the optimiser step, which FSDP
    and DeepSpeed ZeRO-3 shard and DeepSpeed's engine owns; PCGrad's own backward passes bypass
    fp16's gradient scaler."""
    out: list[Problem] = []
    bad = _located(cfg)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    engine = "FSDP or DeepSpeed ZeRO-3" if sharded else "DeepSpeed"
    fix = "use one GPU or DDP (launch/accelerate/ddp.yaml)"
    keys: list[tuple] = []  # settings the backend cannot run
    if sharded or deepspeed:
        keys += [("stages", i, "ewc") for i, s in enumerate(cfg.stages) if s.ewc is not None]
        keys += [("stages", i, "train_layers") for i, s in enumerate(cfg.stages) if s.train_layers]
        if cfg.train.gradient_surgery == "pcgrad":
            keys.append(("train", "gradient_surgery"))
        if cfg.train.unfreeze_every > 0:
            keys.append(("train", "unfreeze_every"))
        if cfg.train.layer_lr_decay != 1 and sharded:
            keys.append(("train", "layer_lr_decay"))
    for kp in keys:
        name = ".".join(f"[{k}]" if isinstance(k, int) else k for k in kp).replace(".[", "[")
        out.append(bad(kp, f"{name} is not supported with {engine}", fix))
    if cfg.train.gradient_surgery == "pcgrad" and mixed == "fp16":
        out.append(
            bad(
                ("train", "gradient_surgery"),
                "train.gradient_surgery: pcgrad does not work with fp16 mixed precision",
                "use bf16 (train.mixed_precision=bf16) or no",
            )
        )
    return out


def layer_range_problems(cfg: RunConfig, n_blocks: int) -> list[Problem]:
    """adapter.layers and stages[i].train_layers that do not fit a model of `n_blocks` blocks."""
    bad = _located(cfg)
    ranges = [(("adapter", "layers"), cfg.adapter.layers)] + [
        (("stages", i, "train_layers"), s.train_layers) for i, s in enumerate(cfg.stages)
    ]
    out = []
    for kp, rng in ranges:
        why = layers.range_problem(rng, n_blocks) if rng else ""
        if why:
            name = "adapter.layers" if kp[0] == "adapter" else f"stages[{kp[1]}].train_layers"
            out.append(bad(kp, f"{name}: {why}", "use [first, last] block numbers"))
    return out


def mixed_precision(cfg: RunConfig) -> str:
    """The autocast dtype a run trains with: `train.mixed_precision` when set; for `auto`, what
    `accelerate launch` was told (ACCELERATE_MIXED_PRECISION), else bf16 on a GPU that supports it,
    else "no". CPUs stay in float32 under `auto`: bf16 is faster there but is a choice the user makes
    (docs/training.md has the measurements)."""
    if cfg.train.mixed_precision != "auto":
        return cfg.train.mixed_precision
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def cpu_processes() -> bool:
    """True for several processes on a machine without an accelerator (DDP over gloo).

    accelerate's `--cpu` launcher starts one process (without mpirun), so several CPU processes come
    from `accelerate launch --multi_gpu --num_processes N` (or torchrun); accelerate would then
    treat each as a separate single-process run unless told to use the CPU backend.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    avail = getattr(torch, "accelerator", None)
    has_accel = (
        avail.is_available()
        if avail is not None and hasattr(avail, "is_available")
        else torch.cuda.is_available()
    )
    return not has_accel


def _sharded_backend() -> bool:
    """FSDP or DeepSpeed ZeRO-3 (parameters split over processes), from accelerate's launch environment."""
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"
    )


def configure_deepspeed(acc: Accelerator, cfg: RunConfig) -> None:
    """DeepSpeed sizes its batches at prepare time from a dataloader we do not use: give it the run's
    micro-batch size and clipping (its `auto` values) instead."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.train.max_grad_norm
