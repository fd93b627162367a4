"""The task catalogue: template files from the shipped folder, `T2T_MTL_TEMPLATES` and run-config folders.

A user adds a task by dropping a YAML file into one of those folders: no code change. Files whose
name starts with `_` are include-only snippets, never tasks. Template validation lives here (not in
`tasks.task`) because the trial render on bundled samples needs the rows (`tasks.sources`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from t2t_mtl.core import shipped
from t2t_mtl.core.config import (
    RunConfig,
    SourceConfig,
    config_notes,
    load_config,
    template_is_path,
)
from t2t_mtl.core.errors import ConfigError, Problem, T2TError, TemplateError, did_you_mean
from t2t_mtl.core.records import Record
from t2t_mtl.tasks import sources
from t2t_mtl.tasks.parsing import (
    CONSTRAINED_KINDS,
    OUTSIDE,
    parse_labels,
    tag_type,
    type_name_problem,
)
from t2t_mtl.tasks.task import Task, load_task_file, read_task_file

logger = logging.getLogger(__name__)

__all__ = [
    "ENV_VAR",
    "SHIPPED_DIR",
    "TrialSource",
    "all_bad_rows_problem",
    "catalogue_problems",
    "check_config",
    "check_file",
    "check_targets",
    "config_cross_problems",
    "find_task_files",
    "load_checked_config",
    "load_task",
    "sample_splits",
    "target_files",
    "task_records",
    "template_dirs",
    "trial_render",
    "trial_sources",
]

SHIPPED_DIR = shipped.TEMPLATES  # the checkout's task_templates/, or the installed copy
ENV_VAR = "T2T_MTL_TEMPLATES"  # extra template folders, separated by os.pathsep
TRIAL_ROWS = 200  # sample rows per split rendered by `validate`


def template_dirs(extra_dirs: Iterable[str | Path] = ()) -> list[Path]:
    """Folders searched for templates, in priority order: shipped, $T2T_MTL_TEMPLATES, then `extra_dirs`."""
    dirs = [SHIPPED_DIR]
    dirs += [
        Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()
    ]
    dirs += [Path(p).expanduser() for p in extra_dirs]
    out, seen = [], set()
    for d in dirs:
        key = d.resolve()
        if key not in seen:  # the same folder named twice is not a name clash
            seen.add(key)
            out.append(d)
    return out


_CONFIG_KEY = re.compile(r"^tasks\s*:", re.M)
_TEMPLATE_KEY = re.compile(r"^variants\s*:", re.M)


def looks_like_run_config(path: Path) -> bool:
    """True for a YAML file with a top-level `tasks:` and no `variants:`: a run config kept next
    to the templates (a common layout), which is no template to list or check."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return bool(_CONFIG_KEY.search(text)) and not _TEMPLATE_KEY.search(text)


def _template_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix in (".yaml", ".yml")
        and p.is_file()
        and not p.name.startswith("_")
        and not looks_like_run_config(p)
    )


def _catalogue(
    extra_dirs: Iterable[str | Path] = (),
) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    found: dict[str, list[Path]] = {}
    for d in template_dirs(extra_dirs):
        for f in _template_files(d):
            found.setdefault(f.stem, []).append(f)
    return {n: fs[0] for n, fs in found.items()}, {n: fs for n, fs in found.items() if len(fs) > 1}


def find_task_files(extra_dirs: Iterable[str | Path] = ()) -> dict[str, Path]:
    """Task name (file stem) -> template file, over every template folder (first folder wins)."""
    return _catalogue(extra_dirs)[0]


def catalogue_problems(
    extra_dirs: Iterable[str | Path] = (), only: str | None = None
) -> list[Problem]:
    """Task names defined by more than one file (a user file shadowing a shipped one, say);
    `only`: just this name's."""
    return [
        Problem(
            str(fs[1]),
            1,
            f"task name '{n}' clashes with {fs[0]}",
            "rename one of the files (and its name:) so each task name is unique",
        )
        for n, fs in sorted(_catalogue(extra_dirs)[1].items())
        if only is None or n == only
    ]


