"""Per-task evaluation: render a split with a task's template, answer, parse, score.

Three modes (TaskConfig.eval_mode, default the template's `eval_mode`): `generate` (greedy
answer, parsed by the template's parser; unparseable answers count as wrong and as invalid),
`rank` (label tasks: rank classification over the answer choices, see
`generation.rank_choices`; never invalid) and `constrained` (label, span and entity tasks: greedy
decoding restricted to answers of the form the template declares, `tasks.constraints`). A mode
that does not apply to a task (`--mode rank` on QA, `constrained` on summaries) generates.

Gold values per parse kind: `label` -> the rendered output (a choice); `span` -> the rendered
output plus every alternative in the row's `answers` field (SQuAD's `{text: [...]}` or a list);
`labels` -> the choices the rendered output names (in `answer_choices` order);
`number` -> the rendered output's number (a row whose output has none does not render: a bad row);
`entities` -> the row's tag list (its `label_field`) aligned to its `tokens`, else the rendered
output parsed back; `text` -> the rendered output plus the row's `summaries` or `references` list
when present.
Metrics are the template's `metric` list (the first is primary), computed by `metrics.compute`;
each task also reports the invalid (unparsed) rate. The combined score is the mean of the
per-task primary scores. Each primary score (and the combined one) gets a 95 % confidence interval,
a percentile bootstrap over the task's examples (`confidence`); the per-example statistics it
resamples are kept in the results (`per_example`) so `t2t-mtl compare` can test differences.

`evaluate` works on a loaded model (`run_eval.evaluate_run` loads a run's bundle and writes
the results files); `training_eval_fn(cfg)` is the hook `trainer.train(cfg, eval_fn=...)` calls every
`eval.every_steps` steps (an `EvalHook` on a fixed per-task subset).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm.auto import tqdm

from t2t_mtl.core.config import RunConfig, SourceConfig
from t2t_mtl.core.errors import (
    ConfigError,
    DataError,
    Problem,
    T2TError,
    TemplateError,
    did_you_mean,
)
from t2t_mtl.core.records import Record
from t2t_mtl.evaluation import confidence, metrics
from t2t_mtl.model.prompt_format import PromptFormat
from t2t_mtl.runs.folder import task_for
from t2t_mtl.tasks import constraints, sources
from t2t_mtl.tasks.parsing import (
    CONSTRAINED_KINDS,
    FIRST_LINE_KINDS,
    ner_linearize,
    parse_labels,
    parse_number,
)
from t2t_mtl.tasks.schema import EVAL_MODES
from t2t_mtl.tasks.task import Task

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from t2t_mtl.model.generation import Ranked

__all__ = [
    "answer_constraints",
    "EvalHook",
    "EvalTask",
    "Example",
    "TrainingEvalContext",
    "eval_tasks",
    "evaluate",
    "examples_from_rows",
    "load_examples",
    "score_task",
    "training_eval_fn",
]

MODES = EVAL_MODES


@dataclass
class EvalTask:
    """One task to evaluate: template, source override, mode and prompt variant id."""

    name: str
    template: Task
    source: SourceConfig | None = None
    mode: str = "generate"
    variant: str | None = None  # None: the first non-heldout variant
    # Seeds the random subset a `limit` draws (`sources.load_rows`); None: the first rows.
    sample_seed: str | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def variant_id(self) -> str:
        """The variant actually used."""
        return self.variant or self.template.train_variants()[0].id


@dataclass
class Example:
    """A rendered eval record plus what scoring needs: gold value and (NER) the row's tokens."""

    record: Record
    # label: the choice; labels: the choices; span/text: alternatives; entities: tags; number: a float
    gold: str | float | list[str] | None
    tokens: list[str] | None = None
    key: str | None = None  # fingerprint of the source row (`confidence.row_key`)
    source: str | None = None  # where the row is: "file:line" (JSONL/CSV) or "file-or-hub-id:row"


