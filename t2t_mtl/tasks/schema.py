"""The task template format: keys, enums and field types, the sandboxed Jinja environment, static checks.

`tasks.task` loads a file (+ includes) and builds a `Task`; this module judges the merged
data and compiles the variants, collecting *every* problem with the `file:line` inside the YAML file
where it sits (included files keep their own lines), so `t2t-mtl validate` lists them all at once.

Security: variants are compiled in the sandbox of `sandbox.py` (no Python internals, files or
network; text only; a render budget); the static check additionally refuses, with their line,
private names, include/import tags and what would print a Python object instead of text: a method
of a field not called (`{{ text.upper }}`) or a function not called (`{{ range }}`).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes

from t2t_mtl.core import shipped
from t2t_mtl.core.config import NAME_HINT, name_problem
from t2t_mtl.core.errors import Problem, did_you_mean
from t2t_mtl.tasks.parsing import (
    CONSTRAINED_KINDS,
    LABEL_KINDS,
    LABELS_SEPARATORS,
    OUTSIDE,
    tag_type,
    type_name_problem,
)
from t2t_mtl.tasks.parsing import KINDS as PARSE_KINDS
from t2t_mtl.tasks.sandbox import make_env, prepare

__all__ = [
    "ENV",
    "EVAL_MODES",
    "FIELD_TYPES",
    "LABEL_TASK_TYPES",
    "METRICS",
    "PARSE_KINDS",
    "PARTS",
    "POLICIES",
    "PROJECT_ROOT",
    "TASK_TYPES",
    "FieldSpec",
    "Variant",
    "check_data",
    "entity_types_of",
    "make_env",
    "data_path_candidates",
    "resolve_data_path",
    "tried",
]

# The shipped files' root (the checkout, or the installed package's data): `samples:` paths of the
# shipped templates are relative to it (`core.shipped`).
PROJECT_ROOT = shipped.ROOT
TASK_TYPES = ("classification", "nli", "qa", "ner", "summarization", "generation", "regression")
LABEL_TASK_TYPES = ("classification", "nli")
METRICS = (
    "accuracy",
    "macro_f1",
    "squad",
    "span_f1",
    "rouge",
    "set_f1",
    "bleu",
    "chrf",
    "pearson",
    "spearman",
)
# What each metric compares (evaluation/metrics.py), so the parse kinds whose predictions it can
# score: accuracy and macro_f1 compare labels (accuracy also whole label sets, set_f1 their items); squad and rouge compare texts (a label is a text),
# bleu and chrf translations or other free texts;
# span_f1 compares IOB2 tag sequences, which only `parse: entities` recovers; pearson and spearman
# correlate numbers, which only `parse: number` gives.
METRIC_PARSES = {
    "accuracy": ("label", "labels"),
    "macro_f1": ("label",),
    "squad": ("span", "text", "label"),
    "rouge": ("text", "span", "label"),
    "span_f1": ("entities",),
    "set_f1": ("labels",),
    "bleu": ("text", "span"),
    "chrf": ("text", "span"),
    "pearson": ("number",),
    "spearman": ("number",),
}
EVAL_MODES = ("generate", "rank", "constrained")  # see evaluation/evaluator.py
POLICIES = ("round_robin", "random")
FIELD_TYPES = ("str", "int", "float", "bool", "label", "list[str]", "list[label]", "list", "dict")
TOP_KEYS = (
    "name",
    "task_type",
    "version",
    "include",
    "description",
    "source",
    "samples",
    "fields",
    "label_field",
    "answer_choices",
    "entity_types",
    "variant_policy",
    "variants",
    "metric",
    "parse",
    "eval_mode",
    "max_new_tokens",
)
REQUIRED_KEYS = ("name", "task_type", "version", "fields", "variants", "metric", "parse")
SOURCE_KEYS = ("hub", "name", "revision", "path", "splits", "columns", "labels", "format")
VARIANT_KEYS = ("id", "instruction", "input", "output", "heldout")
PARTS = ("instruction", "input", "output")
CONTEXT_EXTRA = ("answer_choices",)  # names the renderer adds to every row's fields
_FORBIDDEN = {
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "from ... import",
    nodes.Extends: "extends",
}
_BLOCK_SCALAR = re.compile(r":\s*[|>][-+0-9]*\s*(#.*)?$")


ENV = make_env()


@dataclass(frozen=True)
class FieldSpec:
    """A declared row field: name, type (one of FIELD_TYPES) and whether rows must have it."""

    name: str
    type: str
    required: bool = True


@dataclass
class Variant:
    """One prompt variant: Jinja sources of the three parts plus their compiled templates."""

    id: str
    instruction: str
    input: str
    output: str
    heldout: bool = False
    compiled: dict | None = None  # part -> jinja2.Template
    lines: dict | None = None  # part -> (file, line of the part's first text line)
    # part -> the problem of a render that ran out of time: later rows fail at once, not after
    # another full budget each (a runaway template would otherwise take minutes per file).
    over_time: dict = field(default_factory=dict)


def data_path_candidates(p: str, template_path: Path, data_dirs: Sequence[Path] = ()) -> list[Path]:
    """Where a template's relative `samples`/`source.path` entry is looked for, in order: the
    template's folder, `data_dirs` (for a run folder's copy of a template: the original's folder),
    the shipped files' root (`PROJECT_ROOT`: the checkout, or the installed package's data), the
    current folder. An absolute path is itself."""
    path = Path(str(p)).expanduser()
    if path.is_absolute():
        return [path]
    out = [template_path.parent / path, *(Path(d) / path for d in data_dirs)]
    out += [PROJECT_ROOT / path, Path.cwd() / path]
    return list(dict.fromkeys(out))  # the same folder twice is tried once


def resolve_data_path(p: str, template_path: Path, data_dirs: Sequence[Path] = ()) -> Path:
    """The first candidate of `data_path_candidates` that exists (the first one when none does)."""
    cands = data_path_candidates(p, template_path, data_dirs)
    return next((c for c in cands if c.exists()), cands[0])


def tried(p: str, template_path: Path, data_dirs: Sequence[Path] = ()) -> str:
    """The hint of a path not found: every candidate that was tried."""
    found = data_path_candidates(p, template_path, data_dirs)
    cands = (os.path.normpath(c.absolute()) for c in found)
    out = "tried: " + ", ".join(dict.fromkeys(cands))
    near = []  # a near miss next to any candidate (`dose_spam` for `dose_spans`)
    for c in found:
        if c.parent.is_dir():
            names = [x.name for x in c.parent.iterdir()]
            near += difflib.get_close_matches(c.name, names, n=1, cutoff=0.75)
    if near:
        out += f"; did you mean '{Path(p).parent / near[0]}'?"
    return out


# ------------------------------------------------------------------ static checks


class _Checker:
    """Collects every static problem of one merged template, each with the file:line it comes from."""

    def __init__(self, path: Path, data: dict, origins: dict, problems: list[Problem]):
        self.path, self.data, self.origins, self.problems = path, data, origins, problems
        self._texts: dict[str, list[str]] = {}

    def at(self, kp: tuple) -> tuple[str, int]:
        kp = tuple(kp)
        while kp:
            if kp in self.origins:
                return self.origins[kp]
            kp = kp[:-1]
        return (str(self.path), 1)

    def add(self, kp: tuple, msg: str, hint: str = "", line_offset: int = 0) -> None:
        file, line = self.at(kp)
        self.problems.append(Problem(file, line + line_offset, msg, hint))

    def enum(self, kp: tuple, value: Any, choices: tuple, what: str) -> None:
        if value not in choices:
            self.add(kp, f"{what}: invalid value {value!r}", did_you_mean(str(value), choices))

    def unknown_keys(self, kp: tuple, d: dict, allowed: tuple, what: str) -> None:
        for k in d:
            if k not in allowed:
                self.add(kp + (k,), f"unknown key '{k}' in {what}", did_you_mean(str(k), allowed))

    def first_text_line(self, kp: tuple) -> tuple[str, int]:
        """Line where a part's Jinja text starts: the key's line, or the next one for `|`/`>` block scalars."""
        file, line = self.at(kp)
        if file not in self._texts:
            try:
                self._texts[file] = Path(file).read_text(encoding="utf-8").splitlines()
            except OSError:
                self._texts[file] = []
        text = self._texts[file]
        block = 0 < line <= len(text) and _BLOCK_SCALAR.search(text[line - 1]) is not None
        return file, line + (1 if block else 0)


def _check_fields(c: _Checker, raw: Any) -> dict[str, FieldSpec]:
    out: dict[str, FieldSpec] = {}
    if not isinstance(raw, dict) or not raw:
        c.add(
            ("fields",),
            "fields must be a mapping of field name -> type",
            "e.g. fields: {text: str, label: label}",
        )
        return out
    for name, spec in raw.items():
        kp = ("fields", name)
        req: Any = True
        if isinstance(spec, dict):
            c.unknown_keys(kp, spec, ("type", "required"), f"field '{name}'")
            ftype, req = spec.get("type"), spec.get("required", True)
            if not isinstance(req, bool):
                c.add(kp + ("required",), f"field '{name}': required must be true or false")
        else:
            ftype = spec
        if ftype not in FIELD_TYPES:
            c.add(
                kp, f"field '{name}': unknown type {ftype!r}", did_you_mean(str(ftype), FIELD_TYPES)
            )
        if name in CONTEXT_EXTRA:
            c.add(kp, f"field name '{name}' is reserved", "the renderer sets it from the template")
        out[str(name)] = FieldSpec(str(name), str(ftype), bool(req))
    return out


def _check_source(c: _Checker, d: dict, fields: dict) -> None:
    src = d.get("source")
    if src is None:
        return
    if not isinstance(src, dict):
        c.add(("source",), "source must be a mapping (hub, name, splits, columns, labels)")
        return
    c.unknown_keys(("source",), src, SOURCE_KEYS, "source")
    for k in ("hub", "name", "revision", "path"):
        if src.get(k) is not None and not isinstance(src[k], str):
            c.add(("source", k), f"source.{k} must be text")
    for k in ("splits", "columns", "labels"):
        if src.get(k) is not None and not isinstance(src[k], dict):
            c.add(("source", k), f"source.{k} must be a mapping")
    if src.get("format") is not None:
        c.enum(("source", "format"), src["format"], ("jsonl", "csv", "parquet"), "source.format")
    if isinstance(src.get("columns"), dict):
        seen_dst: dict[str, Any] = {}
        for col, dst in src["columns"].items():
            if str(dst) in seen_dst:
                c.add(
                    ("source", "columns", col),
                    f"columns maps '{seen_dst[str(dst)]}' and '{col}' both to field '{dst}'",
                    "map one column to each field",
                )
            seen_dst.setdefault(str(dst), col)
    if isinstance(src.get("columns"), dict) and fields:
        for col, dst in src["columns"].items():
            if str(dst) not in fields:
                c.add(
                    ("source", "columns", col),
                    f"columns maps '{col}' to '{dst}', which is not a declared field",
                    did_you_mean(str(dst), fields),
                )
    for raw in src.get("labels") or {} if isinstance(src.get("labels"), dict) else ():
        if isinstance(raw, bool) or raw is None:  # `yes:` / `on:` / `~:`: never a raw label's text
            c.add(
                ("source", "labels", raw),
                f"labels key {raw!r} is what YAML makes of an unquoted yes/no/true/false/on/off/~",
                'quote the raw value as the data writes it, e.g. "yes": ... or "true": ...',
            )
    choices = d.get("answer_choices")
    tagging = d.get("parse") == "entities"  # tag maps are judged by _check_entity_types
    if isinstance(src.get("labels"), dict) and isinstance(choices, list) and choices:
        for raw, name in src["labels"].items() if not tagging else ():
            if str(name) not in [str(x) for x in choices]:
                hint = (
                    "YAML reads unquoted yes/no/true/false as booleans: quote the name"
                    if isinstance(name, bool)
                    else did_you_mean(str(name), [str(x) for x in choices])
                )
                c.add(
                    ("source", "labels", raw),
                    f"labels maps '{raw}' to '{name}', which is not in answer_choices",
                    hint,
                )


def _alias_list(value: Any) -> list:
    """The aliases of one `entity_types` mapping entry: a list, one text, or nothing."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def entity_types_of(
    declared: Any, labels: dict | None, choices: list | None
) -> tuple[list[str] | None, dict[str, str] | None]:
    """A tagging task's (entity types, aliases {other spelling: type}).

    `declared` is the template's `entity_types` (a list of names, or a mapping name -> list of
    aliases); without it the types are read, in order, from the values of the `source.labels` map
    and `answer_choices`: `x` of each `B-x`/`I-x` tag and every other value but `O` (a type
    rename), and the aliases are None (the parser's default). No type found: (None, None), which
    accepts any type name. Assumes a template that passed `check_data`.
    """
    if declared is not None:
        if isinstance(declared, dict):
            aliases = {str(a): str(t) for t, al in declared.items() for a in _alias_list(al)}
            return [str(t) for t in declared], aliases
        return [str(t) for t in declared], {}
    found: list[str] = []
    for value in list((labels or {}).values()) + list(choices or []):
        value = str(value)
        etype = tag_type(value) or value
        if value != OUTSIDE and etype not in found:
            found.append(etype)
    return (found or None), None