def looks_like_path(s: str) -> bool:
    """Whether a task argument names a file (what a run config's `template` treats as one, or an
    existing file) rather than a catalogue name."""
    return template_is_path(s) or Path(s).is_file()


def missing_template_file(s: str) -> Problem:
    """The problem for a template path that does not exist: the nearest template file beside it,
    or the missing folder."""
    p = Path(s)
    if p.parent.is_dir():
        near = [f.name for f in p.parent.iterdir() if f.suffix in (".yaml", ".yml")]
        hint = did_you_mean(p.name, near) or "check the path"
        return Problem(s, None, "file not found", hint)
    return Problem(s, None, f"file not found: there is no folder {p.parent}", "check the path")


def load_task(name_or_path: str | Path, extra_dirs: Iterable[str | Path] = ()) -> Task:
    """Load a task by catalogue name or by template file path; unknown names get "did you mean"."""
    s = str(name_or_path)
    if looks_like_path(s):
        if not Path(s).exists():
            raise TemplateError(missing_template_file(s))
        return load_task_file(Path(s))
    cat, clashes = _catalogue(extra_dirs)
    if s in clashes:
        raise TemplateError(catalogue_problems(extra_dirs))
    if s not in cat:
        hint = did_you_mean(s, cat) or ("known tasks: " + ", ".join(sorted(cat)) if cat else "")
        raise TemplateError(
            Problem(
                "<tasks>",
                None,
                f"unknown task '{s}'",
                (hint + "; " if hint else "") + f"template folders: {ENV_VAR} or template_dirs",
            )
        )
    return load_task_file(cat[s])


def task_records(
    template: Task, rows: Sequence[dict], split: str, *, epoch: int = 0
) -> Iterator[Record]:
    """Render every row of `rows` (row id = its index) with the template's variant policy."""
    for i in range(len(rows)):
        yield sources.render_row(template, rows, i, row_id=str(i), split=split, epoch=epoch)


# ------------------------------------------------------------------ validation


def sample_splits(tpl: Task) -> list[str]:
    """The splits of a template's bundled samples (file stems in its `samples` folder)."""
    if tpl.samples is None or not tpl.samples.is_dir():
        return []
    return sorted({p.stem for p in tpl.samples.iterdir() if p.suffix[1:] in sources.FORMATS})


def all_bad_rows_problem(
    tpl: Task,
    rows: sources.Rows,
    source_at: Callable[[str], tuple[str, int | None]] | None = None,
) -> Problem | None:
    """When rows were read but every one was bad: one problem at the mapping that causes it.

    Bad labels point at the label map in effect (`source_at("labels")`, default the template's
    `source.labels` line; the field's line when there is no map), values of another type at the
    field's declaration, rows the template cannot render at the template line that fails, anything
    else at the column map (`source_at("columns")`) or the template's `fields`. None when some row
    was good.
    """
    if not rows.all_bad:
        return None
    first = rows.problems[0] if rows.problems else Problem(rows.desc, None, "unreadable rows")
    count = f"all {rows.skipped} rows of {rows.desc} are bad"
    if rows.render_first is not None and rows.render_skipped == rows.skipped:
        p = rows.render_first  # the template fails on every row: its line is what to fix
        return Problem(
            p.file, p.line, f"{p.message} (on all {rows.skipped} rows of {rows.desc})", p.hint
        )
    at = source_at or (lambda key: tpl.where(("source", key)))
    if rows.label_skipped == rows.skipped:
        if rows.labels:
            (file, line), what = at("labels"), "with this labels map"
        else:
            (file, line), what = tpl.where(("fields", tpl.label_field)), "without a labels map"
        hint = first.hint
        if tpl.tagging:
            tags = tpl.label_set()
            hint = (
                (hint + "; " if hint else "")
                + "a tag-list map names only values that are not tags already: raw values -> tags "
                '("0": O, "1": B-person) or type renames (PER: person)'
                + (f"; this task's tags: {', '.join(tags)}" if tags else "")
            )
        return Problem(file, line, f"{count} {what}: {first.message}", hint)
    typed = re.match(r"field '([^']+)' should (be|hold)", first.message)
    if typed and typed[1] in tpl.fields:  # a column of another type: at the field's declaration
        file, line = tpl.where(("fields", typed[1]))
    elif rows.columns:
        file, line = at("columns")
    else:
        file, line = tpl.where(("fields",))
    return Problem(file, line, f"{count}: {first.message}", first.hint)


