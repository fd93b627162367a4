"""Atomic file and folder writes: a reader sees the old content or the new, never a partial one.

A file is written to a sibling `<name>.tmp` and renamed over the target (`os.replace`, atomic on
POSIX and Windows within one file system); if writing fails the temporary file is removed and the
target is left as it was. A folder is built in a temporary sibling (`temp_folder_beside`) and then
swapped in (`swap_folder`). Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "output_path_problem",
    "read_json_object",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "swap_folder",
    "temp_folder_beside",
]


def output_path_problem(
    path: str | os.PathLike | None,
    *,
    folder: bool = False,
    inputs: tuple[str | os.PathLike | None, ...] = (),
) -> str:
    """Why `path` cannot be written as an output file (`folder`: an output folder), or "" when it
    can: an empty name; a folder where a file is meant or a file where a folder is; a file in the
    way of a folder above it; one of `inputs` or a path inside an input that is a folder (writing
    would replace, or add to, what is being read: a config, template, data source or the parts of
    a run folder, `runs.folder.owned_paths`). Checked
    before any work, so a user mistake costs nothing and destroys nothing."""
    if path is None:
        return ""
    if str(path).strip() == "":
        return "the path is empty"
    p = Path(path).expanduser()
    if not folder and p.is_dir():
        return f"{p} is a folder; give a file name"
    if folder and p.exists() and not p.is_dir():
        return f"{p} is a file, not a folder"
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, so nothing can be written inside it"
            break
    target = p.resolve()
    for src in inputs:
        if src is None or not str(src).strip():
            continue
        q = Path(src).expanduser().resolve()
        if q == target:
            return f"{p} is also an input of this command: writing would replace what is being read"
        if q.is_dir() and q in target.parents:
            return (
                f"{p} lies inside {q}, which this command reads: writing there could replace or "
                "add to what is read"
            )
    return ""


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing (`mode` "w" text UTF-8, or "wb"); on a clean
    exit it replaces `path`, on an exception it is deleted and `path` is untouched.

    For writers that stream (JSON lines); `atomic_write_text` and friends cover whole contents.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with tmp.open(mode, encoding="utf-8" if mode == "w" else None) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (the same bytes as `Path.write_text`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int | None = 1,
    ensure_ascii: bool = True,
    allow_nan: bool = True,
    end: str = "\n",
) -> None:
    """Write `json.dumps(obj, indent=..., ensure_ascii=..., allow_nan=...) + end` atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii, allow_nan=allow_nan)
    atomic_write_text(path, text + end)


@contextlib.contextmanager
def temp_folder_beside(target: str | os.PathLike) -> Iterator[Path]:
    """A new empty folder `.<name>.tmp-XXXX` next to `target` (parents created), removed on exit
    unless it was swapped in meanwhile (`swap_folder`): build a folder in it, then swap."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_folder(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Replace folder `target` (if any) by the finished folder `tmp` on the same file system.

    The old folder is first renamed aside (`.<name>.old-XXXX`), put back if `tmp` cannot take its
    name, and deleted only once the new one is in place: a reader never sees a partial folder, and
    an old one is never half-deleted (`target` is absent only between the two renames).
    """
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
