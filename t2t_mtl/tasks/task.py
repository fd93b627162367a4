"""Task template files: YAML (+ include) -> a checked `Task` that renders rows into Records.

The file format is described in README.md ("Task templates"); its keys and static checks are in
`tasks.schema`, the sandboxed Jinja environment in `tasks.sandbox`. Loading reports *every* problem
with its `file:line`. Trial renders on the bundled samples need the sources and therefore live in
`tasks.catalogue`.
"""

from __future__ import annotations

import copy
import random
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import jinja2
from jinja2.sandbox import SecurityError

from t2t_mtl.core import shipped, yaml_lines
from t2t_mtl.core.errors import Problem, T2TError, TemplateError, did_you_mean
from t2t_mtl.core.records import Record
from t2t_mtl.tasks import sandbox
from t2t_mtl.tasks.parsing import LABEL_KINDS, OUTSIDE, Parsed, parse, parse_number
from t2t_mtl.tasks.sandbox import BudgetError, ObjectOutputError, render_part
from t2t_mtl.tasks.schema import (
    ENV,
    LABEL_TASK_TYPES,
    PARTS,
    PROJECT_ROOT,
    FieldSpec,
    Variant,
    check_data,
    entity_types_of,
    resolve_data_path,
    tried,
)

# ENV and PROJECT_ROOT are re-exported from schema: callers know them as tasks.task.*
__all__ = ["ENV", "PROJECT_ROOT", "Task", "include_target", "load_task_file", "read_task_file"]


