#!/usr/bin/env bash
# Creates .venv (once) and installs arcshard with its test tools, the report extra
# (matplotlib, for arcshard-report) and the dali extra (NVIDIA DALI: the RecordIO loader;
# a 425 MB wheel, ~1 GB installed, also runs on CPU, and the tests compare it with the
# PyTorch fallback) and the deploy extra (onnx, onnxruntime, onnxscript: ONNX export
# and the embedding CLI) into it.
# torch is installed first and pinned to 2.13.0: on this project's CPU machines that
# is a wheel on local disk; an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${ARCSHARD_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,report,dali,deploy,tensorboard]'
