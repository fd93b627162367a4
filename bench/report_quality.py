"""Markdown tables and a PNG plot of the quality study (bench/bench_quality.py's results).

    .venv/bin/python bench/report_quality.py [--results bench/results/quality_validation.json] [--doc docs/benchmarks.md]

Rewrites the doc's "Multi-task quality with seeds" section (validation split: the reported comparison) or
"Quality ablations" section (dev split: where defaults are chosen) from a results file whose `stats` were
computed by bench/quality_stats.py; bench_quality.py calls `write` itself at the end of an invocation.
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
    "mean": "**mean of the five**",
}
TRANSFER_TASKS = ("nli_2way", "topic_ag_news")
TRANSFER_COLUMNS = {
    "transfer_base": "base, template",
    "transfer_multi": "**ours, multi-task, template**",
    "transfer_base_free": "base, free instruction",
    "transfer_multi_free": "ours, multi-task, free instruction",
    "transfer_base_rank": "base, ranked choices",
    "transfer_multi_rank": "ours, multi-task, ranked choices",
}
TRANSFER_SECTION = "## Zero-shot transfer with seeds"
COLUMNS = {
    "base": "base, zero-shot",
    "multi": "**ours, multi-task**",
    "trl_hand": "TRL, hand prompts",
    "trl_ours": "TRL, our records",
    "single": "ours, 5 single-task runs",
    "multi_equal": "ours, multi-task, equal exposure",
}
SECTIONS = {
    "validation": "## Multi-task quality with seeds",
    "dev": "## Quality ablations (dev split)",
}
COMMAND = "python bench/bench_quality.py ../shared/data/real"


def cell(s: dict | None) -> str:
    """`mean [low, high]` of a system's summary; '–' when missing."""
    if not s:
        return "–"
    return f"{s['mean']:.1f} [{s['low']:.1f}, {s['high']:.1f}]"


def diff_cell(d: dict | None) -> str:
    """`+x.x [low, high]` with ≈ for a tie (interval contains 0) and ▲/▼ for a clear win/loss."""
    if not d:
        return "–"
    mark = "≈" if d["tie"] else ("▲" if d["diff"] > 0 else "▼")
    return f"{mark} {d['diff']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"


def _row_label(t: str, tasks: tuple[str, ...]) -> str:
    if t == "mean" and tasks != TASKS:
        return f"**mean of the {len(tasks)}**"
    return LABEL[t]


