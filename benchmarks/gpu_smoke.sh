#!/usr/bin/env bash
# One short run of the GPU-only paths through the real training loop (trainer/train.py):
#   1. NCCL + cuda devices + bf16 autocast, iresnet50, 200k-class Partial FC at r = 0.1,
#      synthetic noise data;
#   2. the same with fp16 autocast + GradScaler;
#   3. bf16 class-centre storage with host offload (pinned host memory, side stream);
#   4. resume on GPU: run 1's output dir continued to step 40 (checkpoint loaded into
#      CUDA tensors, classifier re-sharded when the GPU count changes);
#   5. DALI GPU decode (device='mixed') on RecordIO shards built here by arcshard-data
#      from 2,000 generated 112x112 JPEGs, bf16.
# Uses the python on PATH (it must have a CUDA torch; DALI: pip install -e '.[dali]')
# unless PYTHON is set. Prints each run's last metrics line and peak device memory;
# exits non-zero if any run fails.
#   bash benchmarks/gpu_smoke.sh            # all local GPUs (at most 8)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q -e '.[dali]' >/dev/null
NGPU=$("$PY" -c "import torch; print(min(torch.cuda.device_count(), 8))")
if [ "$NGPU" -lt 1 ]; then echo "gpu_smoke: no CUDA device visible" >&2; exit 1; fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())"
OUT=${SMOKE_OUT:-$(mktemp -d)}

train() {  # name, extra overrides...
    local name=$1; shift
    "$PY" -m torch.distributed.run --nproc_per_node "$NGPU" trainer/train.py \
        --config trainer/configs/cpu_demo.yaml run.output_dir="$OUT/$name" run.max_steps=30 \
        run.log_every=10 backbone.name=iresnet50 backbone.embedding_size=512 \
        data.batch_size=128 data.workers=4 partial_fc.sample_rate=0.1 dist.backend=nccl "$@"
    echo "== $name: last metrics line"
    tail -n 1 "$OUT/$name/metrics.jsonl"
    grep -h "peak device memory" "$OUT/$name"/logs/rank*.log | sed 's/^.*finished/finished/'
}

synthetic=(data.synthetic_mode=noise data.num_classes=200000 data.num_samples=1000000)
train bf16 backbone.precision=bf16 "${synthetic[@]}"
train fp16 backbone.precision=fp16 "${synthetic[@]}"
train bf16_storage_offload backbone.precision=bf16 "${synthetic[@]}" partial_fc.storage=bf16 \
    partial_fc.offload=host
cp -r "$OUT/bf16" "$OUT/bf16_resumed"
train bf16_resumed backbone.precision=bf16 "${synthetic[@]}" run.max_steps=40
grep -h "resumed from" "$OUT/bf16_resumed/logs/rank0.log" || { echo "gpu_smoke: no resume" >&2; exit 1; }

"$PY" - "$OUT/faces" <<'PY'
import sys, pathlib, numpy as np
from PIL import Image
root = pathlib.Path(sys.argv[1]); rng = np.random.default_rng(0)
for c in range(100):
    (root / f"id{c:03d}").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    for i in range(20):
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"id{c:03d}" / f"{i}.jpg", quality=95)
PY
"$PY" -m data_tools build "$OUT/faces" "$OUT/shards" --shards 4 --quiet
train dali_bf16 backbone.precision=bf16 data.source=recordio data.path="$OUT/shards" \
    data.num_classes=null data.loader=dali data.batch_size=64