def _check_entity_types(c: _Checker, d: dict) -> list[str] | None:
    """Judge `entity_types` and, for tagging templates, the label map's values; returns the types
    when declared and well-formed (None otherwise)."""
    raw = d.get("entity_types")
    hint = "e.g. entity_types: [person, location] or {PER: [person, PERSON], LOC: []}"
    types: list[str] | None = None
    if raw is not None:
        if d.get("parse") != "entities":
            c.add(
                ("entity_types",),
                "entity_types is only used by NER templates (parse: entities)",
                "remove it, or set parse: entities",
            )
        if isinstance(raw, dict):
            entries = [(("entity_types", t), t, _alias_list(al)) for t, al in raw.items()]
            for t, al in raw.items():
                if al is not None and not isinstance(al, (list, str)):
                    c.add(("entity_types", t), f"entity type '{t}': aliases must be a list", hint)
        elif isinstance(raw, list):
            entries = [(("entity_types", i), t, []) for i, t in enumerate(raw)]
        else:
            entries = []
        if not entries:
            c.add(("entity_types",), "entity_types must be a non-empty list or mapping", hint)
            return None
        seen: dict[str, tuple[str, str]] = {}
        for kp, name, aliases in entries:
            for what, value in [("entity type", name)] + [("alias", a) for a in aliases]:
                if not isinstance(value, str):
                    c.add(kp, f"{what} {value!r} must be text", "quote it in the YAML")
                    continue
                why = type_name_problem(value)
                if why:
                    c.add(kp, f"{what} {value!r} cannot be used: {why}", "rename it")
                    continue
                key = value.casefold()  # parsing reads types case-insensitively
                if key in seen:
                    first, spelt = seen[key]
                    case = " (case is ignored)" if spelt != value else ""
                    c.add(
                        kp,
                        f"{what} '{value}' clashes with {first}{case}",
                        "each type and alias must be unique",
                    )
                seen.setdefault(key, (f"{what} '{value}'", value))
        # The map's values are judged against the well-formed types even when others are not.
        types = [t for _, t, _ in entries if isinstance(t, str) and not type_name_problem(t)]
    labels = (d.get("source") or {}).get("labels") if isinstance(d.get("source"), dict) else None
    if d.get("parse") != "entities" or not isinstance(labels, dict):
        return types
    for key, value in labels.items():
        kp = ("source", "labels", key)
        value = str(value)
        etype = tag_type(value)
        name = etype if etype is not None else value
        if value == OUTSIDE:
            continue
        why = type_name_problem(name)
        if why:
            c.add(kp, f"labels maps '{key}' to '{value}': type '{name}' cannot be used: {why}")
        elif types is not None and name not in types:
            what = "a tag of type" if etype is not None else "a rename to type"
            c.add(
                kp,
                f"labels maps '{key}' to '{value}', {what} '{name}', which is not in entity_types",
                did_you_mean(name, types)
                or "map raw values to tags (O, B-<type>, I-<type>) or rename types to one of "
                + ", ".join(types),
            )
    return types


