"""Training telemetry: progress bar, metric windows, console/TensorBoard/W&B/JSONL sinks, loss-curve plot.

Only the main process writes. `Telemetry.log(step, row)` sends one flat dict of scalars to every
sink: `run_dir/metrics.jsonl` (one JSON object per logging step, always), TensorBoard event files in
`run_dir/logs/` (`report_to: tensorboard`), W&B (`report_to: wandb`, when the package is installed)
and one console line. `plot_loss_curves` draws per-task loss curves from metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = ["MetricWindow", "Telemetry", "plot_loss_curves", "read_metrics"]


class MetricWindow:
    """Accumulates window statistics between two logging steps (kept in checkpoints for exact resume)."""

    def __init__(self, tasks: list[str]):
        self.tasks = list(tasks)
        self.reset()

    def reset(self) -> None:
        """Start a new logging interval."""
        self.steps = 0
        self.objective = 0.0
        self.loss_sums = [0.0] * len(self.tasks)
        self.tokens = [0.0] * len(self.tasks)
        self.input_tokens = 0.0
        self.records: dict[str, int] = {}
        self.started = time.time()

    def add(
        self,
        objective: float,
        loss_sums: list[float],
        tokens: list[float],
        records: dict[str, int],
        input_tokens: float = 0.0,
    ) -> None:
        """Add one optimiser step's global statistics."""
        self.steps += 1
        self.objective += objective
        self.input_tokens += input_tokens
        for i, (s, n) in enumerate(zip(loss_sums, tokens)):
            self.loss_sums[i] += s
            self.tokens[i] += n
        for k, v in records.items():
            self.records[k] = self.records.get(k, 0) + v

    def row(self) -> dict[str, float]:
        """Flat scalars: loss, loss/<task>, tokens/<task>, share/<member>, tokens_per_s."""
        out: dict[str, float] = {}
        if not self.steps:
            return out
        out["loss"] = self.objective / self.steps
        total_tok = sum(self.tokens)
        out["token_loss"] = sum(self.loss_sums) / total_tok if total_tok else float("nan")
        for t, s, n in zip(self.tasks, self.loss_sums, self.tokens):
            if n:
                out[f"loss/{t}"] = s / n
            out[f"tokens/{t}"] = n
        n_rec = sum(self.records.values())
        for k, v in sorted(self.records.items()):
            out[f"share/{k}"] = v / n_rec if n_rec else 0.0
        dt = max(time.time() - self.started, 1e-9)
        out["target_tokens_per_s"] = total_tok / dt
        out["tokens_per_s"] = self.input_tokens / dt
        return out

    def state_dict(self) -> dict:
        """JSON state (the wall-clock start is not restored)."""
        return {
            "steps": self.steps,
            "objective": self.objective,
            "loss_sums": self.loss_sums,
            "tokens": self.tokens,
            "records": self.records,
            "input_tokens": self.input_tokens,
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore `state_dict()`."""
        self.steps, self.objective = int(d["steps"]), float(d["objective"])
        self.loss_sums, self.tokens = list(d["loss_sums"]), list(d["tokens"])
        self.records = dict(d["records"])
        self.input_tokens = float(d.get("input_tokens", 0.0))
        self.started = time.time()


class Telemetry:
    """Progress bar and metric sinks; every method is a no-op on non-main processes."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        report_to: str = "tensorboard",
        run_name: str = "run",
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        self._bar = None
        self.notes: list[str] = []
        if not enabled:
            return
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # loads tensorboard: only if used

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "logs"))
        elif report_to == "wandb":
            try:
                import wandb  # optional: not a dependency of t2t-mtl
            except ImportError:
                self.notes.append(
                    "report_to: wandb, but wandb is not installed; logging to metrics.jsonl only "
                    "(pip install wandb)"
                )
            else:
                self._wandb = wandb.init(
                    project="t2t-mtl",
                    name=run_name,
                    config=config or {},
                    dir=str(self.run_dir),
                    resume="allow",
                )

    def progress(self, total: int, initial: int, desc: str) -> None:
        """Start (or restart, per stage) the tqdm progress bar with ETA."""
        if not self.enabled:
            return
        self.close_bar()
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0.1,
        )

    def advance(self, postfix: dict | None = None) -> None:
        """One optimiser step done."""
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def write(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def log(self, step: int, row: dict[str, Any], *, stage: str = "", console: bool = True) -> None:
        """Write one metrics row (scalars) to every sink."""
        if not self.enabled:
            return
        rec = {"step": step, "stage": stage, "time": round(time.time(), 3), **row}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, allow_nan=True) + "\n")
        scalars = {
            k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if console:
            self.write(_console_line(step, stage, scalars))

    def close_bar(self) -> None:
        """Close the progress bar (end of a stage)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Flush and close every sink."""
        self.close_bar()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _console_line(step: int, stage: str, s: dict[str, float]) -> str:
    parts = [f"step {step}" + (f" [{stage}]" if stage else "")]
    if "loss" in s:
        parts.append(f"loss {s['loss']:.4f}")
    per_task = [(k[5:], v) for k, v in s.items() if k.startswith("loss/")]
    if per_task:
        parts.append(" ".join(f"{t}={v:.3f}" for t, v in per_task))
    evals = [(k[5:], v) for k, v in s.items() if k.startswith("eval/") and "/" not in k[5:]]
    if evals:
        parts.append("eval " + " ".join(f"{t}={v:.2f}" for t, v in evals))
    if "lr" in s:
        parts.append(f"lr {s['lr']:.2e}")
    if "tokens_per_s" in s:
        parts.append(f"{s['tokens_per_s']:.0f} tok/s")
    return " | ".join(parts)


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.jsonl (a truncated last line from a killed run is skipped)."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss_curves(metrics_path: Path, png_path: Path) -> Path | None:
    """Per-task (and total) training loss against step, one line per task; None when nothing was logged."""
    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return None
    import matplotlib  # slow to import; only this PNG needs it

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tasks = sorted({k[5:] for r in rows for k in r if k.startswith("loss/")})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], color="black", linewidth=2, label="objective")
    for t in tasks:
        pts = [
            (r["step"], r[f"loss/{t}"])
            for r in rows
            if f"loss/{t}" in r and math.isfinite(r[f"loss/{t}"])
        ]
        if pts:
            ax.plot(*zip(*pts), marker=".", linewidth=1, label=t)
    bounds = [
        (r["step"], r["stage"])
        for i, r in enumerate(rows)
        if i and r.get("stage") != rows[i - 1].get("stage")
    ]
    for step, stage in bounds:
        ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
        ax.text(step, ax.get_ylim()[1], f" {stage}", va="top", fontsize=8, color="grey")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("mean target-token loss")
    ax.set_title("training loss per task")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
