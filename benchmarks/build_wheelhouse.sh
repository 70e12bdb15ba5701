#!/usr/bin/env bash
# Build the wheelhouse .whl/ for an air-gapped GPU node (Python 3.12, x86-64, PyTorch and
# torchvision preinstalled; no package index). Run on a connected machine from the repository root:
#
#     bash benchmarks/build_wheelhouse.sh            # -> .whl/*.whl (about 8 MB)
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

# name==version: the versions this project is tested with (pip list here); their own runtime
# dependencies are listed too (zarr: donfig, google-crc32c, numcodecs; webdataset: braceexpand).
PACKAGES=(
    "zarr==3.1.6"
    "numcodecs==0.16.6"
    "donfig==0.8.1.post1"
    "google-crc32c==1.9.0"
    "webdataset==1.0.2"
    "braceexpand==0.1.7"
    "pycocotools==2.0.11"
    "pytest==9.0.3"  # gpu_check's cuda_tests section runs the GPU-only tests; pytest's own dependencies:
    "pluggy==1.6.0"
    "iniconfig==2.3.0"
    "pygments==2.20.0"
)

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
