"""`accelerate launch` of launch/train.py from the tests (the DDP, FSDP and protection tests).

The launcher starts one child per process; when a test times out, killing only the launcher would
leave the children waiting for each other forever (seen twice: gloo ranks orphaned for an hour, eating
the CPU of later tests). So the launch runs in its own session and the whole process group is killed
on timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TWO_CPU_PROCESSES = (
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
)


def accelerate_launch(
    launch_args: tuple[str, ...] | list[str], train_args: list[str], cwd: Path, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `accelerate launch LAUNCH_ARGS launch/train.py TRAIN_ARGS` with one OpenMP thread per
    process; on timeout every process of the launch is killed before TimeoutExpired propagates."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args]
    cmd += [str(REPO / "launch" / "train.py"), *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
