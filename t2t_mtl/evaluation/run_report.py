"""One self-contained HTML page about a run folder (`t2t-mtl report`; no torch).

`build_report(run_dir)` reads only files a run folder already holds and returns the page:

- the mixture: per stage, each member's target share (`mixture.json`) next to its realised share
  (the mean of the `share/<member>` values logged in `metrics.jsonl` during that stage);
- training loss per task against the optimiser step (`metrics.jsonl`), stage boundaries marked;
- the evaluation scores logged during training (`eval/<task>`, `eval/combined` rows);
- every final results table in `RUN/eval/` (`t2t-mtl eval`), with the 95 % intervals when the
  results carry them (`ci_low` / `ci_high`);
- the forgetting heatmap and its summary numbers (`t2t-mtl eval --forgetting`);
- a sample of predictions per task: raw answer, parsed prediction, gold and whether it parsed.

Self-contained: the plots are inline SVG (matplotlib), the CSS is inline, there is no script, and a
Content-Security-Policy forbids loading anything but inline styles and `data:` images, so the
page shows the same offline and cannot run code from model outputs or data (all text is escaped).
A section whose files are missing says which command writes them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from t2t_mtl import __version__
from t2t_mtl.core.errors import ConfigError, Problem
from t2t_mtl.core.files import atomic_write_text, read_json_object
from t2t_mtl.evaluation import metrics
from t2t_mtl.evaluation.reports import forgetting_heatmap
from t2t_mtl.runs.folder import MIXTURE_FILE, Run, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "REPORT_FILE",
    "build_report",
    "eval_figure",
    "loss_figure",
    "mixture_figure",
    "realised_shares",
    "result_files",
    "write_report",
]

REPORT_FILE = "report.html"
SAMPLE_ROWS = 5  # predictions shown per task
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9;line-height:1.45}
header{background:#1d2330;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px;font-size:1.5em}
header p{margin:0;color:#c9cfdb;font-size:.92em}
main{padding:8px 32px 40px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:14px 20px;margin:16px 0}
h2{font-size:1.15em;margin:4px 0 10px}
h3{font-size:1em;margin:14px 0 6px}
table{border-collapse:collapse;font-size:.88em;margin:6px 0 10px}
th,td{border:1px solid #dde1e8;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.pre{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;max-width:420px}
.ok{color:#1a7f37;font-weight:600}.bad{color:#c62828;font-weight:600}
.note{color:#5b6476;font-size:.88em}
.plot svg,.plot img{max-width:100%;height:auto}
.grid{display:flex;flex-wrap:wrap;gap:8px 28px}
code{background:#eef1f5;padding:0 3px;border-radius:3px}
"""


# ------------------------------------------------------------------ reading


def _read_jsonl(path: Path) -> list[dict]:
    return [r for r in read_metrics(path) if isinstance(r, dict)]


def result_files(run: Run) -> list[Path]:
    """The final results files in `RUN/eval/` (`t2t-mtl eval`), the run's eval split first; not the
    per-stage files or the forgetting reports."""
    if not run.eval_dir.is_dir():
        return []
    found = [
        p
        for p in sorted(run.eval_dir.glob("*.json"))
        if not p.stem.startswith(("stage-", "forgetting"))
        and isinstance((read_json_object(p) or {}).get("tasks"), dict)
    ]
    main = run.eval_dir / f"{run.cfg.eval.split}.json"
    return sorted(found, key=lambda p: p != main)


def realised_shares(rows: Sequence[Mapping[str, Any]], stage: str) -> dict[str, float]:
    """A stage's realised share per member: the mean of the `share/<member>` values of its logged
    rows (a member absent from a row had share 0 in that logging window). Empty when none logged."""
    logged = [r for r in rows if r.get("stage") == stage and any(k.startswith("share/") for k in r)]
    if not logged:
        return {}
    names = {k[6:] for r in logged for k in r if k.startswith("share/")}
    return {n: sum(float(r.get(f"share/{n}", 0.0)) for r in logged) / len(logged) for n in names}