def config_source_at(cfg: RunConfig, i: int, tpl: Task) -> Callable[[str], tuple[str, int | None]]:
    """Where the `source.<key>` map (labels, columns) in effect for the run's task i is written:
    the run config's line (or override) when its `tasks[i].source` sets the key, else the
    template's line (`all_bad_rows_problem`'s `source_at`)."""
    tc = cfg.tasks[i]

    def source_at(key: str) -> tuple[str, int | None]:
        if tc.source is not None and getattr(tc.source, key, None) is not None:
            p = cfg.problem(("tasks", i, "source", key), "")
            return p.file, p.line
        return tpl.where(("source", key))

    return source_at


@dataclass
class TrialSource:
    """Rows `validate` trial-renders a template on: a source (None: the template's own bundled
    samples or source) and its splits, with words saying which it is."""

    source: SourceConfig | None
    splits: list[str]
    what: str  # "bundled samples", "its source", "tasks[0].source of run.yaml"
    kind: str  # "samples", "source" or "config": how the summary groups it
    # where a map that spoils every row is written (`config_source_at`; None: the template)
    source_at: Callable[[str], tuple[str, int | None]] | None = None


def trial_sources(tpl: Task, cfg: RunConfig | None = None) -> list[TrialSource]:
    """The real rows `validate` renders `tpl` on: the first of its bundled samples (every split)
    and its own `source` (the splits it maps and, for a folder, those of train/validation/test it
    has a file for; else train); then every source a run config's tasks give it (train and
    `eval.split`, those a source folder has), which is what that run reads (its own columns and
    labels maps; a hub source only when the template has no rows of its own). Empty when there
    are none."""
    own = _own_trial(tpl)
    config = _config_trials(tpl, cfg)
    if own:  # a hub source would be a download (or a wait, offline) for rows already tried
        config = [t for t in config if t.source is None or t.source.path]
    return own + config


def _own_trial(tpl: Task) -> list[TrialSource]:
    splits = sample_splits(tpl)
    if splits:
        return [TrialSource(None, splits, f"bundled samples {tpl.samples}", "samples")]
    if tpl.source.get("path") or tpl.source.get("hub"):
        where = tpl.source.get("path") or f"hub:{tpl.source['hub']}"
        mapped = list(tpl.source.get("splits") or {})
        folder = Path(tpl.source["path"]) if tpl.source.get("path") else None
        if folder is not None and folder.is_dir():  # every usual split the folder has a file for
            stems = {
                p.stem
                for p in folder.iterdir()
                if p.suffix[1:] in sources.FORMATS and p.stem in ("train", "validation", "test")
            }
            renamed = set((tpl.source.get("splits") or {}).values())
            mapped = list(dict.fromkeys(mapped + sorted(stems - renamed)))
        return [TrialSource(None, mapped or ["train"], f"its source {where}", "source")]
    return []


def _config_trials(tpl: Task, cfg: RunConfig | None) -> list[TrialSource]:
    out = []
    for i, t in enumerate(cfg.tasks if cfg is not None else []):
        if t.source is None or not _same_template(t.template, tpl, cfg):
            continue
        src = cfg.resolved_source(t)
        if src.path:
            if not Path(src.path).exists():
                continue  # the config's check reports it, at the config's line
        wanted = list(dict.fromkeys(["train", cfg.eval.split]))
        have = [s for s in wanted if _has_split(src, s)]
        what = f"tasks[{i}].source of {cfg.config_path or 'the run config'}"
        out.append(
            TrialSource(src, have or wanted[:1], what, "config", config_source_at(cfg, i, tpl))
        )
    return out


