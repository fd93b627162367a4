"""Checks before any heavy work, and launch-environment glue for training.

`check_run(cfg)` collects every problem a run would hit early — config cross-checks and templates
(`catalogue.check_config`), sources (every training row is read and checked by `mixture.build_members`),
the model (name, family, position limit), device options (`loading.check_device_options`) and the
accelerate backend (FSDP / ZeRO-3 limits, bf16/fp16 support) — and raises one T2TError listing them all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from typing import TYPE_CHECKING

import torch

from t2t_mtl.core.config import EMBEDDED_MODEL, RunConfig, load_config
from t2t_mtl.core.errors import ConfigError, Problem, T2TError
from t2t_mtl.mixing import mixture
from t2t_mtl.model import layers, loading
from t2t_mtl.tasks import catalogue
from t2t_mtl.tasks.task import Task

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "CPU_BF16_ENV",
    "backend_problems",
    "check_run",
    "configure_deepspeed",
    "configure_fsdp",
    "cpu_bf16_matmul",
    "cpu_processes",
    "deepspeed_launch_env",
    "deepspeed_zero3",
    "fsdp_on_cpu",
    "generation_model",
    "layer_range_problems",
    "load_run_config",
    "mixed_precision",
    "sharded_model",
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
    problems += [
        cfg.problem(
            ("tasks", i),
            f"task '{n}' has no training rows",
            "check its source and the bad-row report",
        )
        for i, n in enumerate(cfg.task_names())
        if n in members and members[n].size == 0
    ]
    try:
        loading.check_device_options(cfg.model, cfg.adapter)
    except T2TError as e:
        problems += e.problems
    name = cfg.model.name
    limit = None
    try:
        if name == EMBEDDED_MODEL:
            limit = loading.embedded_positions()  # its config without loading the weights
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
            limit = loading.position_limit(hf_cfg)  # None for T5's relative positions
    except T2TError as e:  # "model.name: ..." problems: at the config's model.name line
        problems += [
            cfg.problem(("model", "name"), p.message, p.hint)
            if p.file == "<config>" and p.message.startswith("model.name")
            else p
            for p in e.problems
        ]
    except (OSError, ValueError) as e:  # an unreadable model file
        problems.append(cfg.problem(("model", "name"), f"model.name: cannot read {name}: {e}"))
    if limit and isinstance(cfg.model.max_length, int) and cfg.model.max_length > limit:
        problems.append(
            cfg.problem(
                ("model", "max_length"),
                f"model.max_length: {cfg.model.max_length} is more than the model's "
                f"{limit} positions",
                f"use model.max_length <= {limit}",
            )
        )
    problems += backend_problems(cfg)
    if problems:
        raise T2TError(problems)
    extra = [cfg.resolve_path(d) for d in cfg.template_dirs]
    templates = {
        n: catalogue.load_task(t.template, extra) for n, t in zip(cfg.task_names(), cfg.tasks)
    }
    return members, templates


def load_run_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    """The run config for training (`load_config`). When it has problems, they are raised
    together with everything else `check_run` finds (unknown templates, sources, the model's
    limits, the launch setup) in one ConfigError: the user fixes all of them in one go. A valid
    config is returned unchecked: `trainer.train` runs `check_run` itself."""
    problems: list[Problem] = []
    cfg = load_config(path, overrides, collect=problems)
    if problems:
        try:
            check_run(cfg)
        except T2TError as e:  # ("<tasks>": a task without a template, reported above already)
            problems += [p for p in e.problems if p not in problems and p.file != "<tasks>"]
        except Exception:  # noqa: BLE001 - a check tripping over a value reported above
            pass
        raise ConfigError(problems)
    return cfg


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
        # Sharding replaces each parameter by a flat or DTensor shard; a bitsandbytes 4-bit weight
        # keeps its quantisation state on the parameter object, which that loses. The one known
        # recipe (FSDP1, bnb_4bit_quant_storage = compute dtype, no LoRA on embeddings) is untested here.
        out.append(
            Problem.at(
                "<config>",
                "adapter.method: qlora is not supported with FSDP or DeepSpeed ZeRO-3 here (sharding "
                "drops the 4-bit weights' quantisation state)",
                "use launch/accelerate/ddp.yaml or deepspeed_zero2.yaml, or method: lora",
            )
        )
    if _fsdp() and not torch.cuda.is_available():
        if os.environ.get("FSDP_VERSION", "1") != "2":
            out.append(
                Problem.at(
                    "<config>",
                    "FSDP on CPU processes needs fsdp_version: 2 (FSDP1 needs a GPU)",
                    "launch with launch/accelerate/cpu_fsdp.yaml",
                )
            )
        if os.environ.get("FSDP_SYNC_MODULE_STATES", "false").lower() == "true":
            out.append(
                Problem.at(
                    "<config>",
                    "fsdp_sync_module_states: true needs a GPU (accelerate broadcasts from one)",
                    "set fsdp_sync_module_states: false (every process loads the same weights), as "
                    "launch/accelerate/cpu_fsdp.yaml does",
                )
            )
    out += _optimizer_problems(cfg)
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


def _optimizer_problems(cfg: RunConfig) -> list[Problem]:
    """train.optim values this machine or launch cannot run (bitsandbytes optimisers)."""
    optim = cfg.train.optim
    if optim == "adamw":
        return []
    bad = _located(cfg)
    kp = ("train", "optim")
    if importlib.util.find_spec("bitsandbytes") is None:
        return [bad(kp, f"train.optim: {optim} needs bitsandbytes", "pip install bitsandbytes")]
    out = []
    if optim.startswith("paged") and not torch.cuda.is_available():
        # bitsandbytes falls back to an ordinary optimiser there (with a warning): nothing to page
        out.append(
            bad(
                kp,
                f"train.optim: {optim} needs a GPU (paging moves optimiser state out of GPU memory)",
                "use adamw or adamw_8bit on a CPU",
            )
        )
    if _sharded_backend() or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true":
        out.append(
            bad(
                kp,
                f"train.optim: {optim} is not supported with FSDP or DeepSpeed here (they shard or "
                "wrap the optimiser, and accept only optimisers they know)",
                "use adamw, or one GPU / DDP (launch/accelerate/ddp.yaml)",
            )
        )
    return out


def _located(cfg: RunConfig):
    """`bad(key_path, message, hint)`: a Problem at the key's line of the config file, or at the
    `key=value` override that set it (`RunConfig.problem`)."""
    return cfg.problem


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


CPU_BF16_ENV = "T2T_MTL_CPU_BF16"


def cpu_bf16_matmul() -> bool:
    """True on a CPU with bf16 matrix units (AMX-BF16, the `amx_bf16` flag of /proc/cpuinfo), where
    bf16 autocast trains ~2.5x faster than float32 (docs/benchmarks.md, "CPU precision") with no
    measured loss of quality ("Quality ablations (dev split)"). `T2T_MTL_CPU_BF16=0` (or 1) decides
    instead, whatever the CPU (the tests set 0, so they do not depend on the machine)."""
    env = os.environ.get(CPU_BF16_ENV)
    if env is not None:
        return env.strip().lower() not in ("0", "no", "false", "off", "")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def mixed_precision(cfg: RunConfig) -> str:
    """The autocast dtype a run trains with: `train.mixed_precision` when set; for `auto`, what
    `accelerate launch` was told (ACCELERATE_MIXED_PRECISION), else bf16 on a GPU that supports it
    or on a CPU with bf16 matrix units (`cpu_bf16_matmul`), else "no" (float32)."""
    if cfg.train.mixed_precision != "auto":
        return cfg.train.mixed_precision
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_bf16_matmul() else "no"


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


def deepspeed_zero3() -> bool:
    """Launched with DeepSpeed ZeRO-3 (launch/accelerate/deepspeed_zero3.yaml): gradient
    checkpointing must then be reentrant (`loading.load_model_and_tokenizer`)."""
    return (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"
    )


def deepspeed_launch_env(cfg: RunConfig) -> None:
    """Before the Accelerator exists: a DeepSpeed launch config with `gradient_accumulation_steps:
    auto` (launch/accelerate/deepspeed_*.yaml) reaches the process as
    ACCELERATE_GRADIENT_ACCUMULATION_STEPS=auto, which `Accelerator()` reads as an integer (and
    fails on). "auto" means the run's own `train.grad_accum`, so that is what it becomes."""
    if os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "").lower() == "auto":
        os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(cfg.train.grad_accum)


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


