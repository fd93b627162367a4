"""The `t2t-mtl` command line. One function per verb; heavy imports happen inside the verb.

Every verb turns a `T2TError` into `file:line: message` lines on stderr and exit 2,
so a user mistake never shows a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

# The data-layer modules every light verb (validate, preview, mix) needs anyway; mixing (numpy),
# matplotlib and torch & co. are imported inside the verbs that use them.
from t2t_mtl.cli import check_outputs
from t2t_mtl.cli.ecosystem_verbs import add_export_task, add_render, add_report
from t2t_mtl.cli.model_verbs import add_compare, add_eval, add_export, add_predict, add_prompt
from t2t_mtl.core.config import SourceConfig, load_config
from t2t_mtl.core.errors import ConfigError, DataError, Problem, T2TError, did_you_mean
from t2t_mtl.core.records import write_jsonl
from t2t_mtl.tasks import catalogue, sources

__all__ = ["build_parser", "configure_logging", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per verb."""
    p = argparse.ArgumentParser(prog="t2t-mtl", description="Multi-task text-to-text fine-tuning.")
    sub = p.add_subparsers(dest="verb", required=True)
    # Each verb module-level function `add_<verb>(sub)` registers itself below.
    for add in _VERBS:
        add(sub)
    return p


_VERBS: list = []  # filled by the add_* functions defined below, in order


# ---------------------------------------------------------------- validate


def add_validate(sub) -> None:
    """`t2t-mtl validate [PATH ...]`: check template files; every problem goes to stderr."""
    p = sub.add_parser(
        "validate",
        help="check task templates (YAML, keys, Jinja, fields, trial render on samples)",
        description="Check template files, folders or task names (default: every template in task_templates/, "
        "the folders in $T2T_MTL_TEMPLATES and the run config's template_dirs, and the run's tasks "
        "given as template files). Each problem is "
        "printed on stderr as `file:line: message (hint)`, then a summary line (also stderr); "
        "stdout stays empty. Exit 0 when everything is valid, 2 otherwise. --oracle also gives "
        "every row's own gold output back as the answer, through evaluation's parse and metric: "
        "a task that cannot score 100 with 0 % invalid on its own data is a problem (exit 2), "
        "listed with the rows that fail (file:row, gold output, what it parsed as).",
    )
    p.add_argument(
        "paths", nargs="*", metavar="PATH", help="template file, folder of templates, or task name"
    )
    p.add_argument(
        "--config",
        metavar="RUN.yaml",
        help="also search this run config's template_dirs; with --oracle, check the config's "
        "tasks on their own sources instead of the templates' bundled samples",
    )
    p.add_argument(
        "--no-trial",
        action="store_true",
        help="skip the trial render of every variant on the samples",
    )
    p.add_argument(
        "--oracle",
        action="store_true",
        help="score every row's gold output as the model's answer: each task must score 100 "
        "(bundled samples, every split; with --config the run's sources, its eval.split)",
    )
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="with --oracle: check at most N rows per task and split (default: all)",
    )
    p.set_defaults(func=_validate)


def _validate(args) -> int:
    cfg, problems, broken = None, [], False
    if args.config:  # its own problems and cross-checks are reported with the templates'
        cfg = load_config(args.config, collect=problems)
        broken = bool(problems)
        problems += catalogue.config_cross_problems(cfg, broken)
    extra = [cfg.resolve_path(d) for d in cfg.template_dirs] if cfg is not None else []
    n, found, used = catalogue.check_targets(args.paths, extra, trial=not args.no_trial, cfg=cfg)
    problems += found
    if args.oracle:  # the trial render may have reported the same bad rows already
        problems += _oracle(args, cfg, broken)
    problems = list(dict.fromkeys(problems))
    # Each file's problems in its line order (files in the order first reported).
    first = {f: i for i, f in reversed(list(enumerate(p.file for p in problems)))}
    problems.sort(key=lambda p: (first[p.file], p.line or 0))
    for prob in problems:
        print(prob.format(), file=sys.stderr)
    # which real rows each template was trial-rendered on
    note = "".join(f"; {what}: {', '.join(names)}" for what, names in used.items())
    if problems:
        files = len({p.file for p in problems})
        print(
            f"validate: {len(problems)} problem(s) in {files} file(s); {n} template(s) checked{note}",
            file=sys.stderr,
        )
        return 2
    print(f"validate: {n} template(s) OK{note}", file=sys.stderr)
    return 0


