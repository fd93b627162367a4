"""Golden records: every shipped template, every variant, on the first bundled sample rows, byte for byte.

A change to a template's wording, to the renderer or to the bundled samples shows up here as a diff.
When the change is intended, regenerate the files and review the diff before committing:

    .venv/bin/python -m tests.test_golden_records --regen
    T2T_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_records.py

(and bump the template's `version:` when its prompts changed).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python -m tests.test_golden_records` from anywhere
    sys.path.insert(0, str(ROOT))

from t2t_mtl.tasks import (
    catalogue,
    sources,
)

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
ROWS = 5  # first rows of each sample split
SPLITS = ("train", "validation")
REGEN_ENV = "T2T_REGEN_GOLDEN"


def shipped_tasks() -> list[str]:
    """Names of the templates in task_templates/ (not user folders)."""
    shipped = catalogue.SHIPPED_DIR.resolve()
    return sorted(
        n for n, p in catalogue.find_task_files().items() if p.parent.resolve() == shipped
    )


def render_golden(name: str) -> str:
    """The golden text of one task: JSON lines of every variant on the first ROWS rows of each sample split."""
    tpl = catalogue.load_task_file(catalogue.SHIPPED_DIR / f"{name}.yaml")
    lines = []
    for split in SPLITS:
        rows = sources.load_rows(tpl, None, split, bad_rows="fail", limit=ROWS)
        for i in range(len(rows)):
            for v in tpl.variants:
                rec = tpl.render(rows[i], v, row_id=str(i), split=split)
                lines.append(json.dumps(rec.to_dict(), ensure_ascii=False, sort_keys=True))
    return "\n".join(lines) + "\n"


def regenerate(names: list[str] | None = None) -> list[Path]:
    """Write tests/golden/<task>.jsonl for the given (default: all shipped) tasks; returns the files."""
    GOLDEN_DIR.mkdir(exist_ok=True)
    out = []
    for name in names or shipped_tasks():
        path = GOLDEN_DIR / f"{name}.jsonl"
        path.write_bytes(render_golden(name).encode("utf-8"))
        out.append(path)
    return out


def _first_difference(want: str, got: str) -> str:
    for n, (a, b) in enumerate(zip(want.splitlines(), got.splitlines()), 1):
        if a != b:
            return f"line {n}:\n  golden:   {a[:300]}\n  rendered: {b[:300]}"
    return f"golden has {len(want.splitlines())} lines, rendered {len(got.splitlines())}"


@pytest.mark.parametrize("name", shipped_tasks())
def test_golden_records(name):
    path = GOLDEN_DIR / f"{name}.jsonl"
    got = render_golden(name)
    if os.environ.get(REGEN_ENV) == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(got.encode("utf-8"))
    assert path.is_file(), (
        f"no golden file for {name}; create it with `python -m tests.test_golden_records --regen`"
    )
    want = path.read_bytes().decode("utf-8")
    assert got == want, (
        f"{name}: rendered records differ from {path.name} ({_first_difference(want, got)}); if the "
        f"change is intended run `python -m tests.test_golden_records --regen` and review the diff"
    )


def test_golden_files_cover_every_variant_and_no_stale_files():
    names = shipped_tasks()
    assert len(names) >= 7
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.jsonl")) == names, (
        "a golden file without a template (or missing)"
    )
    for name in names:
        tpl = catalogue.load_task(name)
        assert len(tpl.variants) >= 3 and any(v.heldout for v in tpl.variants), name
        recs = [
            json.loads(line)
            for line in (GOLDEN_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        assert {r["meta"]["variant"] for r in recs} == {v.id for v in tpl.variants}, name
        assert all(r["task"] == name and r["input"] and r["output"] for r in recs), name


def main(argv: list[str]) -> int:
    """`python -m tests.test_golden_records --regen [TASK ...]`: rewrite golden files."""
    if not argv or argv[0] != "--regen":
        print(__doc__)
        return 2
    for path in regenerate(argv[1:] or None):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