def _fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_on_cpu(acc: Accelerator) -> None:
    """Run an FSDP launch config (launch/accelerate/cpu_fsdp.yaml) on CPU processes over gloo.

    accelerate turns FSDP on only for accelerator backends and leaves CPU processes on plain data
    parallelism; torch's FSDP2 (`fully_shard`) runs on CPU, so the state is switched to FSDP with
    the launch config's plugin. Used to test sharded training without GPUs (FSDP2 only, see
    `backend_problems`); a no-op anywhere else.
    """
    if not (cpu_processes() and _fsdp()):
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if acc.state.mixed_precision != "no":
        plugin.set_mixed_precision(acc.state.mixed_precision)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    # What AcceleratorState.__init__ does on GPUs: every later AcceleratorState() copies the
    # process state back in, so it must say FSDP too.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def configure_fsdp(acc: Accelerator, model: torch.nn.Module) -> None:
    """Before `accelerator.prepare` under FSDP1: wrap every LoRA layer as its own FSDP unit.

    FSDP1 flattens the parameters of each wrapped unit into one tensor, which needs one dtype: a
    LoRA model has float32 adapters beside a bf16 base, so the default transformer-block wrapping
    fails at prepare ("Must flatten tensors with uniform dtype"). peft's `fsdp_auto_wrap_policy`
    (what TRL uses) makes each adapter layer a unit of its own beside the transformer blocks, so
    every flat parameter has one dtype and one requires_grad. FSDP2 shards parameter by parameter
    and needs nothing; neither does a model without adapters.
    """
    plugin = getattr(acc.state, "fsdp_plugin", None)
    if plugin is None or acc.is_fsdp2 or not hasattr(model, "peft_config"):
        return
    from peft.utils.other import fsdp_auto_wrap_policy

    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


def sharded_model(acc: Accelerator) -> bool:
    """True when the prepared model's parameters are split over processes (FSDP, DeepSpeed ZeRO-3):
    saving its weights then needs the gathered state dict (`Accelerator.get_state_dict`)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def generation_model(
    acc: Accelerator, model: torch.nn.Module
) -> tuple[torch.nn.Module, contextlib.AbstractContextManager]:
    """(model, context): what evaluation during training generates with, inside the context.

    An unsharded model: the unwrapped one. A sharded model must run through its wrapper, whose
    forward gathers the shards: FSDP2 (and DeepSpeed ZeRO-3) gather per module in the model's own
    forward, so the prepared model itself serves; under FSDP1, `generate` reaches the inner module
    past the root wrapper, so the root's own parameters (embeddings, final norm, head) are gathered
    for the call (`summon_full_params(recurse=False)`; the blocks gather themselves). Every process
    must generate the same sequence of forwards: the evaluation hook runs the whole evaluation on
    every process (not split between them).
    """
    if not sharded_model(acc):
        return acc.unwrap_model(model), contextlib.nullcontext()
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return model, FSDP.summon_full_params(model, recurse=False, writeback=False)
    return model, contextlib.nullcontext()
