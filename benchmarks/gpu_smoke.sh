#!/usr/bin/env bash
# The GPU-only paths, run unattended on a GPU box in under 6 minutes (issue 15):
#   env                    torch, CUDA and the GPUs it sees
#   nccl_w1 .. nccl_w8     the trainer's collectives under NCCL at world 1, 2, 4, 8 and
#                          the GPU count (up to 8), checked in fp32 and bf16, + one timing
#   bf16                   the real loop (trainer/train.py under torchrun, every GPU):
#                          iresnet50, bf16 autocast, 200k classes at r = 0.1, synthetic
#                          noise, 24 steps; run through benchmarks/_sync_count.py, so
#   sync_per_step          host syncs per step (steps 3-8; target 1) are counted too
#   fp16_nonfinite         fp16 autocast + GradScaler with a NaN injected at step 5: the
#                          step is skipped and counted, the run finishes
#   offload_host           bf16 again with the class centres in host memory, and
#   offload_rows           the same classifier rows updated as without offload?
#   resume                 bf16's checkpoint continued to step 32 on the GPU
#   gpu_bench              benchmarks/gpu_bench.py: classifier share, vs arcface_torch's
#                          PartialFC_V2 and nn.Linear, planner vs measured peak memory
#   compile                benchmarks/gpu_bench.py --rows compile: torch.compile speed-up
#   bf16_storage_offload   bf16 class-centre storage with host offload, 12 steps
#   dali                   DALI GPU decode (device='mixed') of RecordIO shards built here
# Each part runs under `timeout`, and the parts share a budget (SMOKE_BUDGET_S, default
# 330 s): a part that would start with under 20 s left is skipped. The script prints one
# line per part as it goes, then one table (and gpu_bench's), written as JSON to
# $OUT/gpu_smoke.json when OUT is set (with every part's log in $OUT/gpu_smoke_logs/).
# Exit code: 0 when no part failed or timed out (skipped parts and missed targets are
# reported, not failures), 1 otherwise. Without a GPU (nvidia-smi lists none and there
# is no /dev/nvidiaN) it prints one line, imports, installs and runs nothing, and exits
# 0; a GPU that the python's torch cannot see (a CPU-only build) is exit 1.
#
# Air-gapped boxes: nothing is installed unless WHEELS is set. The checkout goes on
# PYTHONPATH and PYTHON picks the interpreter (default python3: it needs a CUDA build of
# PyTorch >= 2.11, PyYAML, Pillow, psutil, prometheus-client, numpy). Missing packages
# come as wheels: on a machine with a registry,
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl simplejpeg                  # the dali part builds its shards with it
#   pip download ... --extra-index-url https://pypi.nvidia.com -d .whl nvidia-dali-cuda120
#                                           # (425 MB; the build matching the box's CUDA)
# then on the box `WHEELS=.whl bash benchmarks/gpu_smoke.sh` installs them with
# `pip install --no-index --no-deps --target` into the work directory. A part whose
# dependency is missing is skipped with one line (e.g. "skipped: nvidia.dali not
# importable"). For gpu_bench's arcface_torch rows copy the oracle in first:
#   cp -r ../shared/anchors .anchors        # ignored by git; ANCHOR_DIR overrides
# Usage: [PYTHON=python3] [WHEELS=dir] [OUT=dir] [SMOKE_WORK=dir] bash benchmarks/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}

SMI_GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
    SMI_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [ "$SMI_GPUS" -eq 0 ] && ! compgen -G '/dev/nvidia[0-9]*' >/dev/null; then
    echo "gpu_smoke: no NVIDIA GPU visible (nvidia-smi / torch.cuda): nothing run"
    exit 0
fi
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_smoke: PYTHON=$PY not found: set PYTHON to a python with a CUDA build of PyTorch" >&2
    exit 1