def pick_variant(tpl: Task, variant: str | None) -> tuple[str | None, Problem | None]:
    """Variant id for evaluation: None -> first training variant; "heldout" -> first heldout one."""
    if variant is None:
        return tpl.train_variants()[0].id, None
    if variant == "heldout":
        held = [v.id for v in tpl.variants if v.heldout]
        if not held:
            return None, Problem(
                str(tpl.path),
                None,
                f"task '{tpl.name}' has no heldout variant",
                "evaluate it with a training variant (leave --variant out)",
            )
        return held[0], None
    ids = [v.id for v in tpl.variants]
    if variant not in ids:
        return None, Problem(
            str(tpl.path),
            None,
            f"task '{tpl.name}' has no variant '{variant}'",
            did_you_mean(
                variant, ids + (["heldout"] if any(v.heldout for v in tpl.variants) else [])
            ),
        )
    return variant, None


def eval_tasks(
    cfg: RunConfig,
    *,
    names: Sequence[str] | None = None,
    template_dir: Path | None = None,
    mode: str | None = None,
    variant: str | None = None,
) -> list[EvalTask]:
    """The run's tasks as EvalTasks (every problem reported at once).

    `template_dir`: a run's template copies (default: the catalogue); `mode` overrides every
    label task's eval mode; `variant`: a variant id, "heldout", or None (first training variant).
    """
    known = cfg.task_names()
    problems: list[Problem] = []
    for n in names or []:
        if n not in known:
            problems.append(
                Problem(
                    "<cli>", None, f"task '{n}' is not part of this run", did_you_mean(n, known)
                )
            )
    if mode is not None and mode not in MODES:
        problems.append(
            Problem("<cli>", None, f"unknown eval mode '{mode}'", did_you_mean(mode, MODES))
        )
    if problems:
        raise ConfigError(problems)
    out = []
    for t in cfg.tasks:
        name = cfg.task_name(t)
        if names and name not in names:
            continue
        tpl = task_for(cfg, t, template_dir)
        m = mode or t.eval_mode or tpl.eval_mode
        if m == "rank" and (tpl.parse != "label" or not tpl.answer_choices):
            if mode is None:
                problems.append(
                    Problem(
                        str(tpl.path),
                        None,
                        f"task '{name}': rank mode needs a label task (parse: label, answer_choices)",
                        "use eval_mode: generate",
                    )
                )
            m = "generate"  # --mode rank on a run with QA/NER tasks: those still generate
        if m == "constrained" and tpl.parse not in CONSTRAINED_KINDS:
            m = "generate"  # --mode constrained: summaries and numbers have no form to constrain
        vid, prob = pick_variant(tpl, variant)
        if prob:
            problems.append(prob)
        # eval.limit / --limit draw a seeded random subset: the run seed and the task name
        seed = f"{cfg.seed}|{name}"
        out.append(EvalTask(name, tpl, cfg.resolved_source(t), m, vid, sample_seed=seed))
    if mode in ("rank", "constrained") and out and all(t.mode != mode for t in out):
        # Every task asked for keeps its own mode: the option did nothing, say so.
        fits = "label tasks" if mode == "rank" else "label, span and entity tasks"
        problems.append(
            Problem(
                "<cli>",
                None,
                f"--mode {mode} applies to {fits}; "
                + ", ".join(f"'{t.name}' ({t.template.parse})" for t in out)
                + (" is not one" if len(out) == 1 else " are none"),
                "leave --mode out for these tasks",
            )
        )
    if problems:
        raise ConfigError(problems)
    return out


# ------------------------------------------------------------------ data and golds


def _tokens(tpl: Task, row: dict) -> list[str] | None:
    if isinstance(row.get("tokens"), list):
        return [str(t) for t in row["tokens"]]
    for name, spec in tpl.fields.items():  # a template naming its token list differently
        if spec.type == "list[str]" and isinstance(row.get(name), list):
            return [str(t) for t in row[name]]
    return None


def _alternatives(value: Any) -> list[str]:
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, str) and v.strip()]
    return []


def gold_for(tpl: Task, row: dict, rec: Record, tokens: list[str] | None) -> str | list[str] | None:
    """The gold value scoring compares against (see module docstring)."""
    kind = tpl.parse
    if kind == "label":
        return rec.output
    if kind == "labels":  # the choices the output names, in answer_choices order
        return parse_labels(rec.output, tpl.answer_choices)[0]
    if kind == "number":
        return parse_number(rec.output)  # a number: `Task.render` refuses an output without one
    if kind == "entities":
        tags = row.get(tpl.label_field) if tpl.label_field else None
        if (
            isinstance(tags, list)
            and len(tags) == len(tokens or [])
            and all(isinstance(t, str) for t in tags)
        ):
            return list(tags)
        return tpl.parse_output(rec.output, tokens=tokens).value
    if kind == "span":
        extra = _alternatives(row.get("answers"))
    else:  # text: other summaries, or other reference translations
        extra = _alternatives(row.get("summaries")) + _alternatives(row.get("references"))
    return list(dict.fromkeys([rec.output] + extra))


