"""The verbs that use a trained run: `eval`, `predict`, `prompt`, `compare`, `export` (registered by cli.main).

Heavy imports (torch, transformers) happen inside each verb, so `t2t-mtl --help` stays fast: this
module is imported by every verb (cli.main registers these), so at its top it imports only what
validate, preview and mix load anyway. Results and answers go to stdout; progress, notes and written
paths to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from t2t_mtl.cli import check_outputs
from t2t_mtl.core.config import NAME_HINT, name_problem
from t2t_mtl.core.errors import ConfigError, Problem, T2TError, did_you_mean
from t2t_mtl.core.records import Record
from t2t_mtl.runs.folder import owned_paths
from t2t_mtl.tasks.schema import EVAL_MODES

if TYPE_CHECKING:
    from t2t_mtl.inference.predictor import Predictor
    from t2t_mtl.tasks.task import Task

__all__ = ["add_compare", "add_eval", "add_export", "add_predict", "add_prompt"]


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _add_trust_remote_code(p) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the run's base model to run its own Python code from its repository (needed "
        "when the run's config says model.trust_remote_code: true); only for models you trust",
    )


def _check_names(*options: tuple[str, str | None]) -> None:
    """(option, value) pairs whose values become file names under RUN/eval: each must be one safe
    file name (`--name ../x` would write outside the run); every bad one is reported at once."""
    problems = [
        Problem("<cli>", None, f"{opt}: {value!r} is not a safe name: {why}", NAME_HINT)
        for opt, value in options
        if value is not None and (why := name_problem(value))
    ]
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------- eval


def add_eval(sub) -> None:
    """`t2t-mtl eval --run RUN`: per-task metrics of a trained run (or its base model, or every stage)."""
    p = sub.add_parser(
        "eval",
        help="evaluate a run on each task's eval split (metrics, invalid rate, markdown table)",
        description="Evaluate the run's final model on each task's eval split, read from the source in the "
        "run's config and rendered with the run's template copies (first training variant unless "
        "--variant). Writes RUN/eval/<name>.json, .md and .predictions.jsonl and prints the table. "
        "--forgetting evaluates every stage's model instead and writes RUN/eval/forgetting.{json,md,png}.",
    )
    p.add_argument("--run", required=True, help="run folder (output_dir of training)")
    p.add_argument("--tasks", help="comma-separated task names (default: all of the run's tasks)")
    p.add_argument("--split", help="split to evaluate (default: the run's eval.split)")
    p.add_argument("--limit", type=int, help="at most N examples per task")
    p.add_argument(
        "--base", action="store_true", help="evaluate the untuned base model with the same prompts"
    )
    p.add_argument(
        "--mode",
        choices=list(EVAL_MODES),
        help="override each task's eval mode (rank: label tasks; constrained: label, span and "
        "entity tasks; others generate)",
    )
    p.add_argument(
        "--variant", help="prompt variant id, or 'heldout' for each task's first heldout variant"
    )
    p.add_argument(
        "--name", help="results file stem under RUN/eval (default: split[-base][-mode][-variant])"
    )
    p.add_argument(
        "--forgetting", action="store_true", help="staged runs: score every task after every stage"
    )
    p.add_argument(
        "--with-base",
        action="store_true",
        help="with --forgetting: also score the base model (forward transfer)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_trust_remote_code(p)
    p.set_defaults(func=_eval)


def _eval(args) -> int:
    from t2t_mtl.evaluation.run_eval import forgetting_run  # torch & co.

    if args.limit is not None and args.limit <= 0:
        raise ConfigError(Problem("<cli>", None, "--limit must be > 0"))
    _check_names(("--name", args.name), ("--split", args.split))
    if args.with_base and not args.forgetting:
        raise ConfigError(
            Problem(
                "<cli>",
                None,
                "--with-base adds the base model to a --forgetting report",
                "add --forgetting, or use --base to evaluate the base model alone",
            )
        )
    if args.forgetting:
        if args.base or args.name:
            raise ConfigError(
                Problem(
                    "<cli>",
                    None,
                    "--forgetting cannot be combined with --base or --name",
                    "use --with-base to add the base model's scores",
                )
            )
        from t2t_mtl.evaluation.reports import forgetting_markdown  # see _compare

        rep, path = forgetting_run(
            args.run,
            tasks=_csv(args.tasks),
            split=args.split,
            limit=args.limit,
            with_base=args.with_base,
            mode=args.mode,
            variant=args.variant,
            progress=not args.no_progress,
            trust_remote_code=args.trust_remote_code,
        )
        print(forgetting_markdown(rep, rep.get("metric")))
        print(
            f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}", file=sys.stderr
        )
        return 0
    from t2t_mtl.evaluation.reports import results_markdown  # see _compare
    from t2t_mtl.evaluation.run_eval import evaluate_run  # torch & co.

    res, path = evaluate_run(
        args.run,
        tasks=_csv(args.tasks),
        split=args.split,
        limit=args.limit,
        base=args.base,
        mode=args.mode,
        variant=args.variant,
        name=args.name,
        progress=not args.no_progress,
        trust_remote_code=args.trust_remote_code,
    )
    print(results_markdown(res, res.get("title")))
    print(f"wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- predict


def add_predict(sub) -> None:
    """`t2t-mtl predict`: structured predictions for a JSONL file of task rows."""
    p = sub.add_parser(
        "predict",
        help="predict a task on a JSONL file of rows (raw answer + parsed prediction)",
        description="Render each input row (a JSON object with the task's fields; no answer needed) with the "
        "run's template, answer it, and write one JSON line per row: task, line, raw text, parsed "
        "prediction (label / answer / entities + BIO tags / summary) and valid. Bad rows are listed "
        "as file:line; by default nothing is written then (--bad-rows skip predicts the rest).",
    )
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--task", required=True, help="task name (one of the run's tasks)")
    p.add_argument("--input", required=True, metavar="FILE.jsonl", help="rows to predict")
    p.add_argument(
        "--output",
        required=True,
        metavar="FILE.jsonl",
        help="where to write predictions (atomically)",
    )
    p.add_argument("--variant", help="prompt variant id (default: the first training variant)")
    p.add_argument("--base", action="store_true", help="use the untuned base model")
    p.add_argument(
        "--bad-rows",
        choices=["fail", "skip"],
        default="fail",
        help="fail (default) or skip bad rows",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="generation budget (default: the run's eval.max_new_tokens)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_trust_remote_code(p)
    p.set_defaults(func=_predict)


def _predictor(args) -> Predictor:
    from t2t_mtl.inference.predictor import Predictor  # torch & co.

    budget = getattr(args, "max_new_tokens", None)
    if budget is not None and budget <= 0:
        raise ConfigError(
            Problem("<cli>", None, f"--max-new-tokens must be > 0, got {budget}", "e.g. 32")
        )
    kw = {"max_new_tokens": budget} if budget is not None else {}
    return Predictor.from_run(
        args.run, base=args.base, trust_remote_code=args.trust_remote_code, **kw
    )


def _predict(args) -> int:
    from t2t_mtl.inference.predictor import predict_file, read_rows  # torch & co.

    check_outputs(("--output", args.output, False, (args.input, *owned_paths(args.run))))
    pred = _predictor(args)
    pred.template(args.task)  # unknown task: fail before reading anything else
    rows, _ = read_rows(args.input)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm  # not loaded for the light verbs

        bar = tqdm(
            total=len(rows), desc=f"predict {args.task}", unit="row", file=sys.stderr, leave=False
        )
    try:
        n, problems = predict_file(
            pred,
            args.task,
            args.input,
            args.output,
            variant=args.variant,
            bad_rows=args.bad_rows,
            progress=bar.update if bar else None,
        )
    finally:
        if bar is not None:
            bar.close()
    for prob in problems:
        print(prob.format(), file=sys.stderr)
    print(
        f"wrote {n} prediction(s) to {args.output}"
        + (f"; {len(problems)} bad row(s) skipped" if problems else ""),
        file=sys.stderr,
    )
    return 0


# ---------------------------------------------------------------- prompt


def add_prompt(sub) -> None:
    """`t2t-mtl prompt`: answer one example of a task, or a free instruction."""
    p = sub.add_parser(
        "prompt",
        help="answer one example (--task T field=value ...) or a free --instruction",
        description="With --task, the fields are given as field=value (lists as JSON, or space-separated words "
        "for list fields such as tokens) and rendered with the run's template; without, --instruction "
        "(and --input) form the prompt directly. The answer goes to stdout (--json: raw + parsed).",
    )
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--task", help="task name; give its fields as field=value")
    p.add_argument("fields", nargs="*", metavar="FIELD=VALUE", help="the task's fields")
    p.add_argument("--instruction", help="a free instruction (instead of --task)")
    p.add_argument("--input", default="", help="input text for --instruction")
    p.add_argument("--variant", help="prompt variant id (with --task)")
    p.add_argument(
        "--base", action="store_true", help="use the untuned base model (for comparison)"
    )
    p.add_argument("--json", action="store_true", help="print the full prediction as JSON")
    p.add_argument(
        "--show-prompt", action="store_true", help="print the exact prompt text on stderr"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="generation budget (default: the run's eval.max_new_tokens)",
    )
    _add_trust_remote_code(p)
    p.set_defaults(func=_prompt)


def field_values(tpl: Task, pairs: list[str]) -> dict:
    """`field=value` strings -> typed row values, checked against the template's fields (all problems at once)."""
    out, problems = {}, []
    for item in pairs:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(
                Problem("<cli>", None, f"'{item}' is not FIELD=VALUE", "e.g. text='a fine film'")
            )
            continue
        if key in out:
            problems.append(
                Problem("<cli>", None, f"field '{key}' is given twice", "give each field once")
            )
            continue
        spec = tpl.fields.get(key)
        if spec is None:
            problems.append(
                Problem(
                    "<cli>",
                    None,
                    f"task '{tpl.name}' has no field '{key}'",
                    did_you_mean(key, tpl.fields),
                )
            )
            continue
        if spec.type.startswith("list"):
            value = json.loads(raw) if raw.lstrip().startswith("[") else raw.split()
        elif spec.type in ("str", "label"):
            value = raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
        out[key] = value
    if problems:
        raise ConfigError(problems)
    return out


