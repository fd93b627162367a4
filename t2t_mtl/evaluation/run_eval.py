"""Evaluating run folders: the final bundle (or its base model) and every stage's bundle.

`evaluate_run` writes `RUN/eval/<name>.json`, `.md` and `.predictions.jsonl`; `forgetting_run`
scores every task after every stage and writes the forgetting report (`reports.forgetting`:
average forgetting, backward/forward transfer) as JSON, markdown and a heatmap PNG.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from t2t_mtl.core.config import NAME_HINT, name_problem
from t2t_mtl.core.errors import ConfigError, DataError, Problem, TemplateError
from t2t_mtl.core.files import atomic_write_json, read_json_object
from t2t_mtl.evaluation import metrics
from t2t_mtl.evaluation.evaluator import EvalTask, eval_tasks, evaluate, load_examples
from t2t_mtl.evaluation.reports import (
    forgetting,
    forgetting_heatmap,
    forgetting_markdown,
    write_results,
)
from t2t_mtl.model.generation import place
from t2t_mtl.model.loading import load_for_inference, read_manifest, remote_code_consent
from t2t_mtl.model.prompt_format import PromptFormat
from t2t_mtl.runs.folder import Run

__all__ = ["check_result_name", "default_name", "evaluate_bundle", "evaluate_run", "forgetting_run"]

logger = logging.getLogger(__name__)


def evaluate_bundle(
    run: Run,
    bundle: Path,
    tasks: Sequence[EvalTask],
    *,
    split: str,
    limit: int | None,
    base: bool = False,
    progress: bool = True,
    keep_predictions: bool = True,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Load a bundle of `run` (or its base model) and evaluate `tasks` with the run's eval settings.

    `trust_remote_code`: the user's consent to run the model's remote code (a bundle that needs
    it is refused without; see `loading.remote_code_consent`)."""
    model, tokenizer, _family, manifest = load_for_inference(
        bundle, base=base, trust_remote_code=trust_remote_code, merge=run.cfg.eval.merge_adapter
    )
    model = place(model)
    fmt = PromptFormat.from_dict(manifest["prompt_format"])
    ev = run.cfg.eval
    # Prompt budget = training's max_length: training never showed the model a longer prompt.
    res = evaluate(
        model,
        tokenizer,
        fmt,
        tasks,
        split=split,
        limit=limit,
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
        max_prompt_tokens=run.cfg.model.max_length,
        bad_rows=run.cfg.train.bad_rows,
        progress=progress,
        keep_predictions=keep_predictions,
        log=logger.warning,
        ci_resamples=ev.ci_resamples,
        ci_seed=ev.ci_seed,
        # Budgets fit the answers fine-tuning taught; an untuned model was taught none.
        task_budgets=ev.task_budgets and not base,
    )
    res.update(
        run=str(run.dir), bundle=str(bundle), base=base, model=manifest.get("model", {}).get("name")
    )
    return res