def load_examples(
    task: EvalTask, split: str, limit: int | None, *, bad_rows: str = "skip"
) -> tuple[list[Example], sources.Rows]:
    """Render up to `limit` rows of `split` with the task's eval variant; returns (examples, Rows).

    `limit` rows are a random subset seeded by `task.sample_seed` (the same on every run and
    machine, in file order; data files are often sorted), the first ones without a seed.
    Cached per (split, limit), so an eval hook reads its data once.
    """
    key = (split, limit, bad_rows)
    if key not in task._cache:
        rows = sources.load_rows(
            task.template,
            task.source,
            split,
            bad_rows=bad_rows,
            limit=limit,
            seed=task.sample_seed,
        )
        out = examples_from_rows(task.template, rows, task.variant_id(), split, bad_rows=bad_rows)
        task._cache[key] = (out, rows)
    return task._cache[key]


def examples_from_rows(
    tpl: Task, rows: sources.Rows, variant: str, split: str, *, bad_rows: str = "skip"
) -> list[Example]:
    """Render every row of `rows` with `variant` as an Example (record, gold, tokens, row key).

    A row the template cannot render is a bad row: with `bad_rows="skip"` it is counted in
    `rows.skipped` and its problem appended to `rows.problems`. A record's `row_id` is its row's
    index in `rows`; the Example's `source` names the row in the user's file (`rows.location`), and
    travels into the predictions file next to `row_id`.
    """
    out = []
    for i in range(len(rows)):
        row = rows[i]
        try:
            rec = sources.render_row(tpl, rows, i, variant, row_id=str(i), split=split)
        except TemplateError as e:
            if bad_rows != "skip":
                raise
            rows.skipped += 1  # a row the template cannot render is a bad row
            rows.problems.append(e.problems[-1])
            continue
        toks = _tokens(tpl, row) if tpl.parse == "entities" else None
        file, line = rows.location(i) if hasattr(rows, "location") else (tpl.name, i + 1)
        out.append(
            Example(
                rec, gold_for(tpl, row, rec, toks), toks, confidence.row_key(row), f"{file}:{line}"
            )
        )
    return out


# ------------------------------------------------------------------ generation budgets

BUDGET_ROWS = 20_000  # training rows read (at most) to find a task's longest answer


def answer_budget(
    task: EvalTask,
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    cap: int,
) -> tuple[int, str]:
    """(max new tokens, where it came from) for generating `task`'s answers.

    `template`: the template's `max_new_tokens` key, as written. `train`: 2 x the longest answer
    of the task's training split (first `BUDGET_ROWS` rows, eval variant) + 8 tokens, at most `cap`
    (`eval.max_new_tokens`); an answer's tokens are what training taught the model to produce:
    reply frame, answer, end-of-turn (`PromptFormat.target`). `cap`: no training split to read.
    Only a row that runs past the budget is affected, and then only after twice the length of any
    training answer: with "+ 8 tokens" alone an 8-step run's QA and summary scores changed
    (longer-than-trained answers were cut), with this margin none did (docs/benchmarks.md). The
    budget presumes a model fine-tuned on these answers: an untuned base model writes sentences
    where a label is due, so `run_eval` evaluates base models with the cap alone.
    Cached per task.
    """
    if task.template.max_new_tokens is not None:
        return int(task.template.max_new_tokens), "template"
    key = ("budget", cap, getattr(tokenizer, "name_or_path", None), fmt.kind)
    if key not in task._cache:
        try:
            rows = sources.load_rows(
                task.template, task.source, "train", bad_rows="skip", limit=BUDGET_ROWS
            )
        except T2TError:  # no training split (an eval-only task): the run's cap
            task._cache[key] = (int(cap), "cap")
            return task._cache[key]
        texts = []
        for i in range(len(rows)):
            try:
                rec = sources.render_row(
                    task.template, rows, i, task.variant_id(), row_id=str(i), split="train"
                )
            except T2TError:
                continue  # a row the template cannot render says nothing about answer lengths
            texts.append(fmt.target(rec))
        longest = 0
        for s in range(0, len(texts), 1000):  # as features.target_ids, batched
            enc = tokenizer(texts[s : s + 1000], add_special_tokens=fmt.kind == "seq2seq")
            longest = max([longest, *(len(x) for x in enc["input_ids"])])
        task._cache[key] = (min(int(cap), 2 * longest + 8), "train") if texts else (int(cap), "cap")
    return task._cache[key]


