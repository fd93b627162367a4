"""YAML loading that remembers where every key came from.

Templates and run configs report problems as `file:line`; PyYAML's plain
`safe_load` forgets positions and silently keeps the last of duplicate keys,
so we compose the node tree ourselves and record the line of each key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from t2t_mtl.core.errors import Problem, T2TError

__all__ = ["KeyPath", "Located", "load", "loads"]

KeyPath = tuple  # ("variants", 0, "input")


class Located:
    """Parsed YAML data plus the 1-based line of every key path in it."""

    def __init__(self, data: Any, lines: dict[KeyPath, int], file: str):
        self.data = data
        self.lines = lines
        self.file = file

    def line(self, path: KeyPath) -> int | None:
        """Line of `path`, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)

    def problem(self, path: KeyPath, message: str, hint: str = "") -> Problem:
        """A Problem pointing at `path` in this file."""
        return Problem(self.file, self.line(path), message, hint)


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap")


def _construct(node: yaml.Node, problems: list, file: str, ctor) -> Any:
    """The Python value of a scalar node; a tag the safe loader does not know (`!custom x`,
    `!!python/object`, lm-eval's `!function`) is a problem at its line, and the value None."""
    try:
        return ctor.construct_object(node, deep=True)
    except yaml.MarkedYAMLError:
        problems.append(
            Problem(
                file,
                node.start_mark.line + 1,
                f"unsupported YAML tag {node.tag}",
                "remove the tag: t2t-mtl reads plain YAML, and a string that starts with '!' must be quoted",
            )
        )
        return None


def _walk(node: yaml.Node, path: KeyPath, lines: dict, problems: list, file: str, ctor) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
        problems.append(  # `!custom {a: 1}`: the tag would decide what this is; plain YAML only
            Problem(
                file,
                node.start_mark.line + 1,
                f"unsupported YAML tag {node.tag}",
                "t2t-mtl reads plain YAML: remove the tag",
            )
        )
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for knode, vnode in node.value:
            key = _construct(knode, problems, file, ctor)
            try:
                hash(key)
            except TypeError:  # a list or mapping used as a key (`? [a, b]`)
                problems.append(
                    Problem(
                        file,
                        knode.start_mark.line + 1,
                        "a key must be a name",
                        "write the key as plain text",
                    )
                )
                continue
            if key in out:
                problems.append(
                    Problem(
                        file,
                        knode.start_mark.line + 1,
                        f"duplicate key '{key}'",
                        "each key may appear once; remove or rename one",
                    )
                )
            sub = path + (key,)
            lines[sub] = knode.start_mark.line + 1
            out[key] = _walk(vnode, sub, lines, problems, file, ctor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _walk(v, path + (i,), lines, problems, file, ctor) for i, v in enumerate(node.value)
        ]
    return _construct(node, problems, file, ctor)


def loads(text: str, file: str = "<string>") -> Located:
    """Parse YAML text; syntax errors and duplicate keys raise T2TError with file:line."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise T2TError(
            [
                Problem(
                    file,
                    line,
                    f"YAML syntax error: {e.problem or e}",
                    "indent with spaces, not tabs"
                    if "\\t" in str(e.problem or "") or "\t" in str(e.problem or "")
                    else "check indentation and quoting: a value holding ': ' or ' #', or "
                    "starting with '{' or '[', must be quoted (in a template: Jinja text, "
                    "a list[...] type inside { })",
                )
            ]
        ) from None
    except yaml.YAMLError as e:  # pragma: no cover - non-marked errors are rare
        raise T2TError([Problem(file, None, f"YAML error: {e}")]) from None
    lines: dict[KeyPath, int] = {}
    problems: list[Problem] = []
    if node is None:
        return Located(None, {(): 1}, file)
    ctor = yaml.SafeLoader("")
    data = _walk(node, (), lines, problems, file, ctor)
    if problems:
        raise T2TError(problems)
    return Located(data, lines, file)


def load(path: str | Path) -> Located:
    """Parse a YAML file (see `loads`); a missing file is a T2TError, not a traceback."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise T2TError([Problem(str(p), None, "file not found", "check the path")]) from None
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1  # the line holding the bad byte
        col = len(raw[start : e.start].decode("utf-8", errors="replace")) + 1
        msg = f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {col}"
        line = raw[: e.start].count(b"\n") + 1
        raise T2TError([Problem(str(p), line, msg, "save the file as UTF-8")]) from None
    except OSError as e:  # a folder, no permission, ...
        raise T2TError([Problem(str(p), None, f"cannot read: {e.strerror or e}")]) from None
    return loads(text, str(p))
