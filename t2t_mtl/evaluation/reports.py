"""Tables built from evaluation results: the forgetting report of staged runs and run comparisons.

Pure data in, text/JSON/PNG out (no torch). Scores are the per-task primary metrics on
0..100, so forgetting and transfer are in points.

Forgetting report, for a run with stages 1..S and R[s][j] = task j's score after stage s; task j
is *learned* at stage t_j, the first stage that trains it:

- average forgetting (Chaudhry et al., 2018, "Riemannian Walk for Incremental Learning:
  Understanding Forgetting and Intransigence", ECCV; eq. f_j^k = max_{l<k} a_{l,j} - a_{k,j}):
  f_j = max_{t_j <= l < S} R[l][j] - R[S][j] for every task learned before the last stage
  (the max starts at t_j: before a task is learned its score measures nothing to forget), averaged.
- backward transfer (Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory for Continual
  Learning", NeurIPS; BWT = 1/(T-1) sum_i R_{T,i} - R_{i,i}): mean of R[S][j] - R[t_j][j] over
  the same tasks; negative = forgetting, positive = later stages helped.
- forward transfer (same paper, FWT = 1/(T-1) sum_i R_{i-1,i} - b_i), only when base-model
  scores b are given: mean of R[t_j - 1][j] - b_j over tasks learned after the first stage.
- final average: mean of R[S][j] over learned tasks (GEM's ACC).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from t2t_mtl.core.errors import ConfigError, Problem
from t2t_mtl.core.files import atomic_write_json, atomic_write_text
from t2t_mtl.evaluation import metrics
from t2t_mtl.runs.folder import Run

__all__ = [
    "compare_table",
    "forgetting",
    "forgetting_heatmap",
    "forgetting_markdown",
    "load_results",
    "merge_columns",
    "results_markdown",
    "write_results",
]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def forgetting(
    stages: Sequence[str],
    tasks: Sequence[str],
    matrix: Sequence[Sequence[float | None]],
    learned_at: Mapping[str, int],
    base: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Forgetting and transfer numbers of a score matrix (rows: stages in order, columns: tasks).

    `learned_at[task]` is the 0-based index of the first stage training it (tasks missing from it
    are shown but excluded from every number); a None cell (not evaluated) is skipped in maxima
    and makes the task drop out of numbers that need that cell.
    """
    if len(matrix) != len(stages) or any(len(r) != len(tasks) for r in matrix):
        raise ValueError("matrix must have one row per stage and one column per task")
    last = len(stages) - 1
    per_f: dict[str, float] = {}
    per_b: dict[str, float] = {}
    per_fwt: dict[str, float] = {}
    final: list[float] = []
    for j, task in enumerate(tasks):
        t = learned_at.get(task)
        if t is None or last < 0:
            continue
        col = [matrix[s][j] for s in range(len(stages))]
        if col[last] is not None:
            final.append(col[last])
        if t < last and col[last] is not None:
            seen = [v for v in col[t:last] if v is not None]
            if seen:
                per_f[task] = max(seen) - col[last]
            if col[t] is not None:
                per_b[task] = col[last] - col[t]
        if base is not None and t > 0 and task in base and col[t - 1] is not None:
            per_fwt[task] = col[t - 1] - float(base[task])
    return {
        "stages": list(stages),
        "tasks": list(tasks),
        "matrix": [list(r) for r in matrix],
        "learned_at": {k: stages[v] for k, v in learned_at.items()},
        "average_forgetting": _mean(list(per_f.values())),
        "forgetting": per_f,
        "backward_transfer": _mean(list(per_b.values())),
        "backward_transfer_per_task": per_b,
        "forward_transfer": _mean(list(per_fwt.values())) if base is not None else None,
        "forward_transfer_per_task": per_fwt if base is not None else None,
        "final_average": _mean(final),
        "base": dict(base) if base is not None else None,
    }


