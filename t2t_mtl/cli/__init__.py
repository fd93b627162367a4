"""The t2t-mtl command line; heavy imports happen inside the verb that needs them."""

from __future__ import annotations

from typing import Any

from t2t_mtl.core.errors import ConfigError, Problem
from t2t_mtl.core.files import output_path_problem


def check_outputs(*checks: tuple[str, Any, bool, tuple]) -> None:
    """Refuse, before any work, output paths that cannot be written (`core.files.
    output_path_problem`): each check is (option as the user typed it, path or None, is a folder,
    the input paths it must not replace); every bad one is reported at once (ConfigError, exit 2)."""
    problems = [
        Problem("<cli>", None, f"{opt}: {why}", "give another path")
        for opt, path, folder, inputs in checks
        if (why := output_path_problem(path, folder=folder, inputs=inputs))
    ]
    if problems:
        raise ConfigError(problems)
