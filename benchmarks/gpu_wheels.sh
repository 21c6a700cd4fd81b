#!/usr/bin/env bash
# Fill .whl/ with the wheels that the lent GPU machine's Python 3.12 image lacks, for
# benchmarks/gpu_acceptance.py (which installs them before it starts). Run from anywhere:
#
#   bash benchmarks/gpu_wheels.sh
#
# The image already holds torch, lightning, transformers, tokenizers, safetensors, peft,
# torchvision, torchmetrics, onnx, onnxruntime, opencv-python-headless, scipy, scikit-image,
# matplotlib, tensorboard, numba, pyyaml and the rest of its list (see the device tool's
# KINDS.md). What the kit imports beyond that is below, at the versions of .venv. Two
# packages publish no wheel and are built here: DeepSpeed (pure Python with DS_BUILD_OPS=0;
# it compiles its ops on first use there) and insightface (a Cython extension, built with a
# local Python 3.12). PyAV (36 MB) and bitsandbytes (43 MB) stay behind: the acceptance run
# reads no video file and its memory-saving setting is DeepSpeed's CPU offload.
# Everything that travels with a device call must stay under 64 MiB, so the total is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl   # ignored by git (.gitignore): it travels only when a device call carries it
LIMIT_MB=${LIMIT_MB:-56}   # leaves room for the working tree in the 64 MiB a call carries

VENV_PY=.venv/bin/python   # `make install` makes it; the versions below are the ones the suite runs
if [ ! -x "$VENV_PY" ]; then echo "run 'make install' first: the wheels take .venv's versions" >&2; exit 1; fi
version() { "$VENV_PY" -c "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))" "$1"; }

# What the acceptance run imports that the image lacks (traced over a dry run), and what
# those import in turn: diffusers; DeepSpeed's pydantic and hjson; insightface's albumentations
# (imported by insightface.app) with albucore, simsimd and stringzilla; facexlib.
# typing-extensions travels because this pydantic needs 4.16 or newer, which the image may lack.
DOWNLOAD=(diffusers hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
          albumentations albucore simsimd stringzilla facexlib)

if [ -z "${PYTHON312:-}" ]; then
    for candidate in $(ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null) $(command -v python3.12 || true); do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            PYTHON312=$candidate
            break
        fi
    done
fi
if [ -z "${PYTHON312:-}" ]; then
    echo "needs a Python 3.12 to build insightface for the GPU image (set PYTHON312=/path/to/python3.12)" >&2
    exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT"

# Binary wheels from the registry, for CPython 3.12 on x86-64 Linux.
requirements=()
for name in "${DOWNLOAD[@]}"; do requirements+=("$name==$(version "$name")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$OUT" "${requirements[@]}"

# No wheels published: build them here.
DS_BUILD_OPS=0 "$VENV_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$(version deepspeed)"
"$PYTHON312" -m pip wheel -q --no-deps -w "$OUT" "insightface==$(version insightface)"

ls -l "$OUT"
total=$(du -cb "$OUT"/*.whl | tail -n1 | cut -f1)
echo "$(ls "$OUT"/*.whl | wc -l) wheels, $((total / 1048576)) MiB in $OUT"
if [ "$total" -gt $((LIMIT_MB * 1048576)) ]; then
    echo "over the ${LIMIT_MB} MiB these wheels may take of a device call's 64 MiB" >&2
    exit 1
fi
