"""Where the shipped files are: task templates, their bundled samples and the run configs.

In a source checkout they are the checkout's own folders: `task_templates/`, `data/` and
`launch/configs/`. An installed package (`pip install .`, a wheel) carries the same three folders,
with the same layout, as package data under `t2t_mtl/shipped/` (pyproject.toml maps them there), so
`ROOT` is the one place both resolve from: a shipped template's `samples: data/sentiment_sst2` and a
shipped config name such as `default` work from any directory, installed or not.
Standard library only.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIGS", "DATA", "ROOT", "TEMPLATES", "config_names", "shipped_config"]

_PACKAGE = Path(__file__).resolve().parents[1]
_INSTALLED = _PACKAGE / "shipped"  # only in an installed package (see pyproject.toml)
ROOT = _INSTALLED if _INSTALLED.is_dir() else _PACKAGE.parent
TEMPLATES = ROOT / "task_templates"
DATA = ROOT / "data"
CONFIGS = ROOT / "launch" / "configs"


def config_names() -> list[str]:
    """Names of the shipped run configs (`default`, `tiny_cpu`, ...)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml")) if CONFIGS.is_dir() else []


def shipped_config(name: str) -> Path | None:
    """The shipped run config a bare name (`default` or `default.yaml`) stands for, else None."""
    if not name or "/" in name or "\\" in name:
        return None
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = CONFIGS / f"{stem}.yaml"
    return path if path.is_file() else None
