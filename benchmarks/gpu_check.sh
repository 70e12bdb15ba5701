#!/usr/bin/env bash
# The GPU check, from a fresh checkout on an air-gapped node: install from the wheelhouse, then run
# python -m benchmarks.gpu_check, which ends with one JSON line (docs/gpu.md says what each key means).
#
#     bash benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--out DIR] [--workers N] [--only a,b]
#                                   [--image-decode workers|device]
#
# Install: the project's other dependencies come from .whl/ (benchmarks/build_wheelhouse.sh builds
# it on a connected machine) with pip --no-index --no-deps into a folder of their own put first on
# PYTHONPATH, so the node's torch, torchvision and numpy stay as they are and its venv is untouched.
# Where they already import (a development machine), nothing is installed. The checkout itself is
# on PYTHONPATH, so the code checked is the code in this folder.
# Output: progress lines with timestamps; with $OUT (or --out DIR) set, also DIR/gpu_check.json
# (the JSON line), the same line as DIR/gpu_check-PAIR-DEVICE-CODEC-DATE-COMMIT.json (benchmarks/results.py's
# name, to copy into benchmarks/results/) and DIR/gpu_check.log (everything printed).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ ${args[$i]} == "--out" ]]; then OUT_DIR=${args[$((i + 1))]:-}; fi
done

echo "[$(date +%H:%M:%S)] gpu_check.sh: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON")"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

tick=$(date +%s)
if "$PYTHON" -c "import zarr, numcodecs, webdataset, pycocotools, donfig, google_crc32c, braceexpand" 2>/dev/null; then
    echo "[$(date +%H:%M:%S)] dependencies already importable: nothing installed"
elif compgen -G ".whl/*.whl" >/dev/null; then
    SITE=/tmp/pkd_site
    echo "[$(date +%H:%M:%S)] installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE (--no-index --no-deps)"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$SITE" .whl/*.whl || { echo "gpu_check.sh: install failed" >&2; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_check.sh: zarr/numcodecs/webdataset/pycocotools missing and no .whl/ wheelhouse:" \
        "run benchmarks/build_wheelhouse.sh on a connected machine and carry .whl/" >&2
    exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PKD_INSTALL_SECONDS=$("$PYTHON" -c "import time; print(round(time.time() - $tick, 1))")
export PYTHONUNBUFFERED=1

if [[ -n $OUT_DIR ]]; then
    mkdir -p "$OUT_DIR"
    "$PYTHON" -m benchmarks.gpu_check "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
else
    "$PYTHON" -m benchmarks.gpu_check "$@"
fi
