"""Evaluation speed: examples/s per task with the generation speed-ups off (as before) and on, same
model, same rows, same process, and a check that every score and parsed prediction is unchanged.

    .venv/bin/python bench/bench_eval.py [--run RUN [--base]] [--limit N] [--rounds 2] [--ablate [KEY,...]] [--threads 1]
                                         [--out bench/results/eval_speed.json] [--doc docs/benchmarks.md] [--no-doc]

Without --run it evaluates the embedded SmolLM2-135M-Instruct, untuned, on the tasks of
launch/configs/default.yaml (the quick start's seven tasks, their bundled validation samples); with
--run, that run's model (or its base model, --base) on the run's tasks. Settings compared, each a
full `evaluator.evaluate` of one task (generation, parsing, scoring, intervals):

- before: transformers' `generate` for every batch, one budget for all tasks (eval.max_new_tokens),
  rows run until their stop token or the budget (`task_budgets=False, line_stop=False,
  compact=False, share_prefix=False`), the LoRA adapter kept apart from the base weights;
- after: the defaults: per-task budgets (not for a base model, as in `t2t-mtl eval --base`),
  label/span rows end with their first line, ended rows leave the batch, shared prompt prefixes
  are prefilled once per batch (`evaluate`'s docstring), the adapter merged into the float32 base
  weights (`eval.merge_adapter`; nothing to merge for a base model);
- with --ablate, also "after" minus one speed-up at a time (--ablate merge,compact: only those).

The machine may be shared, so the settings run interleaved: every round evaluates each task under
every setting back to back, the order of settings rotating from task to task and round to round, so
load from other processes falls on all of them alike. One warm-up batch runs first. Reported: per
task, examples/s of each setting (median over rounds, wall clock), the speed-up, and whether the
scores (primary, every metric, invalid rate, per-example statistics) and the parsed predictions are
identical to "before". Writes --out and replaces the "Evaluation speed" section of --doc.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

SECTION = "## Evaluation speed"
BEFORE = {
    "task_budgets": False,
    "line_stop": False,
    "compact": False,
    "share_prefix": False,
    "merge": False,
}
AFTER = {
    "task_budgets": True,
    "line_stop": True,
    "compact": True,
    "share_prefix": True,
    "merge": True,
}
# Not an `evaluate` argument: which model object the setting evaluates (the LoRA adapter merged into
# the base weights, `loading.merge_lora_for_inference`, or not).
MODEL_KEYS = ("merge",)
SCORE_KEYS = ("primary", "metrics", "invalid_rate", "per_example", "ci_low", "ci_high")


def settings(ablate: str | None, base: bool) -> dict[str, dict[str, bool]]:
    """The compared settings. A base model gets no per-task budgets in "after", as `t2t-mtl eval
    --base` (run_eval): the budgets fit answers fine-tuning taught, and an untuned model was taught
    none."""
    after = {**AFTER, "task_budgets": not base}
    out = {"before": BEFORE, "after": after}
    if ablate:
        keys = set(after) if ablate == "all" else {k.strip() for k in ablate.split(",")}
        for k in after:
            if after[k] and k in keys:
                out[f"after, no {k}"] = {**after, k: False}
    return out


def load(args):
    """(cfg, tasks, model, tokenizer, prompt format, description) for the model to measure."""
    from t2t_mtl.core.config import load_config
    from t2t_mtl.evaluation.evaluator import eval_tasks
    from t2t_mtl.model.loading import load_for_inference, load_model_and_tokenizer
    from t2t_mtl.model.prompt_format import PromptFormat

    if args.run:
        from t2t_mtl.runs.folder import Run

        run = Run.load(args.run)
        model, tok, _family, manifest = load_for_inference(run.bundle_dir(), base=args.base)
        fmt = PromptFormat.from_dict(manifest["prompt_format"])
        what = f"run `{run.dir}`" + (" (its base model, --base)" if args.base else "")
        return (
            run.cfg,
            eval_tasks(run.cfg, template_dir=run.dir / "templates"),
            model,
            tok,
            fmt,
            what,
        )
    cfg = load_config(ROOT / "launch" / "configs" / "default.yaml")
    model, tok, family = load_model_and_tokenizer(cfg.model, for_training=False)
    fmt = PromptFormat.for_tokenizer(tok, family, cfg.model.prompt_format, cfg.model.truncation)
    what = "the embedded SmolLM2-135M-Instruct, untuned, on launch/configs/default.yaml's tasks"
    return cfg, eval_tasks(cfg), model, tok, fmt, what


def load_words(load: list | None) -> str:
    """The machine's load while the benchmark ran, in words ("" when not recorded)."""
    if not load:
        return ""
    return (
        f"Load average (1 min) on the machine while it ran: {min(load):.1f} to {max(load):.1f} "
        "(other jobs share its cores). "
    )


def merged_copy(model):
    """A copy of `model` with its adapter merged where `eval.merge_adapter` would merge it (the
    model itself when there is nothing to merge)."""
    import copy

    from t2t_mtl.model.loading import merge_lora_for_inference

    from_peft = hasattr(model, "merge_and_unload")
    return merge_lora_for_inference(copy.deepcopy(model)) if from_peft else model


