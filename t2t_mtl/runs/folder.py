"""The run folder: its layout, writing its fixed parts (training) and reading it back (evaluation, prediction, export).

Layout (written by `training.trainer.train`; docs/architecture.md lists the whole folder):
`config.yaml` (resolved config), `templates/` (copies of the template files the run used),
`adapter/` (final bundle with `t2t_manifest.json`), `stages/<stage>/adapter/` (one bundle per
finished stage), `eval/` (written here: evaluation results). Templates are taken from the run's
copies, so a run keeps answering with the prompts it was trained on even after the shipped templates
change.

Writing: resolved config.yaml (local paths made absolute, so `load_config(RUN/config.yaml)` finds the
same sources, template folders and local models from anywhere), template copies, mixture.json, task manifests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from t2t_mtl.core import shipped
from t2t_mtl.core.config import RunConfig, SourceConfig, TaskConfig, config_to_dict, load_config
from t2t_mtl.core.errors import ConfigError, Problem, did_you_mean
from t2t_mtl.core.files import atomic_write_json, atomic_write_text
from t2t_mtl.tasks import catalogue
from t2t_mtl.tasks.task import Task, load_task_file

if TYPE_CHECKING:
    from t2t_mtl.mixing.mixture import StagePlan

__all__ = [
    "CONFIG_FILE",
    "MANIFEST",
    "MIXTURE_FILE",
    "TRACKERS_FILE",
    "Run",
    "clear_previous",
    "config_changes",
    "copy_templates",
    "mixture_entry",
    "read_metrics",
    "resolved_config",
    "task_for",
    "task_manifest",
    "trim_metrics",
    "write_config",
    "write_mixture",
]

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"
MIXTURE_FILE = "mixture.json"
TRACKERS_FILE = "trackers.json"  # experiment trackers' run ids, to continue them on resume
# What training, evaluation and export make a run folder of; a command that reads a run refuses
# to write over any of it (`owned_paths`), while a user's own file beside them stays theirs.
RUN_FILES = (
    CONFIG_FILE,
    MIXTURE_FILE,
    TRACKERS_FILE,
    "metrics.jsonl",
    "loss_curves.png",
    "train_summary.json",
    "run_id",
    "README.md",
)
RUN_DIRS = (
    "adapter",
    "best",
    "checkpoints",
    "eval",
    "ewc",
    "logs",
    "replay",
    "stages",
    "templates",
)
MANIFEST = "t2t_manifest.json"  # a model bundle's manifest (written by model.loading)


class Run:
    """A run folder: its config, template copies and model bundles."""

    def __init__(self, path: Path, cfg: RunConfig):
        self.dir = Path(path)
        self.cfg = cfg
        self._templates: dict[str, Task] = {}

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Open a run folder; anything that is not one is a ConfigError naming what is missing."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError(
                Problem(
                    str(p),
                    None,
                    "run folder not found",
                    "pass the run's output_dir (the folder with config.yaml and adapter/)",
                )
            )
        if not (p / CONFIG_FILE).is_file():
            hint = (
                "this looks like a model bundle; pass the run folder above it"
                if (p / MANIFEST).is_file()
                else "pass the run's output_dir (the folder with config.yaml and adapter/)"
            )
            raise ConfigError(
                Problem(str(p), None, f"not a t2t-mtl run folder (no {CONFIG_FILE})", hint)
            )
        return cls(p, load_config(p / CONFIG_FILE))

    @property
    def name(self) -> str:
        """The run's name (config run_name, else the folder name)."""
        return self.cfg.run_name or self.dir.name

    @property
    def eval_dir(self) -> Path:
        """`RUN/eval`: where evaluation results go."""
        return self.dir / "eval"

    def bundle_dir(self) -> Path:
        """The final model bundle `RUN/adapter`; a missing one is a ConfigError."""
        b = self.dir / "adapter"
        if not (b / MANIFEST).is_file():
            raise ConfigError(
                Problem(
                    str(b),
                    None,
                    "the run has no final model bundle (adapter/t2t_manifest.json)",
                    "has training finished? a checkpoint is not a bundle",
                )
            )
        return b

    def stage_bundles(self) -> list[tuple[str, Path]]:
        """(stage name, bundle folder) for every stage with a saved bundle, in stage order."""
        out = []
        for st in self.cfg.stage_list():
            b = self.dir / "stages" / st.name / "adapter"
            if (b / MANIFEST).is_file():
                out.append((st.name, b))
        return out

    # ------------------------------------------------------------------ tasks

    def task_names(self) -> list[str]:
        """Task names of the run, in config order."""
        return self.cfg.task_names()

    def task_config(self, name: str) -> TaskConfig:
        """The config entry of task `name`; unknown names get "did you mean"."""
        for t in self.cfg.tasks:
            if self.cfg.task_name(t) == name:
                return t
        raise ConfigError(
            Problem(
                str(self.dir / CONFIG_FILE),
                None,
                f"task '{name}' is not part of this run",
                did_you_mean(name, self.task_names()),
            )
        )

    def template(self, name: str) -> Task:
        """Task `name`'s template as the run saved it (`RUN/templates/`), else from the catalogue."""
        if name not in self._templates:
            self._templates[name] = task_for(
                self.cfg, self.task_config(name), self.dir / "templates"
            )
        return self._templates[name]

    def source(self, name: str) -> SourceConfig | None:
        """The task's source override with its path resolved like training resolved it."""
        return self.cfg.resolved_source(self.task_config(name))