# Public methods of the values a field type holds: `{{ text.upper }}` (not called) prints a repr.
_METHODS = {
    "str": {m for m in dir(str) if not m.startswith("_")},
    "list": {m for m in dir(list) if not m.startswith("_")},
    "dict": {m for m in dir(dict) if not m.startswith("_")},
}
_METHODS.update({"label": _METHODS["str"], "list[str]": _METHODS["list"]})
_METHODS["list[label]"] = _METHODS["list"]


def _not_called(ast: nodes.Template, fields: dict) -> list[tuple[int, str, str]]:
    """(line, message, hint) for each method of a declared field, and each global function, that
    the template uses without calling it: the record would show a Python repr."""
    called = {id(n.node) for n in ast.find_all(nodes.Call)}
    # Reading a function's attribute (`loop.cycle(...)`, `cycler | attr(...)`) is no output of it.
    looked_into = {id(n.node) for n in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Test))}
    looked_into |= {id(n.node) for n in ast.find_all(nodes.Filter) if n.name == "attr"}
    out = []
    for node in ast.find_all(nodes.Getattr):
        if id(node) in called or not isinstance(node.node, nodes.Name):
            continue
        spec = fields.get(node.node.name)
        if spec is not None and node.attr in _METHODS.get(spec.type, ()):
            name, attr = node.node.name, node.attr
            hint = f"call it: {name}.{attr}(...)"
            if spec.type == "dict":
                hint += f", or for the key '{attr}' write {name}['{attr}']"
            msg = f"'{name}.{attr}' is a method, not a value (the text would show a Python repr)"
            out.append((node.lineno, msg, hint))
    for node in ast.find_all(nodes.Name):
        if (
            node.ctx == "load"
            and id(node) not in called | looked_into
            and node.name not in fields
            and callable(ENV.globals.get(node.name))
        ):
            msg = f"'{node.name}' is a function, not a value (the text would show a Python repr)"
            out.append((node.lineno, msg, f"call it: {node.name}(...)"))
    return out


