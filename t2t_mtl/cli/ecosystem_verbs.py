"""The verbs that hand a run to other tools: `report`, `render`, `export-task` (registered by cli.main).

Like model_verbs, heavy imports happen inside each verb. Written paths and notes go to stderr;
`render` without --output writes its JSON lines to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from t2t_mtl.cli import check_outputs
from t2t_mtl.core.errors import ConfigError, Problem
from t2t_mtl.runs.folder import owned_paths

__all__ = ["add_export_task", "add_render", "add_report"]


def _add_trust_remote_code(p) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the run's base model to run its own Python code from its repository (needed "
        "when the run's config says model.trust_remote_code: true); only for models you trust",
    )


# ---------------------------------------------------------------- report


def add_report(sub) -> None:
    """`t2t-mtl report --run RUN [--out FILE]`: one self-contained HTML page about a run."""
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML page about a run (mixture, losses, scores, samples)",
        description="Write RUN/report.html (or --out): the mixture per stage (target vs realised "
        "shares), training loss per task, the evaluations logged during training, the final "
        "per-task results with 95 %% intervals, the forgetting heatmap of staged runs and sample "
        "predictions; plots are inline SVG, nothing is loaded from the network. Also writes the "
        "Hub model card of the run's adapter (RUN/adapter/README.md) unless --no-card.",
    )
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--out", metavar="FILE.html", help="where to write the page")
    p.add_argument("--no-card", action="store_true", help="do not write RUN/adapter/README.md")
    p.set_defaults(func=_report)


def _report(args) -> int:
    from t2t_mtl.evaluation.model_card import write_model_card
    from t2t_mtl.evaluation.run_report import write_report
    from t2t_mtl.runs.folder import Run

    check_outputs(("--out", args.out, False, owned_paths(args.run)))
    path = write_report(args.run, args.out)
    print(f"wrote {path}", file=sys.stderr)
    if not args.no_card:
        run = Run.load(args.run)
        if (run.dir / "adapter" / "t2t_manifest.json").is_file():
            card = write_model_card(run.dir, run.bundle_dir(), kind="adapter")
            print(f"wrote {card}", file=sys.stderr)
        else:  # a run still training: the page is useful already, the card needs the bundle
            print("note: no final bundle (RUN/adapter) yet, so no model card", file=sys.stderr)
    print(path)
    return 0


# ---------------------------------------------------------------- render


def add_render(sub) -> None:
    """`t2t-mtl render`: the exact training prompts of rows, for serving an export elsewhere."""
    p = sub.add_parser(
        "render",
        help="write the exact prompts training used for rows (chat messages or raw text)",
        description="Render each input row (a JSON object with the task's fields) with the run's "
        "template copy and saved prompt format and write one JSON line per row: task, line, id "
        "(when the row has one), then `messages` (--format messages: an OpenAI-style chat "
        "message list; the model's chat template turns it into the training prompt) or `prompt` "
        "(--format text: the whole prompt text, chat template and special tokens included; "
        "send it to a completions endpoint without adding special tokens), and `truncated` (the "
        "input was shortened to the run's max_length, as in training). No model is loaded.",
    )
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--task", required=True, help="task name (one of the run's tasks)")
    p.add_argument("--input", required=True, metavar="FILE.jsonl", help="rows to render")
    p.add_argument(
        "--format",
        dest="form",
        choices=["messages", "text"],
        default="text",
        help="chat messages or raw prompt text (default text)",
    )
    p.add_argument("--output", metavar="FILE.jsonl", help="write here (default: stdout)")
    p.add_argument("--variant", help="prompt variant id (default: the first training variant)")
    p.add_argument(
        "--bad-rows",
        choices=["fail", "skip"],
        default="fail",
        help="fail (default) or skip bad rows",
    )
    _add_trust_remote_code(p)
    p.set_defaults(func=_render)


def _render(args) -> int:
    from t2t_mtl.core.files import atomic_write_text
    from t2t_mtl.inference.predictor import Predictor, render_file

    check_outputs(("--output", args.output, False, (args.input, *owned_paths(args.run))))
    pred = Predictor.for_prompts(args.run, trust_remote_code=args.trust_remote_code)
    pred.template(args.task)  # unknown task: fail before reading the rows
    items, problems = render_file(
        pred, args.task, args.input, form=args.form, variant=args.variant, bad_rows=args.bad_rows
    )
    for prob in problems:
        print(prob.format(), file=sys.stderr)
    text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items)
    cut = sum(x["truncated"] for x in items)
    note = (f"; {cut} shortened to the run's max_length" if cut else "") + (
        f"; {len(problems)} bad row(s) skipped" if problems else ""
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, text)
        print(f"wrote {len(items)} prompt(s) to {args.output}{note}", file=sys.stderr)
    else:
        sys.stdout.write(text)
        print(f"rendered {len(items)} prompt(s){note}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- export-task


def add_export_task(sub) -> None:
    """`t2t-mtl export-task T --to lm-eval DIR`: the task as an lm-evaluation-harness task."""
    p = sub.add_parser(
        "export-task",
        help="write a task as an lm-evaluation-harness task (YAML, data, utils.py)",
        description="Write DIR/<task>.yaml, DIR/<task>.<split>.jsonl (the rows `t2t-mtl eval` "
        "scores, each with its exact training prompt), the template copy and utils.py (the "
        "task's parser and t2t-mtl's metrics), so `lm_eval --model hf --model_args "
        "pretrained=MODEL --include_path DIR --tasks TASK` scores a model as `t2t-mtl eval` "
        "does. With --run the run's templates and saved prompt format are used; with --config "
        "the config's templates and its base model's tokenizer.",
    )
    p.add_argument("task", help="task name (as in the run or config)")
    p.add_argument("dir", metavar="DIR", help="output folder (created; other tasks in it stay)")
    p.add_argument("--to", required=True, choices=["lm-eval"], help="target harness")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder: its templates and prompt format")
    src.add_argument(
        "--config",
        nargs="+",
        metavar="ARG",
        help="RUN.yaml [key=value ...]: a run config (its tasks and base model) and overrides",
    )
    p.add_argument("--split", help="split to export (default: the eval.split)")
    p.add_argument(
        "--limit",
        type=int,
        help="at most N rows (a seeded random subset, the rows `eval --limit N` scores)",
    )
    p.add_argument("--variant", help="prompt variant id, or 'heldout'")
    p.add_argument(
        "--mode", choices=["generate", "rank"], help="label tasks: override the eval mode"
    )
    _add_trust_remote_code(p)
    p.set_defaults(func=_export_task)


def _export_task(args) -> int:
    from t2t_mtl.inference.lm_eval_task import export_lm_eval

    if args.limit is not None and args.limit <= 0:
        raise ConfigError(Problem("<cli>", None, "--limit must be > 0"))
    check_outputs(("DIR", args.dir, True, ()))
    config, overrides = (args.config[0], args.config[1:]) if args.config else (None, None)
    path = export_lm_eval(
        args.task,
        args.dir,
        run_dir=args.run,
        config=config,
        overrides=overrides,
        split=args.split,
        limit=args.limit,
        variant=args.variant,
        mode=args.mode,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"wrote {path} (+ data, templates/, utils.py in {path.parent})", file=sys.stderr)
    print(
        f"run it: lm_eval --model hf --model_args pretrained=MODEL --include_path {path.parent} "
        f"--tasks {args.task}",
        file=sys.stderr,
    )
    return 0