def evaluate_run(
    run_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    base: bool = False,
    mode: str | None = None,
    variant: str | None = None,
    name: str | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> tuple[dict[str, Any], Path]:
    """Evaluate a run's final bundle (or, `base=True`, its untuned base model with the same prompts)
    and write `RUN/eval/<name>.json` + `.md` + `.predictions.jsonl`; returns (results, json path).

    Default name: `<split>` plus `-base`, `-<mode>` (mode override: rank, generate, constrained) and `-<variant>` when set.
    """
    run = Run.load(run_dir)
    split = split or run.cfg.eval.split
    name = name or default_name(split, base=base, mode=mode, variant=variant)
    check_result_name(name)
    _remote_code_ok([run.bundle_dir()], trust_remote_code)
    ets = eval_tasks(
        run.cfg, names=tasks, template_dir=run.dir / "templates", mode=mode, variant=variant
    )
    _refuse_without_rows(run, ets, split, limit)
    res = evaluate_bundle(
        run,
        run.bundle_dir(),
        ets,
        split=split,
        limit=limit,
        base=base,
        progress=progress,
        trust_remote_code=trust_remote_code,
    )
    res.update(mode=mode, variant=variant)
    res["title"] = f"{run.name}: {name}"
    before = read_json_object(run.eval_dir / f"{name}.json")
    if before is not None and before.get("limit") != limit:
        rows = {None: "every row"}
        logger.warning(
            "note: replacing %s (%s per task) with this evaluation (%s); --name NAME keeps both",
            run.eval_dir / f"{name}.json",
            rows.get(before.get("limit"), f"at most {before.get('limit')} rows"),
            rows.get(limit, f"at most {limit} rows"),
        )
    jpath, _ = write_results(res, run.eval_dir, name)
    return res, jpath


def stage_fingerprint(
    run: Run, bundle: Path, tasks: Sequence[EvalTask], split: str, limit: int | None
) -> str:
    """Digest of everything a stage's evaluation depends on: the bundle's weight and adapter-config
    files and its prompt format (not its manifest's run names, so two runs that trained a stage
    identically agree), each task's normalised template, source, mode, variant and row draw, the
    split, limit, the run's eval settings, prompt budget and bad-row policy."""
    h = hashlib.sha256()
    for f in sorted(p for p in bundle.rglob("*") if p.is_file()):
        if f.suffix in (".safetensors", ".bin"):
            h.update(f.relative_to(bundle).as_posix().encode())
            h.update(f.read_bytes())
        elif f.name == "adapter_config.json":  # peft writes target_modules (a set) in any order
            cfg = read_json_object(f) or {}
            canon = {k: sorted(v, key=str) if isinstance(v, list) else v for k, v in cfg.items()}
            h.update(json.dumps(canon, sort_keys=True, default=str).encode())
    manifest = read_manifest(bundle)
    spec = {
        "prompt_format": manifest.get("prompt_format"),
        "model": manifest.get("model", {}).get("name"),
        "tasks": [
            [t.name, t.template.data, repr(t.source), t.mode, t.variant, t.sample_seed]
            for t in tasks
        ],
        "split": split,
        "limit": limit,
        "eval": repr(run.cfg.eval),
        "max_length": run.cfg.model.max_length,
        "bad_rows": run.cfg.train.bad_rows,
    }
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _refuse_without_rows(run: Run, ets: Sequence[EvalTask], split: str, limit: int | None) -> None:
    """Before a model is loaded: when no task has rows of `split` (a split name mistyped, say),
    a DataError naming each task's problem; nothing is written. When some have rows, the others
    are reported in the results as skipped (evaluation goes on)."""
    problems = []
    for t in ets:
        try:
            load_examples(t, split, limit, bad_rows=run.cfg.train.bad_rows)  # cached for evaluate
        except (DataError, TemplateError) as e:
            problems += e.problems
        else:
            return
    if problems:
        raise DataError(problems)


def _remote_code_ok(bundles: Sequence[Path], trust_remote_code: bool) -> None:
    """Refuse, before any slow work, bundles whose model needs remote code the user did not allow."""
    for b in bundles:
        remote_code_consent(read_manifest(b), trust_remote_code, b)


def check_result_name(name: str, what: str = "results name") -> None:
    """Refuse a results file stem that is not one safe file name (`../x` would write outside
    RUN/eval); `what` names the setting in the error, e.g. `--name`."""
    why = name_problem(name)
    if why:
        raise ConfigError(
            Problem(
                "<cli>",
                None,
                f"{what}: {name!r} is not a safe name: {why}",
                f"results are written to RUN/eval/<name>.json; {NAME_HINT}",
            )
        )


def default_name(
    split: str, *, base: bool = False, mode: str | None = None, variant: str | None = None
) -> str:
    """File stem for an evaluation: `validation`, `validation-base`, `test-rank-heldout`, ..."""
    parts = (
        [split]
        + (["base"] if base else [])
        + ([mode] if mode else [])
        + ([variant] if variant else [])
    )
    return "-".join(parts)


def forgetting_run(
    run_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    with_base: bool = False,
    mode: str | None = None,
    variant: str | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    learned_only: bool = False,
    reuse: bool = True,
) -> tuple[dict, Path]:
    """Forgetting report of a staged run: evaluate every `stages/<stage>/adapter` bundle on every task
    (and, `with_base`, the base model for forward transfer); write `RUN/eval/forgetting.{json,md,png}`
    and each stage's results as `RUN/eval/stage-<stage>-<split>.json` (`-<mode>`/`-<variant>` appended
    to both names when given). Returns (report, json path).

    `learned_only`: a stage's bundle skips the tasks no stage up to it has trained (their cells stay
    empty): forgetting and backward transfer never read them, so a study that needs only those saves
    their evaluations; forward transfer (which does read them) is then not reported.

    `reuse`: a stage whose `stage-<stage>-<split>.json` was written for the same inputs (its
    `eval_fingerprint`: the bundle's weights and prompt format, the tasks' templates and sources,
    split, limit and the run's eval settings) is read back instead of evaluated again, so an
    interrupted report continues, and a stage copied from a run that trained it identically costs
    nothing. Evaluation is deterministic (greedy), so a reused stage is what a new one would be.
    """
    run = Run.load(run_dir)
    split = split or run.cfg.eval.split
    bundles = run.stage_bundles()
    if not bundles:
        raise ConfigError(
            Problem(
                str(run.dir / "stages"),
                None,
                "the run has no per-stage bundles",
                "a forgetting report needs a staged run (stages: in the config) "
                "that finished a stage",
            )
        )
    ets = eval_tasks(
        run.cfg, names=tasks, template_dir=run.dir / "templates", mode=mode, variant=variant
    )
    _refuse_without_rows(run, ets, split, limit)
    names = [t.name for t in ets]
    suffix = "".join(f"-{x}" for x in (mode, variant) if x)
    for s, _ in bundles:
        check_result_name(f"stage-{s}-{split}{suffix}")
    _remote_code_ok([b for _, b in bundles], trust_remote_code)
    stage_tasks = {s.name: s.tasks for s in run.cfg.stage_list()}
    order = [s for s, _ in bundles]
    learned = {}
    for i, s in enumerate(order):
        for t in stage_tasks.get(s, []):
            learned.setdefault(t, i)
    matrix, metric_names = [], {}
    for i, (s, bundle) in enumerate(bundles):
        todo = [t for t in ets if not learned_only or learned.get(t.name, 0) <= i]
        fp = stage_fingerprint(run, bundle, todo, split, limit)
        path = run.eval_dir / f"stage-{s}-{split}{suffix}.json"
        res = read_json_object(path) if reuse else None
        if res is None or res.get("eval_fingerprint") != fp:
            res = evaluate_bundle(
                run,
                bundle,
                todo,
                split=split,
                limit=limit,
                progress=progress,
                trust_remote_code=trust_remote_code,
            )
            res["title"] = f"{run.name}: after stage {s} ({split})"
            res["eval_fingerprint"] = fp
            write_results(res, run.eval_dir, path.stem)
        else:
            logger.info("stage %s: reusing %s (same bundle, tasks and settings)", s, path)
        matrix.append([res["tasks"].get(n, {}).get("primary") for n in names])
        metric_names.update(
            {
                n: metrics.MAIN_KEY[e["primary_metric"]]
                for n, e in res["tasks"].items()
                if "primary" in e
            }
        )
    base = None
    if with_base and not learned_only:
        res = evaluate_bundle(
            run,
            bundles[0][1],
            ets,
            split=split,
            limit=limit,
            base=True,
            progress=progress,
            trust_remote_code=trust_remote_code,
        )
        base = {n: e["primary"] for n, e in res["tasks"].items() if "primary" in e}
    rep = forgetting(
        order, names, matrix, {t: i for t, i in learned.items() if t in names}, base=base
    )
    rep.update(
        run=str(run.dir), split=split, limit=limit, mode=mode, variant=variant, metric=metric_names
    )
    out = run.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / f"forgetting{suffix}.json"
    atomic_write_json(jpath, rep, indent=2)
    jpath.with_suffix(".md").write_text(forgetting_markdown(rep, metric_names), encoding="utf-8")
    forgetting_heatmap(rep, jpath.with_suffix(".png"))
    return rep, jpath