def _syntax_hint(message: str) -> str:
    """How to fix a Jinja syntax error, for the usual slips."""
    if "end of template" in message or "unexpected end" in message:
        return (
            "a block is not closed: every {% if %} / {% for %} needs its {% endif %} / {% endfor %}"
        )
    if "unknown tag" in message:
        return "statements are {% if %}, {% for %}, {% set %} and their {% end... %}; a value is {{ field }}"
    return (
        "a value is written {{ field }}, a statement {% if ... %}...{% endif %}: check the braces"
    )


def _compile_part(c: _Checker, kp: tuple, src: str, vid: str, part: str, names: set, fields: dict):
    """Parse + compile one Jinja part; report syntax, forbidden constructs, undefined variables and
    uncalled methods and functions."""
    file, first = c.first_text_line(kp)
    where = f"variant '{vid}' {part}"
    before = len(c.problems)

    def bad(lineno: int | None, msg: str, hint: str = "") -> None:
        c.problems.append(Problem(file, first + (lineno or 1) - 1, f"{where}: {msg}", hint))

    try:
        ast = ENV.parse(src)
    except jinja2.TemplateSyntaxError as e:
        bad(e.lineno, f"Jinja syntax error: {e.message}", _syntax_hint(e.message or ""))
        return None
    for node in ast.find_all(tuple(_FORBIDDEN)):
        bad(
            node.lineno,
            f"'{{% {_FORBIDDEN[type(node)]} %}}' is not allowed in task templates",
            "templates cannot read other files; share text with the YAML `include:` key instead",
        )
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        attr = getattr(node, "attr", None)
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            attr = node.arg.value
        if (
            isinstance(node, nodes.Filter)
            and node.name == "attr"
            and node.args
            and isinstance(node.args[0], nodes.Const)
        ):
            attr = node.args[0].value
        if isinstance(attr, str) and attr.startswith("_"):
            bad(
                node.lineno,
                f"access to '{attr}' is not allowed (names starting with '_' are private)",
                "templates may only use the row's fields and filters",
            )
    try:
        # find_undeclared_variables compiles the template, so unknown filters/tests surface here.
        undeclared = meta.find_undeclared_variables(ast) - names
    except jinja2.TemplateSyntaxError as e:
        msg = str(e.message)
        m = re.search(r"No (filter|test) named '([^']*)'", msg)
        bad(
            e.lineno,
            f"Jinja error: {msg}",
            did_you_mean(
                m.group(2),
                [f for f in ENV.filters if not f.startswith("t2t_")]
                if m.group(1) == "filter"
                else ENV.tests,
            )
            if m
            else "",
        )
        return None
    for name in sorted(undeclared):
        line = next((n.lineno for n in ast.find_all(nodes.Name) if n.name == name), 1)
        bad(
            line,
            f"undefined variable '{name}'",
            did_you_mean(name, sorted(names - set(ENV.globals))) or "declare it under fields:",
        )
    for lineno, msg, hint in _not_called(ast, fields):
        bad(lineno, msg, hint)
    if len(c.problems) > before:
        return None
    return ENV.from_string(prepare(ast))