def parsed(entry: dict) -> list:
    return [(p["prediction"], p["valid"]) for p in entry["predictions"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a trained run folder (default: the embedded base model)")
    ap.add_argument("--base", action="store_true", help="with --run: its untuned base model")
    ap.add_argument("--limit", type=int, help="rows per task (default: the whole eval split)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--ablate",
        nargs="?",
        const="all",
        help="also 'after' minus each speed-up (or only the comma-separated ones named: "
        + ", ".join(AFTER)
        + ")",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine extra threads spin-wait for busy "
        "cores and the timings scatter; 0 = torch's default)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_speed.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--section", default=SECTION, help="the `## ...` section of --doc to replace")
    ap.add_argument("--note", help="a line for the doc section (e.g. how the run was trained)")
    args = ap.parse_args(argv)
    if args.ablate and args.ablate != "all":
        unknown = [k for k in args.ablate.split(",") if k.strip() not in AFTER]
        if unknown:
            return common.report_errors(
                [
                    f"error: --ablate: unknown speed-up {k!r} (choose from {', '.join(AFTER)})"
                    for k in unknown
                ]
            )
    if args.base and not args.run:
        return common.report_errors(["error: --base needs --run (without --run the base is used)"])

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from t2t_mtl.evaluation.evaluator import evaluate, load_examples
    from t2t_mtl.model.generation import generate_texts

    t_start = time.perf_counter()
    cfg, tasks, model, tok, fmt, what = load(args)
    models = {False: model, True: merged_copy(model)}
    ev = cfg.eval
    kw = dict(
        split=ev.split,
        limit=args.limit,
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
        max_prompt_tokens=cfg.model.max_length,
        progress=False,
        keep_predictions=True,
        ci_resamples=ev.ci_resamples,
    )
    for t in tasks:  # read and render once, outside the timings
        load_examples(t, ev.split, args.limit)
    warm = [ex.record for ex in load_examples(tasks[0], ev.split, args.limit)[0][:4]]
    generate_texts(model, tok, fmt, warm, max_new_tokens=4, compact=False)
    generate_texts(model, tok, fmt, warm, max_new_tokens=4, compact=True)
    setups = settings(args.ablate, base=args.base or not args.run)
    names = list(setups)
    times: dict[str, dict[str, list[float]]] = {t.name: {s: [] for s in names} for t in tasks}
    cpu: dict[str, dict[str, list[float]]] = {t.name: {s: [] for s in names} for t in tasks}
    results: dict[str, dict[str, list[dict]]] = {t.name: {s: [] for s in names} for t in tasks}
    loads: list[float] = []
    for r in range(args.rounds):
        for k, t in enumerate(tasks):
            shift = (r + k) % len(names)
            for s in names[shift:] + names[:shift]:
                t0, c0 = time.perf_counter(), time.process_time()
                opts = {k: v for k, v in setups[s].items() if k not in MODEL_KEYS}
                res = evaluate(models[setups[s]["merge"]], tok, fmt, [t], **kw, **opts)
                times[t.name][s].append(time.perf_counter() - t0)
                cpu[t.name][s].append(time.process_time() - c0)
                results[t.name][s].append(res["tasks"][t.name])
            loads.append(round(os.getloadavg()[0], 2))
            print(
                f"round {r + 1} {t.name}: "
                + ", ".join(f"{s} {times[t.name][s][-1]:.1f}s" for s in names),
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for t in tasks:
        e0 = results[t.name]["before"][0]
        n = e0["n"]
        row = {"task": t.name, "n": n, "parse": t.template.parse, "settings": {}}
        for s in names:
            entries = results[t.name][s]
            wall = statistics.median(times[t.name][s])
            row["settings"][s] = {
                "seconds": [round(x, 2) for x in times[t.name][s]],
                "cpu_seconds": [round(x, 2) for x in cpu[t.name][s]],
                "examples_per_s": round(n / wall, 2),
                "examples_per_cpu_s": round(n / statistics.median(cpu[t.name][s]), 2),
                "max_new_tokens": entries[0].get("max_new_tokens"),
                "scores_identical": all(
                    all(e[k] == e0.get(k) for k in SCORE_KEYS if k in e0) for e in entries
                ),
                "predictions_identical": all(parsed(e) == parsed(e0) for e in entries),
                "primary": entries[0]["primary"],
            }
        st = row["settings"]
        row["speedup"] = round(st["after"]["examples_per_s"] / st["before"]["examples_per_s"], 2)
        row["speedup_cpu"] = round(
            st["after"]["examples_per_cpu_s"] / st["before"]["examples_per_cpu_s"], 2
        )
        rows.append(row)
    total_n = sum(r["n"] for r in rows)
    totals = {
        s: round(total_n / sum(statistics.median(times[t.name][s]) for t in tasks), 2)
        for s in names
    }
    totals_cpu = {
        s: round(total_n / sum(statistics.median(cpu[t.name][s]) for t in tasks), 2) for s in names
    }
    out = {
        "machine": common.machine(torch_threads=torch.get_num_threads()),
        "model": what,
        "command": shlex.join(
            ["python", "bench/bench_eval.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "results": str(args.out.resolve().relative_to(ROOT))
        if args.out.resolve().is_relative_to(ROOT)
        else str(args.out),
        "note": args.note,
        "rounds": args.rounds,
        "limit": args.limit,
        "split": ev.split,
        "batch_size": ev.batch_size,
        "max_new_tokens": ev.max_new_tokens,
        "settings": setups,
        "tasks": rows,
        "all_tasks_examples_per_s": totals,
        "all_tasks_examples_per_cpu_s": totals_cpu,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "load_average": loads,
    }
    common.write_json(args.out, out)
    body = markdown(out)
    print(body)
    if not args.no_doc:
        common.update_doc(args.doc, args.section, body)
    return 0 if all(s["scores_identical"] for r in rows for s in r["settings"].values()) else 1


def markdown(out: dict) -> str:
    names = list(out["settings"])
    m = out["machine"]
    cpu_total = sum(sum(v["cpu_seconds"]) for r in out["tasks"] for v in r["settings"].values())
    lines = [
        f"Command (repository root): `.venv/bin/{out['command']}`. Results: `{out['results']}`.",
        "",
        common.machine_line(m) + f" Torch threads: {m.get('torch_threads')}.",
        "",
        *([out["note"], ""] if out.get("note") else []),
        f"Model: {out['model']}; split `{out['split']}`"
        + (f", first {out['limit']} rows per task" if out["limit"] else ", every row")
        + f"; batch size {out['batch_size']}, eval.max_new_tokens {out['max_new_tokens']}. *before*: "
        "transformers' `generate` on every batch, one budget for all tasks, each batch running until "
        "its longest row ends; *after*: "
        + (
            "per-task budgets (2 x the longest training answer + 8 tokens, at most "
            "eval.max_new_tokens), "
            if out["settings"]["after"]["task_budgets"]
            else "still one budget for all tasks (an untuned model gets no per-task budgets, as in "
            "`t2t-mtl eval --base`: they fit the answers fine-tuning taught), "
        )
        + "label and span rows stop at the end of their first line, ended rows leave the batch "
        "(compact greedy decoding) and the prompt tokens a batch shares (chat header, system message, "
        "instruction) are prefilled once per batch"
        + (
            ", and the LoRA adapter is merged into the float32 base weights (`eval.merge_adapter`)"
            if out["settings"]["after"].get("merge")
            and out["settings"]["before"].get("merge") is False
            else ""
        )
        + ". Each cell is a whole `evaluate` of one task (generation, parsing, "
        f"scoring, 95 % intervals), the median over {out['rounds']} rounds; ex/CPU-s divides by the "
        "process's CPU time instead of the wall clock. "
        + load_words(out.get("load_average"))
        + "The settings ran interleaved in one process (each task under "
        "every setting back to back, the order rotating per task and round) and on one torch thread "
        "(two threads spin-wait when another process holds a core): load from elsewhere falls on both "
        "alike, but absolute rates vary between runs and CPU-time rates are the steadier measure.",
        "",
        "| task | parse | n | budget before → after | "
        + " | ".join(f"{s}: ex/s, ex/CPU-s" for s in names)
        + " | speed-up wall, CPU | scores identical | predictions identical |",
        "|---|---|---:|---|" + "---:|" * len(names) + "---:|---|---|",
    ]
    for r in out["tasks"]:
        st = r["settings"]
        same_scores = all(v["scores_identical"] for v in st.values())
        same_preds = all(v["predictions_identical"] for v in st.values())
        lines.append(
            f"| {r['task']} | {r['parse']} | {r['n']} | {st['before']['max_new_tokens']} → "
            f"{st['after']['max_new_tokens']} | "
            + " | ".join(
                f"{st[s]['examples_per_s']:.2f}, {st[s]['examples_per_cpu_s']:.2f}" for s in names
            )
            + f" | {r['speedup']:.2f}x, {r['speedup_cpu']:.2f}x | "
            f"{'yes' if same_scores else '**no**'} | {'yes' if same_preds else '**no**'} |"
        )
    tot, tot_cpu = out["all_tasks_examples_per_s"], out["all_tasks_examples_per_cpu_s"]
    lines.append(
        f"| **all tasks** | | {sum(r['n'] for r in out['tasks'])} | | "
        + " | ".join(f"{tot[s]:.2f}, {tot_cpu[s]:.2f}" for s in names)
        + f" | {tot['after'] / tot['before']:.2f}x, {tot_cpu['after'] / tot_cpu['before']:.2f}x | | |"
    )
    lines += [
        "",
        f"Whole benchmark: {out['wall_seconds']:.0f} s wall clock on the loaded machine, "
        f"{cpu_total:.0f} s of CPU time. *scores identical*: primary score, every "
        "metric, invalid rate and the per-example statistics of every round under every setting equal "
        "those of *before* (round 1); *predictions identical*: the same parsed prediction and "
        "validity for every row (the raw text of a label or span row may end earlier: after its "
        "first line).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
