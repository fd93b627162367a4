"""Data-pipeline speed: mix + render + tokenize against the tokenizer-alone bound (issue 6, benchmark 4).

    .venv/bin/python bench/bench_pipeline.py [DATA_DIR] [--records 4000] [--rounds 3]
        [--out bench/results/pipeline.json] [--doc docs/benchmarks.md] [--no-doc] [--note TEXT]

The training pipeline of the default recipe on the five real slices (DATA_DIR, default
../shared/data/real): the seeded mixed stream (temperature sampling) renders each drawn row with its
task's template, and `features.encode` turns the record into token ids (prompt with the chat template,
answer, label mask, cutting the input of over-long records to max_length 256). Measured on the same
--records records of the stream, in one process, alternating the order each round (best of --rounds):
- pipeline: stream → render → `features.encode` (what the training loop calls per example);
- mix + render only: the stream's records without tokenisation;
- tokenizer bound, per record: the tokenizer alone on the *final* prompt and answer texts of the same
  records (pre-rendered, pre-cut), one call each as the pipeline makes them — the pipeline cannot beat it;
- tokenizer bound, batched: the same texts in one batched call (the Rust tokenizer's fastest path);
- tokenizer on the uncut texts: the prompt and answer texts before any cut, one call each.
The pre-pass also counts the pipeline's tokenizer calls per record. The load average before and after
is recorded: on a machine shared with other jobs the rates are lower bounds.
The training step consumes ~1–2 records/s on this CPU (bench_train.py), which puts these rates in context.
Writes --out and the "Data pipeline speed" section of --doc.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

SECTION = "## Data pipeline speed"


def setup(data: Path):
    """Run config (default recipe + five slices), tokenizer, prompt format, task index, members."""
    from t2t_mtl.core.config import load_config
    from t2t_mtl.mixing import mixture
    from t2t_mtl.model import loading
    from t2t_mtl.model.prompt_format import PromptFormat

    d = common.default_recipe()
    d.update(tasks=common.slice_tasks(data), output_dir=tempfile.mkdtemp(prefix="bench-pipeline-"))
    cfg = load_config(data=d)
    from transformers import AutoTokenizer

    path, kw, hf_config = loading.resolve_model(
        cfg.model.name
    )  # the tokenizer only: no weights needed
    tok = AutoTokenizer.from_pretrained(path, **kw)
    fmt = PromptFormat.for_tokenizer(tok, loading.detect_family(hf_config), cfg.model.prompt_format)
    return cfg, tok, fmt, {n: i for i, n in enumerate(cfg.task_names())}, mixture.build_members(cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data_dir", nargs="?", default=str(common.DEFAULT_DATA))
    ap.add_argument("--records", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument(
        "--note",
        default="",
        help="a sentence for the doc section, e.g. what else ran on the machine",
    )
    args = ap.parse_args(argv)
    data = Path(args.data_dir).resolve()
    errors = common.check_data_dir(data, [f for _, f in common.SLICES])
    if errors:
        return common.report_errors(errors)
    import torch

    from t2t_mtl.mixing import mixture
    from t2t_mtl.model import features

    torch.set_num_threads(1)  # tokenisation is single-threaded per call; keep torch out of the way
    cfg, tok, fmt, index, members = setup(data)
    L, T = cfg.model.max_length, cfg.model.max_target_length
    n = args.records

    def stream():
        return mixture.plan_stage(cfg, 0, members).stream()

    class Counting:  # the tokenizer, counting the pipeline's calls (pre-pass only)
        calls = 0

        def __call__(self, *a, **kw):
            Counting.calls += 1
            return tok(*a, **kw)

        def __getattr__(self, name):
            return getattr(tok, name)

    counting = Counting()
    load_before = os.getloadavg()[0]
    # The final texts of the same records (after the pipeline's cut), for the tokenizer bound.
    feats, texts, full = [], [], []
    for rec in stream().take(n):
        f = features.encode(rec, counting, fmt, L, T, task_index=index[rec.task])
        feats.append(f)
        cut = sum(1 for x in f["labels"] if x == features.IGNORE_INDEX)
        texts.append(
            (tok.decode(f["input_ids"][:cut], clean_up_tokenization_spaces=False), fmt.target(rec))
        )
        full.append((fmt.prompt(rec), fmt.target(rec)))
    tokens = sum(len(f["input_ids"]) for f in feats)
    truncated = sum(bool(f["truncated"]) for f in feats)

    def pipeline():
        for rec in stream().take(n):
            features.encode(rec, tok, fmt, L, T, task_index=index[rec.task])

    def render_only():
        stream().take(n)

    def tok_per_record():
        for p, t in texts:
            tok(p, add_special_tokens=False)
            tok(t, add_special_tokens=False)

    def tok_full():
        for p, t in full:
            tok(p, add_special_tokens=False)
            tok(t, add_special_tokens=False)

    def tok_batched():
        tok([p for p, _ in texts], add_special_tokens=False)
        tok([t for _, t in texts], add_special_tokens=False)

    fns = {
        "pipeline (mix + render + tokenize)": pipeline,
        "mix + render only": render_only,
        "tokenizer bound, per record": tok_per_record,
        "tokenizer bound, batched": tok_batched,
        "tokenizer on the uncut texts, per record": tok_full,
    }
    best = {k: float("inf") for k in fns}
    for r in range(args.rounds):
        for k in list(fns) if r % 2 == 0 else list(reversed(fns)):
            t0 = time.perf_counter()
            fns[k]()
            best[k] = min(best[k], time.perf_counter() - t0)
    res = {
        k: {
            "seconds": round(v, 3),
            "records_per_s": round(n / v, 1),
            "tokens_per_s": round(tokens / v),
        }
        for k, v in best.items()
    }
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    calls = Counting.calls / n
    pipe_s, render_s = best["pipeline (mix + render + tokenize)"], best["mix + render only"]
    per_s = best["tokenizer bound, per record"]
    pipe = res["pipeline (mix + render + tokenize)"]["records_per_s"]
    per = res["tokenizer bound, per record"]["records_per_s"]
    uncut = res["tokenizer on the uncut texts, per record"]["records_per_s"]
    out = {
        "machine": common.machine(
            command="python bench/bench_pipeline.py " + " ".join(argv or sys.argv[1:])
        ),
        "records": n,
        "tokens": tokens,
        "truncated_records": truncated,
        "tokenizer_calls_per_record": round(calls, 3),
        "load_average_1min_before_after": list(load),
        "note": args.note,
        "max_length": L,
        "results": res,
        "pipeline_over_tokenizer_bound": round(pipe / per, 3),
        "pipeline_over_uncut_tokenizer": round(pipe / uncut, 3),
    }
    common.write_json(Path(args.out), out)
    lines = ["| stage | records/s | tokens/s | seconds |", "|---|---:|---:|---:|"]
    for k, v in res.items():
        lines.append(
            f"| {k} | {v['records_per_s']:,.0f} | {v['tokens_per_s']:,} | {v['seconds']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_doc:
        body = "\n\n".join(
            [
                "Command: `python bench/bench_pipeline.py ../shared/data/real`. Results: `bench/results/pipeline.json`.",
                common.machine_line(out["machine"]),
                f"{n:,} records of the default recipe's mixed stream over the five slices ({tokens:,} tokens, "
                f"{truncated} records cut to max_length {L}), one process, one torch thread, best of {args.rounds} "
                "rounds:",
                table,
                f"The pipeline runs at **{pipe / per:.0%} of the per-record tokenizer bound** (tokenising the "
                "final texts alone, one call per prompt and answer as the pipeline makes them) and at "
                f"{pipe / uncut:.0%} of tokenising the uncut texts once (which any pipeline must do to find where "
                f"to cut). It makes {calls:.2f} tokenizer calls per record: the answer and the prompt once each, "
                "and an over-long prompt again after its cut, whose points come from the first call's token "
                "offsets (`features.fitted_prompt`): once, or twice when the first cut is over (usual for a "
                "middle cut, by the mark's own tokens); before issue 17 an over-long record was tokenised whole "
                "twice, then its input alone, then after the cut (2.8 calls per record, 34 % of the bound on "
                "2026-11-24, on another CPU: compare the ratios, not the rates). Reserving the mark's tokens "
                "before the first cut saved most second calls (2.21 calls per record, 51 % of the bound in a "
                "run on 2026-12-02) but moved the cut by a token in 116 of 2,681 cut prompts of the real "
                "slices, so runs trained before would be prompted differently: not done. Issue 17's target, 67 % of "
                f"the bound, is {'met' if pipe / per >= 0.67 else 'not met'}. Mixing and rendering alone take "
                f"{render_s / pipe_s:.0%} of the pipeline's time and lie outside the bound, which caps the ratio "
                f"at {per_s / (per_s + render_s):.0%}; the rest of the gap is tokenising the longer uncut "
                "prompts (to find the cut), the second call on cut prompts, and the per-record Python work of "
                "`features.encode` (the chat template is no longer rendered per record: a one-turn prompt is "
                "its frame around the content, `PromptFormat._user_frame`, 45 % → 49 % of the bound on "
                "2026-12-02). "
                "Batched tokenisation looks faster, but on this 2-core CPU its gain over one-text calls is the "
                "Rust tokenizer's thread pool, not less work: encoding each window of 8 records in batched "
                "calls (a prototype `encode_many`, the same ids) measured 1,944 records/s with the pool off "
                "and 2,046 with it on, against 2,063 one record at a time, in one run on 2026-12-02 — no "
                "gain, so the training loop encodes one record at a time. "
                "What closes the rest of the gap is cutting on token ids (splicing the kept ids of the first "
                "call instead of tokenising the cut text): no second call, about the uncut-text rate. We do "
                "not, by design: a cut prompt's ids would no longer be its text tokenised (the text "
                "`t2t-mtl render` exports and a server sent that text sees), and the prompts of runs "
                f"trained before would change. At ~{pipe:,.0f} records/s the pipeline is far from limiting "
                "training, which consumes ~1–2 records/s on this CPU (see the training benchmark); on a GPU "
                "the next windows are built in the background during the step (`train.prefetch`).",
                f"1-minute load average before and after: {load[0]:.2f} and {load[1]:.2f} on {os.cpu_count()} "
                "cores"
                + (
                    ": other jobs shared the machine, so every rate above is a lower bound and the ratios "
                    "are noisier than on an idle machine."
                    if max(load) > 1
                    else "."
                )
                + (f" {args.note}" if args.note else ""),
            ]
        )
        common.update_doc(Path(args.doc), SECTION, body)
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