# ------------------------------------------------------------------ scoring


def score_task(
    tpl: Task,
    examples: Sequence[Example],
    texts: Sequence[str] | None = None,
    ranked: Sequence[Ranked] | None = None,
) -> tuple[dict, list[dict]]:
    """Parse generated `texts` (or take `ranked` choices) and compute the template's metrics.

    Returns (summary, per-example rows). An empty example list gives `n: 0` and no metrics.
    """
    preds, valid, rows = [], [], []
    pred: str | list[str] | None
    extra: dict[str, Any]
    for k, ex in enumerate(examples):
        if ranked is not None:
            r = ranked[k]
            pred, ok, raw, extra = r.choice, True, r.choice, {"scores": r.scores}
        else:
            raw = texts[k]
            parsed = (
                tpl.parse_output(raw, tokens=ex.tokens)
                if tpl.parse == "entities"
                else tpl.parse_output(raw)
            )
            ok, extra = parsed.valid, {}
            if tpl.parse == "entities":
                pred = parsed.value  # recovered tags; partial output still earns partial credit
                extra["entities"] = [list(e) for e in parsed.detail or []]
            else:
                pred = parsed.value if parsed.value not in ("", None) else None
        preds.append(pred)
        valid.append(ok)
        gold = ex.gold if tpl.parse != "entities" else ner_linearize(ex.tokens or [], ex.gold)
        rows.append(
            {
                "row_id": ex.record.meta.get("row_id"),
                "source": ex.source,
                "raw": raw,
                "prediction": pred
                if tpl.parse != "entities"
                else ner_linearize(ex.tokens or [], pred),
                "gold": gold,
                "valid": ok,
                **extra,
            }
        )
    summary: dict[str, Any] = {
        "n": len(examples),
        "metric": list(tpl.metric),
        "primary_metric": tpl.metric[0],
    }
    if examples:
        golds = [ex.gold for ex in examples]
        res = metrics.compute(tpl.metric, preds, golds, labels=tpl.answer_choices or None)
        summary.update(
            metrics=res,
            primary=metrics.primary_score(tpl.metric, res),
            invalid_rate=metrics.invalid_rate(valid),
        )
        # What the confidence intervals (and `compare`'s paired test) resample: the primary
        # metric's per-example statistics, tagged with the rows they were computed on.
        stats = confidence.row_stats(tpl.metric[0], preds, golds, tpl.answer_choices or None)
        stats.digest = confidence.rows_digest(
            [ex.key or f"{ex.record.meta.get('row_id')}:{ex.record.input}" for ex in examples]
        )
        summary["per_example"] = stats.to_json()
    return summary, rows


def answer_constraints(tpl: Task, examples: Sequence[Example]) -> list:
    """Each example's `constraints.AnswerConstraint` (None: free) under its template's declarations:
    the answer choices, the rendered input to copy spans from, the sentence's tokens and the
    entity types."""
    return [
        constraints.for_task(
            tpl.parse,
            answer_choices=tpl.answer_choices,
            source=ex.record.input,
            tokens=ex.tokens,
            entity_types=tpl.entity_types,
        )
        for ex in examples
    ]


def _bar(total: int, enabled: bool, desc: str) -> tqdm | None:
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, dynamic_ncols=True, leave=False)


