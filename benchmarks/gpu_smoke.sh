#!/usr/bin/env bash
# One short run of the GPU-only paths: NCCL, cuda devices, bf16 autocast, and fp16
# autocast with GradScaler, through the real training loop (trainer/train.py) with an
# iresnet50 backbone and a 200k-class Partial FC at sample rate 0.1. Uses the python on
# PATH (which must have a CUDA torch) unless PYTHON is set. Prints each run's last
# metrics line and peak memory; exits non-zero if any run fails.
#   bash benchmarks/gpu_smoke.sh            # all local GPUs (at most 8)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q -e . >/dev/null
NGPU=$("$PY" -c "import torch; print(min(torch.cuda.device_count(), 8))")
if [ "$NGPU" -lt 1 ]; then echo "gpu_smoke: no CUDA device visible" >&2; exit 1; fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())"
OUT=${SMOKE_OUT:-$(mktemp -d)}
for precision in bf16 fp16; do
    dir="$OUT/$precision"
    "$PY" -m torch.distributed.run --nproc_per_node "$NGPU" trainer/train.py \
        --config trainer/configs/cpu_demo.yaml run.output_dir="$dir" run.max_steps=30 \
        run.log_every=10 backbone.name=iresnet50 backbone.embedding_size=512 \
        backbone.precision="$precision" data.synthetic_mode=noise data.batch_size=128 \
        data.num_classes=200000 data.num_samples=1000000 data.workers=4 \
        partial_fc.sample_rate=0.1 dist.backend=nccl
    echo "== $precision: last metrics line"
    tail -n 1 "$dir/metrics.jsonl"
    grep -h "peak device memory" "$dir"/logs/rank*.log | sed 's/^.*finished/finished/'
done
