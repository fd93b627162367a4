"""The `t2t-mtl` command line. One function per verb; heavy imports happen inside the verb.

Every verb turns a `T2TError` into `file:line: message` lines on stderr and exit 2,
so a user mistake never shows a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import T2TError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per verb."""
    p = argparse.ArgumentParser(prog="t2t-mtl", description="Multi-task text-to-text fine-tuning.")
    sub = p.add_subparsers(dest="verb", required=True)
    # Each verb module-level function `add_<verb>(sub)` registers itself below.
    for add in _VERBS:
        add(sub)
    return p


_VERBS: list = []  # filled by the add_* functions defined below, in order


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `t2t-mtl` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except T2TError as e:
        for prob in e.problems:
            print(prob.format(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