# ------------------------------------------------------------------ figures


def _plt():
    import matplotlib  # slow to import; only the plots need it

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Figure) -> str:
    """The figure as an inline `<svg>` element (no XML prolog, no date: the same run gives the
    same page)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    _plt().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _stage_bounds(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
    """(first step, stage) where a new stage starts, from the training rows (those with a loss:
    evaluation rows come at the end of a window and would mark the boundary late)."""
    rows = [r for r in rows if "loss" in r and "step" in r]
    return [
        (r["step"], str(r.get("stage")))
        for i, r in enumerate(rows)
        if i and r.get("stage") != rows[i - 1].get("stage")
    ]


def _mark_stages(ax, rows: Sequence[Mapping[str, Any]]) -> None:
    for step, stage in _stage_bounds(rows):
        ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
        ax.text(step, ax.get_ylim()[1], f" {stage}", va="top", fontsize=8, color="grey")


def loss_figure(rows: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Training loss against the optimiser step: the objective and one line per task (rows of
    metrics.jsonl with a `loss`); None when no loss was logged. Also drawn into RUN/loss_curves.png
    by training (`telemetry.plot_loss_curves`)."""
    rows = [r for r in rows if "loss" in r and "step" in r]
    if not rows:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    tasks = sorted({k[5:] for r in rows for k in r if k.startswith("loss/")})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(
        [r["step"] for r in rows],
        [r["loss"] for r in rows],
        color="black",
        linewidth=2,
        label="objective",
    )
    for t in tasks:
        pts = [
            (r["step"], r[f"loss/{t}"])
            for r in rows
            if isinstance(r.get(f"loss/{t}"), (int, float)) and math.isfinite(r[f"loss/{t}"])
        ]
        if pts:
            ax.plot(*zip(*pts), marker=".", linewidth=1, label=t)
    _mark_stages(ax, rows)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("mean target-token loss")
    ax.set_title("training loss per task")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def eval_figure(rows: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Each task's primary score (and the combined score) from the evaluations logged during
    training (`eval/<task>` keys of metrics.jsonl); None when there are none."""
    every = rows
    rows = [r for r in rows if "step" in r and any(k.startswith("eval/") for k in r)]
    keys = sorted(
        {k[5:] for r in rows for k in r if k.startswith("eval/") and "/" not in k[5:]}
        - {"combined"}
    )
    if not rows or not (keys or any("eval/combined" in r for r in rows)):
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for key, style in [("combined", {"color": "black", "linewidth": 2})] + [
        (k, {"linewidth": 1}) for k in keys
    ]:
        pts = [(r["step"], r[f"eval/{key}"]) for r in rows if f"eval/{key}" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=key, **style)
    _mark_stages(ax, every)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-2, 102)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("primary metric (0-100)")
    ax.set_title("evaluation during training (eval.limit rows per task)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def mixture_figure(
    stages: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
) -> Figure:
    """Grouped bars per stage: each member's target share and its realised share."""
    plt = _plt()
    fig, axes = plt.subplots(
        1, len(stages), figsize=(max(4.5, 4.2 * len(stages)), 3.8), squeeze=False
    )
    for ax, st in zip(axes[0], stages):
        names = [m["name"] for m in st.get("members", [])]
        real = realised_shares(rows, st.get("stage"))
        xs = list(range(len(names)))
        target = [float(m.get("rate", 0.0)) for m in st.get("members", [])]
        ax.bar([x - 0.2 for x in xs], target, 0.4, label="target")
        if real:
            ax.bar([x + 0.2 for x in xs], [real.get(n, 0.0) for n in names], 0.4, label="realised")
        ax.set_xticks(xs, names, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        temp = st.get("temperature")
        ax.set_title(f"stage {st.get('stage')}" + (f" (T={temp:g})" if temp is not None else ""))
        ax.set_ylabel("share of records")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ html pieces


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(v: Any, fmt: str = ".2f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def _table(head: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]]) -> str:
    """`rows` hold (already escaped html, css class) cells."""
    out = ["<table>"]
    if head:
        out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        cells = "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for v, c in row)
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _missing(what: str, how: str) -> str:
    return f'<p class="note">No {_e(what)} in this run folder: {how}.</p>'


def _plot(fig: Figure | None) -> str:
    return f'<div class="plot">{_svg(fig)}</div>' if fig is not None else ""


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _summary(run: Run) -> str:
    cfg = run.cfg
    summ = read_json_object(run.dir / "train_summary.json") or {}
    best = read_json_object(run.dir / "best" / "best.json")
    ad = cfg.adapter
    adapter = ad.method + (f" (r={ad.r}, alpha={ad.alpha})" if ad.method != "full" else "")
    stages = ", ".join(
        f"{s.name}: {s.steps} steps on {', '.join(s.tasks)}" for s in cfg.stage_list()
    )
    facts = [
        ("model", _e(cfg.model.name)),
        ("adapter", _e(adapter)),
        ("tasks", _e(", ".join(cfg.task_names()))),
        ("stages", _e(stages)),
        (
            "optimisation",
            _e(
                f"lr {cfg.train.learning_rate:g}, batch {cfg.train.batch_size} x accumulation "
                f"{cfg.train.grad_accum}, {cfg.train.scheduler} schedule, seed {cfg.seed}"
            ),
        ),
        (
            "mixing",
            _e(
                f"temperature {cfg.mixing.temperature:g}, cap {cfg.mixing.cap}, unit {cfg.mixing.unit}"
            )
            + (_e(f"; replay {cfg.replay.share} of later stages") if cfg.replay.enabled else ""),
        ),
    ]
    if summ:
        facts.append(
            (
                "training",
                _e(
                    f"{summ.get('steps')} steps in {_num(summ.get('seconds'), '.0f')} s on "
                    f"{summ.get('processes', 1)} process(es); final loss {_num(summ.get('final_loss'), '.4f')}"
                ),
            )
        )
    else:
        facts.append(("training", "not finished (no train_summary.json)"))
    if best:
        facts.append(
            (
                "best bundle",
                _e(
                    f"step {best.get('step')} (stage {best.get('stage')}), combined "
                    f"{_num(best.get('combined'))}: best/adapter"
                ),
            )
        )
    return _table([], [[(f"<b>{_e(k)}</b>", ""), (v, "")] for k, v in facts])


def _mixture(run: Run, rows: list[dict]) -> str:
    data = read_json_object(run.dir / MIXTURE_FILE)
    stages = (data or {}).get("stages") or []
    if not stages:
        return _missing(MIXTURE_FILE, "training writes it when a stage starts")
    parts = [
        '<p class="note">Target: the share each member gets from the temperature-scaled sizes '
        "(<code>mixture.json</code>). Realised: the mean share of records per logging window in "
        "<code>metrics.jsonl</code> during the stage.</p>",
        _plot(mixture_figure(stages, rows)),
    ]
    for st in stages:
        real = realised_shares(rows, st.get("stage"))
        body = [
            [
                (_e(m.get("name")), ""),
                (_e(m.get("source", "task")), ""),
                (_e(f"{m.get('examples', 0):,}"), "num"),
                (_num(m.get("n_i"), ",.0f"), "num"),
                (_num(100 * float(m.get("rate", 0.0)), ".1f") + " %", "num"),
                (
                    (_num(100 * real[m["name"]], ".1f") + " %") if m.get("name") in real else "—",
                    "num",
                ),
            ]
            for m in st.get("members", [])
        ]
        parts.append(f"<h3>stage {_e(st.get('stage'))}</h3>")
        parts.append(_table(["member", "kind", "examples", "n_i", "target", "realised"], body))
    return "\n".join(parts)


def _results_table(res: Mapping[str, Any]) -> str:
    body = []
    for name, e in res.get("tasks", {}).items():
        if "primary" not in e:
            body.append(
                [(_e(name), ""), (_e(e.get("mode")), ""), (_e(e.get("n", 0)), "num")]
                + [("—", "")] * 3
                + [(_e(e.get("error", "no examples")), "")]
            )
            continue
        lo, hi = e.get("ci_low"), e.get("ci_high")
        ci = f"[{_num(lo)}, {_num(hi)}]" if lo is not None and hi is not None else "—"
        others = ", ".join(f"{k} {v:.1f}" for k, v in (e.get("metrics") or {}).items())
        body.append(
            [
                (_e(name), ""),
                (_e(f"{e.get('mode')} / {e.get('variant')}"), ""),
                (_e(e.get("n")), "num"),
                (_e(metrics.MAIN_KEY.get(e.get("primary_metric"), e.get("primary_metric"))), ""),
                (f"<b>{_num(e['primary'])}</b>", "num"),
                (_e(ci), "num"),
                (_e(others) + f"; invalid {_num(e.get('invalid_rate'), '.1f')} %", ""),
            ]
        )
    comb = res.get("combined")
    lo, hi = res.get("combined_ci_low"), res.get("combined_ci_high")
    body.append(
        [("<b>combined</b>", ""), ("", ""), ("", ""), ("mean primary", "")]
        + [(f"<b>{_num(comb)}</b>", "num")]
        + [(_e(f"[{_num(lo)}, {_num(hi)}]") if lo is not None and hi is not None else "—", "num")]
        + [("", "")]
    )
    out = _table(["task", "mode / variant", "n", "primary", "score", "95 % CI", "metrics"], body)
    ci = res.get("ci") or next(
        (e["ci"] for e in res.get("tasks", {}).values() if isinstance(e.get("ci"), dict)), None
    )
    if ci:
        out += (
            f'<p class="note">95 % CI: {_e(ci.get("method", "percentile bootstrap over examples"))} '
            f"({_e(ci.get('resamples'))} resamples, seed {_e(ci.get('seed'))}).</p>"
        )
    return out


def _final(run: Run) -> str:
    files = result_files(run)
    if not files:
        return _missing("evaluation results", f"run <code>t2t-mtl eval --run {_e(run.dir)}</code>")
    parts = []
    for f in files:
        res = read_json_object(f) or {}
        lim = res.get("limit")
        what = f"split {res.get('split')}" + (f", at most {lim} rows per task" if lim else "")
        base = " (untuned base model)" if res.get("base") else ""
        parts.append(
            f"<h3>{_e(f.stem)}{_e(base)}</h3><p class='note'>{_e(what)}; eval/{_e(f.name)}</p>"
        )
        parts.append(_results_table(res))
    return "\n".join(parts)


def _png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<div class="plot"><img alt="{_e(path.name)}" src="data:image/png;base64,{data}"></div>'


def _forgetting(run: Run) -> str:
    if len(run.cfg.stage_list()) < 2:
        return '<p class="note">One stage: nothing to forget.</p>'
    reps = sorted(run.eval_dir.glob("forgetting*.json")) if run.eval_dir.is_dir() else []
    reps = [p for p in reps if isinstance((read_json_object(p) or {}).get("matrix"), list)]
    if not reps:
        return _missing(
            "forgetting report",
            f"run <code>t2t-mtl eval --run {_e(run.dir)} --forgetting</code>",
        )
    parts = []
    for p in reps:
        rep = read_json_object(p) or {}
        png = p.with_suffix(".png")
        if not png.is_file():  # written beside the JSON by eval --forgetting; redraw if lost
            with tempfile.TemporaryDirectory() as tmp:
                parts.append(_png(forgetting_heatmap(rep, Path(tmp) / "heatmap.png")))
        else:
            parts.append(_png(png))
        rows = [
            ("average forgetting (Chaudhry et al. 2018)", rep.get("average_forgetting"), ".2f"),
            ("backward transfer (Lopez-Paz & Ranzato 2017)", rep.get("backward_transfer"), "+.2f"),
            ("forward transfer", rep.get("forward_transfer"), "+.2f"),
            ("final average score", rep.get("final_average"), ".2f"),
        ]
        parts.append(f"<p class='note'>eval/{_e(p.name)}</p>")
        parts.append(
            _table(
                ["measure", "points"],
                [[(_e(n), ""), (_num(v, f), "num")] for n, v, f in rows if v is not None],
            )
        )
    return "\n".join(parts)


def _pred_text(v: Any) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _predictions(run: Run) -> str:
    files = [f.with_suffix(".predictions.jsonl") for f in result_files(run)]
    files = [f for f in files if f.is_file()]
    if not files:
        return _missing("predictions", f"run <code>t2t-mtl eval --run {_e(run.dir)}</code>")
    path = files[0]
    by_task: dict[str, list[dict]] = {}
    for r in _read_jsonl(path):
        by_task.setdefault(str(r.get("task")), []).append(r)
    parts = [f"<p class='note'>The first {SAMPLE_ROWS} rows per task of eval/{_e(path.name)}.</p>"]
    for task, rows in by_task.items():
        n_ok = sum(bool(r.get("valid")) for r in rows)
        parts.append(
            f"<h3>{_e(task)} <span class='note'>({n_ok} of {len(rows)} parsed)</span></h3>"
        )
        body = [
            [
                (_e(r.get("row_id")), "num"),
                (_e(_pred_text(r.get("raw"))), "pre"),
                (_e(_pred_text(r.get("prediction"))), "pre"),
                (_e(_pred_text(r.get("gold"))), "pre"),
                ('<span class="ok">parsed</span>', "")
                if r.get("valid")
                else ('<span class="bad">invalid</span>', ""),
            ]
            for r in rows[:SAMPLE_ROWS]
        ]
        parts.append(_table(["row", "raw answer", "prediction", "gold", "parse"], body))
    return "\n".join(parts)


# ------------------------------------------------------------------ page


def build_report(run_dir: str | Path) -> str:
    """The report page of a run folder as HTML text (see the module docstring)."""
    run = Run.load(run_dir)
    rows = _read_jsonl(run.dir / "metrics.jsonl")
    loss = loss_figure(rows)
    evals = eval_figure(rows)
    sections = [
        _section("summary", "Run", _summary(run)),
        _section("mixture", "Mixture: target vs realised shares", _mixture(run, rows)),
        _section(
            "loss",
            "Training loss per task",
            _plot(loss) if loss else _missing("training loss", "metrics.jsonl has no loss rows"),
        ),
        _section(
            "eval-steps",
            "Evaluation during training",
            _plot(evals)
            if evals
            else _missing("evaluation rows", "set eval.every_steps in the run config"),
        ),
        _section("results", "Final per-task results", _final(run)),
        _section("forgetting", "Forgetting across stages", _forgetting(run)),
        _section("predictions", "Sample predictions", _predictions(run)),
    ]
    when = time.strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>t2t-mtl report: {_e(run.name)}</title><style>{_CSS}</style></head>\n<body>"
        f"<header><h1>{_e(run.name)}</h1><p>{_e(run.dir.resolve())} · report by t2t-mtl "
        f"{_e(__version__)} · {_e(when)}</p></header>\n<main>\n"
        + "\n".join(sections)
        + "\n</main></body></html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report page to `out` (default `RUN/report.html`), atomically; returns its path.
    A folder that is not a run folder is a ConfigError (from `Run.load`)."""
    run = Run.load(run_dir)
    path = Path(out).expanduser() if out else run.dir / REPORT_FILE
    if path.is_dir():
        raise ConfigError(
            Problem(
                str(path), None, "--out is a folder", f"give a file name, e.g. {path / REPORT_FILE}"
            )
        )
    page = build_report(run.dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    return path