def evaluate(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    tasks: Sequence[EvalTask],
    *,
    split: str = "validation",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    max_prompt_tokens: int | None = None,
    bad_rows: str = "skip",
    progress: bool = True,
    keep_predictions: bool = False,
    log: Callable[[str], object] | None = None,
    ci_resamples: int = confidence.RESAMPLES,
    ci_seed: int = confidence.SEED,
    task_budgets: bool = True,
    line_stop: bool = True,
    compact: bool = True,
    share_prefix: bool = True,
) -> dict[str, Any]:
    """Evaluate `model` on every task; returns the results dict.

    `{"split", "limit", "tasks": {name: {"mode", "variant", "n", "skipped_rows", "metric",
    "primary_metric", "metrics", "primary", "invalid_rate", "per_example", "ci_low", "ci_high",
    "ci"[, "predictions"]}}, "combined"[, "combined_ci_low", "combined_ci_high", "ci"]}`;
    "combined" is the mean primary score over tasks with examples (None when none has any).
    Intervals: `confidence.add_intervals` with `ci_resamples` (0: none) and `ci_seed`.
    A task whose data cannot be read (e.g. no such split) gets `"error"` instead of metrics.

    Speed (none changes a prediction; each can be turned off to measure it, bench/bench_eval.py):
    `task_budgets`: each generated task gets its own budget (`answer_budget`, recorded as
    `max_new_tokens` and `budget_from` in its entry), at most `max_new_tokens`; `line_stop`: rows
    of tasks whose parser reads only the first line (`parsing.FIRST_LINE_KINDS`) end with it;
    `compact`: ended rows leave the batch, and with `share_prefix` the prompt tokens a batch
    shares are prefilled once (`generation.generate_texts`).
    """
    from t2t_mtl.model.generation import generate_texts, rank_choices  # torch: only to answer

    data: dict[str, tuple] = {}
    out: dict[str, Any] = {"split": split, "limit": limit, "tasks": {}}
    for t in tasks:
        same = sources.training_file_for(t.template, t.source, split)
        if same is not None and log:
            log(
                f"note: {t.name}: split '{split}' is read from {same}, the file the task trains on "
                "(a source.path that is one file serves every split); for a held-out score give a "
                f"folder with train and {split} files"
            )
        try:
            data[t.name] = load_examples(t, split, limit, bad_rows=bad_rows)
        except (
            DataError,
            TemplateError,
        ) as e:  # a missing split of one task must not stop the others
            out["tasks"][t.name] = {
                "mode": t.mode,
                "variant": t.variant_id(),
                "n": 0,
                "error": "; ".join(p.format() for p in e.problems),
            }
            if log:
                log(f"{t.name}: skipped: {out['tasks'][t.name]['error']}")
    bar = _bar(sum(len(d[0]) for d in data.values()), progress, f"eval {split}")
    try:
        for t in tasks:
            if t.name not in data:
                continue
            examples, rows = data[t.name]
            if bar is not None:
                bar.set_postfix_str(t.name)
            recs = [ex.record for ex in examples]
            upd = bar.update if bar is not None else None
            if t.mode == "rank":
                ranked = rank_choices(
                    model,
                    tokenizer,
                    fmt,
                    recs,
                    t.template.answer_choices,
                    batch_size=batch_size,
                    max_prompt_tokens=max_prompt_tokens,
                    progress=upd,
                )
                summary, preds = score_task(t.template, examples, ranked=ranked)
            else:
                budget, budget_from = (
                    answer_budget(t, tokenizer, fmt, max_new_tokens)
                    if task_budgets
                    else (max_new_tokens, "cap")
                )
                texts = generate_texts(
                    model,
                    tokenizer,
                    fmt,
                    recs,
                    max_new_tokens=budget,
                    batch_size=batch_size,
                    max_prompt_tokens=max_prompt_tokens,
                    progress=upd,
                    stop_after_line=line_stop and t.template.parse in FIRST_LINE_KINDS,
                    compact=compact,
                    share_prefix=share_prefix,
                    constraints=answer_constraints(t.template, examples)
                    if t.mode == "constrained"
                    else None,
                )
                summary, preds = score_task(t.template, examples, texts)
                summary.update(max_new_tokens=budget, budget_from=budget_from)
            entry = {
                "mode": t.mode,
                "variant": t.variant_id(),
                "skipped_rows": rows.skipped,
                **summary,
            }
            if keep_predictions:
                entry["predictions"] = preds
            out["tasks"][t.name] = entry
    finally:
        if bar is not None:
            bar.close()
    prim = [e["primary"] for e in out["tasks"].values() if "primary" in e]
    out["combined"] = sum(prim) / len(prim) if prim else None
    confidence.add_intervals(out, resamples=ci_resamples, seed=ci_seed)
    return out