def _cell(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def forgetting_markdown(
    rep: Mapping[str, Any], metric_names: Mapping[str, str] | None = None
) -> str:
    """The report as markdown: the stage x task matrix, per-task forgetting, then the summary numbers."""
    tasks, learned = rep["tasks"], rep["learned_at"]
    head = [
        f"{t}" + (f" ({metric_names[t]})" if metric_names and t in metric_names else "")
        for t in tasks
    ]
    lines = ["| after stage | " + " | ".join(head) + " |", "|---|" + "---:|" * len(tasks)]
    if rep.get("base") is not None:
        lines.append(
            "| base model | " + " | ".join(_cell(rep["base"].get(t)) for t in tasks) + " |"
        )
    for s, row in zip(rep["stages"], rep["matrix"]):
        cells = [_cell(v) + ("*" if learned.get(t) == s else "") for t, v in zip(tasks, row)]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append(
        "| forgetting | " + " | ".join(_cell(rep["forgetting"].get(t)) for t in tasks) + " |"
    )
    lines += ["", "`*` = the stage that first trains the task.", ""]
    summary = [
        ("average forgetting (Chaudhry et al. 2018)", rep["average_forgetting"], False),
        ("backward transfer (Lopez-Paz & Ranzato 2017)", rep["backward_transfer"], True),
        ("forward transfer (Lopez-Paz & Ranzato 2017)", rep["forward_transfer"], True),
        ("final average score", rep["final_average"], False),
    ]
    lines += ["| measure | points |", "|---|---:|"]
    lines += [
        f"| {n} | {_cell(v, signed)} |"
        for n, v, signed in summary
        if v is not None or "forward" not in n
    ]
    return "\n".join(lines) + "\n"


def forgetting_heatmap(rep: Mapping[str, Any], path: str | Path) -> Path:
    """Heatmap PNG of the matrix (rows stages, columns tasks), scores written in the cells."""
    import matplotlib  # slow to import; only this PNG needs it (and numpy)

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, stages = rep["tasks"], rep["stages"]
    data = np.array(
        [[np.nan if v is None else v for v in row] for row in rep["matrix"]], dtype=float
    )
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 1.2 + 0.6 * len(stages)))
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(stages)), [f"after {s}" for s in stages])
    for i in range(len(stages)):
        for j in range(len(tasks)):
            if not np.isnan(data[i, j]):
                ax.text(
                    j,
                    i,
                    f"{data[i, j]:.1f}",
                    ha="center",
                    va="center",
                    color="white" if data[i, j] < 60 else "black",
                    fontsize=9,
                )
    af, bwt = rep.get("average_forgetting"), rep.get("backward_transfer")
    ax.set_title(
        "score after each stage"
        + (
            f"  (avg forgetting {af:.1f}, BWT {bwt:+.1f})"
            if af is not None and bwt is not None
            else ""
        ),
        fontsize=10,
    )
    fig.colorbar(im, ax=ax, label="primary metric")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ one evaluation


def _score_ci(v: float, lo: float | None, hi: float | None) -> str:
    """`87.50 [75.00, 95.00]`: a score and its 95 % interval (just the score when there is none)."""
    return f"{v:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")


def results_markdown(res: dict[str, Any], title: str | None = None) -> str:
    """A markdown table of one results dict: task, mode, n, primary, score with its 95 % interval,
    all metrics, invalid %; a note under the table says how the intervals were computed."""
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| task | mode | variant | n | primary | score [95 % CI] | metrics | invalid % |",
        "|---|---|---|---:|---|---:|---|---:|",
    ]
    for name, e in res["tasks"].items():
        if "primary" not in e:
            lines.append(
                f"| {name} | {e.get('mode', '')} | {e.get('variant', '')} | {e.get('n', 0)} | — | — | "
                f"{e.get('error', 'no examples')} | — |"
            )
            continue
        others = ", ".join(f"{k} {v:.1f}" for k, v in e["metrics"].items())
        lines.append(
            f"| {name} | {e['mode']} | {e['variant']} | {e['n']} | {metrics.MAIN_KEY[e['primary_metric']]} | "
            f"{_score_ci(e['primary'], e.get('ci_low'), e.get('ci_high'))} | {others} | "
            f"{e['invalid_rate']:.1f} |"
        )
    comb = res.get("combined")
    score = (
        _score_ci(comb, res.get("combined_ci_low"), res.get("combined_ci_high"))
        if comb is not None
        else "—"
    )
    lines.append(f"| **combined** | | | | mean primary | {score} | | |")
    ci = res.get("ci") or next((e["ci"] for e in res["tasks"].values() if "ci" in e), None)
    if ci:
        lines += [
            "",
            f"95 % CI: {ci.get('method', 'percentile bootstrap over examples')} "
            f"({ci.get('resamples')} resamples, seed {ci.get('seed')}); combined: each task "
            "resampled over its own examples, then the mean across tasks.",
        ]
    return "\n".join(lines) + "\n"


