"""Typed run configuration: dataclasses, YAML + `key=value` overrides, collect-all validation.

One YAML file describes a run: model, tasks (template + optional source override),
mixing, stages, replay, adapter, optimisation, evaluation and output folder.
`load_config` reports *every* problem at once, naming keys as the user wrote them
(`train.lr: unknown key (did you mean 'learning_rate'?)`).

Cross-checks that need the template catalogue (does template X exist?) live in
`tasks.catalogue.check_config`, one layer up, so this module stays import-light.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from t2t_mtl.core import shipped, yaml_lines
from t2t_mtl.core.errors import ConfigError, Problem, did_you_mean

__all__ = [
    "EMBEDDED_MODEL",
    "NAME_HINT",
    "REPORT_TO",
    "AdapterConfig",
    "EvalConfig",
    "EwcConfig",
    "MixingConfig",
    "ModelConfig",
    "ReplayConfig",
    "RunConfig",
    "SourceConfig",
    "StageConfig",
    "TaskConfig",
    "TrainConfig",
    "config_to_dict",
    "find_config",
    "load_config",
    "name_problem",
]

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
# train.report_to: accelerate's names of the trackers t2t-mtl sets up (training/telemetry.py)
REPORT_TO = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "none")

# Names that become one file or folder name (RUN/stages/<stage>/, RUN/eval/<split>.json, ...).
NAME_MAX = 100
NAME_HINT = (
    "a name becomes a file or folder name: use letters, digits, '_', '-', '.' and spaces, "
    f"starting with a letter, digit or '_', at most {NAME_MAX} characters"
)


def name_problem(value: Any) -> str:
    """Why `value` cannot be a single path component ("" when it can).

    Safe names are non-empty text of at most NAME_MAX letters, digits, `_ - .` and spaces that
    start with a letter, digit or `_` and do not end with a space or `.`: so never `.`/`..`,
    never a `/` or `\\` (a path), a control character, or a leading `-` (read as an option).
    """
    if not isinstance(value, str) or not value:
        return "it is empty"
    if len(value) > NAME_MAX:
        return f"it is {len(value)} characters long"
    if value in (".", ".."):
        return f"'{value}' names a folder, not a file"
    if "/" in value or "\\" in value:
        return "it contains a path separator ('/' or '\\')"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "it contains a control character"
    if not (value[0].isalnum() or value[0] == "_"):
        return f"it starts with {value[0]!r}"
    bad = sorted({c for c in value if not (c.isalnum() or c in "_-. ")})
    if bad:
        return "it contains " + ", ".join(repr(c) for c in bad)
    if value[-1] in " .":
        return f"it ends with {value[-1]!r}"
    return ""


@dataclass
class SourceConfig:
    """Where a task's rows come from; overrides the template's own `source` block.

    Either `hub` (a Hugging Face dataset path, with optional `name` = config) or
    `path` (a local JSONL/CSV/Parquet file or a folder of `{split}.{ext}` files).
    """

    hub: str | None = None
    name: str | None = None  # hub dataset config name
    revision: str | None = (
        None  # hub revision, e.g. "refs/convert/parquet" for script-only datasets
    )
    path: str | None = None
    splits: dict[str, str] = field(default_factory=dict)  # canonical split -> file stem / hub split
    columns: dict[str, str] | None = None  # source column -> template field
    labels: dict[str, str] | None = None  # raw label value (as string) -> label name
    format: Literal["jsonl", "csv", "parquet"] | None = None  # default: from file extension


@dataclass
class TaskConfig:
    """One task of the run: a template name plus optional source override and weights."""

    template: str = ""
    name: str | None = None  # defaults to the template's name
    source: SourceConfig | None = None  # None: the template's bundled samples / default
    weight: float | None = None  # explicit mixing weight (overrides the temperature rule)
    floor: float | None = None  # minimum share in the mixture (0..1)
    ceiling: float | None = None  # maximum share in the mixture (0..1)
    loss_weight: float = 1.0
    max_examples: int | None = None  # cap on training rows read from the source
    # default from the template; rank: label tasks; constrained: label, span and entity tasks
    eval_mode: Literal["generate", "rank", "constrained"] | None = None
    # The template's variants this task trains on (ids, in order; the template's variant_policy
    # turns over them); the first is also the one evaluation and prompting use. None: every
    # training variant of the template.
    variants: list[str] | None = None


@dataclass
class MixingConfig:
    """T5-style examples-proportional mixing: p_i ∝ min(n_i, K)^(1/T)."""

    temperature: float = 2.0  # T=1 proportional; large T -> equal; mT5 used ~3.3 (alpha 0.3)
    cap: int | None = 3000  # K; None = no cap. T5 used 2^19 examples at full scale
    unit: Literal["examples", "tokens"] = "examples"
    seed: int | None = None  # default: the run seed


@dataclass
class EwcConfig:
    """Elastic weight consolidation for one stage (`stages[i].ewc`; docs/training.md, "Against
    interference and forgetting").

    The stage adds (lambda/2) Σ F (θ − θ*)² to its objective: θ* = the trainable weights at the end
    of the previous stage, F = the online diagonal Fisher (Schwarz et al. 2018) of all earlier stages,
    F_i = gamma · F_{i−1} + Fisher(stage i), each Fisher(stage i) estimated at the end of stage i from
    the first `samples` records of its stream. A stage's Fisher takes `samples` and `gamma` from the
    first later stage that sets `ewc`.
    """

    # YAML key `lambda` (a Python keyword): `_build` and `config_to_dict` read the metadata.
    lam: float = field(default=0.0, metadata={"key": "lambda"})  # required: > 0
    samples: int = 100
    gamma: float = 1.0


@dataclass
class StageConfig:
    """One curriculum stage: which tasks, for how many optimiser steps, optional T and learning rate,
    an EWC penalty against forgetting earlier stages and the block range that trains."""

    name: str = ""
    tasks: list[str] = field(default_factory=list)
    steps: int = 0
    temperature: float | None = None
    learning_rate: float | None = (
        None  # peak LR of this stage's schedule; None = train.learning_rate
    )
    ewc: EwcConfig | None = None  # None = no penalty in this stage
    # [first, last] transformer blocks that train in this stage (within adapter.layers; negative
    # counts from the top); None = every trainable block
    train_layers: list[int] | None = None


@dataclass
class ReplayConfig:
    """Replay buffer of earlier stages' records (reservoir sampling, per-task quota)."""

    enabled: bool = False
    per_task: int = 200  # reservoir quota per finished task
    share: float | None = (
        0.1  # replay's share of later stages; None = temperature rule over old+new
    )
    label_balanced: bool = False


@dataclass
class ModelConfig:
    """Base model: the embedded SmolLM2, a hub id or a local folder."""

    name: str = EMBEDDED_MODEL
    family: Literal["auto", "causal", "seq2seq"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # e.g. "sdpa", "eager", "flash_attention_2" (CUDA only); unset: eager for T5, else sdpa
    attn_implementation: str | None = None
    prompt_format: Literal["auto", "chat", "plain"] = (
        "auto"  # causal only; auto = chat template if the tokenizer has one
    )
    # Training only: eval/predict/prompt/export also need --trust-remote-code (a run folder may
    # come from anyone; the config the user wrote for training is their own consent).
    trust_remote_code: bool = False
    max_length: int = 512  # tokens of prompt + target (causal) or source (seq2seq)
    max_target_length: int = 128  # seq2seq decoder length; also generation budget
    truncation: Literal["middle", "end"] = (
        "middle"  # what an over-long input loses (features.prompt_ids)
    )


@dataclass
class AdapterConfig:
    """LoRA / QLoRA (bitsandbytes 4-bit) / full fine-tuning."""

    method: Literal["lora", "qlora", "full"] = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # "all-linear" or a list of module names
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # [first, last] transformer blocks (0-based, inclusive; negative counts from the top) that get
    # adapters (lora/qlora) or train (full); None = all. Embeddings train with a range starting at
    # block 0, the final norm and LM head with one ending at the top block.
    layers: list[int] | None = None


@dataclass
class TrainConfig:
    """Optimisation and checkpointing."""

    steps: int = 100  # optimiser steps when no stages are given
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    # AdamW from torch, or bitsandbytes' 8-bit (optimiser state quantised) / paged (state paged
    # out to CPU memory under GPU memory pressure; GPU only) AdamW
    optim: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    packing: Literal["auto", "on", "off"] = "auto"
    # Prompt variants a task trains on when its `variants` does not name them: all training
    # variants in turn, or only the first (the one evaluation and prompting ask with).
    prompt_variants: Literal["all", "first"] = "all"
    group_by_length: bool = True  # seq2seq batches
    loss_balancing: Literal["none", "equal", "uncertainty", "gradnorm"] = "none"
    gradnorm_alpha: float = 1.5
    # off (false), on (true: every transformer block) or N: every N-th block (0, N, 2N, ...;
    # encoder then decoder blocks for T5), trading memory back for speed
    gradient_checkpointing: bool | int = False
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int = 2
    resume: str = "auto"  # auto | never | one of this run's checkpoints/step-N folders
    # experiment trackers, through accelerate (REPORT_TO); one name, a list, or "none"
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    # autocast dtype: auto = what `accelerate launch` was told, else bf16 on a GPU that supports it,
    # else none (float32). bf16 also runs on CPUs (fastest on ones with AMX / AVX512-BF16).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    bad_rows: Literal["skip", "fail"] = "skip"
    # windows (render, tokenise, collate) built ahead in a background thread while a step runs;
    # 0 = each window is built when its step starts
    prefetch: int = 1
    # Against interference and forgetting (docs/training.md): PCGrad projects conflicting per-task
    # gradients apart; layer l's learning rate is lr · layer_lr_decay^(L−1−l); every
    # `unfreeze_every` steps of a stage one more block below the top starts training (0 = all at once).
    gradient_surgery: Literal["none", "pcgrad"] = "none"
    layer_lr_decay: float = 1.0
    unfreeze_every: int = 0


@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    every_steps: int = 0  # 0 = only at the end
    limit: int = 50  # examples per task during training
    split: str = "validation"
    batch_size: int = 16
    select_best: bool = True
    max_new_tokens: int = 64  # generation budget cap; each task's own budget fits its answers
    task_budgets: bool = True  # per-task budgets (evaluator.answer_budget; not for base models)
    ci_resamples: int = 1000  # bootstrap resamples of the 95 % intervals (0 = no intervals)
    ci_seed: int = 0
    # Merge a LoRA adapter into float32 base weights before generating (faster, same answers;
    # `loading.merge_lora_for_inference`); evaluation and `prompt` alike.
    merge_adapter: bool = True


def _stage_tasks_by_path(cfg: RunConfig) -> None:
    """A stage may list a task by the template path the run config gives it (as `tasks:` does):
    such an entry becomes the task's name."""
    try:
        alias = {
            t.template: cfg.task_name(t)
            for t in cfg.tasks
            if isinstance(t.template, str) and not t.name and template_is_path(t.template)
        }
        for s in cfg.stages:
            if isinstance(s.tasks, list):
                s.tasks = [alias.get(x, x) if isinstance(x, str) else x for x in s.tasks]
    except (AttributeError, TypeError):  # a malformed tasks/stages entry: reported by the checks
        return


def template_is_path(template: str) -> bool:
    """Whether a task's `template` names a file (a .yaml/.yml name or a path), not a catalogue name."""
    return template.endswith((".yaml", ".yml")) or "/" in template or "\\" in template


_DECLARED: dict[tuple[str, float], str] = {}


def declared_name(path: Path | None) -> str:
    """The `name:` a template file declares at its top level, else the file's stem (cached by path
    and modification time)."""
    if path is None:
        return ""
    try:
        key = (str(path), path.stat().st_mtime)
    except OSError:
        return path.stem
    if key not in _DECLARED:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None
        name = data.get("name") if isinstance(data, dict) else None
        _DECLARED[key] = name if isinstance(name, str) and name.strip() else path.stem
    return _DECLARED[key]


@dataclass
class RunConfig:
    """The whole run. See launch/configs/*.yaml for complete examples."""

    run_name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 42
    template_dirs: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    stages: list[StageConfig] = field(default_factory=list)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Where the YAML came from; relative paths in the config resolve against its folder.
    config_path: str | None = None
    # The YAML's lines and the `key=value` overrides applied (`problem` uses them); not a key.
    located: Any = field(default=None, repr=False, compare=False)

    def problem(self, path: tuple, message: str, hint: str = "") -> Problem:
        """A Problem about the config key at `path` (`("tasks", 0, "template")`): at the
        `key=value` override that set it, else at its line in the config file, else `<config>`."""
        if self.located is not None:
            return self.located.problem(path, message, hint)
        return Problem(self.config_path or "<config>", None, message, hint)

    def task_names(self) -> list[str]:
        """Task names as used in stages, logs and metrics (`task_name` of each task)."""
        return [self.task_name(t) for t in self.tasks]

    def task_name(self, t: TaskConfig) -> str:
        """A task's name: its `name`, else its template's. A template given by file path is named
        by the `name:` its file declares (the path's file stem when the file has none or cannot be
        read yet: the catalogue reports that file), so logs, metrics and stages say `tickets`,
        not `my_tasks/tickets.yaml`."""
        if t.name:
            return t.name
        if not template_is_path(t.template):
            return t.template
        return declared_name(self.resolve_path(t.template))

    def resolve_path(self, p: str | None) -> Path | None:
        """Resolve a path from the config relative to the config file's folder.

        A path that exists relative to the current directory wins, so both
        `cd project && t2t-mtl ...` and configs with `../shared/...` work.
        """
        if p is None:
            return None
        path = Path(p).expanduser()
        if path.is_absolute() or path.exists() or not self.config_path:
            return path
        return Path(self.config_path).parent / path

    def resolved_source(self, task: TaskConfig) -> SourceConfig | None:
        """`task.source` with a relative `path` resolved against the config's folder."""
        src = task.source
        if src is not None and src.path:
            src = dataclasses.replace(src, path=str(self.resolve_path(src.path)))
        return src

    def stage_list(self) -> list[StageConfig]:
        """Stages to run; with none configured, one stage of all tasks for `train.steps`."""
        if self.stages:
            return self.stages
        return [StageConfig(name="main", tasks=self.task_names(), steps=self.train.steps)]


# ---------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return origin.__name__
    return getattr(tp, "__name__", str(tp))


def _fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (("." if out else "") + str(p))
    return out or "<root>"


def _scalar(tp: Any) -> bool:
    """Whether `tp` is one value (number, flag, text, choice), optional or not; not a section or list."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(args) == 1 and _scalar(args[0])
    return tp in (int, float, bool, str) or typing.get_origin(tp) is Literal


def _convert(
    value: Any, tp: Any, path: tuple, loc: yaml_lines.Located, problems: list[Problem]
) -> Any:
    """Convert `value` to type `tp`, appending problems (never raising)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], path, loc, problems)
        return value
    if value is None:
        problems.append(
            loc.problem(path, f"{_fmt_path(path)}: must not be empty", f"expected {_type_name(tp)}")
        )
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no unquoted as booleans
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((w for w in words if w in choices), value)
        if value not in choices:
            hint = did_you_mean(str(value), [str(c) for c in choices])
            if isinstance(value, bool):  # `yes`, `on`, `true` ... unquoted: YAML made it a boolean
                hint = (
                    f"YAML reads an unquoted yes/no/on/off/true/false as {value}; "
                    f"expected one of {', '.join(map(str, choices))}"
                )
            problems.append(loc.problem(path, f"{_fmt_path(path)}: invalid value {value!r}", hint))
        return value
    if dataclasses.is_dataclass(tp):
        if tp is TaskConfig and isinstance(value, str):  # `tasks: [sst2, qa]`: a template name
            value = {"template": value}
        return _build(tp, value, path, loc, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            if isinstance(value, str) and item_tp is str:
                return [
                    v.strip() for v in value.split(",") if v.strip()
                ]  # "a,b" on the command line
            problems.append(
                loc.problem(path, f"{_fmt_path(path)}: expected a list, got {type(value).__name__}")
            )
            return []
        return [_convert(v, item_tp, path + (i,), loc, problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(
                loc.problem(
                    path, f"{_fmt_path(path)}: expected a mapping, got {type(value).__name__}"
                )
            )
            return {}
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): (str(v) if vt is str and v is not None else v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(
                loc.problem(path, f"{_fmt_path(path)}: expected true or false, got {value!r}")
            )
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(
                loc.problem(path, f"{_fmt_path(path)}: expected an integer, got {value!r}")
            )
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)  # YAML reads 2e-4 as a string
            except (TypeError, ValueError):
                problems.append(
                    loc.problem(path, f"{_fmt_path(path)}: expected a number, got {value!r}")
                )
                return value
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            problems.append(
                loc.problem(path, f"{_fmt_path(path)}: expected text, got {type(value).__name__}")
            )
            return value
        return str(value)
    return value


# Names users bring from other tools (HF Trainer, axolotl, LLaMA-Factory).
_ALIASES = {
    "lr": "learning_rate",
    "max_steps": "steps",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "model_name_or_path": "name",
    "base_model": "name",
    "warmup": "warmup_steps",
    "lr_scheduler_type": "scheduler",
    "sequence_len": "max_length",
    "max_seq_length": "max_length",
    "T": "temperature",
    "output": "output_dir",
    "epochs": "steps",
    "datasets": "tasks",
    "mixture": "mixing",
    "mix": "mixing",
    "training": "train",
    "evaluation": "eval",
}


def _build(
    cls: type, data: Any, path: tuple, loc: yaml_lines.Located, problems: list[Problem]
) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(
            loc.problem(path, f"{_fmt_path(path)}: expected a mapping, got {type(data).__name__}")
        )
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {
        _key(f): f.name for f in dataclasses.fields(cls) if f.name not in ("config_path", "located")
    }
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            alias = _ALIASES.get(str(key))
            hint = f"did you mean '{alias}'?" if alias in names else did_you_mean(str(key), names)
            problems.append(
                loc.problem(path + (key,), f"{_fmt_path(path + (key,))}: unknown key", hint)
            )
            continue
        before = len(problems)
        converted = _convert(value, hints[fields[key]], path + (key,), loc, problems)
        if len(problems) > before and _scalar(hints[fields[key]]):
            # Reported; the default stands in, so the checks across keys still run and every
            # other problem is reported in the same pass (not only after this one is fixed).
            continue
        kwargs[fields[key]] = converted
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defaults cover every field
        problems.append(loc.problem(path, str(e)))
        return cls()


def _check_values(cfg: RunConfig, loc: yaml_lines.Located, problems: list[Problem]) -> None:
    """Range and cross-field checks that types alone cannot express."""

    def bad(path: tuple, msg: str, hint: str = "") -> None:
        problems.append(loc.problem(path, f"{_fmt_path(path)}: {msg}", hint))

    def safe_name(path: tuple, value: Any) -> None:
        why = name_problem(value) if isinstance(value, str) else ""  # else: a type problem
        if why:
            bad(path, f"{value!r} is not a safe name: {why}", NAME_HINT)

    def layer_range(path: tuple, value: Any) -> None:
        if value is None or not all(isinstance(v, int) for v in value):
            return  # unset, or already a type problem
        if len(value) != 2:
            bad(
                path,
                f"expected [first, last], got {value}",
                "e.g. [8, 29], or [-4, -1] for the top four",
            )
        elif (value[0] < 0) == (value[1] < 0) and value[0] > value[1]:
            bad(path, f"first block {value[0]} is above last block {value[1]}", "use [first, last]")

    safe_name(("run_name",), cfg.run_name)
    safe_name(("eval", "split"), cfg.eval.split)
    if not cfg.tasks:
        bad(("tasks",), "no tasks configured", "add at least one entry with a 'template' key")
    names = cfg.task_names()
    for i, t in enumerate(cfg.tasks):
        if not t.template:
            bad(
                ("tasks", i, "template"),
                "missing template name",
                "run `t2t-mtl validate` to list templates",
            )
        if t.name is not None:
            safe_name(("tasks", i, "name"), t.name)
        if t.weight is not None and not t.weight >= 0:
            bad(("tasks", i, "weight"), "must be >= 0")
        if not t.loss_weight >= 0:
            bad(("tasks", i, "loss_weight"), "must be >= 0", "0 trains nothing on the task")
        if t.max_examples is not None and t.max_examples <= 0:
            bad(
                ("tasks", i, "max_examples"),
                f"must be a positive number of rows, got {t.max_examples}",
                "leave it out to read every row",
            )
        if t.floor is not None and t.ceiling is not None and t.floor > t.ceiling:
            bad(
                ("tasks", i, "floor"),
                f"floor {t.floor:g} is above the task's ceiling {t.ceiling:g}",
                "a floor at most the ceiling",
            )
        for k in ("floor", "ceiling"):
            v = getattr(t, k)
            if v is not None and not 0 <= v <= 1:
                bad(("tasks", i, k), "must be a share between 0 and 1")
        if t.source is not None and not (t.source.hub or t.source.path):
            bad(("tasks", i, "source"), "needs 'hub' or 'path'")
        if t.source is not None and t.source.hub and t.source.path:
            bad(("tasks", i, "source"), "give either 'hub' or 'path', not both")
        if t.source is not None and isinstance(t.source.labels, dict):
            for raw in t.source.labels:
                if isinstance(raw, bool) or raw is None:
                    bad(
                        ("tasks", i, "source", "labels", raw),
                        f"labels key {raw!r} is what YAML makes of an unquoted "
                        "yes/no/true/false/on/off/~",
                        'quote the raw value as the data writes it, e.g. "yes": ... or "true": ...',
                    )
    for j, n in enumerate(names):
        if names.index(n) != j:  # at the later entry, which is the one to rename
            bad(
                ("tasks", j),
                f"task name '{n}' used twice (tasks[{names.index(n)}] and tasks[{j}])",
                "give one of them a distinct 'name'",
            )
    if not cfg.mixing.temperature > 0:  # also NaN
        bad(("mixing", "temperature"), "must be > 0", "1 = proportional, larger = closer to equal")
    if cfg.mixing.cap is not None and cfg.mixing.cap <= 0:
        bad(("mixing", "cap"), "must be a positive number of examples (or null for no cap)")
    stage_names = [s.name for s in cfg.stages]
    for i, s in enumerate(cfg.stages):
        safe_name(("stages", i, "name"), s.name)
        if isinstance(s.name, str) and s.name and stage_names.index(s.name) != i:
            bad(
                ("stages", i, "name"),
                f"stage name '{s.name}' used twice",
                "each stage saves RUN/stages/<name>/: give it a distinct name",
            )
        if s.steps <= 0:
            bad(("stages", i, "steps"), "must be > 0")
        if not s.tasks:
            bad(("stages", i, "tasks"), "lists no tasks")
        for j, tn in enumerate(s.tasks):
            if tn not in names:
                bad(("stages", i, "tasks", j), f"unknown task '{tn}'", did_you_mean(tn, names))
        if s.temperature is not None and not s.temperature > 0:  # also NaN
            bad(("stages", i, "temperature"), "must be > 0")
        if s.learning_rate is not None and s.learning_rate <= 0:
            bad(
                ("stages", i, "learning_rate"),
                "must be > 0",
                "leave it out to use train.learning_rate",
            )
        if s.ewc is not None:
            if i == 0:
                bad(
                    ("stages", i, "ewc"),
                    "the first stage has no earlier stage to protect",
                    "set ewc on a later stage: it penalises moving away from the stages before it",
                )
            if not s.ewc.lam > 0:
                bad(
                    ("stages", i, "ewc", "lambda"),
                    "must be > 0",
                    "the strength of the penalty (lambda/2) · Σ F (θ − θ*)²",
                )
            if s.ewc.samples <= 0:
                bad(("stages", i, "ewc", "samples"), "must be > 0", "records per Fisher estimate")
            if not 0 <= s.ewc.gamma <= 1:
                bad(
                    ("stages", i, "ewc", "gamma"),
                    "must be in [0, 1]",
                    "online EWC's decay of older stages' Fisher: 1 keeps all, 0 only the latest",
                )
        layer_range(("stages", i, "train_layers"), s.train_layers)
    # What the mixture of each stage (or of the one implicit stage) needs of its tasks' floors,
    # ceilings and weights, checked here, before any data is read (mixture.mixing_rates would
    # find the same after reading it, without a line to point at).
    by_name = {n: t for n, t in zip(names, cfg.tasks)}
    groups = [(("stages", i, "tasks"), s.name, s.tasks, i > 0) for i, s in enumerate(cfg.stages)]
    for where, stage, members, later in groups or [(("tasks",), None, names, False)]:
        ts = [by_name[n] for n in dict.fromkeys(members) if n in by_name]
        if not ts:
            continue
        label = f"stage '{stage}'" if stage is not None else "the mixture"
        replayed = cfg.replay.enabled and later  # a replay member (no floor, no ceiling) joins
        floors = [(t, t.floor) for t in ts if isinstance(t.floor, (int, float))]
        if sum(f for _, f in floors) > 1 + 1e-9:
            bad(
                where,
                f"{label}: floors of {', '.join(cfg.task_name(t) for t, _ in floors)} sum to "
                f"{sum(f for _, f in floors):g}, more than the whole",
                "lower some task's floor",
            )
        ceilings = [t.ceiling if isinstance(t.ceiling, (int, float)) else 1.0 for t in ts]
        if not replayed and sum(ceilings) < 1 - 1e-9:
            bad(
                where,
                f"{label}: the ceilings of its tasks sum to {sum(ceilings):g}, less than the whole",
                "raise some task's ceiling, or add a task without one",
            )
        weights = [t.weight for t in ts if isinstance(t.weight, (int, float))]
        if weights and len(weights) == len(ts) and not replayed and sum(weights) <= 0:
            bad(where, f"{label}: every task's weight is 0", "give at least one task a weight > 0")
        elif weights and len(weights) < len(ts) and sum(weights) >= 1 - 1e-9:
            bad(
                where,
                f"{label}: the tasks with a weight take {sum(weights):g} of the mixture, "
                "leaving nothing for the tasks without one",
                "give every task a weight (then they are relative), or weights summing below 1",
            )
    if cfg.replay.share is not None and not 0 <= cfg.replay.share < 1:
        bad(("replay", "share"), "must be in [0, 1)")
    if cfg.replay.per_task < 0:
        bad(("replay", "per_task"), "must be >= 0")
    tr = cfg.train
    for k in ("steps", "batch_size", "grad_accum", "logging_steps", "save_steps"):
        if getattr(tr, k) <= 0:
            bad(("train", k), "must be > 0")
    if tr.learning_rate <= 0:
        bad(("train", "learning_rate"), "must be > 0")
    for i, name in enumerate(tr.report_to if isinstance(tr.report_to, list) else []):
        if name not in REPORT_TO:
            bad(
                ("train", "report_to", i),
                f"unknown tracker {name!r}",
                did_you_mean(str(name), REPORT_TO) or f"expected: {', '.join(REPORT_TO)}",
            )
        elif name == "none" and len(tr.report_to) > 1:
            bad(("train", "report_to", i), "'none' cannot be combined with trackers")
    if not 0 < tr.layer_lr_decay <= 1:
        bad(
            ("train", "layer_lr_decay"),
            "must be in (0, 1]",
            "layer l trains at lr · decay^(L−1−l); 1 = the same rate everywhere",
        )
    if tr.unfreeze_every < 0:
        bad(("train", "unfreeze_every"), "must be >= 0", "0 = every block trains from the start")
    if tr.prefetch < 0:
        bad(
            ("train", "prefetch"),
            "must be >= 0",
            "windows built ahead in a background thread; 0 = build each when its step starts",
        )
    gc = tr.gradient_checkpointing
    if not isinstance(gc, bool) and (not isinstance(gc, int) or gc < 1):
        bad(
            ("train", "gradient_checkpointing"),
            f"invalid value {gc!r}",
            "off, on, or a whole number N >= 1 to checkpoint every N-th block",
        )
    if tr.gradient_surgery == "pcgrad" and tr.loss_balancing == "gradnorm":
        bad(
            ("train", "gradient_surgery"),
            "pcgrad cannot be combined with train.loss_balancing: gradnorm",
            "both steer per-task gradients: use pcgrad with none/equal/uncertainty",
        )
    for k in ("warmup_steps", "save_total_limit"):
        if getattr(tr, k) < 0:
            bad(("train", k), "must be >= 0")
    for k in ("weight_decay", "max_grad_norm"):
        if not getattr(tr, k) >= 0:  # also NaN
            bad(("train", k), "must be >= 0", "0 turns it off" if k == "max_grad_norm" else "")
    if not tr.gradnorm_alpha > 0:
        bad(("train", "gradnorm_alpha"), "must be > 0", "GradNorm's restoring force; 1.5 is usual")
    if isinstance(tr.resume, str) and tr.resume not in ("auto", "never"):
        if not re.search(r"(^|[/\\])step-\d+[/\\]?$", tr.resume.strip()):
            bad(
                ("train", "resume"),
                f"{tr.resume!r} is neither auto, never nor a checkpoint folder",
                "auto resumes from the run's latest checkpoint, never starts over, "
                "RUN/checkpoints/step-N resumes from that one",
            )
    layer_range(("adapter", "layers"), cfg.adapter.layers)
    if cfg.adapter.r <= 0:
        bad(("adapter", "r"), "must be > 0")
    if cfg.adapter.alpha <= 0:
        bad(
            ("adapter", "alpha"),
            "must be > 0",
            "LoRA scales its update by alpha / r; 2 x r is usual",
        )
    if not 0 <= cfg.adapter.dropout < 1:
        bad(("adapter", "dropout"), "must be in [0, 1)")
    if cfg.adapter.layers is not None and all(isinstance(v, int) for v in cfg.adapter.layers):
        first, last = (cfg.adapter.layers + [None, None])[:2]
        for i, s in enumerate(cfg.stages):
            tl = s.train_layers
            if (
                tl is None
                or len(tl) != 2
                or not all(isinstance(v, int) for v in tl)
                or last is None
            ):
                continue
            # comparable only when both count from the same end (the model's depth is not known here)
            # (a partial overlap trains the blocks in both; none trains nothing)
            if (tl[0] < 0) == (first < 0) and (tl[1] < 0) == (last < 0):
                if tl[1] < first or tl[0] > last:
                    bad(
                        ("stages", i, "train_layers"),
                        f"{tl} covers none of adapter.layers {cfg.adapter.layers}: the stage "
                        "would train nothing",
                        "a stage trains some of the blocks that have adapters: a range inside "
                        "adapter.layers",
                    )
    if cfg.model.max_length <= 8:
        bad(("model", "max_length"), "too small", "use at least 64 tokens")
    if cfg.model.max_target_length <= 0:
        bad(("model", "max_target_length"), "must be > 0")
    for k in ("limit", "every_steps"):
        if getattr(cfg.eval, k) < 0:
            bad(
                ("eval", k),
                "must be >= 0",
                "0 scores every row" if k == "limit" else "0 evaluates only at the end",
            )
    if cfg.eval.batch_size <= 0:
        bad(("eval", "batch_size"), "must be > 0")
    if cfg.eval.ci_resamples < 0:
        bad(("eval", "ci_resamples"), "must be >= 0", "0 turns the confidence intervals off")
    if cfg.eval.max_new_tokens <= 0:
        bad(("eval", "max_new_tokens"), "must be > 0")


def config_notes(cfg: RunConfig) -> list[str]:
    """Settings that are valid but do nothing in this config, as notes for the user (not errors:
    an evaluation-only task, say, is a choice)."""
    notes = []
    if cfg.stages:
        staged = {n for s in cfg.stages for n in s.tasks}
        for n in cfg.task_names():
            if n not in staged:
                notes.append(f"note: task '{n}' is in no stage: evaluated, never trained")
    if cfg.replay.enabled and len(cfg.stage_list()) < 2:
        notes.append(
            "note: replay.enabled does nothing with one stage (replay mixes earlier stages' "
            "records into later ones)"
        )
    return notes


def _set_path(
    data: dict, dotted: str, value: Any, problems: list[Problem], ov: str = ""
) -> tuple | None:
    """Set `dotted` (an override's key) in `data`; returns the key path set, or None on a problem
    (named by `ov`, the override as written)."""
    ov = ov or dotted
    parts = dotted.split(".")
    cur: Any = data
    done: list = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        key: Any = int(part) if part.isdigit() and isinstance(cur, list) else part
        if isinstance(cur, list):
            if not isinstance(key, int) or not -len(cur) <= key < len(cur):
                problems.append(
                    Problem(
                        "<override>",
                        None,
                        f"{ov}: no list item '{part}'",
                        f"the list has {len(cur)} item(s), numbered from 0",
                    )
                )
                return None
        done.append(key)
        if last:
            cur[key] = value
            return tuple(done)
        if isinstance(cur, dict) and (key not in cur or cur[key] is None):
            cur[key] = {}
        cur = cur[key]
        if not isinstance(cur, (dict, list)):
            problems.append(Problem("<override>", None, f"{ov}: '{part}' is not a section"))
            return None
    return None


class _OverrideLocated(yaml_lines.Located):
    """A config's Located whose problems in a value set by a `key=value` override name the
    override as the user wrote it (`<override>: stages.0.name=..: ...`), not a file line."""

    def __init__(self, loc: yaml_lines.Located, overridden: dict[tuple, str]):
        super().__init__(loc.data, loc.lines, loc.file)
        self.overridden = overridden

    def problem(self, path: yaml_lines.KeyPath, message: str, hint: str = "") -> Problem:
        path = tuple(path)
        for n in range(len(path), 0, -1):  # the innermost override that set this value
            ov = self.overridden.get(path[:n])
            if ov is not None:
                return Problem("<override>", None, f"{ov}: {message}", hint)
        if path and path not in self.lines:  # a key no file holds: an override created it
            for key, ov in self.overridden.items():  # (`trian.steps=3` made `trian`)
                if key[: len(path)] == path:
                    return Problem("<override>", None, f"{ov}: {message}", hint)
        return super().problem(path, message, hint)


def find_config(path: str | Path) -> Path:
    """The run config file `path` names: the file itself, else a shipped config of that name
    (`default`, `tiny_cpu.yaml`: `core.shipped`, found from any folder). A ConfigError when it is
    neither, listing what was tried and the shipped names."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    found = shipped.shipped_config(str(path))
    if found is not None:
        return found
    names = shipped.config_names()
    raise ConfigError(
        Problem(
            str(path),
            None,
            "run config not found",
            f"tried {p.resolve()} and the shipped configs in {shipped.CONFIGS}"
            + (f"; {did_you_mean(Path(str(path)).stem, names)}" if names else ""),
        )
    )


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    data: dict | None = None,
    *,
    collect: list[Problem] | None = None,
) -> RunConfig:
    """Load a run config from YAML (or a dict) and apply `key=value` overrides.

    `path` is a file, or the name of a shipped config (`default`; `find_config`).
    Overrides use dotted keys (`train.steps=20`, `tasks.0.source.path=data/x`);
    values are parsed as YAML (`model.dtype=bfloat16`, `stages.0.tasks=[a,b]`).
    Raises ConfigError listing every problem found; with `collect` (a list) the problems are
    appended to it instead and the config is returned as far as it could be built (for callers
    that report them together with the cross-checks, `RunConfig.problem` placing each one).
    """
    problems: list[Problem] = []
    if path is not None:
        path = find_config(path)
        loc = yaml_lines.load(path)
        if loc.data is None:
            loc.data = {}
    else:
        loc = yaml_lines.Located(dict(data or {}), {(): 1}, "<config>")
    if not isinstance(loc.data, dict):
        raise ConfigError([Problem(loc.file, 1, "a run config must be a YAML mapping")])
    if path is not None and not loc.data:
        raise ConfigError(
            Problem(
                loc.file, 1, "the run config is empty", "start from launch/configs/default.yaml"
            )
        )
    if "variants" in loc.data and "tasks" not in loc.data:  # one line, not a key error per key
        raise ConfigError(
            Problem(
                loc.file,
                loc.lines.get(("variants",), 1),
                "this is a task template (it has variants:), not a run config",
                f"a run config names it under tasks: [{{template: {loc.data.get('name', 'NAME')}}}]; "
                f"check the template with: t2t-mtl validate {loc.file}",
            )
        )
    overridden: dict[tuple, str] = {}
    for ov in overrides or []:
        if "=" not in ov:
            problems.append(
                Problem("<override>", None, f"'{ov}' is not key=value", "e.g. train.steps=20")
            )
            continue
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            if raw.lstrip()[:1] in ("[", "{", '"', "'"):  # meant as a list, mapping or quoted text
                why = str(getattr(e, "problem", None) or e).splitlines()[0]
                problems.append(
                    Problem(
                        "<override>",
                        None,
                        f"{ov}: the value is not valid YAML ({why})",
                        "close every [ { and quote; quote the whole override for the shell: "
                        "'train.report_to=[tensorboard]'",
                    )
                )
                continue
            value = raw  # plain text YAML cannot read (e.g. "a: b: c") is meant as text
        where = _set_path(loc.data, key.strip(), value, problems, ov)
        if where is not None:
            overridden[where] = ov
    if overridden:
        loc = _OverrideLocated(loc, overridden)
    cfg = _build(RunConfig, loc.data, (), loc, problems)
    cfg.config_path = str(path) if path is not None else None  # relative paths resolve from here
    _stage_tasks_by_path(cfg)
    try:
        _check_values(cfg, loc, problems)
    except TypeError:  # a value of the wrong type was already reported above
        pass
    cfg.located = loc
    # In the order of the file (overrides first), whichever check found them.
    problems.sort(key=lambda p: (p.file != "<override>", p.file, p.line or 0))
    if collect is not None:
        collect.extend(problems)
    elif problems:
        raise ConfigError(problems)
    return cfg


def _key(f: dataclasses.Field) -> str:
    """The YAML key of a config field: its name, or `metadata["key"]` (e.g. `lambda`)."""
    return f.metadata.get("key", f.name)


def _as_dict(obj: Any) -> Any:
    """`dataclasses.asdict` with YAML keys (`_key`), so the dict loads back with `load_config`."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {_key(f): _as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _as_dict(v) for k, v in obj.items()}
    return obj


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain dict of the resolved config (saved in the run folder)."""
    d = _as_dict(cfg)
    d.pop("config_path", None)
    d.pop("located", None)
    return d
