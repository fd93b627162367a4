"""Markdown tables and PNG plots for bench/bench_quality.py's results (quality, temperature, transfer).

    .venv/bin/python bench/report_quality.py [--results bench/results/quality.json] [--doc docs/benchmarks.md]

Rewrites the "Multi-task quality" and "Zero-shot transfer" sections of the doc from the results file
(bench_quality.py calls `write` itself at the end of a run); the plots go to docs/img/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

TASKS = ("sentiment_sst2", "nli_3way", "qa_squad", "ner_conll2003", "summarization")
LABEL = {
    "sentiment_sst2": "SST-2 (accuracy)",
    "nli_3way": "SICK (accuracy)",
    "qa_squad": "SQuAD (F1)",
    "ner_conll2003": "CoNLL-2003 (span F1)",
    "summarization": "SciTLDR (ROUGE-L)",
    "nli_2way": "RTE (accuracy)",
    "topic_ag_news": "AG News (accuracy)",
}
COMMAND = "python bench/bench_quality.py ../shared/data/real"


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def quality_table(runs: dict) -> tuple[str, dict]:
    """Per-task primary scores of (a) base, (b) multi, (c) single, (d) TRL; returns (markdown, columns)."""
    cols = {
        "(a) base, zero-shot": runs.get("base", {}).get("scores"),
        "(b) ours, multi-task": runs.get("multi", {}).get("scores"),
        "(c) ours, single-task": (
            {t: runs[f"single_{t}"]["scores"].get(t) for t in TASKS if f"single_{t}" in runs}
            or None
        ),
        "(d) TRL SFTTrainer, hand prompts": runs.get("trl", {}).get("scores"),
    }
    cols = {k: v for k, v in cols.items() if v}
    lines = ["| task | " + " | ".join(cols) + " | (b) − (c) |", "|---|" + "---:|" * (len(cols) + 1)]
    b, c = cols.get("(b) ours, multi-task"), cols.get("(c) ours, single-task")
    for t in TASKS:
        cells = [common.fmt_score(v.get(t)) for v in cols.values()]
        diff = (
            f"{b[t] - c[t]:+.1f}"
            if b and c and b.get(t) is not None and c.get(t) is not None
            else "–"
        )
        lines.append(f"| {LABEL[t]} | " + " | ".join(cells) + f" | {diff} |")
    means = [
        common.fmt_score(_mean(v.get(t) for t in TASKS)) if all(t in v for t in TASKS) else "–"
        for v in cols.values()
    ]
    mdiff = "–"
    if b and c and all(t in b and t in c for t in TASKS):
        mdiff = f"{_mean(b[t] for t in TASKS) - _mean(c[t] for t in TASKS):+.1f}"
    lines.append("| **mean** | " + " | ".join(f"**{m}**" for m in means) + f" | **{mdiff}** |")
    inv = {
        "(a) base, zero-shot": runs.get("base", {}).get("invalid"),
        "(b) ours, multi-task": runs.get("multi", {}).get("invalid"),
        "(c) ours, single-task": {
            t: runs[f"single_{t}"].get("invalid", {}).get(t) for t in TASKS if f"single_{t}" in runs
        },
        "(d) TRL SFTTrainer, hand prompts": runs.get("trl", {}).get("invalid"),
    }
    cells = []
    for k in cols:
        vals = [v for v in (inv.get(k) or {}).values() if v is not None]
        cells.append(f"{sum(vals) / len(vals):.0f} %" if vals else "–")
    lines.append("| unreadable answers (mean over tasks) | " + " | ".join(cells) + " | |")
    return "\n".join(lines), cols


def budget_table(runs: dict) -> str:
    """Training time, throughput and final loss of every trained run."""
    lines = [
        "| run | training examples | wall time (s) | input tokens/s | final loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        tr = r.get("train")
        if not tr:
            continue
        ex = tr.get("examples") or (tr.get("steps") or 0) * 8
        tps = tr.get("input_tokens_per_s")
        loss = tr.get("final_loss")
        lines.append(
            f"| {name} | {ex:,} | {tr.get('seconds', 0):,.0f} | {tps if tps is not None else '–'} | "
            f"{'–' if loss is None else f'{loss:.3f}'} |"
        )
    return "\n".join(lines)


def temperature_table(runs: dict, caps: dict | None) -> str:
    names = [n for n in sorted(runs) if n.startswith("imbalanced_T")]
    if not names:
        return ""
    lines = [
        "| task | training rows (cap) | "
        + " | ".join(f"T={runs[n]['temperature']:g}: share → score" for n in names)
        + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for t in TASKS:
        cells = [
            f"{100 * runs[n]['shares'].get(t, 0):.1f} % → {common.fmt_score(runs[n]['scores'].get(t))}"
            for n in names
        ]
        lines.append(f"| {LABEL[t]} | {(caps or {}).get(t, '–')} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mean score** | | "
        + " | ".join(
            f"**{common.fmt_score(_mean(runs[n]['scores'].get(t) for t in TASKS))}**" for n in names
        )
        + " |"
    )
    return "\n".join(lines)


def truncation_table(runs: dict, stats: dict | None) -> str:
    """(b) (over-long inputs lose their end) next to the same run cutting their middle."""
    b, m = runs.get("multi", {}).get("scores"), runs.get("multi_middle", {}).get("scores")
    if not (b and m):
        return ""
    stats = stats or {}
    lines = [
        "| task | evaluated prompts cut | (b) multi-task, end cut | multi-task, middle cut | change |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in TASKS:
        st = stats.get(t, {})
        cut = f"{st['cut_pct']:.0f} %" if "cut_pct" in st else "–"
        if "question_lost_pct_end" in st:
            cut += f" (question lost: {st['question_lost_pct_end']:.0f} % → {st['question_lost_pct_middle']:.0f} %)"
        diff = f"{m[t] - b[t]:+.1f}" if b.get(t) is not None and m.get(t) is not None else "–"
        lines.append(
            f"| {LABEL[t]} | {cut} | {common.fmt_score(b.get(t))} | {common.fmt_score(m.get(t))} | {diff} |"
        )
    mb, mm = _mean(b.get(t) for t in TASKS), _mean(m.get(t) for t in TASKS)
    lines.append(
        f"| **mean** | | **{common.fmt_score(mb)}** | **{common.fmt_score(mm)}** | "
        f"**{mm - mb:+.1f}** |"
        if mb is not None and mm is not None
        else "| **mean** | | | | |"
    )
    return "\n".join(lines)


def ablation_table(runs: dict, key: str, columns: tuple[str, str, str, str]) -> str:
    """(b) next to the ablation run `runs[key]` and TRL (d), per task and mean. `columns`: headers of (b),
    the ablation, TRL and the ablation − (b) difference. Empty when either run is missing."""
    b, o, d = (runs.get(k, {}).get("scores") for k in ("multi", key, "trl"))
    if not (b and o):
        return ""
    lines = ["| task | " + " | ".join(columns) + " |", "|---|---:|---:|---:|---:|"]
    for t in TASKS:
        diff = f"{o[t] - b[t]:+.1f}" if b.get(t) is not None and o.get(t) is not None else "–"
        lines.append(
            f"| {LABEL[t]} | {common.fmt_score(b.get(t))} | {common.fmt_score(o.get(t))} | "
            f"{common.fmt_score((d or {}).get(t))} | {diff} |"
        )
    mb, mo = _mean(b.get(t) for t in TASKS), _mean(o.get(t) for t in TASKS)
    md = _mean((d or {}).get(t) for t in TASKS)
    lines.append(
        f"| **mean** | **{common.fmt_score(mb)}** | **{common.fmt_score(mo)}** | **{common.fmt_score(md)}** | "
        f"**{mo - mb:+.1f}** |"
    )
    return "\n".join(lines)


def transfer_table(tr: dict) -> str:
    cols = [
        ("base_template", "base, template"),
        ("multi_template", "multi-task, template"),
        ("base_free", "base, free instruction"),
        ("multi_free", "multi-task, free instruction"),
        ("base_rank", "base, ranked choices"),
        ("multi_rank", "multi-task, ranked choices"),
    ]
    cols = [(k, h) for k, h in cols if k in tr]
    lines = ["| task | " + " | ".join(h for _, h in cols) + " |", "|---|" + "---:|" * len(cols)]
    for t in ("nli_2way", "topic_ag_news"):
        cells = []
        for k, _ in cols:
            inv = (
                None if k.endswith("_rank") else (tr.get(f"{k}_invalid") or {}).get(t)
            )  # ranking never fails
            cells.append(
                common.fmt_score(tr[k].get(t))
                + (f" ({inv:.0f} % unreadable)" if inv is not None else "")
            )
        lines.append(f"| {LABEL[t]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_quality(cols: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / max(len(cols), 1)
    for j, (name, sc) in enumerate(cols.items()):
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(TASKS))]
        ax.bar(xs, [sc.get(t) or 0 for t in TASKS], width, label=name)
    ax.set_xticks(range(len(TASKS)), [LABEL[t] for t in TASKS], fontsize=8)
    ax.set_ylabel("primary metric (points)")
    ax.set_title(
        "SmolLM2-135M-Instruct, 1,600 training examples, 100 validation rows per task", fontsize=9
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_temperature(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(
        (n for n in runs if n.startswith("imbalanced_T")), key=lambda n: runs[n]["temperature"]
    )
    temps = [runs[n]["temperature"] for n in names]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 3.4))
    for t in TASKS:
        a1.plot(
            temps, [100 * runs[n]["shares"].get(t, 0) for n in names], marker="o", label=LABEL[t]
        )
        a2.plot(temps, [runs[n]["scores"].get(t) or 0 for n in names], marker="o", label=LABEL[t])
    for ax, yl in ((a1, "share of training examples (%)"), (a2, "score (points)")):
        ax.set_xscale("log")
        ax.set_xticks(temps, [f"{t:g}" for t in temps])
        ax.minorticks_off()  # a log axis otherwise labels 3×10^0, 4×10^0 between the measured T
        ax.set_xlabel("temperature T")
        ax.set_ylabel(yl)
    a2.legend(
        fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1)
    )  # outside: the lines fill the axes
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, doc: Path) -> None:
    """Rewrite both doc sections from `results` (and the plots under docs/img/)."""
    runs, st, m = results.get("runs", {}), results.get("settings", {}), results.get("machine", {})
    img = doc.parent / "img"
    qtab, cols = quality_table(runs)
    body = [
        f"Command: `{COMMAND}` (one command; resumable: run folders and evaluations are cached under "
        "`runs/bench_quality/`; `--parts` selects parts). Results: `bench/results/quality.json`.",
        common.machine_line(m) if m else "",
        f"Setting: embedded SmolLM2-135M-Instruct, LoRA r16/α32 on all linear layers, the default recipe "
        f"(launch/configs/default.yaml: max_length 256, lr 3e-4 cosine, batch {st.get('batch_size')}); every "
        f"trained model sees the same budget of {st.get('examples', 0):,} training examples "
        f"({st.get('steps')} steps × {st.get('batch_size')}); scores are each task's primary metric on the first "
        f"{st.get('limit')} validation rows, in points (0–100).",
        qtab,
    ]
    if cols:
        plot_quality(cols, img / "quality.png")
        body.append("![per-task scores](img/quality.png)")
    bt = budget_table(runs)
    if bt.count("\n") > 1:
        body.append(
            "Training runs (wall time includes model loading; tokens/s counts prompt + answer tokens):\n\n"
            + bt
        )
    ttab = temperature_table(runs, results.get("imbalanced_caps"))
    if ttab:
        plot_temperature(runs, img / "temperature.png")
        body += [
            "### Temperature T (imbalanced mixture)",
            "The five slices have ~2,000 training rows each, and with equal sizes every T gives the same "
            "mixture. Here each task is capped in proportion to its full dataset's size (SQuAD 87.6k, "
            "SST-2 67.3k, CoNLL 14.0k, SICK 4.4k, SciTLDR 2.0k → caps below), then mixed with "
            "p ∝ min(n, 3000)^(1/T); same budget as above.",
            ttab,
            "![temperature](img/temperature.png)",
        ]
    trtab = truncation_table(runs, results.get("truncation_stats"))
    if trtab:
        body += [
            "### Input truncation (middle vs end)",
            f"`{COMMAND} --parts truncation`. An input longer than max_length allows (256 tokens with the "
            "prompt and answer) is shortened on its input field. Every run above cut the input's *end* "
            "(layout 1, the benchmark pins it so its cached runs stay comparable); the product now cuts "
            "the *middle* (`model.truncation: middle`, the default), keeping a question that follows a "
            "long passage. Same multi-task recipe and budget as (b), only the truncation differs; "
            "*prompts cut*: of the evaluated prompts (the same cut applies to training examples).",
            trtab,
        ]
    vtab = ablation_table(
        runs,
        "multi_one_variant",
        (
            "(b) multi-task, all training variants",
            "multi-task, one variant",
            "(d) TRL, one hand prompt",
            "one − all",
        ),
    )
    if vtab:
        body += [
            "### Prompt variants (all vs one)",
            f"`{COMMAND} --parts one_variant`. Our tasks train on all their prompt variants in turn "
            "(round-robin); here each template keeps only its first variant, the one every part evaluates "
            "and the analogue of TRL's single hand prompt. Same recipe, budget and (end) truncation as (b).",
            vtab,
        ]
    ftab = ablation_table(
        runs,
        "multi_plain",
        (
            "(b) multi-task, chat template",
            "multi-task, plain prompt",
            "(d) TRL, plain hand prompt",
            "plain − chat",
        ),
    )
    if ftab:
        body += [
            "### Prompt format (chat vs plain)",
            f"`{COMMAND} --parts plain_prompt`. (b) wraps each rendered instruction and input in the model's "
            "chat template (`model.prompt_format: auto`); here the same templates are sent as plain text "
            "(`plain`), as TRL's hand prompts are. Same recipe, budget and (end) truncation as (b).",
            ftab,
        ]
    common.update_doc(doc, "## Multi-task quality", "\n\n".join(x for x in body if x))
    tr = results.get("transfer")
    if tr:
        tb = [
            f"Command: `{COMMAND} --parts transfer` (reuses the multi-task run). RTE and AG News are in no "
            "training run. *template*: the task's own template (first training variant); *free "
            "instruction*: a plain instruction written for this benchmark (not a template variant) with the "
            "row's text as input, as `t2t-mtl prompt --instruction` sends it; both parsed by the task's "
            "verbalizer; *ranked choices*: the template's prompt, answered by the answer choice with the highest "
            "likelihood (`t2t-mtl eval --mode rank`: no answer can be unreadable, so this measures what the model "
            f"knows apart from answer format). First {st.get('limit')} rows (RTE: validation; AG News: test.jsonl, "
            "the slice has no validation split). Accuracy in points; chance is 50 (RTE) and 25 (AG News).",
            transfer_table(tr),
        ]
        common.update_doc(doc, "## Zero-shot transfer", "\n\n".join(tb))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "quality.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    write(json.loads(Path(args.results).read_text(encoding="utf-8")), Path(args.doc))
    print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
