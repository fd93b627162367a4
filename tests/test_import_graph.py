"""Import layering: layers 0-2 never import the training stack; imports only go to the same or a lower layer.

The layer of each module is read from the table in docs/architecture.md (the contract), so the test
follows the document; modules listed there that do not exist yet are ignored, and a module that
exists but is missing from the table fails (add it to the table).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "t2t_mtl"
HEAVY = {"torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"}
LIGHT_LAYERS = 2  # layers 0..2 must stay free of HEAVY


def layer_table() -> dict[str, int]:
    """module name -> layer, from the `## Layers` table in docs/architecture.md."""
    out = {}
    for ln in (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*(\d+)\s*\|([^|]+)\|", ln)
        if m:
            for mod in re.findall(r"`([A-Za-z_][\w/]*)\.py`", m.group(2)):
                out[mod] = int(m.group(1))
    return out


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(project modules, top-level third-party packages) imported anywhere in the file, lazy imports included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    project, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "t2t_mtl":
                    if len(parts) > 1:
                        project.add(parts[1])
                else:
                    external.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "t2t_mtl":
                    project.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
                else:
                    external.add(parts[0])
            elif node.module:  # from .x import y / from .x.z import y
                project.add(node.module.split(".")[0])
            else:  # from . import x, y
                project.update(a.name for a in node.names)
    return project, external


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in PKG.glob("*.py") if p.stem != "__init__"}


def test_layer_table_is_parsed():
    table = layer_table()
    assert table["errors"] == 0 and table["templates"] == 1 and table["tasks"] == 2 and table["cli"] == 5


def test_every_module_is_in_the_layer_table():
    table = layer_table()
    missing = sorted(set(_modules()) - set(table))
    assert not missing, f"add these modules to the layer table in docs/architecture.md: {missing}"


def test_imports_only_go_down():
    table, mods = layer_table(), _modules()
    bad = []
    for name, path in mods.items():  # a module not written yet is checked by its table layer only
        project, _ = imports_of(path)
        for dep in sorted(project):
            if dep == "launch" or (dep in table and table[dep] > table.get(name, 99)):
                bad.append(f"{name} (layer {table.get(name)}) imports {dep} (layer {table.get(dep)})")
    assert not bad, "\n".join(bad)


def test_light_layers_never_reach_the_training_stack():
    table, mods = layer_table(), _modules()
    graph = {n: imports_of(p) for n, p in mods.items()}
    bad = []
    for name in sorted(n for n in mods if table.get(n, 99) <= LIGHT_LAYERS):
        seen, todo, chain = set(), [name], {name: [name]}
        while todo:  # walk the project-import closure, remembering one path for the message
            cur = todo.pop()
            if cur in seen or cur not in graph:
                continue
            seen.add(cur)
            project, external = graph[cur]
            for h in sorted(external & HEAVY):
                bad.append(" -> ".join(chain[cur]) + f" imports {h}")
            for dep in project:
                chain.setdefault(dep, chain[cur] + [dep])
                todo.append(dep)
    assert not bad, "\n".join(bad)


def test_light_layers_import_cleanly_without_the_training_stack():
    # Runtime check: also catches heavy imports pulled in through third-party packages.
    table, mods = layer_table(), _modules()
    light = sorted(n for n in mods if table.get(n, 99) <= LIGHT_LAYERS)
    code = ("import sys\n" + "".join(f"import t2t_mtl.{n}\n" for n in light)
            + f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"heavy packages imported by layers 0-2: {r.stdout}"
