"""Error types that carry every problem found, not just the first.

A user mistake (bad template, bad row, bad config key) is reported as one
`file:line: message (hint)` line per problem and a non-zero exit; the CLI
catches `T2TError` so the user never sees a traceback for their own mistake.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ConfigError", "DataError", "Problem", "T2TError", "TemplateError", "did_you_mean"]


@dataclass(frozen=True)
class Problem:
    """One problem in a user-provided file, row or setting."""

    file: str  # path as the user would recognise it, or "<config>" / "<cli>"
    line: int | None  # 1-based line (or data row number); None when unknown
    message: str
    hint: str = ""  # how to fix it ("did you mean 'label'?")

    @classmethod
    def at(cls, file: str, message: str, hint: str = "", *, line: int | None = None) -> Problem:
        """A problem about `file` (a path, or a place such as "<config>", "<mixing>", "<train>"),
        at `line` when known: `Problem.at("<config>", "model.name: no such model", "check it")`."""
        return cls(file, line, message, hint)

    def format(self) -> str:
        """Render as `file:line: message (hint)`; the form every command prints."""
        loc = f"{self.file}:{self.line}" if self.line is not None else f"{self.file}"
        text = f"{loc}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class T2TError(Exception):
    """A user-facing error carrying one or more problems.

    Raise it with every problem found so far so users fix all of them at once.
    """

    exit_code = 2

    def __init__(self, problems: Iterable[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem("<t2t-mtl>", None, problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(p.format() for p in self.problems))


class ConfigError(T2TError):
    """Invalid run configuration (unknown keys, wrong types, bad values)."""


class TemplateError(T2TError):
    """Invalid task template file."""


class DataError(T2TError):
    """Invalid data rows (missing field, wrong type, label outside the label set)."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return a hint like "did you mean 'label'?" or "" when nothing is close."""
    cands = [str(c) for c in candidates if str(c).strip()]  # an unnamed entry is no suggestion
    close = difflib.get_close_matches(str(word), cands, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if cands and len(cands) <= 12:
        return "expected one of: " + ", ".join(sorted(cands))
    return ""