class Task:
    """A loaded, statically valid task template (README.md, "Task templates", describes the fields)."""

    def __init__(
        self,
        data: dict,
        origins: dict,
        path: Path,
        files: list[Path],
        fields,
        variants,
        data_dirs: Sequence[Path] = (),
    ):
        self.data, self._origins, self.path, self.files = data, origins, path, files
        self.name: str = data["name"]
        self.task_type: str = data["task_type"]
        self.version: int = data["version"]
        self.description: str = data.get("description") or ""
        self.fields: dict[str, FieldSpec] = fields
        self.variants: list[Variant] = variants
        self.answer_choices: list[str] = list(data.get("answer_choices") or [])
        # Default: the field named `label`, else the only field typed label / list[label].
        labelled = [n for n, f in fields.items() if f.type in ("label", "list[label]")]
        self.label_field = data.get("label_field") or (
            "label" if "label" in fields else labelled[0] if len(labelled) == 1 else None
        )
        self.variant_policy: str = data.get("variant_policy") or "round_robin"
        self._chosen: list[Variant] | None = None  # a run's choice of variants (`trained_on`)
        m = data["metric"]
        self.metric: list[str] = [m] if isinstance(m, str) else list(m)
        self.parse: str = data["parse"]
        self.eval_mode: str = data.get("eval_mode") or "generate"
        # Generation budget of an answer in tokens; None: derived from the longest training answer.
        self.max_new_tokens: int | None = data.get("max_new_tokens")
        src = dict(data.get("source") or {})
        for k in (
            "columns",
            "labels",
            "splits",
        ):  # YAML may give int keys (0: negative); rows are matched as text
            if isinstance(src.get(k), dict):
                src[k] = {str(a): str(b) for a, b in src[k].items()}
        # A `source.path` that is not there: the problem to raise when rows are read from it.
        self.source_missing: Problem | None = None
        if src.get("path"):
            raw_path = src["path"]
            src["path"] = str(resolve_data_path(raw_path, path, data_dirs))
            if not Path(src["path"]).exists():
                file, line = self.where(("source", "path"))
                self.source_missing = Problem(
                    file,
                    line,
                    f"source.path not found: {raw_path}",
                    tried(raw_path, path, data_dirs),
                )
        self.source: dict = src
        self.samples: Path | None = (
            resolve_data_path(data["samples"], path, data_dirs) if data.get("samples") else None
        )
        # NER: the entity types (None: any type name) and other spellings parsing accepts.
        self.entity_types: list[str] | None = None
        self.entity_aliases: dict[str, str] | None = None
        if self.tagging:
            self.entity_types, self.entity_aliases = entity_types_of(
                data.get("entity_types"), src.get("labels"), self.answer_choices
            )

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {str(self.path)!r})"

    @property
    def primary_metric(self) -> str:
        """The first metric listed (used for model selection)."""
        return self.metric[0]

    @property
    def is_label_task(self) -> bool:
        """True when outputs are made of `answer_choices`: one of them (classification, NLI, parse:
        label) or several (parse: labels)."""
        return self.task_type in LABEL_TASK_TYPES or self.parse in LABEL_KINDS

    @property
    def tagging(self) -> bool:
        """True for NER templates (`parse: entities`): the label field holds BIO tags."""
        return self.parse == "entities"

    def label_set(self) -> list[str] | None:
        """Allowed label names: answer_choices, else the values of the `labels` map, else None (any).

        NER templates: the BIO tags of their entity types (`O`, `B-x`, `I-x`), None when the types
        are unknown (then any well-formed tag is allowed).
        """
        if self.tagging:
            if not self.entity_types:
                return None
            return [OUTSIDE] + [f"{p}-{t}" for t in self.entity_types for p in ("B", "I")]
        if self.answer_choices:
            return list(self.answer_choices)
        labels = self.source.get("labels") or {}
        return sorted({str(v) for v in labels.values()}) or None

    def where(self, keypath: tuple) -> tuple[str, int]:
        """(file, line) of a key path in the merged template (included files keep their own lines)."""
        kp = tuple(keypath)
        while kp:
            if kp in self._origins:
                return self._origins[kp]
            kp = kp[:-1]
        return (str(self.path), 1)

    def train_variants(self) -> list[Variant]:
        """Variants used in training (heldout ones are for robustness evaluation only), or the ones
        a run chose (`trained_on`), in that order."""
        if self._chosen:
            return list(self._chosen)
        return [v for v in self.variants if not v.heldout]

    def trained_on(self, ids: Sequence[str] | None) -> Task:
        """This task as a run with `tasks[i].variants: ids` uses it: training turns over those
        variants only and evaluation asks with the first. None or empty: the task itself. An
        unknown id raises TemplateError (`variant`); `variant_problems` reports them all first."""
        if not ids:
            return self
        out = copy.copy(self)
        out._chosen = [self.variant(vid) for vid in ids]
        return out

    def variant_problems(self, ids: Sequence[str]) -> list[tuple[str, str]]:
        """(message, hint) for each id of a run's `variants` list that is not a training variant."""
        known = [v.id for v in self.variants if not v.heldout]
        out = []
        for vid in ids:
            if vid in known:
                continue
            if any(v.id == vid for v in self.variants):
                out.append(
                    (
                        f"variant '{vid}' is heldout (kept out of training)",
                        "train on " + ", ".join(known),
                    )
                )
            else:
                out.append(
                    (f"template '{self.name}' has no variant '{vid}'", did_you_mean(vid, known))
                )
        if len(set(ids)) != len(ids):
            out.append(("a variant is listed twice", "list each once"))
        return out

    def variant(self, vid: str) -> Variant:
        """The variant with id `vid`; unknown ids raise TemplateError with "did you mean"."""
        for v in self.variants:
            if v.id == vid:
                return v
        ids = [v.id for v in self.variants]
        raise TemplateError(
            Problem(
                str(self.path),
                None,
                f"task '{self.name}' has no variant '{vid}'",
                did_you_mean(vid, ids),
            )
        )

    def pick_variant(self, row_id: str, epoch: int = 0) -> Variant:
        """Apply the variant policy: round_robin cycles by row number and epoch; random is seeded by both."""
        vs = self.train_variants()
        rid = str(row_id)
        if self.variant_policy == "random":
            # A string seed is hashed with SHA-512 by `random`, so this is stable across processes.
            return vs[random.Random(f"{self.name}|{rid}|{epoch}").randrange(len(vs))]
        key = int(rid) if rid.isdigit() else zlib.crc32(rid.encode("utf-8"))
        return vs[(key + epoch) % len(vs)]

    def render(
        self,
        row: dict,
        variant: str | Variant | None = None,
        *,
        row_id: str | int,
        split: str,
        epoch: int = 0,
        with_output: bool = True,
    ) -> Record:
        """Render one row into a Record; `variant=None` applies the variant policy.

        `with_output=False` renders only instruction and input (prompting rows that have no answer).
        Errors inside a template raise TemplateError pointing at the variant's line in the YAML file.
        """
        if variant is None:
            v = self.pick_variant(str(row_id), epoch)
        else:
            v = variant if isinstance(variant, Variant) else self.variant(variant)
        ctx = dict(row)
        ctx["answer_choices"] = list(self.answer_choices)
        parts = {p: self._render_part(v, p, ctx) for p in PARTS if p != "output" or with_output}
        if with_output and not parts["output"]:
            # Nothing to learn or score against: the row is bad (skipped and counted, or failing,
            # under bad_rows), the same rule in training, evaluation, render and validate.
            file, line = v.lines["output"]
            raise TemplateError(
                Problem(
                    file,
                    line,
                    f"variant '{v.id}' output renders empty text for this row",
                    "fill in the field(s) the output uses, or leave the row out",
                )
            )
        if with_output and self.parse == "number" and parse_number(parts["output"]) is None:
            # The same rule for a number task's answer: no number, nothing to learn or correlate.
            file, line = v.lines["output"]
            raise TemplateError(
                Problem(
                    file,
                    line,
                    f"variant '{v.id}' output holds no number for this row (parse: number)",
                    "give the row a number (a '.' or ',' decimal point; `{{ score }}` renders "
                    "it); a row without one is skipped as a bad row",
                )
            )
        meta = {
            "variant": v.id,
            "row_id": str(row_id),
            "split": split,
            "template_version": self.version,
        }
        return Record(
            self.name, parts["instruction"], parts["input"], parts.get("output", ""), meta
        )

    def _render_part(self, v: Variant, part: str, ctx: dict) -> str:
        file, line = v.lines[part]
        if part in v.over_time:
            raise TemplateError(v.over_time[part])
        try:
            return render_part(v.compiled[part], ctx).strip()
        except Exception as e:  # user template code: any failure is the template's, not ours
            at = _template_lineno(e)
            lines = str(getattr(v, part)).splitlines()
            msg, hint = _render_error(e, lines[at - 1] if 0 < at <= len(lines) else "", self, ctx)
            line += at - 1
            timed_out = isinstance(e, BudgetError) and e.timed_out
        problem = Problem(file, line, f"variant '{v.id}' {part}: {msg}", hint)
        if timed_out:  # later rows fail with the same problem at once
            v.over_time[part] = problem
        raise TemplateError(problem)

    def parse_output(self, text: str, *, tokens: list[str] | None = None) -> Parsed:
        """Generated text -> `parsing.Parsed` using this template's `parse` kind, answer choices
        and (NER) entity types."""
        return parse(
            self.parse,
            text,
            answer_choices=self.answer_choices or None,
            tokens=tokens,
            entity_types=self.entity_types,
            entity_aliases=self.entity_aliases,
        )


