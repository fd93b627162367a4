"""Thin training launcher (nothing imports it):

    accelerate launch [--config_file launch/accelerate/ddp.yaml] launch/train.py --config CFG [key=value ...]

Runs the same code as `t2t-mtl train --config CFG [key=value ...]`: load the run config with its
overrides, then `t2t_mtl.training.trainer.train`. A user mistake prints `file:line: message (hint)` lines
and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # a source checkout works without installing

from t2t_mtl.cli.main import configure_logging  # noqa: E402
from t2t_mtl.core.errors import T2TError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse `--config CFG [key=value ...]` and train; returns the exit status."""
    p = argparse.ArgumentParser(prog="launch/train.py", description="Train a t2t-mtl run config.")
    p.add_argument("--config", required=True, help="run config YAML (see launch/configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50")
    args = p.parse_args(argv)
    configure_logging()  # library notes on stderr, as `t2t-mtl train` shows them
    try:
        from t2t_mtl.training import preflight, trainer

        cfg = preflight.load_run_config(args.config, args.overrides)
        run_dir = trainer.train(cfg)
        if os.environ.get("RANK", "0") == "0":
            print(run_dir)
    except T2TError as e:
        for prob in e.problems:
            print(prob.format(), file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