def task_for(cfg: RunConfig, task: TaskConfig, copies: Path | None = None) -> Task:
    """Load a task's template: the copy in `copies` when there is one, else through the catalogue
    (the shipped folder, $T2T_MTL_TEMPLATES and the config's template_dirs)."""
    stem = Path(task.template).stem if task.template.endswith((".yaml", ".yml")) else task.template
    if copies is not None:
        for cand in (copies / f"{stem}.yaml", copies / f"{stem}.yml", copies / f"{task.name}.yaml"):
            if cand.is_file():
                return template_copy(cand).trained_on(task.variants)
    tpl = catalogue.load_task(task.template, [cfg.resolve_path(d) for d in cfg.template_dirs])
    if copies is not None and copies.is_dir():
        logger.warning("note: no copy of template '%s' in %s; using %s", stem, copies, tpl.path)
    return tpl.trained_on(task.variants)


# ------------------------------------------------------------------ writing (training)


def _abs(cfg: RunConfig, p: str | None) -> str | None:
    if p is None:
        return None
    rp = cfg.resolve_path(p)
    return str(rp.resolve()) if rp is not None and rp.exists() else p


def resolved_config(cfg: RunConfig) -> dict:
    """The run config as a plain dict with local paths made absolute."""
    c = dataclasses.replace(cfg, tasks=[dataclasses.replace(t) for t in cfg.tasks])
    for t in c.tasks:
        if t.template.endswith((".yaml", ".yml")):
            t.template = _abs(cfg, t.template)
        if t.source is not None and t.source.path:
            t.source = dataclasses.replace(t.source, path=_abs(cfg, t.source.path))
    c.template_dirs = [_abs(cfg, d) for d in cfg.template_dirs]
    name = cfg.model.name
    if not name.startswith("embedded:") and (
        Path(name).expanduser().exists() or cfg.resolve_path(name).exists()
    ):
        c.model = dataclasses.replace(cfg.model, name=_abs(cfg, name))
    return config_to_dict(c)


def write_config(run_dir: Path, cfg: RunConfig) -> Path:
    """`run_dir/config.yaml`: the resolved config (loads back with `config.load_config`)."""
    path = Path(run_dir) / CONFIG_FILE
    atomic_write_text(
        path, yaml.safe_dump(resolved_config(cfg), sort_keys=False, allow_unicode=True)
    )
    return path


def config_changes(run_dir: Path, cfg: RunConfig) -> list[str]:
    """Dotted keys whose value differs from the run's saved config.yaml (for a note on resume)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return []
    try:
        old = resolved_config(load_config(path))
    except Exception:  # an unreadable old config is not a reason to refuse resuming
        return ["config.yaml (unreadable)"]
    new = resolved_config(cfg)
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        elif a != b:
            out.append(prefix)

    walk(old, new, "")
    return out


ORIGINS_FILE = "origins.json"  # in RUN/templates/: copied template -> its original's folder


def copy_templates(run_dir: Path, templates: dict[str, Task]) -> dict[str, str]:
    """Copy each used template file and its includes into `run_dir/templates/` (layout kept, so
    includes still resolve); returns task -> copied file path relative to the run folder.

    `templates/origins.json` records each copy's original folder: the copy's relative `samples`
    and `source.path` keep resolving there (`template_copy`)."""
    dest_root = Path(run_dir) / "templates"
    out = {}
    origins = {}
    for task, tpl in templates.items():
        origins[Path(tpl.path).name] = str(Path(tpl.path).resolve().parent)
        base = Path(tpl.path).parent
        for f in tpl.files or [tpl.path]:
            f = Path(f)
            try:
                rel = f.resolve().relative_to(base.resolve())
            except ValueError:
                try:  # a shipped part (`include: _shared/x.yaml` from another folder): the copy
                    # keeps its path, so the copied include still finds it next to the template
                    rel = f.resolve().relative_to(shipped.TEMPLATES.resolve())
                except ValueError:  # any other include outside the template's folder: the name
                    rel = Path("_external") / f.name
            target = dest_root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
        out[task] = str(Path("templates") / Path(tpl.path).name)
    if origins:
        atomic_write_json(dest_root / ORIGINS_FILE, origins, indent=1)
    return out


def template_copy(path: Path) -> Task:
    """Load a run folder's copy of a template, its relative data paths also looked up in the
    original template's folder (`templates/origins.json`; run folders without it: as they are)."""
    data_dirs = []
    index = Path(path).parent / ORIGINS_FILE
    if index.is_file():
        try:
            origin = json.loads(index.read_text(encoding="utf-8")).get(Path(path).name)
        except (OSError, ValueError, AttributeError):
            origin = None
        if isinstance(origin, str):
            data_dirs.append(Path(origin))
    return load_task_file(path, data_dirs)