def _has_split(src: SourceConfig, split: str) -> bool:
    """Whether a local source has a file for `split` (a hub source or a single file: assumed)."""
    if not src.path or not Path(src.path).is_dir():
        return True
    stem = (src.splits or {}).get(split, split)
    return any((Path(src.path) / f"{stem}.{ext}").is_file() for ext in sources.FORMATS)


def _same_template(name: str, tpl: Task, cfg: RunConfig) -> bool:
    extra = [cfg.resolve_path(d) for d in cfg.template_dirs]
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name)
    else:
        path = find_task_files(extra).get(name)
    return path is not None and Path(path).resolve() == Path(tpl.path).resolve()


def trial_render(
    tpl: Task, limit: int = TRIAL_ROWS, trials: Sequence[TrialSource] | None = None
) -> list[Problem]:
    """Render every variant on real rows (`trials`, default `trial_sources(tpl)`): report rows
    that cannot be read or do not fit, render failures, empty and off-label outputs.

    Template problems point at the variant's line, naming the row (`file:line`) they met first and
    how many more rows show the same. Data that cannot be read is reported where it is.
    """
    problems: list[Problem] = []
    first: dict[
        tuple, list
    ] = {}  # (variant, part, kind) -> [problem, count]: one line per kind, with a count

    def note(key: tuple, prob: Problem) -> None:
        if key in first:
            first[key][1] += 1
        else:
            first[key] = [prob, 1]

    choices = set(tpl.answer_choices)
    for trial in trial_sources(tpl) if trials is None else trials:
        for split in trial.splits:
            try:
                # render=False: failing renders are reported below, at the template's lines
                rows = sources.load_rows(
                    tpl, trial.source, split, bad_rows="skip", limit=limit, render=False
                )
            except T2TError as e:
                problems.extend(e.problems)
                continue
            every = all_bad_rows_problem(tpl, rows, trial.source_at)
            problems.extend(([every] if every else []) + rows.problems)
            for i in range(len(rows)):
                row, (dfile, dline) = rows[i], rows.location(i)
                # "sample train.jsonl:3" for the bundled samples, else the row's whole path
                sample = trial.kind == "samples"
                where = f"sample {Path(dfile).name}:{dline}" if sample else f"row {dfile}:{dline}"
                for v in tpl.variants:
                    try:
                        rec = tpl.render(row, v, row_id=str(i), split=split)
                    except TemplateError as e:
                        p = e.problems[0]
                        note(
                            (v.id, p.message),
                            Problem(p.file, p.line, f"{p.message} ({where})", p.hint),
                        )
                        continue
                    for part in ("input", "output"):
                        if not getattr(rec, part):
                            f, ln = v.lines[part]
                            note(
                                (v.id, part, "empty"),
                                Problem(
                                    f,
                                    ln,
                                    f"variant '{v.id}' {part} renders empty text ({where})",
                                ),
                            )
                    # an output the parse kind cannot read back as the row's answer choice(s)
                    off = None
                    if tpl.parse == "labels" and choices:
                        if not parse_labels(rec.output, tpl.answer_choices)[1]:
                            off = (
                                "labels",
                                "is not answer_choices joined by ', ' (or none)",
                                "render the row's labels, e.g. {{ labels | join(', ') }}, "
                                "each one of answer_choices",
                            )
                    elif tpl.is_label_task and choices and rec.output not in choices:
                        off = (
                            "choice",
                            "is not one of answer_choices",
                            did_you_mean(rec.output, choices),
                        )
                    if off is not None:
                        f, ln = v.lines["output"]
                        msg = f"variant '{v.id}' output {rec.output!r} {off[1]} ({where})"
                        note((v.id, "output", off[0]), Problem(f, ln, msg, off[2]))
    for prob, count in first.values():
        more = f" and {count - 1} more {'sample ' if '(sample ' in prob.message else ''}row(s)"
        more = more if count > 1 else ""
        problems.append(Problem(prob.file, prob.line, prob.message + more, prob.hint))
    return problems


