"""A finished (or running) run folder, read back for evaluation, prediction and export.

Layout (written by `training.train`, see docs/architecture.md): `config.yaml` (resolved config),
`templates/` (copies of the template files the run used), `adapter/` (final bundle with
`t2t_manifest.json`), `stages/<stage>/adapter/` (one bundle per finished stage), `eval/`
(written here: evaluation results). Templates are taken from the run's copies, so a run keeps
answering with the prompts it was trained on even after the shipped templates change.

Layer 2: no torch.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from .config import RunConfig, SourceConfig, TaskConfig, load_config
from .errors import ConfigError, Problem, did_you_mean
from .templates import TaskTemplate, load_template

CONFIG_FILE = "config.yaml"
MANIFEST = "t2t_manifest.json"  # same name as modeling.MANIFEST (kept here: this layer has no torch)


class Run:
    """A run folder: its config, template copies and model bundles."""

    def __init__(self, path: Path, cfg: RunConfig):
        self.dir = Path(path)
        self.cfg = cfg
        self._templates: dict[str, TaskTemplate] = {}

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        """Open a run folder; anything that is not one is a ConfigError naming what is missing."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError(Problem(str(p), None, "run folder not found",
                                      "pass the run's output_dir (the folder with config.yaml and adapter/)"))
        if not (p / CONFIG_FILE).is_file():
            hint = "this looks like a model bundle; pass the run folder above it" if (p / MANIFEST).is_file() \
                else "pass the run's output_dir (the folder with config.yaml and adapter/)"
            raise ConfigError(Problem(str(p), None, f"not a t2t-mtl run folder (no {CONFIG_FILE})", hint))
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
            raise ConfigError(Problem(str(b), None, "the run has no final model bundle (adapter/t2t_manifest.json)",
                                      "has training finished? a checkpoint is not a bundle"))
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
            if (t.name or t.template) == name:
                return t
        raise ConfigError(Problem(str(self.dir / CONFIG_FILE), None, f"task '{name}' is not part of this run",
                                  did_you_mean(name, self.task_names())))

    def template(self, name: str) -> TaskTemplate:
        """Task `name`'s template as the run saved it (`RUN/templates/`), else from the catalogue."""
        if name not in self._templates:
            self._templates[name] = template_for(self.cfg, self.task_config(name), self.dir / "templates")
        return self._templates[name]

    def source(self, name: str) -> SourceConfig | None:
        """The task's source override with its path resolved like training resolved it."""
        return resolved_source(self.cfg, self.task_config(name))


def template_for(cfg: RunConfig, task: TaskConfig, copies: Path | None = None) -> TaskTemplate:
    """Load a task's template: the copy in `copies` when there is one, else through the catalogue
    (the shipped folder, $T2T_MTL_TEMPLATES and the config's template_dirs)."""
    stem = Path(task.template).stem if task.template.endswith((".yaml", ".yml")) else task.template
    if copies is not None:
        for cand in (copies / f"{stem}.yaml", copies / f"{stem}.yml", copies / f"{task.name}.yaml"):
            if cand.is_file():
                return load_template(cand)
    from . import tasks  # lazy: only runs without template copies need the catalogue
    tpl = tasks.load_task(task.template, [cfg.resolve_path(d) for d in cfg.template_dirs])
    if copies is not None and copies.is_dir():
        print(f"note: no copy of template '{stem}' in {copies}; using {tpl.path}", file=sys.stderr)
    return tpl


def resolved_source(cfg: RunConfig, task: TaskConfig) -> SourceConfig | None:
    """`task.source` with a relative `path` resolved against the config's folder."""
    src = task.source
    if src is not None and src.path:
        src = dataclasses.replace(src, path=str(cfg.resolve_path(src.path)))
    return src