def write_results(res: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write `<name>.json`, `<name>.md` and `<name>.predictions.jsonl` (when predictions were kept), atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        **res,
        "tasks": {
            n: {k: v for k, v in e.items() if k != "predictions"} for n, e in res["tasks"].items()
        },
    }
    jpath, mpath = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_json(jpath, summary, indent=2, ensure_ascii=False)
    atomic_write_text(mpath, results_markdown(res, title=res.get("title") or name))
    preds = [{"task": n, **p} for n, e in res["tasks"].items() for p in e.get("predictions", [])]
    if preds:
        atomic_write_text(
            out_dir / f"{name}.predictions.jsonl",
            "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds),
        )
    return jpath, mpath


# ------------------------------------------------------------------ compare


def load_results(spec: str, name: str | None = None) -> tuple[str, dict[str, Any]]:
    """(label, results) for `[LABEL=]PATH`: an eval JSON file, or a run folder (its `eval/<name>.json`,
    default the run's eval split, e.g. `eval/validation.json`)."""
    label, _, path_s = (
        spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    )
    p = Path(path_s).expanduser()
    if p.is_dir():
        run = Run.load(p)
        stem = name or run.cfg.eval.split
        f = run.eval_dir / f"{stem}.json"
        if not f.is_file():
            have = (
                sorted(x.stem for x in run.eval_dir.glob("*.json")) if run.eval_dir.is_dir() else []
            )
            raise ConfigError(
                Problem(
                    str(f),
                    None,
                    "no evaluation results here",
                    f"run `t2t-mtl eval --run {p}` first"
                    + (f"; found: {', '.join(have)}" if have else ""),
                )
            )
        return label or run.name + ("" if stem == run.cfg.eval.split else f" ({stem})"), _read_json(
            f
        )
    if not p.is_file():
        raise ConfigError(
            Problem(
                path_s,
                None,
                "no such run folder or results file",
                "give a run folder or an eval JSON file (RUN/eval/<name>.json)",
            )
        )
    res = _read_json(p)
    auto = p.parent.parent.name + "/" + p.stem if p.parent.name == "eval" else p.stem
    return label or auto, res


def _read_json(p: Path) -> dict[str, Any]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(Problem(str(p), None, f"not a readable results file: {e}")) from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise ConfigError(
            Problem(
                str(p),
                None,
                "not a t2t-mtl results file (no 'tasks' table)",
                "use the JSON written by `t2t-mtl eval` (RUN/eval/<name>.json)",
            )
        )
    return data


def merge_columns(
    sources: Sequence[tuple[str, dict[str, Any]]],
) -> list[tuple[str, dict[str, dict]]]:
    """Columns of a comparison: sources with the same label merge (e.g. several single-task runs
    as one "single-task" column); a task in two sources of one label keeps the first."""
    cols: dict[str, dict[str, dict]] = {}
    for label, res in sources:
        col = cols.setdefault(label, {})
        for task, e in res["tasks"].items():
            if "primary" in e:
                col.setdefault(task, e)
    return list(cols.items())


TIE = "≈"
UNPAIRED = "†"


def _diff_text(diff: float, test: Mapping[str, Any] | None) -> str:
    """A difference cell's text: `+1.20`, `≈ +1.20` inside the noise, `†` appended when the rows
    differ (interval overlap instead of a paired test)."""
    text = f"{diff:+.2f}"
    if test is None:
        return text
    return (
        (f"{TIE} " if test["tie"] else "")
        + text
        + (UNPAIRED if test["method"] == "overlap" else "")
    )