def check_file(path: str | Path, *, trial: bool = True) -> list[Problem]:
    """Every problem of one template file: static checks, then trial renders on its real rows
    (`trial_sources`)."""
    return _check_one(Path(path), trial, None)[0]


def _check_one(path: Path, trial: bool, cfg: RunConfig | None) -> tuple[list[Problem], list]:
    """(problems, the TrialSources rendered) of one template file."""
    tpl, problems = read_task_file(path)
    if tpl is None or not trial:
        return problems, []
    trials = trial_sources(tpl, cfg)
    if not trials:
        return problems + [
            Problem(
                str(path),
                1,
                f"no rows to trial-render '{tpl.name}' on",
                "give it bundled samples (samples: a folder of {split}.jsonl files) or a source "
                "(source: {path: ...}), or validate it with --config RUN.yaml whose task gives "
                "it a source; --no-trial skips the trial render",
            )
        ], []
    found = trial_render(tpl, trials=trials)
    if tpl.source_missing is not None:  # nothing was rendered on a source that is not there
        trials = [t for t in trials if t.kind != "source"]
    return problems + found, trials


def check_targets(
    targets: list[str],
    extra_dirs: Iterable[str | Path] = (),
    *,
    trial: bool = True,
    cfg: RunConfig | None = None,
) -> tuple[int, list[Problem], dict[str, list[str]]]:
    """Validate files, folders or task names (default: the whole catalogue, and with `cfg` the run's
    templates given as file paths).

    Returns (number of files checked, problems, which rows the templates were trial-rendered on:
    {"rendered on bundled samples" | "... own source" | "... run config sources": [names]}).
    `cfg`: a run config whose tasks' sources serve templates without samples or a source.
    """
    files, problems = target_files(targets, extra_dirs)
    if not targets and cfg is not None:
        # the whole catalogue, and the run's own templates named by file path (in no folder)
        seen = {f.resolve() for f in files}
        for t in cfg.tasks:
            p = Path(t.template or "")
            if str(p).endswith((".yaml", ".yml")) and p.is_file() and p.resolve() not in seen:
                files.append(p)
                seen.add(p.resolve())
    used: dict[str, list[str]] = {}
    names = {
        "samples": "rendered on bundled samples",
        "source": "rendered on own source",
        "config": "rendered on run config sources",
    }
    for f in files:
        found, trials = _check_one(f, trial, cfg)
        problems += found
        for kind in dict.fromkeys(t.kind for t in trials):
            used.setdefault(names[kind], []).append(f.stem)
    return len(files), problems, used


def target_files(
    targets: Sequence[str], extra_dirs: Iterable[str | Path] = ()
) -> tuple[list[Path], list[Problem]]:
    """The template files `check_targets` checks for `targets` (files, folders or task names;
    default the whole catalogue), and the problems of targets that name none."""
    files: list[Path] = []
    problems: list[Problem] = []
    if not targets:
        cat = find_task_files(extra_dirs)
        files = [cat[n] for n in sorted(cat)]
        problems += catalogue_problems(extra_dirs)
    for t in targets:
        p = Path(t)
        if p.is_dir():  # a folder named explicitly: its snippets are checked too (as snippets)
            found = sorted(
                f
                for f in p.iterdir()
                if f.suffix in (".yaml", ".yml") and f.is_file() and not looks_like_run_config(f)
            )
            if not found:
                problems.append(Problem(str(p), None, "no template files (*.yaml) here"))
            files += found
        elif p.is_file() and looks_like_run_config(p):
            problems.append(
                Problem(
                    str(p),
                    1,
                    "this is a run config (it has tasks:), not a task template",
                    f"check it with: t2t-mtl validate --config {p}",
                )
            )
        elif p.is_file():
            files.append(p)
        elif looks_like_path(str(t)) and "=" not in str(t):
            problems.append(missing_template_file(str(t)))
        else:
            try:
                files.append(find_task_files(extra_dirs)[t])
                # a name that several files define: which one is meant is the problem
                problems += catalogue_problems(extra_dirs, only=t)
            except KeyError:
                problems.append(
                    Problem(
                        t,
                        None,
                        "no such template file, folder or task name",
                        "validate takes templates, not key=value overrides (train and mix take "
                        "those)"
                        if "=" in t
                        else did_you_mean(t, find_task_files(extra_dirs)),
                    )
                )
    return files, problems


