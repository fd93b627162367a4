"""The README and docs cannot drift from the code.

1. Every command line they show — `t2t-mtl VERB ...`, `python bench/SCRIPT.py ...` and `accelerate launch
   ... launch/train.py ...` — names a verb or script that exists and only options it accepts, with a
   listed value where the option has choices; a `--config` file exists and every `key=value` override
   names a key the config has.
   A section that says its commands are an earlier script's ("as of commit ...") is exempt.
2. The README's file tree lists every project file and names nothing that is missing.

An entry is the first word of a line in the code block under "## File tree": a file
(`t2t_mtl/core/errors.py`), a folder (`tests/fixtures/`) or a pattern, where `<name>` stands for one
path part, `*` for any characters within a part and `{a,b}` for alternatives
(`data/<task>/{train,validation}.jsonl`). Every module under t2t_mtl/, every test file and test
helper module, bench script, launch file, docs page and task template must appear under its own
path (a pattern does not count: the tree says what each file is); every entry must name something
that exists. The t2t_mtl/ subpackages appear in the order of `t2t_mtl.LAYERS`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import t2t_mtl
from t2t_mtl.cli.main import build_parser
from t2t_mtl.core.config import load_config
from t2t_mtl.core.errors import ConfigError

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


# ------------------------------------------------------------------ documented command lines

DOCS = ("README.md", "docs")
_COMMAND = re.compile(
    r"(?:^|`|\$ |\s{2,})((?:\.venv/bin/)?(?:t2t-mtl|python3? bench/\w+\.py|accelerate launch)\b[^`\n]*)"
)
_HISTORICAL = "as of commit"  # a section whose commands are an earlier script's says so


def documented_commands(root: Path) -> list[tuple[str, str]]:
    """(where, command line) of every command the README and docs/*.md show; `where` is file:line."""
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    out = []
    for f in files:
        historical = False
        lines = f.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines, 1):
            j = i  # a command continued with a trailing backslash is read whole
            while line.endswith("\\") and j < len(lines):
                line, j = line[:-1] + " " + lines[j].strip(), j + 1
            if line.startswith("## "):
                historical = False
            historical = historical or _HISTORICAL in line
            if historical:
                continue
            out += [(f"{f.relative_to(root)}:{i}", m.group(1)) for m in _COMMAND.finditer(line)]
    return out


def command_words(line: str) -> list[str]:
    """The words of one command: no comment, pipe, redirection, continuation or `[optional]` part."""
    line = re.sub(r"\[[^\[\]]*\]", " ", line)
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: a quoted example cut by the line end
        words = line.split()
    out = []
    for w in words:
        if w in ("|", "\\", "&&", ";") or w.startswith(("2>", ">")):
            break
        out.append(w)
    return out


def _option_problems(words: list[str], options: dict[str, argparse.Action | None]) -> list[str]:
    """Options in `words` not among `options`, and values outside an option's choices."""
    out = []
    for i, w in enumerate(words):
        if not w.startswith("-") or w in ("-", "--"):
            continue
        flag = w.split("=", 1)[0]
        if flag not in options:
            out.append(f"unknown option {flag}")
            continue
        action = options[flag]
        value = w.split("=", 1)[1] if "=" in w else (words[i + 1] if i + 1 < len(words) else None)
        if (
            action is not None
            and action.choices
            and value is not None
            and action.nargs in (None, "?")
        ):
            if value not in action.choices and not value.startswith("-"):
                out.append(f"{flag} {value}: not one of {sorted(action.choices)}")
    return out


def cli_problems(words: list[str]) -> list[str]:
    """What `t2t-mtl ...` gets wrong: an unknown verb, option or choice."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if len(words) < 2:
        return []
    if words[1] not in sub.choices:
        return [f"unknown verb {words[1]}"]
    out = _option_problems(words[2:], sub.choices[words[1]]._option_string_actions)
    if "--config" in words[:-1]:
        out += _override_problems(words[words.index("--config") + 1], words[2:])
    return out


# what a config says of a key or override that cannot be applied (not of a value: an example may
# show a wrong value on purpose, with the error it gets)
_KEY_PROBLEMS = ("unknown key", "no list item", "is not a section", "is not key=value")


def _override_problems(config: str, words: list[str]) -> list[str]:
    """A documented `--config FILE key=value ...`: the file exists and every key is one it has."""
    if Path(config).stem.isupper():  # a placeholder (`--config CFG`, `--config RUN.yaml`)
        return []
    overrides = [w for w in words if "=" in w and not w.startswith("-")]
    problems: list = []
    try:
        load_config(
            ROOT / config if (ROOT / config).exists() else config, overrides, collect=problems
        )
    except ConfigError as e:  # the file itself is missing or broken
        return [f"--config {config}: {p.message}" for p in e.problems]
    return [
        f"{p.message} ({p.hint})" if p.hint else p.message
        for p in problems
        if any(k in p.message for k in _KEY_PROBLEMS)
    ]


_HELP_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def script_options(root: Path, script: str) -> dict[str, None] | None:
    """The options a bench script's --help lists (None: the script is missing or --help fails)."""
    path = root / script
    if not path.is_file():
        return None
    res = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, cwd=root, timeout=120
    )
    if res.returncode != 0:
        return None
    # the option lines only ("  -s, --seeds SEEDS   help text"), not flags the description mentions
    heads = [
        ln.strip().split("  ")[0] for ln in res.stdout.splitlines() if ln.lstrip().startswith("-")
    ]
    return {flag: None for head in heads for flag in _HELP_OPTION.findall(head)}


def test_every_documented_command_names_real_verbs_scripts_and_options():
    problems, scripts = [], {}
    for where, line in documented_commands(ROOT):
        words = command_words(line)
        if words[:2] == ["accelerate", "launch"]:  # its --config_file, then the script's own words
            if "--config_file" in words[:-1]:
                accel = words[words.index("--config_file") + 1]
                if not (ROOT / accel).is_file():
                    problems.append(f"{where}: --config_file {accel}: no such file")
            script_at = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
            if script_at is None:
                continue
            words = ["python", *words[script_at:]]
        if words and Path(words[0]).name.startswith("python"):  # python, python3, .venv/bin/python
            script = words[1]
            if script not in scripts:
                scripts[script] = script_options(ROOT, script)
            if scripts[script] is None:
                problems.append(f"{where}: {script} is missing or its --help fails")
                continue
            problems += [
                f"{where}: {script}: {p}" for p in _option_problems(words[2:], scripts[script])
            ]
            if script == "launch/train.py" and "--config" in words[:-1]:
                config = words[words.index("--config") + 1]
                problems += [f"{where}: {p}" for p in _override_problems(config, words[2:])]
        else:
            problems += [f"{where}: {p}" for p in cli_problems(words)]
    assert not problems, "\n".join(problems)


def test_command_check_reports_drift():
    """The checker itself: an unknown verb, option or choice is each reported; the good ones pass."""
    good = "t2t-mtl eval --run runs/x --mode constrained --limit 5  # a comment | not a pipe"
    assert cli_problems(command_words(good)) == []
    assert cli_problems(command_words("t2t-mtl evaluate --run r")) == ["unknown verb evaluate"]
    assert cli_problems(command_words("t2t-mtl eval --run r --limt 5")) == ["unknown option --limt"]
    assert cli_problems(command_words("t2t-mtl eval --run r --mode beam"))[0].startswith(
        "--mode beam: not one of"
    )
    assert cli_problems(command_words("t2t-mtl train --config default train.stpes=3")) == [
        "train.stpes=3: train.stpes: unknown key (did you mean 'steps'?)"
    ]
    assert cli_problems(command_words("t2t-mtl train --config default train.steps=-1")) == []
    assert cli_problems(command_words("t2t-mtl mix --config launch/configs/nope.yaml"))[
        0
    ].startswith("--config launch/configs/nope.yaml: run config not found")
    assert command_words("t2t-mtl export --run R --out D [--private] 2>&1 | tail -1") == [
        "t2t-mtl",
        "export",
        "--run",
        "R",
        "--out",
        "D",
    ]
