"""The package installs and works without the checkout: templates, samples and configs are package data.

A wheel is built offline (`pip wheel --no-deps --no-build-isolation`) from a copy of the files
pyproject.toml packages (so the checkout gets no build/ or egg-info litter). The fast test reads
the wheel's contents; the other (~20 s) installs it into a fresh venv that reuses this venv's
site-packages for the dependencies (no network), and runs `t2t-mtl validate`, `preview` and
`train --config default` from an empty folder: nothing may come from the checkout.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from t2t_mtl.core import shipped

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "t2t_mtl"


def _package_list() -> list[str]:
    """`[tool.setuptools] packages` of pyproject.toml (read without a TOML library: py3.10)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    start = text.index("packages = [", text.index("[tool.setuptools]"))
    return ast.literal_eval(text[start + len("packages = ") : text.index("]", start) + 1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the packaged files."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("t2t_mtl", "task_templates", "data", "launch/configs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    r = subprocess.run(
        [*cmd, "--no-index", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("t2t_mtl-*.whl")
    return whl


def test_pyproject_lists_every_layer():
    layers = {f"t2t_mtl.{name}" for name, _ in __import__("t2t_mtl").LAYERS}
    listed = set(_package_list())
    assert {"t2t_mtl"} | layers <= listed
    on_disk = {
        "t2t_mtl." + str(p.parent.relative_to(PKG)).replace(os.sep, ".")
        for p in PKG.rglob("__init__.py")
        if p.parent != PKG
    }
    assert on_disk <= listed, f"packages missing from pyproject.toml: {on_disk - listed}"


def test_wheel_holds_every_module_template_sample_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)).replace(os.sep, "/") for p in PKG.rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    inside = "t2t_mtl/shipped/"
    for folder, pattern in (("task_templates", "**/*.yaml"), ("data", "*/*.jsonl")):
        files = {f"{inside}{folder}/{p.relative_to(ROOT / folder).as_posix()}"
                 for p in (ROOT / folder).glob(pattern)}  # fmt: skip
        assert files and files <= names, sorted(files - names)
    configs = {f"{inside}launch/configs/{p.name}" for p in (ROOT / "launch/configs").glob("*.yaml")}
    assert f"{inside}launch/configs/default.yaml" in configs and configs <= names
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "t2t-mtl = t2t_mtl.cli.main:main" in entry


def test_shipped_files_resolve_in_the_checkout():
    assert shipped.ROOT == ROOT  # no t2t_mtl/shipped/ in a checkout
    assert shipped.TEMPLATES == ROOT / "task_templates" and shipped.shipped_config("default")
    assert shipped.shipped_config("default.yaml") == ROOT / "launch/configs/default.yaml"
    assert shipped.shipped_config("../default") is None and shipped.shipped_config("nope") is None


def test_installed_wheel_works_from_any_folder(wheel, tmp_path, tiny_causal_dir):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index"]
    r = subprocess.run([*pip, "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # The dependencies come from this venv's site-packages, added after the wheel's own folder
    # as a plain path (not a site dir: its editable-install hook for the checkout is not run).
    (purelib / "_reuse_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "T2T_MTL_TEMPLATES")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(env_dir / "bin" / "t2t-mtl"), *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    where = subprocess.check_output(
        [str(py), "-c", "import t2t_mtl.core.shipped as s; print(s.ROOT)"], cwd=work, text=True
    ).strip()
    assert Path(where) == purelib / "t2t_mtl" / "shipped"  # the installed copy, not the checkout
    r = run("validate")
    assert r.returncode == 0, r.stderr
    assert "validate: 7 template(s) OK; rendered on bundled samples:" in r.stderr
    r = run("preview", "sentiment_sst2", "-n", "2")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(recs) == 2 and all(x["task"] == "sentiment_sst2" and x["output"] for x in recs)
    r = run(
        "train",
        "--config",
        "default",
        "train.steps=1",
        "train.batch_size=2",
        "train.report_to=none",
        f"model.name={tiny_causal_dir}",
        "model.max_length=128",
        "eval.limit=2",
        "output_dir=run",
    )
    assert r.returncode == 0, r.stderr
    assert (work / "run" / "adapter" / "t2t_manifest.json").is_file()
    assert "bad rows skipped: sentiment_sst2 0" in r.stderr