def _oracle(args, cfg=None, broken: bool = False) -> list[Problem]:
    """Run the oracle check (`evaluation.oracle`, torch-free); print one line per task on stderr
    and return the problems of the tasks that fail (`cfg`: the run config of --config; `broken`:
    it has problems of its own, already reported)."""
    from t2t_mtl.evaluation import oracle  # metrics + parsing only: validate stays model-free

    problems: list[Problem] = []
    if args.limit is not None and args.limit < 1:
        raise T2TError(Problem("<cli>", None, "--limit must be >= 1"))
    if cfg is not None and not args.paths:
        try:
            reports, untried = oracle.oracle_config(cfg, limit=args.limit), []
        except T2TError as e:  # templates that do not load: check_config has said so
            return problems + [p for p in e.problems if p not in problems]
        except Exception:  # noqa: BLE001 - a config with problems (reported) can trip it
            if not broken:
                raise
            return problems
    else:  # the templates named (their samples or source, else the config's sources for them)
        extra = [cfg.resolve_path(d) for d in cfg.template_dirs] if cfg is not None else []
        files, _ = catalogue.target_files(args.paths, extra)
        reports, untried = oracle.oracle_templates(files, limit=args.limit, cfg=cfg)
    for r in reports:
        print(r.summary(), file=sys.stderr)
        problems += r.all_problems()
    if untried:
        print(
            f"oracle: no rows to check (no bundled samples or source): {', '.join(untried)}",
            file=sys.stderr,
        )
    return problems


_VERBS.append(add_validate)


# ---------------------------------------------------------------- preview


def add_preview(sub) -> None:
    """`t2t-mtl preview TASK`: N rendered records as JSON lines on stdout (messages on stderr)."""
    p = sub.add_parser(
        "preview",
        help="print N rendered records of a task as JSON lines",
        description="Render N rows of a task and print one JSON record per line on stdout (nothing else goes "
        "to stdout). Without --source/--config the template's bundled samples are used. The number "
        "of skipped bad rows is always printed on stderr.",
    )
    p.add_argument("task", help="task name or template file")
    p.add_argument("-n", type=int, default=5, help="number of records (default 5)")
    p.add_argument("--split", default="train", help="split to read (default train)")
    p.add_argument(
        "--variant", help="render with this variant id (default: the template's variant policy)"
    )
    p.add_argument(
        "--source",
        metavar="PATH|HUB",
        help="local file/folder, or hub dataset id (hub:ID forces hub)",
    )
    p.add_argument(
        "--hub-config", metavar="NAME", help="hub dataset config name, with --source HUB"
    )
    p.add_argument(
        "--splits",
        metavar="SPLIT=STEM,...",
        help="split -> file stem / hub split, e.g. train=train_v2",
    )
    p.add_argument(
        "--columns", metavar="COL=FIELD,...", help="rename source columns to template fields"
    )
    p.add_argument(
        "--labels", metavar="RAW=NAME,...", help="map raw label values to names, e.g. 0=negative"
    )
    p.add_argument(
        "--config",
        metavar="RUN.yaml",
        help="take the task's source and template_dirs from a run config",
    )
    p.add_argument(
        "--bad-rows",
        choices=["skip", "fail"],
        help="skip (default) or fail on rows that do not fit",
    )
    p.set_defaults(func=_preview)


_PAIR_EXAMPLES = {  # what each KEY=VALUE option means, shown when one is miswritten
    "--labels": "--labels 0=negative,1=positive (raw value=label name)",
    "--columns": "--columns sentence=text,score=label (column=field)",
    "--splits": "--splits validation=dev (split=the file stem or hub split)",
}


def _pairs(text: str | None, option: str) -> dict | None:
    if text is None:
        return None
    out, bad = {}, []
    example = "e.g. " + _PAIR_EXAMPLES.get(option, f"{option} a=b,c=d")
    for item in (x.strip() for x in text.split(",")):
        k, eq, v = item.partition("=")
        why = ""
        if not eq or not k.strip():
            why = "is not KEY=VALUE"
        elif not v.strip():
            why = "has no value after '='"
        elif k.strip() in out:
            why = f"names '{k.strip()}' twice"
        elif option == "--columns" and v.strip() in out.values():
            why = f"maps a second column to field '{v.strip()}'"
        if why:
            bad.append(Problem("<cli>", None, f"{option}: '{item}' {why}", example))
            continue
        out[k.strip()] = v.strip()
    if bad:
        raise T2TError(bad)
    return out


