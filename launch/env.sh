# Sourced by launch/train.sh and launch/slurm/*.sbatch: the Python to use and the
# NCCL / torch.distributed environment every launch gets. A variable the user already
# set is kept as it is.
#
#   ARCSHARD_ROOT  the arcshard checkout (set by the caller before sourcing)
#   PYTHON         interpreter; default: $ARCSHARD_ROOT/.venv/bin/python if present, else python3
#
# NCCL defaults (GPU runs; harmless on CPU):
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1   a failed or timed-out collective tears the process
#                                       down (the launcher then stops the job) instead of
#                                       leaving the other ranks hanging
#   TORCH_FR_BUFFER_SIZE=2000           keep the last collectives per rank (flight recorder) and
#   TORCH_NCCL_DUMP_ON_TIMEOUT=1        dump them on a timeout to TORCH_FR_DUMP_TEMP_FILE<rank>
#                                       (default /tmp/nccl_trace_rank_; read with torchfrtrace)
#   NCCL_DEBUG=WARN                     NCCL prints its own errors; INFO to debug a hang
#   NCCL_SOCKET_IFNAME                  not set unless given; when given, GLOO_SOCKET_IFNAME
#                                       follows it (torch's gloo/TCPStore use the same NIC)
# The collective timeout itself is the trainer's `dist.timeout_s` (default 1800 s).

if [ -z "${ARCSHARD_ROOT:-}" ]; then
    echo "launch/env.sh: set ARCSHARD_ROOT before sourcing" >&2
    return 2
fi
if [ ! -f "$ARCSHARD_ROOT/trainer/train.py" ]; then
    echo "arcshard: $ARCSHARD_ROOT/trainer/train.py not found; run from the arcshard checkout" \
         "(sbatch from its root) or set ARCSHARD_ROOT to it" >&2
    return 2
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ARCSHARD_ROOT/.venv/bin/python" ]; then
        PYTHON="$ARCSHARD_ROOT/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi

export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
if [ -n "${NCCL_SOCKET_IFNAME:-}" ]; then
    export NCCL_SOCKET_IFNAME
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NCCL_SOCKET_IFNAME}"
fi

# Number of GPUs this process can use: CUDA_VISIBLE_DEVICES when set, else nvidia-smi,
# else torch (0 without CUDA).
arcshard_local_gpus() {
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        local list="${CUDA_VISIBLE_DEVICES//[[:space:]]/}"
        if [ -z "$list" ] || [ "$list" = "-1" ]; then echo 0; else echo $(( $(tr -cd , <<<"$list" | wc -c) + 1 )); fi
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
    fi
}

# Print a command the way it will run (shell-quoted), on stderr, prefixed with "+ ".
arcshard_show() {
    local out="+" arg
    for arg in "$@"; do out+=" $(printf '%q' "$arg")"; done
    echo "$out" >&2
}
