"""Error types that carry every problem found, not just the first.

A user mistake (bad template, bad row, bad config key) is reported as one
`file:line: message (hint)` line per problem and a non-zero exit; the CLI
catches `T2TError` so the user never sees a traceback for their own mistake.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ConfigError",
    "DataError",
    "Problem",
    "T2TError",
    "TemplateError",
    "RepeatTally",
    "did_you_mean",
]


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


class RepeatTally:
    """Problems as they are found, keeping at most `keep` that share a file, message and hint and
    counting the rest: one cause, such as a misnamed column, fails every row the same way, and a
    user needs a few of its lines, not one per row. `cap` (None = no cap) bounds the problems kept
    in all; beyond it they are only counted, with their group."""

    def __init__(self, keep: int = 3, cap: int | None = None):
        self.keep, self.cap = keep, cap
        self.kept: list[Problem] = []
        self._shown: dict[tuple, int] = {}  # group -> problems kept
        self._extra: dict[tuple, list] = {}  # group -> [count, first, last line] of those not kept

    def add(self, p: Problem) -> None:
        key = (p.file, p.message, p.hint)
        if self._shown.get(key, 0) < self.keep and (self.cap is None or len(self.kept) < self.cap):
            self._shown[key] = self._shown.get(key, 0) + 1
            self.kept.append(p)
            return
        extra = self._extra.setdefault(key, [0, None, None])  # count, first and last line
        extra[0] += 1
        if p.line is not None:
            extra[1] = p.line if extra[1] is None else min(extra[1], p.line)
            extra[2] = p.line if extra[2] is None else max(extra[2], p.line)

    def problems(self, order: Callable[[Problem], Any] | None = None) -> list[Problem]:
        """The kept problems (sorted by `order` when given), each group's count of the rest on a
        line after its last kept one: "file:5: the same on 14 more line(s) (lines 5-18): <message>"."""
        kept = sorted(self.kept, key=order) if order is not None else list(self.kept)
        last = {(p.file, p.message, p.hint): i for i, p in enumerate(kept)}
        after = {i: key for key, i in last.items() if key in self._extra}
        out: list[Problem] = []
        for i, p in enumerate(kept):
            out.append(p)
            if i in after:
                n, first, last = self._extra[after[i]]
                where = f" (lines {first}-{last})" if first is not None and last != first else ""
                out.append(
                    Problem(
                        p.file, first, f"the same on {n} more line(s){where}: {p.message}", p.hint
                    )
                )
        return out
