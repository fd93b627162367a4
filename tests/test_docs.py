"""The README's file tree cannot drift: it lists every project file and names nothing that is missing.

An entry is the first word of a line in the code block under "## File tree": a file
(`t2t_mtl/core/errors.py`), a folder (`tests/fixtures/`) or a pattern, where `<name>` stands for one
path part, `*` for any characters within a part and `{a,b}` for alternatives
(`data/<task>/{train,validation}.jsonl`). Every module under t2t_mtl/, every test file and test
helper module, bench script, launch file, docs page and task template must appear under its own
path (a pattern does not count: the tree says what each file is); every entry must name something
that exists. The t2t_mtl/ subpackages appear in the order of `t2t_mtl.LAYERS`.
"""

from __future__ import annotations

import re
from pathlib import Path

import t2t_mtl

ROOT = Path(__file__).resolve().parents[1]
_WILD = re.compile(r"[<>*{}?\[\]]")


def tree_entries(readme: str) -> list[str]:
    """First word of every non-blank line of the code block under the "## File tree" heading."""
    lines = readme.splitlines()
    start = lines.index("## File tree")
    fence = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
    return [ln.split()[0] for ln in lines[fence + 1 : end] if ln.strip()]


def _expand(entry: str) -> list[str]:
    """`{a,b}` alternatives expanded, `<name>` turned into `*`."""
    m = re.search(r"\{([^{}]*)\}", entry)
    if m:
        return [
            e
            for alt in m.group(1).split(",")
            for e in _expand(entry[: m.start()] + alt + entry[m.end() :])
        ]
    return [re.sub(r"<[^<>/]+>", "*", entry)]


def exists(entry: str, root: Path) -> bool:
    """Whether the entry names an existing file or folder (a pattern: at least one match)."""
    if not _WILD.search(entry):
        return (root / entry).exists()
    return all(any(root.glob(pat)) for pat in _expand(entry))


def required_files(root: Path) -> set[str]:
    """The files the tree must list by their own path (repository-relative, `/`-separated)."""
    found: set[Path] = set()
    found.update((root / "t2t_mtl").rglob("*.py"))
    found.update((root / "tests").glob("*.py"))
    found.update((root / "bench").glob("*.py"))
    found.update(p for p in (root / "launch").rglob("*") if p.is_file())
    found.update((root / "docs").glob("*.md"))
    found.update((root / "task_templates").rglob("*.yaml"))
    return {
        p.relative_to(root).as_posix()
        for p in found
        if "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def tree_problems(entries: list[str], root: Path) -> list[str]:
    """What is wrong with a file tree: files it leaves out, entries naming nothing, layer order."""
    listed = {e for e in entries if not _WILD.search(e)}
    out = [f"not in the README file tree: {f}" for f in sorted(required_files(root) - listed)]
    out += [f"README file tree names a missing path: {e}" for e in entries if not exists(e, root)]
    seen: list[str] = []
    for e in entries:
        parts = e.split("/")
        if parts[0] == "t2t_mtl" and len(parts) > 2 and parts[1] not in seen:
            seen.append(parts[1])
    layers = [name for name, _ in t2t_mtl.LAYERS]
    if seen != layers:
        out.append(f"t2t_mtl subpackages listed in the order {seen}, LAYERS says {layers}")
    return out


def test_readme_file_tree_matches_the_repository():
    entries = tree_entries((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(entries) == len(set(entries)), "an entry is listed twice"
    problems = tree_problems(entries, ROOT)
    assert not problems, "\n".join(problems)


def test_tree_check_reports_drift(tmp_path):
    """The checker itself: a new module, a vanished file and a bad pattern are each reported."""
    for rel in ("t2t_mtl/__init__.py", "t2t_mtl/core/errors.py", "docs/a.md", "data/x/train.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("", encoding="utf-8")
    for layer, _ in t2t_mtl.LAYERS:
        (tmp_path / "t2t_mtl" / layer).mkdir(parents=True, exist_ok=True)
    good = ["t2t_mtl/__init__.py", "t2t_mtl/core/errors.py", "docs/a.md", "data/<task>/*.jsonl"]
    good += [f"t2t_mtl/{layer}/" for layer, _ in t2t_mtl.LAYERS[1:]]
    assert tree_problems(good, tmp_path) == []

    (tmp_path / "t2t_mtl" / "core" / "new.py").write_text("", encoding="utf-8")
    assert tree_problems(good, tmp_path) == ["not in the README file tree: t2t_mtl/core/new.py"]
    (tmp_path / "t2t_mtl" / "core" / "new.py").unlink()

    assert tree_problems([*good, "docs/gone.md", "data/<task>/{train,test}.jsonl"], tmp_path) == [
        "README file tree names a missing path: docs/gone.md",
        "README file tree names a missing path: data/<task>/{train,test}.jsonl",
    ]
    swapped = [good[0], good[1], good[2], good[3], *reversed(good[4:])]
    assert any("order" in p for p in tree_problems(swapped, tmp_path))
    # a pattern does not stand for a file the tree must name by its own path
    assert tree_problems([e for e in good if e != "docs/a.md"] + ["docs/*.md"], tmp_path) == [
        "not in the README file tree: docs/a.md"
    ]