def _prompt(args) -> int:
    if bool(args.task) == bool(args.instruction):
        raise ConfigError(
            Problem(
                "<cli>",
                None,
                "give either --task with FIELD=VALUE pairs, or --instruction",
                "e.g. --task sentiment_sst2 text='a fine film'",
            )
        )
    if args.instruction and args.fields:
        raise ConfigError(
            Problem("<cli>", None, "FIELD=VALUE pairs need --task", "use --input for free text")
        )
    pred = _predictor(args)
    if args.instruction:
        if args.show_prompt:
            print(
                pred.fmt.prompt(Record("free", args.instruction, args.input, "")), file=sys.stderr
            )
        answer = pred.ask(args.instruction, args.input)
        print(json.dumps({"raw": answer}, ensure_ascii=False) if args.json else answer)
        return 0
    tpl = pred.template(args.task)
    try:
        fields = field_values(tpl, args.fields)
    except json.JSONDecodeError as e:
        raise ConfigError(
            Problem("<cli>", None, f"a list value is not valid JSON: {e.msg}")
        ) from None
    rec = pred.render(
        args.task, fields, variant=args.variant, where="<fields>"
    )  # bad fields: before model load
    if args.show_prompt:
        print(pred.fmt.prompt(rec), file=sys.stderr)
    out = pred.prompt(args.task, variant=args.variant, **fields)
    print(json.dumps(out, ensure_ascii=False) if args.json else out["raw"])
    return 0