def _check_variants(c: _Checker, raw: Any, fields: dict) -> list[Variant]:
    out: list[Variant] = []
    if not isinstance(raw, list) or not raw:
        c.add(
            ("variants",),
            "variants must be a non-empty list",
            "each item has id, instruction, input, output",
        )
        return out
    names = set(fields) | set(CONTEXT_EXTRA) | set(ENV.globals)
    seen: dict[str, int] = {}
    for i, v in enumerate(raw):
        kp = ("variants", i)
        if not isinstance(v, dict):
            c.add(kp, f"variants[{i}] must be a mapping with id, instruction, input, output")
            continue
        c.unknown_keys(kp, v, VARIANT_KEYS, f"variants[{i}]")
        vid = v.get("id")
        why = ""
        if vid is None or isinstance(vid, (dict, list)) or str(vid).strip() == "":
            c.add(kp, f"variants[{i}]: missing 'id'", "give each variant a short unique id")
            vid = f"#{i}"
        else:  # ids end up in eval file names (RUN/eval/validation-<variant>.json)
            why = name_problem(str(vid))
        vid = str(vid)
        if why:
            c.add(kp + ("id",), f"variant id {vid!r} is not a safe name: {why}", NAME_HINT)
        if vid in seen:
            c.add(
                kp + ("id",),
                f"duplicate variant id '{vid}' (first used on line {seen[vid]})",
                "variant ids must be unique within a template",
            )
        seen.setdefault(vid, c.at(kp + ("id",))[1])
        heldout = v.get("heldout", False)
        if not isinstance(heldout, bool):
            c.add(kp + ("heldout",), f"variant '{vid}': heldout must be true or false")
        compiled, lines, texts = {}, {}, {}
        for part in PARTS:
            src = v.get(part, "" if part == "instruction" else None)
            if src is None:
                c.add(kp, f"variant '{vid}': missing '{part}'")
                continue
            if isinstance(src, (dict, list)):
                c.add(
                    kp + (part,),
                    f"variant '{vid}' {part}: must be text (a Jinja template)",
                    "quote it",
                )
                continue
            texts[part] = str(src)
            lines[part] = c.first_text_line(kp + (part,)) if part in v else c.at(kp)
            compiled[part] = _compile_part(c, kp + (part,), str(src), vid, part, names, fields)
        out.append(
            Variant(
                vid,
                texts.get("instruction", ""),
                texts.get("input", ""),
                texts.get("output", ""),
                heldout is True,
                compiled,
                lines,
            )
        )
    if out and all(v.heldout for v in out):
        c.add(
            ("variants",),
            "every variant is heldout: nothing left to train on",
            "set heldout: false on one",
        )
    return out