def _cli_source(spec: str, hub_config: str | None) -> SourceConfig:
    if spec.startswith("hub:"):
        return SourceConfig(hub=spec[4:], name=hub_config)
    p = Path(spec).expanduser()
    if p.exists():
        return SourceConfig(path=str(p))
    if (
        spec.startswith((".", "/", "~"))
        or p.suffix in (".jsonl", ".json", ".csv", ".parquet")
        or spec.count("/") > 1
    ):
        raise DataError(
            Problem(
                spec,
                None,
                "--source: no such file or folder",
                "for a hub dataset give owner/name, or hub:NAME",
            )
        )
    return SourceConfig(hub=spec, name=hub_config)


def _preview(args) -> int:
    if args.n < 0:
        raise T2TError(Problem("<cli>", None, "-n must be >= 0"))
    extra, src, bad_rows, template, task_name = [], None, "skip", args.task, None
    in_config = None  # where the run config writes a map, when the source is its task's
    if args.config:  # its problems and cross-checks all at once
        cfg = catalogue.load_checked_config(args.config)
        extra = [cfg.resolve_path(d) for d in cfg.template_dirs]
        bad_rows = cfg.train.bad_rows
        match = [t for t in cfg.tasks if args.task in (cfg.task_name(t), t.template)]
        if not match:
            raise ConfigError(
                Problem(
                    args.config,
                    None,
                    f"task '{args.task}' is not in this run config",
                    did_you_mean(args.task, cfg.task_names()),
                )
            )
        template, task_name = match[0].template, cfg.task_name(match[0])
        src = cfg.resolved_source(match[0])
    tpl = catalogue.load_task(template, extra)
    if args.config:  # the variants the run trains on
        tpl = tpl.trained_on(match[0].variants)
    if args.config and not args.source:
        in_config = catalogue.config_source_at(cfg, cfg.tasks.index(match[0]), tpl)
    if args.variant:
        tpl.variant(args.variant)  # unknown id: fail before reading any data
    if args.source:
        src = _cli_source(args.source, args.hub_config)
    mapping = {
        k: v
        for k, v in (
            ("splits", _pairs(args.splits, "--splits")),
            ("columns", _pairs(args.columns, "--columns")),
            ("labels", _pairs(args.labels, "--labels")),
        )
        if v is not None
    }
    if mapping:
        if src is None:
            raise T2TError(
                Problem(
                    "<cli>",
                    None,
                    "--splits/--columns/--labels need --source (or --config)",
                    "the bundled samples already fit the template",
                )
            )
        src = dataclasses.replace(src, **mapping)
    rows = sources.load_rows(tpl, src, args.split, bad_rows=args.bad_rows or bad_rows, limit=args.n)
    print(rows.summary(), file=sys.stderr)
    if rows.all_bad:  # a map that fits no row is a mistake to fix, not an empty preview

        def source_at(key: str) -> tuple[str, int | None]:
            if key in mapping:
                return f"<cli> --{key}", None
            return in_config(key) if in_config is not None else tpl.where(("source", key))

        every = catalogue.all_bad_rows_problem(tpl, rows, source_at)
        raise DataError(([every] if every else []) + rows.problems[:5])
    if len(rows) == 0:
        print(f"{tpl.name}/{args.split}: no rows to show", file=sys.stderr)
    for i in range(min(args.n, len(rows))):
        rec = sources.render_row(tpl, rows, i, args.variant, row_id=str(i), split=args.split)
        if (
            task_name
        ):  # a task renamed in the run config keeps that name in its records (as in training)
            rec.task = task_name
        print(json.dumps(rec.to_dict(), ensure_ascii=False))
    return 0


_VERBS.append(add_preview)


# ---------------------------------------------------------------- mix