# `x.y['z'][0]`: an expression indexed by a number (group 1) and the number (group 2).
_INDEXED = re.compile(
    r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\s*(?:'[^']*'|\"[^\"]*\")\s*\])*)\s*\[\s*(-?\d+)\s*\]"
)


def _render_error(
    e: BaseException, source_line: str, task: Task, ctx: dict | None = None
) -> tuple[str, str]:
    """(message, hint) for a part that failed to render, the hint fitting the cause; `source_line`
    is the template line where it failed, `ctx` the row it rendered (for a misspelt key: the
    nearest key of the row's mappings)."""
    text = str(e)
    too_big = isinstance(e, SecurityError) and "too large" in text  # `*` and `**` limits
    if isinstance(e, BudgetError) or (isinstance(e, OverflowError) and "range" in text.lower()):
        return f"over the render budget: {text}", (
            f"a part may take {sandbox.MAX_RENDER_SECONDS:g} s and {sandbox.MAX_PART_CHARS:,} "
            "characters: look for nested loops, a huge range, padding widths (center, indent, "
            "format) or repetition"
        )
    if isinstance(e, ObjectOutputError):
        return text, "templates output text: call methods and functions; add | list or | join"
    if isinstance(e, SecurityError):
        return (
            f"not allowed in a template: {e}",
            "a part may not build text or numbers that large"
            if too_big
            else "templates may only use the row's fields and filters",
        )
    if isinstance(e, jinja2.UndefinedError):
        element = re.search(r"has no element (-?\d+)", text)
        key = re.search(r"has no attribute '([^']*)'", text)
        if element:
            m = next((m for m in _INDEXED.finditer(source_line) if m[2] == element[1]), None)
            what = f"'{m[1]}'" if m else "a list"
            guard = m[1] if m else "..."
            return text, (
                f"{what} has no item {element[1]} in this row (it is shorter, or empty): fix the "
                f"row, or guard the template: {{% if {guard} %}}...{{% endif %}}"
            )
        if key:
            k = re.escape(key[1])
            m = re.search(rf"([A-Za-z_][\w.]*)\.{k}\b", source_line)
            sub = re.search(rf"([A-Za-z_][\w.]*)\[\s*(['\"]){k}\2\s*\]", source_line)
            ref = f"{m[1]}.{key[1]}" if m else (sub[0] if sub else key[1])
            near = did_you_mean(key[1], _nested_keys(ctx or {}))
            return text, (
                (f"{near} " if near.startswith("did you mean") else "")
                + f"this row has no key '{key[1]}': fix the row, or guard the template: "
                f"{{% if {ref} is defined %}}...{{% endif %}}"
            )
        return text, "fields: " + ", ".join(task.fields)
    msg = f"render failed: {type(e).__name__}: {text}"
    if isinstance(e, ZeroDivisionError):
        return msg, "a divisor is 0 in this row: guard it, e.g. {% if n %}...{% endif %}"
    if isinstance(e, RecursionError):
        return msg, "a macro calls itself without end"
    if re.search(r"\d+ tokens but \d+ tags", text):
        return msg, "a tagged row needs exactly one tag per token: fix the row"
    if isinstance(e, (TypeError, ValueError, AttributeError, KeyError, IndexError)):
        return msg, (
            "a value in this row does not fit what the template does with it: check the row "
            "against fields: (" + ", ".join(f"{n}: {f.type}" for n, f in task.fields.items()) + ")"
        )
    return msg, ""


