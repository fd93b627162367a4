"""Atomic, resumable checkpoints in `run_dir/checkpoints/step-N/`.

A checkpoint is written with `accelerator.save_state` into `checkpoints/.tmp-step-N` (optimizer,
per-process RNG states; FSDP/DeepSpeed shards are handled by accelerate) plus our own files, and
only then renamed to `step-N` (`core.files.swap_folder`), so a folder named `step-N` is always complete:
- `trainable.safetensors`: only the parameters that train (LoRA adapters, or everything for full
  fine-tuning) — a save-state hook replaces accelerate's full-model save, so a QLoRA checkpoint
  does not carry the frozen 4-bit base model;
- `trainer_state.json`: step counters, data-stream position, replay buffer, loss-balancer state,
  LR-scheduler state, the open metric window and the number of processes.
Older checkpoints beyond `save_total_limit` are deleted after the new one is in place.

A checkpoint is trusted input: accelerate's RNG states in it are pickles, and unpickling runs code.
So a run resumes only its own checkpoints: folders in `run_dir/checkpoints/` whose state carries the
run folder's id (`run_dir/run_id`, a random uuid written once; checkpoints written before ids
existed carry none and are accepted there). See `resume_point`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from t2t_mtl.core.errors import Problem, T2TError
from t2t_mtl.core.files import atomic_write_text, swap_folder
from t2t_mtl.model.layers import trainable_named

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "STATE_FILE",
    "install_hooks",
    "latest_checkpoint",
    "load",
    "read_state",
    "resume_point",
    "run_id",
    "save",
]

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
RUN_ID_FILE = "run_id"  # in the run folder: the id every checkpoint of the run carries
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TRUST_HINT = (
    "a checkpoint is trusted input (resuming unpickles its RNG state), so a run resumes only "
    "its own checkpoints; use train.resume=never to start this run over"
)


def checkpoints_dir(run_dir: Path) -> Path:
    """`run_dir/checkpoints`."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first."""
    out = []
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def run_id(run_dir: Path, *, create: bool = False) -> str | None:
    """The run folder's id (`run_dir/run_id`); `create=True` writes a new random one when there is
    none (main process only). None when there is none and `create` is False."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8").strip() or None
    if not create:
        return None
    rid = uuid.uuid4().hex
    atomic_write_text(path, rid + "\n")
    return rid


def resume_point(mode: str, run_dir: Path, resolve: Callable[[str], Path] = Path) -> Path | None:
    """The checkpoint `train.resume` asks for: auto = newest complete one (or None), never = None,
    else a checkpoint folder (`resolve` turns the configured path into a real one).

    The checkpoint must belong to the run in `run_dir` (see the module docstring): a folder outside
    `run_dir/checkpoints/`, or one whose state names another run id, is a T2TError.
    """
    if mode == "never":
        return None
    if mode == "auto":
        ckpt = latest_checkpoint(run_dir)
    else:
        ckpt = Path(resolve(mode))
        if not (ckpt / STATE_FILE).is_file():
            raise T2TError(
                Problem(
                    "<config>",
                    None,
                    f"train.resume: {mode} is not a checkpoint folder",
                    "use auto, never, or a run's checkpoints/step-N folder",
                )
            )
        root = checkpoints_dir(run_dir)
        if ckpt.resolve().parent != root.resolve():
            raise T2TError(
                Problem(
                    "<config>",
                    None,
                    f"train.resume: {mode} is not a checkpoint of this run (not in {root})",
                    _TRUST_HINT,
                )
            )
    if ckpt is not None:
        check_owner(ckpt, run_dir)
    return ckpt


def check_owner(ckpt: Path, run_dir: Path) -> None:
    """Refuse a checkpoint whose state names another run than the one in `run_dir` (T2TError).
    A checkpoint without a run id (written before ids existed) passes."""
    saved = read_state(ckpt).get("run_id")
    if saved is None:
        return
    mine = run_id(run_dir)
    if saved != mine:
        raise T2TError(
            Problem(
                str(ckpt),
                None,
                f"this checkpoint belongs to another run (run id {saved}; the run folder "
                f"{run_dir} has {'id ' + mine if mine else 'no run id'})",
                _TRUST_HINT,
            )
        )


def read_state(ckpt: Path) -> dict:
    """The trainer state of a checkpoint folder; a missing or broken file is a T2TError."""
    path = Path(ckpt) / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise T2TError(
            Problem(
                str(path),
                None,
                f"not a readable t2t-mtl checkpoint: {e}",
                "point train.resume at a checkpoints/step-N folder, or use resume=never",
            )
        ) from None


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # The run's trainable set, including blocks a freezing schedule has turned off for now.
    return {n: p.detach().contiguous() for n, p in trainable_named(model)}


def install_hooks(accelerator: Accelerator) -> None:
    """Make `save_state`/`load_state` keep only trainable weights (for plain and DDP models).

    FSDP and DeepSpeed models are saved by accelerate itself (they pass no weights to the hook).
    """

    def save_hook(models, weights, output_dir):
        if len(weights) != len(models):
            return  # FSDP / DeepSpeed: accelerate saves the (sharded) model
        for i, m in enumerate(models):
            if accelerator.is_main_process:
                name = WEIGHTS_FILE if i == 0 else WEIGHTS_FILE.replace(".", f"_{i}.")
                save_file(
                    _trainable_state(accelerator.unwrap_model(m)), os.path.join(output_dir, name)
                )
        weights.clear()

    def load_hook(models, input_dir):
        for i, m in enumerate(models):
            name = WEIGHTS_FILE if i == 0 else WEIGHTS_FILE.replace(".", f"_{i}.")
            path = os.path.join(input_dir, name)
            state = load_file(path)
            inner = accelerator.unwrap_model(m)
            params = dict(inner.named_parameters())
            missing = [n for n, _ in trainable_named(inner) if n not in state]
            unknown = [n for n in state if n not in params]
            if missing or unknown:
                raise T2TError(
                    Problem(
                        path,
                        None,
                        f"checkpoint weights do not fit the model ({len(missing)} missing, "
                        f"{len(unknown)} unknown, e.g. {(missing + unknown)[0]})",
                        "resume with the same model and adapter settings, or use resume=never",
                    )
                )
            with torch.no_grad():
                for n, t in state.items():
                    params[n].copy_(t.to(params[n].device, params[n].dtype))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save(accelerator: Accelerator, run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoint `step-{step}` atomically; all processes must call it. Returns the folder."""
    root = checkpoints_dir(run_dir)
    tmp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rid = run_id(run_dir, create=True)
        state = dict(state, num_processes=accelerator.num_processes, run_id=rid)
        (tmp / STATE_FILE).write_text(
            json.dumps(state, indent=1, allow_nan=True) + "\n", encoding="utf-8"
        )
        swap_folder(tmp, final)  # `final` may exist: the same step saved again after resuming
        rotate(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def rotate(run_dir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (keep <= 0 keeps all) and stale temp folders."""
    found = list_checkpoints(run_dir)
    if keep > 0:
        for _, p in found[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-step-"):
                shutil.rmtree(p, ignore_errors=True)


def load(accelerator: Accelerator, ckpt: Path) -> dict:
    """Restore weights, optimizer and RNG states from `ckpt`; returns its trainer state."""
    state = read_state(ckpt)
    saved = int(state.get("num_processes", 1))
    if saved != accelerator.num_processes:
        raise T2TError(
            Problem(
                str(ckpt),
                None,
                f"checkpoint was written by {saved} process(es), this run has "
                f"{accelerator.num_processes}",
                f"resume with --num_processes {saved} (the data stream itself would be the same)",
            )
        )
    accelerator.load_state(str(ckpt))
    return state
