"""The oracle check: can a task's template express its own data? (torch-free; no model)

Each row's own gold output, given back as the model's answer, must score 100 on the task's primary
metric with 0 % invalid answers; a task evaluated in `constrained` mode must also admit it
(`constraints.admits`: constrained decoding can write it; an extractive answer that is not in the
input, say, could never be generated). Less means the template (its output, `parse` kind, answer choices
or entity types) cannot express some rows, so no model trained on it can reach 100, and the user
should learn it before training. `oracle_check` renders rows with every variant exactly as
evaluation does (`evaluator.examples_from_rows`) and scores the rendered outputs through
evaluation's own parse and metric path (`evaluator.score_task`), so the check cannot drift from
what `t2t-mtl eval` measures. Failing rows are found with the per-example form of the primary metric
(`metrics.squad_example`, `span_counts`, `rouge_example`, equality for label metrics).

`oracle_templates` (bundled samples of template files) and `oracle_config` (a run config's tasks on
their sources) are what `t2t-mtl validate --oracle` runs; each returns one `TaskOracle` per task.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t2t_mtl.core.config import RunConfig
from t2t_mtl.core.errors import Problem, T2TError
from t2t_mtl.evaluation import metrics
from t2t_mtl.evaluation.evaluator import (
    Example,
    answer_constraints,
    eval_tasks,
    examples_from_rows,
    score_task,
)
from t2t_mtl.tasks import catalogue, constraints, sources
from t2t_mtl.tasks.parsing import OUTSIDE
from t2t_mtl.tasks.task import Task, read_task_file

__all__ = [
    "MAX_FAILURES",
    "OracleFailure",
    "OracleResult",
    "TaskOracle",
    "oracle_check",
    "oracle_config",
    "oracle_templates",
]

MAX_FAILURES = 5  # failing rows listed per variant; the rest are counted
_FULL = 100.0 - 1e-6  # float sums of per-example scores may miss 100 by rounding

_HINTS = {
    "label": "the output must name exactly one of answer_choices so that `parse: label` reads it back",
    "entities": "the output must be the canonical linearisation of the row's tags "
    "(`{{ tokens | ner_linearize(tags) }}`), every type one of the task's entity types",
    "span": "the answer must be non-empty text on one line",
    "text": "the output must be non-empty text",
    "labels": "the output must name the row's labels, each one of answer_choices, joined by ', ' "
    "(`{{ labels | join(', ') }}`), or be `none`",
    "number": "the output must start with the row's number (e.g. `{{ score }}`) so that `parse: number` "
    "reads it back",
}


@dataclass
class OracleFailure:
    """One row whose gold output does not score full marks: where it is and what parsing made of it."""

    file: str
    row: int | None
    output: str  # the rendered gold output, given back as the answer
    parsed: Any  # what parsing recovered (NER: its linearisation)
    expected: Any  # what scoring compares against (NER: the row's tags, linearised)
    valid: bool
    error: str = ""  # the template failed to render this row
    note: str = ""  # what else went wrong (NER: entities aligned to other tokens)

    def problem(self, task: str, variant: str, kind: str) -> Problem:
        """This failure as `file:row: message (hint)`."""
        where = f"oracle: task '{task}' variant '{variant}'"
        if self.error:
            return Problem(self.file, self.row, f"{where}: {self.error}")
        msg = f"{where}: gold output {self.output!r} parsed as {self.parsed!r}"
        msg += "" if self.valid else " (invalid)"
        if self.expected != self.output and self.expected != [self.output]:
            msg += f", scored against {self.expected!r}"
        hint = "" if self.note else _HINTS.get(kind, "")
        return Problem(self.file, self.row, msg + self.note, hint)


@dataclass
class OracleResult:
    """The oracle score of one variant on one split."""

    task: str
    variant: str
    split: str
    n: int  # rows scored
    rows: int  # rows checked: scored ones plus those that failed to render
    primary_metric: str
    score: float | None  # None when there was no row to score
    invalid_rate: float | None
    failed: int = 0  # rows that do not score full marks (or do not render)
    failures: list[OracleFailure] = field(default_factory=list)  # the first MAX_FAILURES
    # why the score misses 100 although every row reads back (a corpus metric's blind spot)
    why: str = ""

    @property
    def ok(self) -> bool:
        """100 on the primary metric, 0 % invalid, every row rendered (vacuously true without rows)."""
        if self.failed:
            return False
        return self.n == 0 or (
            self.score is not None and self.score >= _FULL and not self.invalid_rate
        )


@dataclass
class TaskOracle:
    """The oracle results of one task (one per variant and split) plus problems met on the way."""

    task: str
    template: Task | None
    results: list[OracleResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # data that could not be read, bad rows
    skipped_rows: int = 0

    @property
    def ok(self) -> bool:
        """Every variant scores 100 with 0 % invalid, and no problem was met."""
        return not self.problems and all(r.ok for r in self.results)

    @property
    def score(self) -> float | None:
        """The lowest variant score (None when nothing was scored)."""
        scores = [r.score for r in self.results if r.score is not None]
        return min(scores) if scores else None

    def summary(self) -> str:
        """One line: task, worst score, invalid rate, rows and variants checked."""
        if not self.results:
            return f"oracle {self.task}: not checked"
        scored = [r for r in self.results if r.score is not None]
        splits = ", ".join(dict.fromkeys(r.split for r in self.results))
        status = "OK" if self.ok else "FAIL"
        if not scored:
            return f"oracle {self.task} ({splits}): no rows to check: {status}"
        worst = min(scored, key=lambda r: (r.score, -(r.invalid_rate or 0)))
        invalid = max(r.invalid_rate or 0.0 for r in scored)
        metric = worst.primary_metric
        key = metrics.MAIN_KEY.get(metric, metric)
        metric += f" {key}" if key != metric else ""
        first = self.results[0].variant
        rows = sum(r.rows for r in self.results if r.variant == first)
        variants = len({r.variant for r in self.results})
        skipped = f", {self.skipped_rows} bad rows skipped" if self.skipped_rows else ""
        failed = sum(r.failed for r in self.results)  # the score is over the rows that render
        failing = f", {failed} row check(s) fail" if failed else ""
        return (
            f"oracle {self.task} ({splits}): {metric} {worst.score:.2f}, "
            f"invalid {invalid:.1f} %, {rows} rows x {variants} variant(s){skipped}{failing}: "
            f"{status}"
        )

    def all_problems(self) -> list[Problem]:
        """Problems met, then per failing variant a summary at its output line and its failing rows."""
        out = list(self.problems)
        for r in self.results:
            if r.ok:
                continue
            out.append(self._variant_problem(r))
            kind = self.template.parse if self.template is not None else ""
            out += [f.problem(self.task, r.variant, kind) for f in r.failures]
        return out

    def _variant_problem(self, r: OracleResult) -> Problem:
        file, line = (str(self.template.path), None) if self.template is not None else ("", None)
        if self.template is not None:
            v = next((v for v in self.template.variants if v.id == r.variant), None)
            if v is not None and v.lines:
                file, line = v.lines.get("output", (file, line))
        score = "no score" if r.score is None else f"{r.primary_metric} {r.score:.2f}"
        invalid = f"{r.invalid_rate or 0.0:.1f} %"
        scored = f" (the {r.n} that render)" if r.n < r.rows else ""
        head = (
            f"oracle: task '{self.task}' variant '{r.variant}' scores {score} with {invalid} invalid "
            f"on its own gold outputs{scored}; {r.failed} of {r.rows} {r.split} rows fail"
        )
        if r.why:
            return Problem(file, line, f"{head}: {r.why[0]}", r.why[1])
        return Problem(
            file,
            line,
            head,
            "no model can score 100 on rows its template cannot express: fix the variant's output, "
            "the parse kind or answer choices/entity types, or the rows listed below",
        )


def _row_ok(metric: str, pred: Any, ex: Example) -> bool:
    """Does one parsed prediction earn full marks on the primary `metric` (the per-example form)?"""
    if pred is None:
        return False
    if metric in ("accuracy", "macro_f1"):
        return pred == ex.gold
    if metric == "squad":
        return metrics.squad_example(pred, ex.gold)[1] >= 1.0  # F1, the squad primary number
    if metric == "span_f1":
        _, fp, fn = metrics.span_counts(pred, ex.gold)
        return fp == 0 and fn == 0
    if metric == "set_f1":
        _, fp, fn = metrics.set_counts(pred, ex.gold)
        return fp == 0 and fn == 0
    if metric == "rouge":
        return metrics.rouge_example(pred, ex.gold)["rougeL"] >= 1.0 - 1e-9
    if metric in ("bleu", "chrf"):  # the answer is one of the references, as written
        return str(pred) in metrics.reference_list(ex.gold)
    if metric in ("pearson", "spearman"):  # correlation 100 over the rows: each number read back
        return abs(float(pred) - float(ex.gold)) <= 1e-9 * max(1.0, abs(ex.gold))
    raise ValueError(f"no per-example form of metric {metric!r}")


def oracle_check(
    tpl: Task,
    rows: sources.Rows,
    *,
    task: str | None = None,
    variants: Sequence[str] | None = None,
    max_failures: int = MAX_FAILURES,
    mode: str | None = None,
) -> list[OracleResult]:
    """Give each row's own gold output back as the answer and score it: one result per variant.

    `rows`: mapped rows of one split (`sources.load_rows`); `task`: the name to report (default the
    template's); `variants`: ids to check (default every variant, heldout ones included); `mode`:
    the task's eval mode (default the template's): `constrained` also needs every gold answer
    admitted by its constraint. `rows` is not changed (rows that fail to render are counted as
    failures of their variant).
    """
    name = task or tpl.name
    constrained = (mode or tpl.eval_mode) == "constrained"
    out = []
    for vid in variants if variants is not None else [v.id for v in tpl.variants]:
        view = copy.copy(rows)  # examples_from_rows counts unrenderable rows on the Rows it gets
        view.problems = list(rows.problems)
        examples = examples_from_rows(tpl, view, vid, rows.split, bad_rows="skip")
        failures = [
            OracleFailure(p.file, p.line, "", None, None, False, p.message)
            for p in view.problems[len(rows.problems) :]
        ]
        failed = len(failures)
        summary, scored = score_task(tpl, examples, [ex.record.output for ex in examples])
        primary = summary["primary_metric"]
        rules = answer_constraints(tpl, examples) if constrained else [None] * len(examples)
        for ex, r, rule in zip(examples, scored, rules):
            pred = r["prediction"] if tpl.parse != "entities" else _tags(r, ex, tpl)
            refused = rule is not None and not constraints.admits(rule, ex.record.output)
            if r["valid"] and _row_ok(primary, pred, ex) and not refused:
                continue
            failed += 1
            if len(failures) < max_failures:
                file, line = rows.location(int(ex.record.meta["row_id"]))
                note = ""
                if refused:
                    note = (
                        ", but eval_mode: constrained cannot generate it (it is not of the form "
                        "the template declares: "
                        + constraints.FORM[tpl.parse]
                        + "); use eval_mode: generate for this task"
                    )
                elif tpl.parse == "entities" and r["prediction"] == r["gold"]:
                    note = (
                        f", but aligned to other tokens: tags {pred} for gold {ex.gold} (an "
                        "entity whose words also occur untagged earlier in the sentence is "
                        "aligned to the earlier occurrence, a limit of the TYPE: words format)"
                    )
                failures.append(
                    OracleFailure(
                        file,
                        line,
                        ex.record.output,
                        r["prediction"],
                        r["gold"],
                        bool(r["valid"]),
                        note=note,
                    )
                )
        out.append(
            OracleResult(
                name,
                vid,
                rows.split,
                summary["n"],
                len(rows),
                primary,
                summary.get("primary"),
                summary.get("invalid_rate"),
                failed,
                failures[:max_failures],
                _blind_spot(primary, summary.get("primary"), examples) if not failed else ("", ""),
            )
        )
    return out


def _blind_spot(metric: str, score: float | None, examples: Sequence[Example]) -> tuple[str, str]:
    """(why, hint) when every row reads back yet a corpus metric stays below 100, else ("", "")."""
    if score is None or score >= _FULL:
        return "", ""
    if metric == "bleu":
        return (
            "corpus BLEU is 0 when no output has four words (no 4-gram to match)",
            "score short answers with chrf: put it first in metric",
        )
    nothing = (metric == "set_f1" and not any(ex.gold for ex in examples)) or (
        metric == "span_f1" and all(tag == OUTSIDE for ex in examples for tag in ex.gold or [])
    )
    if nothing:
        return (
            "no row of this split has a label (or entity), so there is nothing to score",
            "check that the output renders the row's labels; a split of all-empty answers "
            "cannot test F1",
        )
    if metric in ("pearson", "spearman"):
        values = sorted({float(ex.gold) for ex in examples})
        if len(values) < 2:
            seen = f"every output parses as {values[0]:g}" if values else "no output has a number"
            return (
                f"a correlation needs at least two different gold numbers; {seen}",
                "check that the output's first number is the score (text before it may hold "
                "another number), and that the split holds rows with different scores",
            )
    return "", ""


def _tags(row: dict, ex: Example, tpl: Task) -> list[str]:
    """The predicted tags of an entities example (score_task shows them linearised)."""
    return tpl.parse_output(row["raw"], tokens=ex.tokens).value


def _check_split(
    tpl: Task,
    rows: sources.Rows,
    report: TaskOracle,
    source_at=None,
    task: str | None = None,
    mode: str | None = None,
) -> None:
    report.skipped_rows += rows.skipped
    every = catalogue.all_bad_rows_problem(tpl, rows, source_at)
    if every is not None:
        report.problems.append(every)
        report.problems += rows.problems[:3]
    report.results += oracle_check(tpl, rows, task=task, mode=mode)


def oracle_templates(
    files: Sequence[str | Path], limit: int | None = None, cfg: RunConfig | None = None
) -> tuple[list[TaskOracle], list[str]]:
    """The oracle on the rows `validate` trial-renders each template file that loads on
    (`catalogue.trial_sources`: its bundled samples, else its own source, else the sources `cfg`'s
    tasks give it; every split there, `limit` rows each).

    Returns (one TaskOracle per checked template, names of templates with no rows to check).
    Files that do not load are left out: `validate` reports their problems.
    """
    reports, untried = [], []
    for f in files:
        tpl, problems = read_task_file(f)
        if tpl is None or problems:
            continue
        trials = catalogue.trial_sources(tpl, cfg)
        if not trials or tpl.source_missing is not None:
            untried.append(tpl.name)
            continue
        report = TaskOracle(tpl.name, tpl)
        for trial in trials:
            for split in trial.splits:
                try:
                    rows = sources.load_rows(
                        tpl, trial.source, split, bad_rows="skip", limit=limit, render=False
                    )
                except T2TError as e:
                    report.problems += e.problems
                    continue
                _check_split(tpl, rows, report)
        reports.append(report)
    return reports, untried


def oracle_config(
    cfg: RunConfig, split: str | None = None, limit: int | None = None
) -> list[TaskOracle]:
    """The oracle on a run config's tasks, each on its own source (`split` default `eval.split`;
    at most `limit` good rows per task).

    Bad label or column maps that leave no good row are reported at the run config's line of the
    map when the config gives it, else at the template's.
    """
    split = split or cfg.eval.split
    reports = []
    for i, (_tc, et) in enumerate(zip(cfg.tasks, eval_tasks(cfg))):
        report = TaskOracle(et.name, et.template)
        reports.append(report)
        source_at = catalogue.config_source_at(cfg, i, et.template)

        try:
            rows = sources.load_rows(
                et.template, et.source, split, bad_rows="skip", limit=limit, render=False
            )
        except T2TError as e:
            report.problems += e.problems
            continue
        _check_split(et.template, rows, report, source_at, et.name, et.mode)
    return reports
