#!/usr/bin/env bash
# Build the wheelhouse .whl/ for an air-gapped GPU node (Python 3.12, x86-64, PyTorch and
# torchvision preinstalled; no package index). Run on a connected machine from the repository root:
#
#     bash benchmarks/build_wheelhouse.sh            # -> .whl/*.whl (it prints their size)
#
# It downloads, without their dependencies, the project's runtime dependencies that such a node
# lacks, for CPython 3.12 on manylinux x86-64 (or pure-Python py3-none-any wheels), and builds the
# project's own wheel. Not included: torch and torchvision (the node's own build stays), dvc (the
# pipeline tool, not needed to extract or train), and what the node already has (numpy, pillow,
# pyyaml, fsspec, tqdm, matplotlib, packaging, typing-extensions). On the node:
#
#     python3 -m pip install --no-index --no-deps .whl/*.whl
#
# (benchmarks/gpu_check.sh does this). PYTHON_VERSION and WHEELHOUSE override the target and folder.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-.whl}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}

# The packages such a node lacks (their own runtime dependencies too: zarr's donfig, google-crc32c, numcodecs;
# webdataset's braceexpand; pytest's, for gpu_check's cuda_tests section), at the versions constraints.txt pins.
NAMES=(zarr numcodecs donfig google-crc32c webdataset braceexpand pycocotools pytest pluggy iniconfig pygments)
PACKAGES=()
for name in "${NAMES[@]}"; do
    pin=$(grep -i -E "^${name}==" constraints.txt) || { echo "build_wheelhouse: $name is not pinned in constraints.txt" >&2; exit 1; }
    PACKAGES+=("$pin")
done

mkdir -p "$WHEELHOUSE"
rm -f "$WHEELHOUSE"/*.whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELHOUSE" \
    --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    "${PACKAGES[@]}"

# The project itself: a pure-Python wheel (setuptools builds it; no network needed for that step
# when setuptools is installed here).
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WHEELHOUSE" .

echo "wheelhouse $WHEELHOUSE:"
ls -1 "$WHEELHOUSE"
du -sh "$WHEELHOUSE"