fi
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null | tail -n 1)
case $NGPU in '' | *[!0-9]*) NGPU=0 ;; esac
if [ "$NGPU" -lt 1 ]; then
    TORCH=$("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -n 1)
    echo "gpu_smoke: an NVIDIA GPU is present but $PY ($TORCH) sees none: set PYTHON to a python with a CUDA build of PyTorch" >&2
    exit 1
fi
[ "$NGPU" -gt 8 ] && NGPU=8

WORK=${SMOKE_WORK:-$(mktemp -d -t gpu_smoke.XXXXXX)}
LOGS=$WORK/logs
RESULTS=$WORK/parts.tsv
mkdir -p "$LOGS" && : >"$RESULTS"
SITE=
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install --quiet --no-index --no-deps --target "$WORK/site" "$WHEELS"/*.whl || {
        echo "gpu_smoke: could not install the wheels in $WHEELS (pip --no-index --no-deps)" >&2
        exit 1
    }
    SITE=:$WORK/site
fi
export PYTHONPATH="$REPO$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PY NGPU WORK
BUDGET=${SMOKE_BUDGET_S:-330}
DEADLINE=$((SECONDS + BUDGET))
declare -A STATUS

record() {  # PART STATUS SECONDS DETAIL
    STATUS[$1]=$2
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >>"$RESULTS"
    echo "== $1: $2 ($3 s) $4"
}

part() {  # PART LIMIT_S COMMAND...: COMMAND (a program or a function below) under timeout
    local name=$1 limit=$2 start=$SECONDS rc=0 status detail
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        record "$name" skipped 0 "skipped: the $BUDGET s budget is spent (SMOKE_BUDGET_S)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
    detail=$(grep -Ev '^[[:space:]=-]*$' "$LOGS/$name.log" | tail -n 1)
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout detail="killed after $limit s; last line: $detail" ;;
        *) status=FAIL detail="exit $rc: $(why_failed "$LOGS/$name.log") (log: $LOGS/$name.log)" ;;
    esac
    record "$name" "$status" $((SECONDS - start)) "$detail"
}

why_failed() {  # LOG: its last error line (not torchrun's summary of it), else its last line
    local why
    why=$(grep -E '^([A-Za-z_][A-Za-z0-9_.]*(Error|Exception)|arcshard: [a-z ]*error)' "$1" |
        grep -v ChildFailedError | tail -n 1)
    [ -n "$why" ] || why=$(grep -Ev '^[[:space:]=-]*$' "$1" | tail -n 1)
    echo "$why"
}

after() {  # PART NEEDED...: true when every NEEDED part passed, else records PART skipped
    local name=$1 need
    shift
    for need in "$@"; do
        if [ "${STATUS[$need]:-}" != ok ]; then
            record "$name" skipped 0 "skipped: needs $need, which did not pass"
            return 1
        fi
    done
}

importable() {  # PART MODULE: true when MODULE imports, else records PART skipped
    "$PY" -c "import $2" >/dev/null 2>&1 && return
    record "$1" skipped 0 "skipped: $2 not importable (carry its wheel: WHEELS=dir)"
    return 1
}

train() {  # NAME SCRIPT OVERRIDE...: a real run on every GPU, then its one-line summary
    local name=$1 script=$2 args=()
    shift 2
    [ "$script" = benchmarks/_sync_count.py ] && args=(--json "$WORK/$name.sync.json" --)
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" "$script" "${args[@]}" \
        run.output_dir="$WORK/$name" run.max_steps=24 run.log_every=8 backbone.name=iresnet50 \
        data.batch_size=128 data.workers=4 data.synthetic_mode=noise data.num_classes=200000 \
        data.num_samples=1000000 partial_fc.sample_rate=0.1 dist.backend=nccl "$@" || return
    "$PY" benchmarks/_smoke.py run-summary "$WORK/$name"
}

resume() {  # bf16's output directory continued to step 32
    cp -r "$WORK/bf16" "$WORK/resumed" || return
    train resumed trainer/train.py run.max_steps=32 || return
    grep -q "resumed from" "$WORK/resumed/logs/rank0.log" || {
        echo "no 'resumed from' line in $WORK/resumed/logs/rank0.log"
        return 1
    }
}

dali() {  # RecordIO shards from generated JPEGs, decoded by DALI on the GPU
    "$PY" benchmarks/_smoke.py faces "$WORK/faces" &&
        "$PY" -m data_tools build "$WORK/faces" "$WORK/shards" --shards 4 --quiet &&
        train dali trainer/train.py data.source=recordio data.path="$WORK/shards" \
            data.num_classes=null data.loader=dali data.batch_size=64 run.max_steps=12
}
export -f train resume dali

part env 60 "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '$NGPU x', torch.cuda.get_device_name(0))"
for w in $(printf '%s\n' 1 2 4 8 "$NGPU" | sort -nu); do
    [ "$w" -le "$NGPU" ] && part "nccl_w$w" 60 "$PY" -m torch.distributed.run --standalone \
        --nproc_per_node "$w" benchmarks/_smoke.py collectives
done
part bf16 120 train bf16 benchmarks/_sync_count.py backbone.precision=bf16
after sync_per_step bf16 && part sync_per_step 30 "$PY" benchmarks/_smoke.py sync-summary "$WORK/bf16.sync.json"
part fp16_nonfinite 120 train fp16_nonfinite trainer/train.py backbone.precision=fp16 'run.inject_nonfinite=[5]'
part offload_host 120 train offload_host trainer/train.py backbone.precision=bf16 partial_fc.offload=host
after offload_rows bf16 offload_host &&
    part offload_rows 60 "$PY" benchmarks/_smoke.py offload-compare "$WORK/bf16" "$WORK/offload_host"
after resume bf16 && part resume 120 resume
part gpu_bench 180 "$PY" benchmarks/gpu_bench.py --rows arcshard,anchor,dense --json "$WORK/gpu_bench.json"
part compile 150 "$PY" benchmarks/gpu_bench.py --rows compile --json "$WORK/gpu_bench_compile.json"
part bf16_storage_offload 120 train bf16_storage_offload trainer/train.py backbone.precision=bf16 \
    partial_fc.storage=bf16 partial_fc.offload=host run.max_steps=12
importable dali nvidia.dali && importable dali simplejpeg && part dali 150 dali

"$PY" benchmarks/_smoke.py report "$RESULTS" --bench "$WORK/gpu_bench.json" \
    --bench "$WORK/gpu_bench_compile.json" ${OUT:+--json "$OUT/gpu_smoke.json"}
rc=$?
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/gpu_smoke_logs" && cp "$LOGS"/*.log "$OUT/gpu_smoke_logs/" 2>/dev/null
fi
echo "gpu_smoke: work directory $WORK"
exit $rc
