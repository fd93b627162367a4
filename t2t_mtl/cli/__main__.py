"""`python -m t2t_mtl.cli ...` runs the t2t-mtl command line."""

import sys

from t2t_mtl.cli.main import main

__all__: list[str] = []  # a script: nothing to import from here

sys.exit(main())
