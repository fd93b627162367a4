#!/usr/bin/env bash
# The README's main job: set up, fine-tune the embedded SmolLM2-135M-Instruct on
# all shipped tasks (bundled samples), evaluate it per task, and prompt it.
#   bash launch/quickstart.sh [key=value ...]   (overrides for launch/configs/default.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
T2T=.venv/bin/t2t-mtl
RUN=runs/default
$T2T validate
$T2T train --config launch/configs/default.yaml output_dir=$RUN "$@"
$T2T eval --run $RUN --limit 10
$T2T prompt --run $RUN --task sentiment_sst2 text="A warm, funny and beautifully acted film."
$T2T prompt --run $RUN --instruction "Name the capital of France." --input ""