# ------------------------------------------------------------------ training hook


class EvalHook:
    """Evaluation during training: a small fixed subset per task (`eval.limit` rows of `eval.split`).

    `hook(model)` returns `{"tasks": {name: primary score}, "combined": mean, "invalid": {name: %},
    "results": full results}`. Data is read and rendered once, at construction.
    """

    def __init__(
        self,
        cfg: RunConfig,
        tokenizer: PreTrainedTokenizerBase,
        fmt: PromptFormat,
        *,
        template_dir: Path | None = None,
        tasks: Sequence[EvalTask] | None = None,
        progress: bool = False,
    ):
        self.cfg, self.tokenizer, self.fmt, self.progress = cfg, tokenizer, fmt, progress
        self.tasks = (
            list(tasks) if tasks is not None else eval_tasks(cfg, template_dir=template_dir)
        )
        ev = cfg.eval
        self.split, self.limit = ev.split, ev.limit or None
        for t in self.tasks:  # read the data now: a missing split fails at start, not after hours
            load_examples(t, self.split, self.limit, bad_rows=cfg.train.bad_rows)

    def __call__(
        self, model: PreTrainedModel | PeftModel, step: int | None = None
    ) -> dict[str, Any]:
        ev = self.cfg.eval
        res = evaluate(
            model,
            self.tokenizer,
            self.fmt,
            self.tasks,
            split=self.split,
            limit=self.limit,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            max_prompt_tokens=self.cfg.model.max_length,
            bad_rows=self.cfg.train.bad_rows,
            progress=self.progress,
            ci_resamples=ev.ci_resamples,
            ci_seed=ev.ci_seed,
            task_budgets=ev.task_budgets,
        )
        res["step"] = step
        scored = {n: e for n, e in res["tasks"].items() if "primary" in e}
        return {
            "tasks": {n: e["primary"] for n, e in scored.items()},
            "combined": res["combined"],
            "invalid": {n: e["invalid_rate"] for n, e in scored.items()},
            "results": res,
        }


class TrainingEvalContext(Protocol):
    """What the `training_eval_fn` hook reads of training's `EvalContext` (training is a higher
    layer, so the context is described here, not imported). It also uses `accelerator`, if set."""

    @property
    def model(self) -> PreTrainedModel | PeftModel: ...
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...
    @property
    def prompt_format(self) -> PromptFormat: ...
    @property
    def cfg(self) -> RunConfig: ...
    @property
    def run_dir(self) -> Path: ...
    @property
    def stage(self) -> str: ...
    @property
    def step(self) -> int: ...


def training_eval_fn(
    cfg: RunConfig, *, progress: bool = False
) -> Callable[[TrainingEvalContext], dict]:
    """The `eval_fn` for `trainer.train`: called with its EvalContext every `eval.every_steps`,
    returns flat scalars (logged as `eval/...`): `combined` (mean primary score: the model-selection
    number), `<task>` (primary score) and `<task>/invalid_rate`. The main process also appends the
    full results to `RUN/eval/during_training.jsonl`.

    The eval data is read and rendered here, before training starts, so a missing eval split
    fails at once instead of at the first evaluation.
    """
    tasks = eval_tasks(cfg)
    for t in tasks:
        load_examples(t, cfg.eval.split, cfg.eval.limit or None, bad_rows=cfg.train.bad_rows)
    hook: list[EvalHook] = []

    def eval_fn(ctx: TrainingEvalContext) -> dict:
        if not hook:  # tokenizer and prompt format exist only once training has loaded the model
            hook.append(
                EvalHook(ctx.cfg, ctx.tokenizer, ctx.prompt_format, tasks=tasks, progress=progress)
            )
        out = hook[0](ctx.model, ctx.step)
        flat = {
            "combined": out["combined"],
            **out["tasks"],
            **{f"{n}/invalid_rate": v for n, v in out["invalid"].items()},
        }
        acc = getattr(ctx, "accelerator", None)
        if acc is None or acc.is_main_process:
            path = Path(ctx.run_dir) / "eval" / "during_training.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(
                    json.dumps({**out["results"], "stage": ctx.stage}, ensure_ascii=False) + "\n"
                )
        return {k: v for k, v in flat.items() if v is not None}

    return eval_fn