def add_mix(sub) -> None:
    """`t2t-mtl mix`: per-stage mixing table; optionally dump the stream's first records or plot shares."""
    p = sub.add_parser(
        "mix",
        help="show each stage's mixture (sizes, target shares); dump or plot the stream",
        description="Print task sizes and target shares per stage. --dump N --out F writes the "
        "first N records of each shown stage and adds their realised shares. With replay, each "
        "stage after the first mixes in the buffer that training would build from the stages "
        "before it: they offer steps x batch_size x grad_accum x --processes records each, so "
        "give the number of processes the run will train with. The whole config is validated "
        "and its data read; what needs the model or the device (its family, depth and length "
        "limits; mixed precision and optimiser) is checked by `train` before any weights "
        "load.",
    )
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument(
        "overrides", nargs="*", help="key=value config overrides, e.g. mixing.temperature=1"
    )
    p.add_argument("--stage", help="only this stage (earlier stages still feed the replay buffer)")
    p.add_argument("--split", default="train", help="split to mix (default: train)")
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="training processes (accelerate --num_processes): each stage trains on, and offers "
        "the replay buffer, N times the records of one process (default: $WORLD_SIZE if set, "
        "else 1)",
    )
    p.add_argument(
        "--dump", type=int, default=0, metavar="N", help="write the first N records per stage"
    )
    p.add_argument("--out", help="JSONL file for --dump")
    p.add_argument(
        "--plot", metavar="PNG", help="bar chart of target vs realised shares (matplotlib)"
    )
    p.set_defaults(func=_cmd_mix)


def _cmd_mix(args) -> int:
    from t2t_mtl.mixing import mixture, replay  # numpy: only this verb needs it

    processes = _processes(args.processes)
    if bool(args.dump) != bool(args.out) or args.dump < 0:
        raise ConfigError(
            [
                Problem(
                    "<cli>",
                    None,
                    "--dump N and --out FILE go together (N > 0)",
                    "e.g. --dump 2000 --out mix.jsonl",
                )
            ]
        )
    if args.plot and Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise ConfigError(
            Problem(
                "<cli>",
                None,
                f"--plot {args.plot}: a chart is written as {', '.join(PLOT_SUFFIXES)}",
                f"e.g. --plot {Path(args.plot).with_suffix('.png').name}",
            )
        )
    check_outputs(("--out", args.out, False, ()), ("--plot", args.plot, False, ()))
    # the config, its templates and sources: every problem at once, at its line or override
    cfg = catalogue.load_checked_config(args.config, args.overrides)
    read = tuple(catalogue.config_inputs(cfg))  # never written over, nor added to
    check_outputs(("--out", args.out, False, read), ("--plot", args.plot, False, read))
    stages = cfg.stage_list()
    names = [s.name for s in stages]
    if args.stage and args.stage not in names:
        raise ConfigError(
            [
                Problem(
                    args.config,
                    None,
                    f"unknown stage '{args.stage}'",
                    did_you_mean(args.stage, names),
                )
            ]
        )
    last = names.index(args.stage) if args.stage else len(stages) - 1
    needed = sorted({t for s in stages[: last + 1] for t in s.tasks})
    members = mixture.build_members(cfg, needed, split=args.split)
    print(
        "bad rows skipped: " + ", ".join(f"{n} {members[n].skipped}" for n in needed),
        file=sys.stderr,
    )
    for n in needed:
        if members[n].skipped and members[n].info.get("bad_rows"):
            print("  " + members[n].info["bad_rows"], file=sys.stderr)
    buf = (
        replay.buffer_for_run(cfg, [n for n, m in members.items() if m.info.get("label_task")])
        if cfg.replay.enabled
        else None
    )
    dumped, plotted = [], []
    for idx, st in enumerate(stages[: last + 1]):
        plan = mixture.plan_stage(cfg, idx, members, replay=mixture.stage_replay(buf))
        if not args.stage or st.name == args.stage:
            stream = plan.stream()
            if args.dump:
                for r in stream.take(args.dump):
                    r.meta["stage"] = st.name
                    dumped.append(r)
            elif args.plot:
                for _ in range(10_000):  # realised shares without rendering
                    stream.next_index()
            realised = (
                {k: v / stream.count for k, v in stream.counts().items()} if stream.count else None
            )
            _print_mix_table(cfg, plan, realised, stream.count)
            plotted.append((plan, realised))
        if buf is not None and idx < last:  # what training offers the buffer after this stage
            mixture.offer_stage_records(buf, plan, mixture.stage_records(cfg, idx, processes))
    if args.dump:
        write_jsonl(dumped, args.out)
        print(f"wrote {len(dumped)} records to {args.out}")
    if args.plot:
        _plot_mix(plotted, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _processes(given: int | None) -> int:
    """--processes, else $WORLD_SIZE (set by accelerate/torchrun), else 1; a ConfigError when < 1."""
    if given is not None:
        value, where = str(given), "--processes"
    else:
        value, where = os.environ.get("WORLD_SIZE", "1"), "$WORLD_SIZE"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(
            Problem.at("<cli>", f"{where}: {value!r} is not a number of processes >= 1", "e.g. 2")
        )
    return n


def _print_mix_table(cfg, plan, realised, n) -> None:
    mix = cfg.mixing
    print(
        f"stage {plan.name}: T={plan.temperature:g}, K={mix.cap}, unit={mix.unit}, seed={plan.seed}"
    )
    head = f"  {'task':<24}{'examples':>10}{'target tokens':>15}{'n_i':>12}{'target':>9}"
    print(head + (f"{'realised':>10}  (first {n})" if realised else ""))
    for m in plan.members:
        tok = f"{'' if m.tokens_exact else '~'}{m.tokens:,.0f}"
        line = f"  {m.name:<24}{m.size:>10,}{tok:>15}{plan.sizes[m.name]:>12,.0f}{plan.rates[m.name]:>9.2%}"
        print(line + (f"{realised.get(m.name, 0.0):>10.2%}" if realised else ""))


PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")  # what matplotlib writes by suffix


def _plot_mix(plotted, path) -> None:
    import matplotlib  # slow to import; only --plot needs it

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plotted), figsize=(5 * len(plotted), 4), squeeze=False)
    for ax, (plan, realised) in zip(axes[0], plotted):
        xs = range(len(plan.members))
        names = [m.name for m in plan.members]
        ax.bar([x - 0.2 for x in xs], [plan.rates[n] for n in names], 0.4, label="target")
        if realised:
            ax.bar(
                [x + 0.2 for x in xs], [realised.get(n, 0.0) for n in names], 0.4, label="realised"
            )
        ax.set_xticks(list(xs), names, rotation=30, ha="right")
        ax.set_title(f"stage {plan.name} (T={plan.temperature:g})")
        ax.set_ylabel("share of records")
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # as --out: its folder is made
    fig.savefig(path, dpi=100)
    plt.close(fig)


