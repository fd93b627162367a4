"""Import layering, read from the package structure: `t2t_mtl.LAYERS` orders the subpackages (lowest
first) and `t2t_mtl.DATA_LAYERS` names those that never reach the training stack.

Every module belongs to the subpackage it sits in; a module imports only from its own layer or a lower
one (lazy imports inside functions included), and no data-layer module reaches torch & co., directly or
through another project module. A module outside every subpackage fails (put it in a layer).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import t2t_mtl

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "t2t_mtl"
LAYER = {name: i for i, (name, _) in enumerate(t2t_mtl.LAYERS)}
HEAVY = set(t2t_mtl.HEAVY_PACKAGES)


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(project modules as dotted names under t2t_mtl, top-level third-party packages) imported anywhere
    in the file, lazy and TYPE_CHECKING imports included (a type-only import still states a dependency)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    project, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                (project if a.name.split(".")[0] == "t2t_mtl" else external).add(
                    a.name if a.name.startswith("t2t_mtl") else a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom):
            if (
                node.level
            ):  # relative imports are not used: absolute ones show the layer at a glance
                project.add(f"<relative import in {path.name}>")
                continue
            mod = node.module or ""
            if mod.split(".")[0] == "t2t_mtl":
                project.add(mod)
                project.update(
                    f"{mod}.{a.name}"
                    for a in node.names
                    if (PKG.parent / f"{mod}.{a.name}".replace(".", "/"))
                    .with_suffix(".py")
                    .exists()
                    or (PKG.parent / f"{mod}.{a.name}".replace(".", "/")).is_dir()
                )
            else:
                external.add(mod.split(".")[0])
    return project, external


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def layer_of(dotted: str) -> int | None:
    """The layer of `t2t_mtl.<pkg>...`; None for the top-level package itself."""
    parts = dotted.split(".")
    return LAYER.get(parts[1]) if len(parts) > 1 else None


def test_every_subpackage_is_a_layer_and_back():
    pkgs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert pkgs == set(LAYER), f"subpackages {sorted(pkgs)} vs LAYERS {sorted(LAYER)}"
    assert set(t2t_mtl.DATA_LAYERS) <= set(LAYER)


def test_every_module_sits_in_a_layer():
    stray = [m for m in modules() if m != "t2t_mtl" and layer_of(m) is None]
    assert not stray, f"modules outside every layer subpackage: {stray}"


def test_no_relative_imports():
    bad = [
        m for m, p in modules().items() if any(d.startswith("<relative") for d in imports_of(p)[0])
    ]
    assert not bad, f"use absolute imports (t2t_mtl.<layer>.<module>): {bad}"


def test_imports_only_go_down():
    bad = []
    for name, path in modules().items():
        here = layer_of(name)
        if here is None:
            continue
        for dep in sorted(imports_of(path)[0]):
            there = layer_of(dep)
            if there is not None and there > here:
                bad.append(f"{name} (layer {here}) imports {dep} (layer {there})")
    assert not bad, "\n".join(bad)


def heavy_chains(mods: dict[str, Path]) -> list[str]:
    """Every data-layer module's project-import closure, walked for heavy packages (one path each)."""
    graph = {n: imports_of(p) for n, p in mods.items()}
    data = {LAYER[n] for n in t2t_mtl.DATA_LAYERS}
    bad = []
    for name in sorted(n for n in mods if layer_of(n) in data):
        seen, todo, chain = set(), [name], {name: [name]}
        while todo:
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
    return bad


def test_data_layers_never_reach_the_training_stack():
    bad = heavy_chains(modules())
    assert not bad, "\n".join(bad)


def test_the_check_fails_on_a_data_layer_module_that_imports_torch(tmp_path, monkeypatch):
    # The rule must be able to fail: a planted `import torch` in a tasks module is reported.
    mods = modules()
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\n", encoding="utf-8")
    mods["t2t_mtl.tasks.planted"] = planted
    assert any("t2t_mtl.tasks.planted imports torch" in b for b in heavy_chains(mods))


@pytest.mark.parametrize("layer", t2t_mtl.DATA_LAYERS)
def test_data_layers_import_cleanly_without_the_training_stack(layer):
    # Runtime check: also catches heavy imports pulled in through third-party packages.
    mods = sorted(m for m in modules() if layer_of(m) == LAYER[layer])
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"heavy packages imported by {layer}: {r.stdout}"