def check_data(
    path: Path,
    data: dict,
    origins: dict,
    problems: list[Problem],
    *,
    snippet: bool = False,
    data_dirs: Sequence[Path] = (),
    require_data: bool = True,
) -> tuple[dict, list]:
    """Judge merged template data; appends every problem, returns (fields, compiled variants).

    `snippet`: an include-only file, incomplete on purpose, so only its key names are judged.
    `data_dirs`: more folders relative data paths are looked up in (`data_path_candidates`).
    `require_data=False`: a `samples` folder that is not there is no problem (a copy that only
    parses and scores answers, e.g. in an lm-eval export, reads no rows).
    """
    c = _Checker(path, data, origins, problems)
    c.unknown_keys((), data, TOP_KEYS, "the template")
    if snippet:
        return {}, []
    for k in REQUIRED_KEYS:
        if k not in data:
            c.add(
                (),
                f"missing required key '{k}'",
                "see README.md, 'Task templates', for the template format",
            )
    name = data.get("name")
    if "name" in data and (
        not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)
    ):
        c.add(("name",), f"name {name!r} must be a word of letters, digits, '_', '-' or '.'")
    elif isinstance(name, str) and not path.name.startswith("_") and name != path.stem:
        c.add(
            ("name",),
            f"name '{name}' does not match the file name '{path.name}'",
            f"tasks are found by file name: rename the file to {name}.yaml or set name: {path.stem}",
        )
    if "task_type" in data:
        c.enum(("task_type",), data["task_type"], TASK_TYPES, "task_type")
    if "version" in data and (
        isinstance(data["version"], bool) or not isinstance(data["version"], int)
    ):
        c.add(
            ("version",),
            f"version must be an integer, got {data['version']!r}",
            "bump it when prompts change",
        )
    if "parse" in data:
        c.enum(("parse",), data["parse"], PARSE_KINDS, "parse")
    c.enum(("eval_mode",), data.get("eval_mode", "generate"), EVAL_MODES, "eval_mode")
    if (
        data.get("eval_mode") == "constrained"
        and data.get("parse") in PARSE_KINDS
        and data.get("parse") not in CONSTRAINED_KINDS
    ):
        c.add(
            ("eval_mode",),
            "eval_mode: constrained needs an answer of fixed form (parse: label, span or entities)",
            f"parse: {data.get('parse')} has nothing to constrain; use eval_mode: generate",
        )
    if (
        data.get("eval_mode") == "rank"
        and data.get("parse") in PARSE_KINDS
        and data["parse"] != "label"
    ):
        c.add(
            ("eval_mode",),
            "eval_mode: rank needs parse: label (it answers with the likeliest of answer_choices)",
            f"parse: {data['parse']} answers are generated: use eval_mode: generate",
        )
    mnt = data.get("max_new_tokens")
    if mnt is not None and (isinstance(mnt, bool) or not isinstance(mnt, int) or mnt <= 0):
        c.add(
            ("max_new_tokens",),
            f"max_new_tokens must be a positive integer, got {mnt!r}",
            "the generation budget of this task's answers in tokens; leave it out to derive it "
            "from the longest training answer",
        )
    c.enum(
        ("variant_policy",), data.get("variant_policy", "round_robin"), POLICIES, "variant_policy"
    )
    if "metric" in data:
        ms = data["metric"] if isinstance(data["metric"], list) else [data["metric"]]
        if not ms:
            c.add(
                ("metric",),
                "metric must name at least one metric",
                "the first one is the primary metric",
            )
        for i, m in enumerate(ms):
            where = ("metric", i) if isinstance(data["metric"], list) else ("metric",)
            c.enum(where, m, METRICS, "metric")
            kind = data.get("parse")
            if (
                isinstance(m, str)
                and isinstance(kind, str)
                and m in METRIC_PARSES
                and kind in PARSE_KINDS
                and kind not in METRIC_PARSES[m]
            ):
                fits = [x for x, ok in METRIC_PARSES.items() if kind in ok]
                c.add(
                    where,
                    f"metric {m} cannot score parse: {kind} answers ({m} needs parse: "
                    f"{' or '.join(METRIC_PARSES[m])})",
                    f"for parse: {kind} use {', '.join(fits)}",
                )
    fields = _check_fields(c, data.get("fields")) if "fields" in data else {}
    if data.get("parse") == "entities" and isinstance(fields, dict) and fields:
        if not any(getattr(f, "type", None) == "list[str]" for f in fields.values()):
            c.add(
                ("parse",),
                "parse: entities needs the sentence's tokens: a field of type list[str] "
                "(e.g. tokens), whose words the answer's entities are matched against",
                "declare it under fields (e.g. fields: {tokens: list[str], tags: list[label]}) with the "
                "tags as label_field, or use parse: text for free-text answers",
            )
    choices = data.get("answer_choices")
    label_task = data.get("task_type") in LABEL_TASK_TYPES or data.get("parse") in LABEL_KINDS
    if choices is not None:
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(x, str) and x.strip() for x in choices)
        ):
            c.add(
                ("answer_choices",),
                "answer_choices must be a non-empty list of texts",
                "quote yes/no/numbers",
            )
        elif len(set(choices)) != len(choices):
            twice = sorted({str(x) for x in choices if choices.count(x) > 1})
            c.add(
                ("answer_choices",),
                f"answer_choices lists {', '.join(repr(x) for x in twice)} more than once",
                "each choice once",
            )
        elif len({x.strip().casefold() for x in choices}) != len(choices):
            seen: dict[str, str] = {}
            for x in choices:
                seen.setdefault(x.strip().casefold(), x)
            pairs = [
                f"'{seen[x.strip().casefold()]}' / '{x}'"
                for x in choices
                if seen[x.strip().casefold()] != x
            ]
            c.add(
                ("answer_choices",),
                "answer_choices differ only in case or spaces: " + ", ".join(pairs),
                "generated answers are matched to the choices ignoring case, so these cannot be "
                "told apart: give them distinct names",
            )
        elif data.get("parse") == "labels":
            clash = [
                x
                for x in choices
                if any(sep in x for sep in LABELS_SEPARATORS) or x.strip().casefold() == "none"
            ]
            if clash:
                c.add(
                    ("answer_choices",),
                    "parse: labels joins choices with ', ' and reads 'none' as no label: "
                    + ", ".join(repr(x) for x in clash)
                    + " cannot be told apart",
                    "rename them without , ; | (and not 'none')",
                )
    elif label_task:  # (eval_mode: rank on another parse kind is refused above)
        c.add(
            (), "missing required key 'answer_choices' (needed by label tasks and eval_mode: rank)"
        )
    lf = data.get("label_field")
    if lf is not None and fields and lf not in fields:
        c.add(
            ("label_field",),
            f"label_field '{lf}' is not a declared field",
            did_you_mean(str(lf), fields),
        )
    if data.get("samples") is not None:
        if not isinstance(data["samples"], str):
            c.add(("samples",), "samples must be a folder path")
        elif require_data and not resolve_data_path(data["samples"], path, data_dirs).is_dir():
            c.add(
                ("samples",),
                f"samples folder not found: {data['samples']}",
                "a folder of {split}.jsonl files, relative to this file's folder; "
                + tried(data["samples"], path, data_dirs),
            )
    _check_source(c, data, fields)
    _check_entity_types(c, data)
    variants = _check_variants(c, data.get("variants"), fields) if "variants" in data else []
    return fields, variants