def systems_table(stats: dict, columns: dict[str, str], tasks: tuple[str, ...] = TASKS) -> str:
    """Per task and mean: each system's mean over seeds with its 95 % interval."""
    cols = {k: v for k, v in columns.items() if k in stats.get("systems", {})}
    if not cols:
        return ""
    lines = ["| task | " + " | ".join(cols.values()) + " |", "|---|" + "---:|" * len(cols)]
    for t in (*tasks, "mean"):
        cells = [cell(stats["systems"][k].get(t)) for k in cols]
        lines.append(f"| {_row_label(t, tasks)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pairs_table(stats: dict, pairs: list[str] | None = None, tasks: tuple[str, ...] = TASKS) -> str:
    """Per task and mean: each paired difference a − b with its 95 % interval and tie mark."""
    names = [p for p in (pairs or list(stats.get("pairs", {}))) if p in stats.get("pairs", {})]
    if not names:
        return ""
    lines = ["| task | " + " | ".join(f"{p.replace(' - ', ' − ')}" for p in names) + " |"]
    lines.append("|---|" + "---:|" * len(names))
    for t in (*tasks, "mean"):
        lines.append(
            f"| {_row_label(t, tasks)} | "
            + " | ".join(diff_cell(stats["pairs"][p].get(t)) for p in names)
            + " |"
        )
    return "\n".join(lines)


def seeds_table(stats: dict, names: list[str], tasks: tuple[str, ...] = TASKS) -> str:
    """Each seed's score per system and task (what the intervals are made of)."""
    names = [n for n in names if n in stats.get("systems", {})]
    lines = [
        "| system | " + " | ".join(LABEL[t] for t in tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for n in names:
        s = stats["systems"][n]
        lines.append(
            f"| {n} | "
            + " | ".join(
                ", ".join(f"{x:.1f}" for x in s[t]["seeds"]) if t in s else "–" for t in tasks
            )
            + " |"
        )
    return "\n".join(lines)


def targets(stats: dict) -> list[str]:
    """The issue's two targets, read from the intervals (met / missed, and by how much)."""
    out = []
    d = stats.get("pairs", {}).get("multi - trl_hand")
    if d and "mean" in d:
        m = d["mean"]
        below = [LABEL[t] for t in TASKS if t in d and not d[t]["tie"] and d[t]["diff"] < 0]
        ok = m["low"] > 0 and not below
        out.append(
            f"- Ours beats TRL (hand prompts) on the mean, the interval above 0, no task significantly "
            f"below: **{'met' if ok else 'missed'}** (mean difference {m['diff']:+.1f} "
            f"[{m['low']:+.1f}, {m['high']:+.1f}]"
            + (f"; significantly below on {', '.join(below)}" if below else "")
            + ")."
        )
    s = stats.get("systems", {})
    e = stats.get("ratios", {}).get("multi_equal / single")
    if e:
        ok = e["low"] >= 97.0
        out.append(
            f"- Equal-exposure multi-task ≥ 97 % of the single-task mean: **{'met' if ok else 'missed'}** "
            f"({e['ratio']:.1f} % [{e['low']:.1f}, {e['high']:.1f}] of "
            f"{s['single']['mean']['mean']:.1f})."
        )
    return out


def cost_table(runs: dict) -> str:
    """What each system cost on this machine: minutes of training and of evaluation per seed (wall
    clock of one process; an evaluation setting of another system's runs, `eval_of`, trains nothing of
    its own), and the total of the study so far."""
    lines = [
        "| system | seeds | training, min per seed | evaluation, min per seed |",
        "|---|---:|---:|---:|",
    ]
    total = 0.0
    for name, by_seed in runs.items():
        infos = list(by_seed.values())
        own = not any(i.get("eval_of") for i in infos)
        train = [float(i.get("train_seconds") or 0.0) for i in infos] if own else []
        evals = [float(i["eval_seconds"]) for i in infos if i.get("eval_seconds")]
        total += sum(train) + sum(evals)
        t_cell = f"{sum(train) / len(train) / 60:.1f}" if train and any(train) else "–"
        e_cell = f"{sum(evals) / len(evals) / 60:.1f}" if evals else "–"
        lines.append(f"| {name} | {len(infos)} | {t_cell} | {e_cell} |")
    if len(lines) == 2:
        return ""
    return f"Cost so far: {total / 3600:.1f} h of this machine in all.\n\n" + "\n".join(lines)


def plot(stats: dict, columns: dict[str, str], path: Path, title: str) -> bool:
    """Bars per task and system with 95 % interval error bars; False when there is nothing to plot."""
    cols = [k for k in columns if k in stats.get("systems", {})]
    if not cols:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (*TASKS, "mean")
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(cols)
    for j, k in enumerate(cols):
        s = stats["systems"][k]
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(keys))]
        means = [s[t]["mean"] if t in s else 0 for t in keys]
        err = [
            [s[t]["mean"] - s[t]["low"] if t in s else 0 for t in keys],
            [s[t]["high"] - s[t]["mean"] if t in s else 0 for t in keys],
        ]
        ax.bar(xs, means, width, yerr=err, capsize=2, label=columns[k].strip("*"))
    ax.set_xticks(range(len(keys)), [LABEL[t].strip("*") for t in keys], fontsize=8)
    ax.set_ylabel("primary metric (points)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: dict, doc: Path) -> None:
    """Rewrite the split's section of `doc` from `results` (plot under docs/img/)."""
    st, m, stats = results.get("settings", {}), results.get("machine", {}), results.get("stats", {})
    split = st.get("split", "validation")
    seeds = st.get("seeds", [])
    runs = results.get("runs", {})
    n_seeds = {k: len(v) for k, v in runs.items() if k not in TRANSFER_COLUMNS}
    body = [
        f"Command: `{COMMAND} --split {split}` (one command; resumable: run folders under "
        f"`runs/bench_quality/{split}/`, every evaluation kept in `bench/results/quality/{split}-<rows>/`). "
        f"Results: `bench/results/quality_{split}.json`.",
        common.machine_line(m) if m else "",
        f"Setting: embedded SmolLM2-135M-Instruct, LoRA r16/α32 on all linear layers, the default recipe "
        f"(launch/configs/default.yaml), {st.get('examples', 0):,} training examples per run "
        f"({st.get('steps')} steps × {st.get('batch_size')}) unless a system says otherwise; seeds "
        f"{', '.join(map(str, seeds))} (runs per system: "
        + ", ".join(f"{k} {v}" for k, v in sorted(n_seeds.items()))
        + f"); {st.get('rows')} "
        + (
            "validation rows per task, drawn once with a fixed seed."
            if split == "validation"
            else "rows per task carved out of each training slice (the runs train on the rest)."
        )
        + " Cells: mean over seeds [95 % bootstrap interval over rows and seeds], in points. Differences "
        "are paired over rows; ≈ marks a tie (the interval contains 0), ▲/▼ a clear win/loss.",
    ]
    # the untuned model has one evaluation by design (greedy decoding does not depend on a seed)
    single = sorted(
        k
        for k, v in n_seeds.items()
        if v < 2 and k not in ("base", "transfer_base") and not k.startswith("transfer_base_")
    )
    if single:
        body.append(
            f"**Partial study: {', '.join(single)} "
            f"{'has' if len(single) == 1 else 'have'} one seed so far.** Its interval covers the "
            "sampling of rows only, and a difference between two systems trained apart also holds the "
            "seed-to-seed spread one seed cannot show: read ▲/▼ between separately trained systems as "
            "provisional until every system has its seeds (an evaluation setting of the same runs, "
            "`eval_of`, is paired over rows and seeds and needs no such caution)."
        )
    if split == "validation":
        body += [systems_table(stats, COLUMNS)]
        if plot(
            stats,
            COLUMNS,
            doc.parent / "img" / "quality_seeds.png",
            "quality, mean over seeds, 95 % CI",
        ):
            body.append("![per-task scores with 95 % intervals](img/quality_seeds.png)")
        body += ["Paired differences:", pairs_table(stats)]
        body += targets(stats)
    else:
        names = [k for k in stats.get("systems", {}) if k != "single"]
        body += [
            systems_table(stats, {k: k for k in names}),
            "Each ablation against the default:",
            pairs_table(stats),
        ]
    body += ["Per-seed scores:", seeds_table(stats, list(stats.get("systems", {})))]
    body.append(cost_table({k: v for k, v in runs.items() if k not in TRANSFER_COLUMNS}))
    common.update_doc(doc, SECTIONS[split], "\n\n".join(x for x in body if x))
    if stats.get("transfer", {}).get("systems"):
        write_transfer(results, doc)


def write_transfer(results: dict, doc: Path) -> None:
    """Rewrite the doc's "Zero-shot transfer with seeds" section from `results["stats"]["transfer"]`."""
    st, m = results.get("settings", {}), results.get("machine", {})
    stats = results["stats"]["transfer"]
    runs = results.get("runs", {})
    n_seeds = {k: len(v) for k, v in runs.items() if k in TRANSFER_COLUMNS}
    body = [
        f"Command: `{COMMAND} --split {st.get('split', 'validation')} --systems "
        + ",".join(k for k in TRANSFER_COLUMNS if k in runs)
        + "` (the tuned runs are the study's `multi` runs; their evaluations are kept in "
        "`bench/results/quality/`).",
        common.machine_line(m) if m else "",
        "RTE and AG News are in no training run. *template*: the task's own template (first training "
        "variant); *free instruction*: a plain instruction written for this benchmark (not a template "
        "variant) over the same input, as `t2t-mtl prompt --instruction` sends it; both generated (first "
        "line, greedy) and parsed by the task's verbalizer; *ranked choices*: the answer choice with the "
        "highest likelihood under the template's prompt (`t2t-mtl eval --mode rank`: no answer can be "
        f"unreadable). Rows: up to {st.get('rows')} per task drawn once with a fixed seed (RTE: its 277 "
        "validation rows; AG News: test.jsonl, the slice has no validation split). Seeds per system: "
        + ", ".join(f"{k} {v}" for k, v in n_seeds.items())
        + " (the untuned model's greedy answers do not depend on a seed: its interval is over rows). "
        "Accuracy in points; chance is 50 (RTE) and 25 (AG News). Cells: mean over seeds [95 % bootstrap "
        "interval over rows and seeds].",
        systems_table(stats, TRANSFER_COLUMNS, TRANSFER_TASKS),
        "Tuned against untuned, paired over rows (≈: the interval contains 0):",
        pairs_table(stats, tasks=TRANSFER_TASKS),
        "Per-seed scores:",
        seeds_table(stats, list(TRANSFER_COLUMNS), TRANSFER_TASKS),
        cost_table({k: v for k, v in runs.items() if k in TRANSFER_COLUMNS}),
    ]
    common.update_doc(doc, TRANSFER_SECTION, "\n\n".join(x for x in body if x))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--results", default=str(ROOT / "bench" / "results" / "quality_validation.json")
    )
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    write(json.loads(Path(args.results).read_text(encoding="utf-8")), Path(args.doc))
    print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