# ---------------------------------------------------------------- compare


def add_compare(sub) -> None:
    """`t2t-mtl compare A B ...`: runs' results side by side (transfer / interference table)."""
    p = sub.add_parser(
        "compare",
        help="put several runs' (or eval JSON files') results side by side",
        description="One column per source, one row per task (primary metric; later columns show the "
        "difference to the first). A source is a run folder (its RUN/eval/<split>.json), an eval "
        "JSON file, or LABEL=SOURCE; sources with the same LABEL merge into one column, e.g. "
        "single=runs/st_sst2 single=runs/st_squad for single-task baselines.",
    )
    p.add_argument("sources", nargs="+", metavar="[LABEL=]RUN|FILE.json")
    p.add_argument(
        "--name", help="results stem to read from run folders (default: the run's eval split)"
    )
    p.add_argument("--out", metavar="FILE.md", help="also write the table here")
    p.add_argument("--json", metavar="FILE.json", help="also write the numbers as JSON")
    p.set_defaults(func=_compare)


def _compare(args) -> int:
    # reports (and the metrics and run folder it reads) would add start-up time to every verb
    from t2t_mtl.evaluation.reports import compare_table, load_results

    _check_names(("--name", args.name))  # read from RUN/eval/<name>.json: never outside it
    read: list[Path] = []  # what the sources are read from: no output may replace it
    for spec in args.sources:
        where = Path(spec.split("=", 1)[1] if "=" in spec else spec).expanduser()
        read += owned_paths(where) if where.is_dir() else [where]
    check_outputs(
        ("--out", args.out, False, tuple(read)), ("--json", args.json, False, tuple(read))
    )
    loaded, problems, seen = [], [], set()
    for spec in args.sources:
        where = Path(spec.split("=", 1)[1] if "=" in spec else spec).expanduser().resolve()
        if where in seen:
            problems.append(
                Problem("<cli>", None, f"{spec}: given twice", "name each run or file once")
            )
            continue
        seen.add(where)
        try:
            loaded.append(load_results(spec, args.name))
        except T2TError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    table, data = compare_table(loaded)
    print(table)
    for path, text in ((args.out, table), (args.json, json.dumps(data, indent=2) + "\n")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
            print(f"wrote {path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- export


def add_export(sub) -> None:
    """`t2t-mtl export --run RUN --out DIR`: merged full model folder."""
    p = sub.add_parser(
        "export",
        help="merge the adapter into the base model and save a standard transformers folder",
        description="Merge the run's LoRA adapter into a full-precision copy of the base model (QLoRA runs: the "
        "base is reloaded unquantised) and save model, tokenizer, t2t_manifest.json and the export "
        "marker t2t_export.json to DIR (built beside it and swapped in), with a Hub model card "
        "README.md (metadata, per-task metrics, prompt format, training settings, data "
        "licences); load it with AutoModelFor*.from_pretrained(DIR). --push-to-hub REPO then "
        "uploads DIR to that Hub model repo (created if missing; needs `hf auth login`).",
    )
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: the run's model.dtype; QLoRA: its compute dtype, bf16 or fp32)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export in DIR (only a folder holding t2t_export.json, which every "
        "export writes; any other non-empty folder is refused)",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="after exporting, upload DIR to this Hugging Face Hub model repo (owner/name)",
    )
    p.add_argument(
        "--private", action="store_true", help="with --push-to-hub: create the repo private"
    )
    _add_trust_remote_code(p)
    p.set_defaults(func=_export)


def _export(args) -> int:
    from t2t_mtl.inference.predictor import export, push_to_hub  # torch & co.

    if args.private and not args.push_to_hub:
        raise ConfigError(
            Problem("<cli>", None, "--private needs --push-to-hub", "add --push-to-hub OWNER/NAME")
        )
    if args.push_to_hub:  # a bad repo id fails now, not after the slow merge
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as e:
            raise ConfigError(
                Problem(
                    "<cli>",
                    None,
                    f"--push-to-hub: {args.push_to_hub!r}: {e}",
                    "e.g. your-name/smollm2-multitask",
                )
            ) from None
    out = export(
        args.run,
        args.out,
        dtype=args.dtype,
        force=args.force,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"exported to {out}", file=sys.stderr)
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"pushed {out} to https://huggingface.co/{args.push_to_hub} ({url})", file=sys.stderr)
    return 0
