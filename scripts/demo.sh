#!/usr/bin/env bash
# The README's first command: install (scripts/bootstrap.sh), then train the CPU demo —
# MobileFaceNet on synthetic identities, 2 gloo processes, a few minutes on 2 cores.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh run.max_steps=40`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/torchrun --nproc_per_node 2 trainer/train.py \
    --config trainer/configs/cpu_demo.yaml "$@"