def _nested_keys(value: object, depth: int = 0) -> set[str]:
    """The keys of the mappings inside a row's values (lists and mappings, a few levels deep)."""
    out: set[str] = set()
    if depth > 4:
        return out
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if isinstance(value, dict) and depth > 0:
        out |= {str(k) for k in value}
    for v in list(items)[:50]:
        if isinstance(v, (dict, list)):
            out |= _nested_keys(v, depth + 1)
    return out


def _template_lineno(exc: BaseException) -> int:
    """Line inside the Jinja source where rendering failed (jinja rewrites tracebacks to '<template>')."""
    tb, line = exc.__traceback__, 1
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# ------------------------------------------------------------------ include + merge


def _merge(base: dict, bo: dict, over: dict, oo: dict) -> tuple[dict, dict]:
    """Deep-merge `over` into `base` (mappings merge, anything else is replaced); origins follow the winner."""
    replaced: set[tuple] = set()

    def rec(b: dict, o: dict, prefix: tuple) -> dict:
        out = dict(b)
        for k, v in o.items():
            if isinstance(v, dict) and isinstance(b.get(k), dict):
                out[k] = rec(b[k], v, prefix + (k,))
            else:
                out[k] = v
                replaced.add(prefix + (k,))
        return out

    merged = rec(base, over, ())
    origins = {
        q: o for q, o in bo.items() if not any(q[:i] in replaced for i in range(1, len(q) + 1))
    }
    origins.update(oo)
    return merged, origins


def include_target(path: Path, rel: str) -> Path:
    """The file `include: rel` in template `path` names: `rel` relative to the template's folder,
    else (when there is no such file) relative to the shipped `task_templates/` folder, so a template
    in any folder can include the shipped parts as `include: _shared/label_task.yaml`."""
    target = (path.parent / rel).resolve()
    if not target.is_file() and not Path(rel).is_absolute():
        shipped_part = (shipped.TEMPLATES / rel).resolve()
        if shipped_part.is_file():
            return shipped_part
    return target


