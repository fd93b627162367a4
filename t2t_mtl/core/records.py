"""The unified record every task renders to, and JSONL read/write.

`input` and `output` stay separate all the way to the collator: the model's
prompt is built from (instruction, input) and the target from output, so the
answer is never located by string search.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from t2t_mtl.core.errors import DataError, Problem
from t2t_mtl.core.files import atomic_open

__all__ = ["RECORD_FIELDS", "Record", "read_jsonl", "write_jsonl"]

RECORD_FIELDS = ("task", "instruction", "input", "output")


@dataclass
class Record:
    """One rendered example: `{task, instruction, input, output}` plus metadata.

    meta keys set by the renderer: `variant` (prompt variant id), `row_id`
    (source row id or index), `split`, `template_version`; mixing adds `source`
    ("task" or "replay") where relevant.
    """

    task: str
    instruction: str
    input: str
    output: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) with the four fields and `meta`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        """Inverse of `to_dict`; unknown keys are kept in meta."""
        missing = [k for k in RECORD_FIELDS if k not in d]
        if missing:
            raise KeyError(f"record misses field(s): {', '.join(missing)}")
        meta = dict(d.get("meta") or {})
        for k, v in d.items():
            if k not in RECORD_FIELDS and k != "meta":
                meta[k] = v
        return cls(str(d["task"]), str(d["instruction"]), str(d["input"]), str(d["output"]), meta)


def write_jsonl(records: Iterable[Record], path: str | Path) -> int:
    """Write records as JSON lines (UTF-8, one object per line); returns the count."""
    n = 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:  # a crash never leaves a half-written file behind
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[Record]:
    """Read records written by `write_jsonl`; a bad line raises DataError with file:line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Record.from_dict(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(
                    [
                        Problem(
                            str(path),
                            i,
                            f"not a valid record: {e}",
                            "each line must be a JSON object with task, instruction, input, output",
                        )
                    ]
                ) from None
