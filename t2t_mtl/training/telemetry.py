"""Training telemetry: progress bar, metric windows, metrics.jsonl, experiment trackers, loss-curve plot.

Only the main process writes. `Telemetry.log(step, row)` sends one flat dict of scalars to
`run_dir/metrics.jsonl` (one JSON object per logging step, always), to the experiment trackers
named by `train.report_to` and to one console line.

Trackers go through accelerate: `tracker_setup` gives the `Accelerator` its `log_with` (the named
trackers that are installed; a missing one is a note, not an error) and a project configuration
whose logging folder is `run_dir/logs`; `Telemetry` calls `accelerator.init_trackers` (project
`t2t-mtl`, the flattened run config as hyper-parameters) and `accelerator.log`. TensorBoard (the
default) writes event files to `run_dir/logs/t2t-mtl/`; W&B, MLflow, trackio and Comet
(`comet_ml`) work when their package is installed and configured. Each tracker's run id is saved
in `run_dir/trackers.json`, so a resumed run continues the same tracker run: TensorBoard writes
to the same folder (hiding events a killed run logged after its checkpoint, `purge_step`), W&B
resumes the saved id (`resume="allow"`), MLflow the saved run id, trackio the saved run name,
Comet the saved experiment key. `plot_loss_curves` draws per-task loss curves from metrics.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from t2t_mtl.core.files import atomic_write_json
from t2t_mtl.runs.folder import TRACKERS_FILE, read_metrics

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

__all__ = [
    "PROJECT",
    "MetricWindow",
    "Telemetry",
    "flat_config",
    "plot_loss_curves",
    "read_metrics",
    "tracker_init_kwargs",
    "tracker_names",
    "tracker_setup",
]

PROJECT = "t2t-mtl"  # the tracker project (W&B / trackio / Comet project, MLflow experiment)
_PACKAGES = {
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
    "comet_ml": "comet-ml",
    "tensorboard": "tensorboard",
}


def tracker_names(report_to: str | list[str] | None) -> list[str]:
    """`train.report_to` as a list of tracker names ("none" and empty entries dropped)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in dict.fromkeys(n.strip() for n in names) if n and n != "none"]