def mixture_entry(plan: StagePlan, cfg: RunConfig) -> dict:
    """One stage's table for mixture.json: per member size, target tokens, n_i and rate."""
    return {
        "stage": plan.name,
        "index": plan.index,
        "temperature": plan.temperature,
        "cap": cfg.mixing.cap,
        "unit": cfg.mixing.unit,
        "seed": plan.seed,
        "members": [
            {
                "name": m.name,
                "source": m.info.get("source", "task"),
                "examples": m.size,
                "target_tokens": round(float(m.tokens), 1),
                "tokens_exact": m.tokens_exact,
                "skipped_rows": m.skipped,
                "n_i": plan.sizes[m.name],
                "rate": plan.rates[m.name],
                **({"tasks": m.info["tasks"]} if "tasks" in m.info else {}),
            }
            for m in plan.members
        ],
    }


def write_mixture(run_dir: Path, entry: dict) -> None:
    """Insert/replace one stage's table in `run_dir/mixture.json` (kept in stage order)."""
    path = Path(run_dir) / MIXTURE_FILE
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"stages": []}
    stages = [s for s in data.get("stages", []) if s.get("stage") != entry["stage"]] + [entry]
    data["stages"] = sorted(stages, key=lambda s: s.get("index", 0))
    atomic_write_json(path, data, indent=1)


def task_manifest(cfg: RunConfig, templates: dict[str, Task], copies: dict[str, str]) -> list[dict]:
    """Per task: template name/version/type, how outputs are parsed and scored, where the copy is."""
    out = []
    for name, tc in zip(cfg.task_names(), cfg.tasks):
        tpl = templates[name]
        out.append(
            {
                "name": name,
                "template": tpl.name,
                "version": tpl.version,
                "task_type": tpl.task_type,
                "parse": tpl.parse,
                "metric": list(tpl.metric),
                "answer_choices": list(tpl.answer_choices or []),
                "eval_mode": tc.eval_mode or tpl.eval_mode,
                "loss_weight": tc.loss_weight,
                "template_file": copies.get(name),
            }
        )
    return out


def read_metrics(path: Path) -> list[dict]:
    """Rows of a run's metrics.jsonl (a truncated last line from a killed run is skipped; a missing
    file has no rows)."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def trim_metrics(run_dir: Path, last_step: int) -> None:
    """Drop metrics.jsonl rows logged after `last_step` (a killed run's tail, redone after resuming)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, TypeError, ValueError):
            continue
    atomic_write_text(path, "".join(x + "\n" for x in keep))


def clear_previous(run_dir: Path) -> None:
    """Remove a previous run's checkpoints, logs and metrics (fresh start in an existing folder).

    Only in a folder that is a run folder (has config.yaml): an output_dir pointing at some other
    folder never loses its `logs/` or other files.
    """
    if not (Path(run_dir) / CONFIG_FILE).is_file():
        return
    for name in ("checkpoints", "logs", "stages", "replay", "ewc"):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
    for name in ("metrics.jsonl", MIXTURE_FILE, "loss_curves.png", TRACKERS_FILE):
        (Path(run_dir) / name).unlink(missing_ok=True)


def owned_paths(run_dir: str | Path | None) -> tuple[Path, ...]:
    """The files and folders of the run folder `run_dir` that t2t-mtl writes (RUN_FILES, RUN_DIRS):
    the inputs an output path of a command reading the run must not replace or lie inside
    (`core.files.output_path_problem`). Empty for None."""
    if run_dir is None or not str(run_dir).strip():
        return ()
    root = Path(run_dir).expanduser()
    return tuple(root / n for n in (*RUN_FILES, *RUN_DIRS))