_VERBS.append(add_mix)


# ---------------------------------------------------------------- train


def add_train(sub) -> None:
    """`t2t-mtl train --config CFG [key=value ...]`: fine-tune per a run config (same code as launch/train.py)."""
    p = sub.add_parser(
        "train",
        help="fine-tune a model on the run config's tasks (LoRA / QLoRA / full)",
        description="Validate the config, templates, sources and model (every problem at once), "
        "then train and write the run folder (output_dir). An interrupted run resumes "
        "from its last checkpoint (train.resume: auto). For several GPUs/processes use "
        "`accelerate launch [--config_file launch/accelerate/ddp.yaml] launch/train.py "
        "--config CFG [key=value ...]`.",
    )
    p.add_argument("--config", required=True, help="run config YAML (see launch/configs/)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value config overrides, e.g. train.steps=50 output_dir=runs/x",
    )
    p.set_defaults(func=_train)


def _train(args) -> int:
    from t2t_mtl.training import preflight, trainer  # torch & co.

    # A config with problems is reported with every other problem of the run at once.
    cfg = preflight.load_run_config(args.config, args.overrides)
    run_dir = trainer.train(cfg)
    print(run_dir)
    return 0


_VERBS.append(add_train)


# ---------------------------------------------------------------- eval, predict, prompt, compare, export
# Defined in model_verbs.py (light module: heavy imports happen inside each verb).
_VERBS.extend([add_eval, add_predict, add_prompt, add_compare, add_export])
# report, render, export-task: hand a run to other tools (ecosystem_verbs.py, also light).
_VERBS.extend([add_report, add_render, add_export_task])


class _StderrHandler(logging.StreamHandler):
    """Writes bare messages to the `sys.stderr` of the moment (so a swapped stream, as in tests,
    receives them too)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Show the package's log records (`logging.getLogger("t2t_mtl...")`, `level` and up) on stderr
    as bare messages: library notes read exactly as printed lines. For the CLI and
    launch/train.py; calling it again changes nothing. Records still propagate to the root logger."""
    pkg = logging.getLogger("t2t_mtl")
    if not any(isinstance(h, _StderrHandler) for h in pkg.handlers):
        pkg.addHandler(_StderrHandler())
    pkg.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `t2t-mtl` console script."""
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except T2TError as e:
        for prob in e.problems:
            print(prob.format(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`t2t-mtl mix ... | head`): stop quietly, as a shell tool does;
        # stdout is pointed at devnull so that Python's exit flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what the shell reports for a tool stopped this way


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