def _load_merged(
    path: Path, stack: tuple, problems: list[Problem]
) -> tuple[dict, dict, list[Path]]:
    """Load `path` with its includes resolved; returns (data, origins {keypath: (file, line)}, files)."""
    loc = yaml_lines.load(path)
    data = loc.data if loc.data is not None else {}
    if not isinstance(data, dict):
        problems.append(Problem(loc.file, 1, "a task template must be a YAML mapping of keys"))
        return {}, {}, [path]
    origins = {p: (loc.file, ln) for p, ln in loc.lines.items() if p and p[0] != "include"}
    inc = data.pop("include", None)
    files = [path]
    if inc is None:
        return data, origins, files
    incs = [inc] if isinstance(inc, str) else inc
    if not isinstance(incs, list) or not all(isinstance(i, str) for i in incs):
        problems.append(
            loc.problem(("include",), "include must be a file path or a list of file paths")
        )
        return data, origins, files
    base: dict = {}
    bo: dict = {}
    for i, rel in enumerate(incs):
        kp = ("include", i) if isinstance(inc, list) else ("include",)
        target = include_target(path, rel)
        if target in stack or target == path.resolve():
            chain = " -> ".join(p.name for p in stack + (path.resolve(), target))
            problems.append(
                loc.problem(kp, f"include cycle: {chain}", "remove one of the includes")
            )
            continue
        if not target.is_file():
            near = [p.name for p in target.parent.glob("*.y*ml")] if target.parent.is_dir() else []
            problems.append(
                loc.problem(
                    kp,
                    f"include file not found: {rel}",
                    did_you_mean(Path(rel).name, near)
                    or f"tried {target} and {(shipped.TEMPLATES / rel).resolve()}: a path is "
                    "relative to this file, else to the shipped task_templates/ folder",
                )
            )
            continue
        try:
            d, o, f = _load_merged(target, stack + (path.resolve(),), problems)
        except T2TError as e:  # syntax error in the included file: report it where it is
            problems.extend(e.problems)
            continue
        base, bo = _merge(base, bo, d, o)
        files += f
    merged, morig = _merge(base, bo, data, origins)
    return merged, morig, files


def is_snippet(path: Path) -> bool:
    """Include-only file: its name, or its folder's (task_templates/_shared/), starts with '_'."""
    return path.name.startswith("_") or path.parent.name.startswith("_")


def read_task_file(
    path: str | Path, data_dirs: Sequence[Path] = (), *, require_data: bool = True
) -> tuple[Task | None, list[Problem]]:
    """Load and statically check a template file; returns (template or None, every problem found).

    Include-only snippets (see `is_snippet`) are incomplete on purpose: only their YAML,
    includes and key names are checked, and no template is returned. `data_dirs`: more folders its
    relative `samples`/`source.path` are looked up in (a run folder's copy: the original's folder).
    `require_data=False`: a missing `samples` folder is no problem (a copy that reads no rows).
    """
    path = Path(path)
    problems: list[Problem] = []
    try:
        data, origins, files = _load_merged(path, (), problems)
    except T2TError as e:
        return None, list(e.problems)
    if isinstance(data, dict) and "tasks" in data and "variants" not in data:
        return None, [  # one line, not a key error per key of the config
            Problem(
                str(path),
                1,
                "this is a run config (it has tasks:), not a task template",
                f"use it with --config {path} (e.g. t2t-mtl validate --config {path}, "
                f"t2t-mtl preview TASK --config {path})",
            )
        ]
    snippet = is_snippet(path)
    fields, variants = check_data(
        path,
        data,
        origins,
        problems,
        snippet=snippet,
        data_dirs=data_dirs,
        require_data=require_data,
    )
    if problems or snippet:
        return None, problems
    return Task(data, origins, path, files, fields, variants, data_dirs), problems


def load_task_file(
    path: str | Path, data_dirs: Sequence[Path] = (), *, require_data: bool = True
) -> Task:
    """Load a template file (`read_task_file`); raises TemplateError listing every static problem."""
    tpl, problems = read_task_file(path, data_dirs, require_data=require_data)
    if problems or tpl is None:
        raise TemplateError(problems)
    return tpl