# ------------------------------------------------------------------ run-config cross-checks


def load_checked_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A run config (`load_config`) checked against the catalogue (`check_config`): every problem
    of both kinds is raised together in one ConfigError, each at its line or override."""
    problems: list[Problem] = []
    cfg = load_config(path, overrides, collect=problems)
    problems += [p for p in config_cross_problems(cfg, bool(problems)) if p not in problems]
    if problems:
        raise ConfigError(problems)
    for note in config_notes(cfg):
        logger.warning("%s", note)
    return cfg


def config_inputs(cfg: RunConfig) -> list[Path]:
    """Every file or folder a run config reads: the config file, its tasks' template files (with
    their includes) and each task's data (a source file or folder, bundled samples, for every split
    it resolves to). An output of a command on the config must not replace or lie inside any of
    them (`core.files.output_path_problem`). Tasks that do not load are left out: the config's
    check reports them."""
    out: list[Path] = [Path(cfg.config_path)] if cfg.config_path else []
    extra = [cfg.resolve_path(d) for d in cfg.template_dirs]
    for tc in cfg.tasks:
        if not tc.template:
            continue
        try:
            tpl = load_task(tc.template, extra)
        except T2TError:
            continue
        out += [Path(f) for f in tpl.files]
        src = cfg.resolved_source(tc)
        for split in ("train", "validation", "test"):
            try:
                res = sources.resolve(tpl, src, split)
            except T2TError:
                continue
            if res.path is not None:
                out.append(res.path)
    return list(dict.fromkeys(out))


def config_cross_problems(cfg: RunConfig, broken: bool) -> list[Problem]:
    """`check_config(cfg)`; when the config itself has problems (`broken`: values may have wrong
    types), a cross-check that trips over one of them is left out: it is reported already."""
    try:
        return check_config(cfg)
    except T2TError as e:
        return list(e.problems)
    except Exception:  # noqa: BLE001 - only for a broken config, whose problems are reported
        if not broken:
            raise
        return []


def check_config(cfg: RunConfig) -> list[Problem]:
    """Cross-check a run config against the catalogue: templates exist and load, sources exist and fit.

    Each problem is at its key's line in the config file, or at the `key=value` override that set
    it (`RunConfig.problem`).
    """
    bad = cfg.problem

    problems: list[Problem] = []
    extra = []
    for i, d in enumerate(cfg.template_dirs):
        rp = cfg.resolve_path(d)
        if not rp.is_dir():
            problems.append(bad(("template_dirs", i), f"template_dirs[{i}]: folder not found: {d}"))
        extra.append(rp)
    problems += catalogue_problems(extra)
    for i, t in enumerate(cfg.tasks):
        if not t.template:
            continue  # config.py already reports it
        try:
            tpl = load_task(t.template, extra)
        except T2TError as e:
            for p in e.problems:
                problems.append(
                    bad(("tasks", i, "template"), f"tasks[{i}].template: {p.message}", p.hint)
                    if p.file == "<tasks>"
                    else p
                )
            continue
        if t.variants is not None:
            if not t.variants:
                problems.append(
                    bad(
                        ("tasks", i, "variants"),
                        f"tasks[{i}].variants: lists no variant",
                        "leave it out to train on every variant, or name the ones to train on",
                    )
                )
            for msg, hint in tpl.variant_problems(t.variants):
                problems.append(bad(("tasks", i, "variants"), f"tasks[{i}].variants: {msg}", hint))
        if t.eval_mode == "rank" and (tpl.parse != "label" or not tpl.answer_choices):
            problems.append(
                bad(
                    ("tasks", i, "eval_mode"),
                    f"tasks[{i}].eval_mode: rank needs a label task (parse: label, answer_choices)",
                    f"template '{tpl.name}' has parse: {tpl.parse}"
                    + ("" if tpl.answer_choices else " and no answer_choices")
                    + "; use generate",
                )
            )
        if t.eval_mode == "constrained" and tpl.parse not in CONSTRAINED_KINDS:
            problems.append(
                bad(
                    ("tasks", i, "eval_mode"),
                    f"tasks[{i}].eval_mode: constrained needs an answer of fixed form",
                    f"template '{tpl.name}' has parse: {tpl.parse}; use generate",
                )
            )
        src = t.source
        if src is None:
            if tpl.samples is None and not (tpl.source.get("hub") or tpl.source.get("path")):
                problems.append(
                    bad(
                        ("tasks", i),
                        f"tasks[{i}]: template '{tpl.name}' has no samples and no source",
                        "add source: {path: ...}",
                    )
                )
            continue
        if src.path:
            rp = cfg.resolve_path(src.path)
            resolved = cfg.resolved_source(t)
            # a split the config maps to a file stem must have that file (a split left unmapped
            # may be missing: training reports a missing train file, evaluation skips the task)
            for split in dict.fromkeys(["train", cfg.eval.split]):
                if (
                    split not in (src.splits or {})
                    or not rp.is_dir()
                    or _has_split(resolved, split)
                ):
                    continue
                stem = src.splits[split]
                stems = sorted({f.stem for f in rp.iterdir() if f.suffix[1:] in sources.FORMATS})
                problems.append(
                    bad(
                        ("tasks", i, "source", "splits", split),
                        f"tasks[{i}].source.splits.{split}: {src.path} has no "
                        f"{stem}.jsonl/.csv/.parquet",
                        (did_you_mean(stem, stems) or f"files there: {', '.join(stems) or 'none'}")
                        + f"; map it with splits: {{{split}: <file stem>}}",
                    )
                )
            if not rp.exists():
                tried = [Path(src.path).expanduser().resolve()]
                if cfg.config_path and not Path(src.path).expanduser().is_absolute():
                    tried.append((Path(cfg.config_path).parent / src.path).resolve())
                problems.append(
                    bad(
                        ("tasks", i, "source", "path"),
                        f"tasks[{i}].source.path: not found: {src.path}",
                        "a relative path is looked for in the current folder, then the config's "
                        "folder; tried: " + ", ".join(map(str, dict.fromkeys(tried))),
                    )
                )
        for col, dst in (src.columns or {}).items():
            if dst not in tpl.fields:
                problems.append(
                    bad(
                        ("tasks", i, "source", "columns", col),
                        f"tasks[{i}].source.columns: '{dst}' is not a field of '{tpl.name}'",
                        did_you_mean(dst, tpl.fields),
                    )
                )
        allowed = tpl.label_set()
        for raw, name in (src.labels or {}).items():
            if tpl.tagging:  # a whole tag ("1": B-person) or a type rename (PER: person)
                etype = tag_type(name) or name
                why = "" if name == OUTSIDE else type_name_problem(etype)
                if why or (name != OUTSIDE and tpl.entity_types and etype not in tpl.entity_types):
                    problems.append(
                        bad(
                            ("tasks", i, "source", "labels", raw),
                            f"tasks[{i}].source.labels: '{name}' is not a tag or entity type of "
                            f"'{tpl.name}'" + (f": {why}" if why else ""),
                            did_you_mean(name, (allowed or []) + (tpl.entity_types or []))
                            or "map raw values to tags (O, B-<type>, I-<type>) or rename types",
                        )
                    )
                continue
            if allowed and name not in allowed:
                problems.append(
                    bad(
                        ("tasks", i, "source", "labels", raw),
                        f"tasks[{i}].source.labels: '{name}' is not a label of '{tpl.name}'",
                        did_you_mean(name, allowed),
                    )
                )
    return list(dict.fromkeys(problems))  # a name clash is met by the catalogue and the task alike