def tracker_setup(
    report_to: str | list[str] | None, run_dir: Path
) -> tuple[list[str], ProjectConfiguration, list[str]]:
    """(`log_with` for the Accelerator, its project configuration, notes): the trackers of
    `report_to` that are installed (accelerate's own check), logging under `run_dir/logs`; one
    note per named tracker that is not installed."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import ProjectConfiguration

    have = {str(t) for t in get_available_trackers()}
    use, notes = [], []
    for name in tracker_names(report_to):
        if name in have:
            use.append(name)
        else:
            notes.append(
                f"train.report_to: {name}, but {name} is not installed; not logging to it "
                f"(pip install {_PACKAGES.get(name, name)})"
            )
    run_dir = Path(run_dir)
    return (
        use,
        ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        notes,
    )


def flat_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as flat `section.key` hyper-parameters of scalars (every tracker takes
    these; lists and None become JSON text)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, ensure_ascii=False)
    return out


def tracker_init_kwargs(
    names: list[str],
    run_name: str,
    run_dir: Path,
    saved: Mapping[str, Any],
    resume_step: int | None,
) -> dict[str, dict[str, Any]]:
    """`init_kwargs` for `accelerator.init_trackers`: a fresh tracker run named after the run, or,
    when resuming (`resume_step` = the checkpoint's step) with ids saved in trackers.json, the
    same tracker run again."""
    out: dict[str, dict[str, Any]] = {}
    again = resume_step is not None
    for name in names:
        ids = dict(saved.get(name) or {}) if again else {}
        if name == "tensorboard":
            # same folder (it depends on run_dir only); hide what a killed run logged after the
            # checkpoint, as metrics.jsonl is trimmed to it
            out[name] = {"purge_step": int(resume_step) + 1} if again else {}
        elif name == "wandb":
            kw: dict[str, Any] = {"name": run_name, "dir": str(run_dir)}
            if ids.get("id"):
                kw.update(id=ids["id"], resume="allow")
            out[name] = kw
        elif name == "mlflow":
            out[name] = {"run_id": ids["run_id"]} if ids.get("run_id") else {"run_name": run_name}
        elif name == "trackio":
            out[name] = {"name": ids.get("name") or run_name}
            if ids.get("name"):
                out[name]["resume"] = "allow"
        elif name == "comet_ml":
            out[name] = (
                {"experiment_key": ids["experiment_key"], "mode": "get_or_create"}
                if ids.get("experiment_key")
                else {}
            )
    return out


def _tracker_ids(tracker: Any) -> dict[str, Any]:
    """What identifies a started tracker's run, to continue it after a resume."""
    name = getattr(tracker, "name", "")
    try:
        if name == "tensorboard":
            return {"logging_dir": str(tracker.logging_dir)}
        if name == "wandb":
            return {"id": tracker.run.id, "project": PROJECT}
        if name == "mlflow":
            return {"run_id": tracker.active_run.info.run_id, "experiment": PROJECT}
        if name == "trackio":
            return {"name": getattr(tracker.run, "name", None), "project": PROJECT}
        if name == "comet_ml":
            return {"experiment_key": tracker.writer.get_key(), "project": PROJECT}
    except AttributeError:  # a tracker version without the attribute: nothing to resume with
        pass
    return {}


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
    """Progress bar, metrics.jsonl and the accelerator's trackers; every method is a no-op on
    non-main processes. `accelerator` must have been built with `tracker_setup`'s `log_with` and
    project configuration (None: metrics.jsonl and the console only). `resume_step`: the step
    of the checkpoint this session resumes from (None for a fresh run)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        accelerator: Accelerator | None = None,
        run_name: str = "run",
        config: dict | None = None,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._acc = None
        self._bar = None
        self.notes: list[str] = []
        if not enabled:
            return
        self.metrics_path = self.run_dir / "metrics.jsonl"
        names = [str(t) for t in (getattr(accelerator, "log_with", None) or [])]
        if accelerator is None or not names:
            return
        path = self.run_dir / TRACKERS_FILE
        saved = {}
        if resume_step is not None and path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                self.notes.append(f"{path} is unreadable: the trackers start new runs")
        accelerator.init_trackers(
            PROJECT,
            config=flat_config(config or {}),
            init_kwargs=tracker_init_kwargs(names, run_name, self.run_dir, saved, resume_step),
        )
        self._acc = accelerator
        ids = {t.name: _tracker_ids(t) for t in accelerator.trackers}
        atomic_write_json(path, ids, indent=1)
        if "tensorboard" in ids:
            self.notes.append(f"TensorBoard logs: {ids['tensorboard'].get('logging_dir')}")

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
        """Write one metrics row (scalars) to metrics.jsonl, the trackers and the console."""
        if not self.enabled:
            return
        rec = {"step": step, "stage": stage, "time": round(time.time(), 3), **row}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, allow_nan=True) + "\n")
        scalars = {
            k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._acc is not None and scalars:
            self._acc.log(scalars, step=step)
        if console:
            self.write(_console_line(step, stage, scalars))

    def close_bar(self) -> None:
        """Close the progress bar (end of a stage)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Close the bar and finish every tracker (flushes TensorBoard, ends the W&B run, ...).
        Not `accelerator.end_training`: that also destroys the process group, which training
        tears down itself after a barrier."""
        self.close_bar()
        if self._acc is not None:
            for tracker in self._acc.trackers:
                tracker.finish()
            self._acc = None


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


def plot_loss_curves(metrics_path: Path, png_path: Path) -> Path | None:
    """Per-task (and total) training loss against step (`run_report.loss_figure`, also in the
    HTML report) as a PNG; None when nothing was logged."""
    from t2t_mtl.evaluation.run_report import loss_figure  # matplotlib: only this PNG needs it

    fig = loss_figure(read_metrics(metrics_path))
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