def compare_table(sources: Sequence[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """Markdown table (tasks x sources, primary metric; later columns show the difference to the
    first) and the same numbers as a dict. The last rows are the mean over every task a column has
    and the mean over the tasks all columns share (the fair comparison).

    Differences are tested against the noise of the test set (`confidence.compare_entries`) when
    the results carry per-example statistics: `(≈ -1.20)` marks a difference whose 95 % interval
    contains 0 (a tie), `(-5.00)` one outside it. Two runs scored on the same rows get a paired
    bootstrap of the difference; when the rows differ the two runs' own intervals are compared
    instead (they overlap = a tie), marked `†`. The shared-tasks mean is tested the same way.
    """
    from t2t_mtl.evaluation.confidence import compare_entries

    cols = merge_columns(sources)
    tasks: list[str] = []
    for _, col in cols:
        tasks += [t for t in col if t not in tasks]
    metric = {
        t: metrics.MAIN_KEY[next(c[t]["primary_metric"] for _, c in cols if t in c)] for t in tasks
    }
    labels = [lab for lab, _ in cols]
    lines = ["| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    first = cols[0][1] if cols else {}
    tests: dict[str, dict[str, Any]] = {lab: {} for lab in labels[1:]}

    def cell(k: int, v: float | None, ref: float | None, test: Mapping | None = None) -> str:
        if v is None:
            return "—"
        if k == 0 or ref is None:
            return f"{v:.2f}"
        return f"{v:.2f} ({_diff_text(v - ref, test)})"

    for t in tasks:
        vals = [c[t]["primary"] if t in c else None for _, c in cols]
        ref = first[t]["primary"] if t in first else None
        row = []
        for k, (lab, c) in enumerate(cols):
            test = None
            if k > 0 and t in c and t in first:
                test = compare_entries([t], [first[t]], [c[t]])
                if test is not None:
                    tests[lab][t] = test
            row.append(cell(k, vals[k], ref, test))
        lines.append(f"| {t} | {metric[t]} | " + " | ".join(row) + " |")
    shared = [t for t in tasks if all(t in c for _, c in cols)]
    means = [_mean([c[t]["primary"] for t in c]) for _, c in cols]
    shared_means = [_mean([c[t]["primary"] for t in shared]) for _, c in cols]
    lines.append(
        "| **mean (own tasks)** | | "
        # values only: each column's own tasks may differ, so the means are not compared
        + " | ".join(cell(k, v, None) for k, v in enumerate(means))
        + " |"
    )
    if len(cols) > 1:
        row = []
        for k, (lab, c) in enumerate(cols):
            test = None
            if k > 0 and shared:
                test = compare_entries(shared, [first[t] for t in shared], [c[t] for t in shared])
                if test is not None:
                    tests[lab]["mean (shared)"] = test
            row.append(cell(k, shared_means[k], shared_means[0], test))
        lines.append(f"| **mean ({len(shared)} shared)** | | " + " | ".join(row) + " |")
    methods = {x["method"] for per in tests.values() for x in per.values()}
    if methods:
        lines += [
            "",
            f"Differences to {labels[0]}: `{TIE}` = inside the noise (the 95 % interval of the "
            "difference contains 0), no mark = outside it; paired bootstrap over the examples both "
            "runs were scored on.",
        ]
        if "overlap" in methods:
            lines.append(
                f"`{UNPAIRED}` = the runs were scored on different rows: their own 95 % intervals "
                f"are compared instead (overlapping = `{TIE}`), a weaker test."
            )
    elif len(cols) > 1:
        lines += ["", "Differences are not tested: the results carry no per-example statistics."]
    data = {
        "columns": labels,
        "tasks": tasks,
        "metric": metric,
        "scores": {lab: {t: c[t]["primary"] for t in c} for lab, c in cols},
        "mean": dict(zip(labels, means)),
        "shared_tasks": shared,
        "shared_mean": dict(zip(labels, shared_means)),
        "differences": tests,
    }
    return "\n".join(lines) + "\n", data
