"""`python -m t2t_mtl.cli ...` runs the t2t-mtl command line."""

import sys

from t2t_mtl.cli.main import main

sys.exit(main())
