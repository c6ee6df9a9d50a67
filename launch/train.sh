#!/usr/bin/env bash
# Launch trainer/train.py on this node: one machine, or one of several (run it on each).
# `launch/train.sh --help` for usage.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/train.sh [options] [--] [trainer arguments...]

Starts one worker process per GPU on this node (2 CPU processes with gloo when there is
no GPU) with torchrun's c10d rendezvous, and passes the trainer arguments to
trainer/train.py (--config FILE section.key=value ...). Prints the resolved command.
For several nodes run the same command on every node with the same NNODES, MASTER_ADDR
and MASTER_PORT: the launchers meet at MASTER_ADDR:MASTER_PORT, then training starts.

options (each also read from the environment variable in capitals):
  --nnodes N            NNODES          number of nodes (default 1)
  --node-rank R         NODE_RANK       0 on the node at MASTER_ADDR, which hosts the
                                        rendezvous store; 1..N-1 elsewhere (optional: by
                                        default torchrun decides from the host name).
                                        Global ranks are assigned at the rendezvous.
  --master-addr HOST    MASTER_ADDR     rendezvous host (required when NNODES > 1;
                                        default 127.0.0.1 on one node)
  --master-port PORT    MASTER_PORT     rendezvous port (default 29500 with several nodes,
                                        a free port on one node)
  --nproc-per-node K    NPROC_PER_NODE  workers on this node (default: every visible GPU,
                                        from CUDA_VISIBLE_DEVICES or nvidia-smi; 2 on CPU)
  --max-restarts K      MAX_RESTARTS    torchrun restarts of a failed worker group (default
                                        0; keep 0 when a scheduler requeues preempted runs)
  --rdzv-id ID          RDZV_ID         rendezvous id, the same on every node (default arcshard)
  --dry-run                             print the command and exit
  -h, --help                            this help

environment: PYTHON (default .venv/bin/python in the checkout, else python3);
NCCL_SOCKET_IFNAME (network interface for NCCL and gloo, only when given); see
launch/env.sh for the NCCL defaults exported.

Preemption: SIGTERM or SIGUSR1 to this process (or to the workers) makes every rank
finish its step, write a checkpoint and exit; this script then exits 75. Run the same
command again to resume from output_dir/checkpoints/latest.

examples:
  launch/train.sh --config trainer/configs/ms1mv3_r50.yaml data.path=/data/ms1mv3
  # two nodes, 8 GPUs each; on node A (10.0.0.1) and on node B:
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/train.sh --config ... 
  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/train.sh --config ...
EOF
}

ARCSHARD_ROOT="${ARCSHARD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-}"
NPROC_PER_NODE="${NPROC_PER_NODE:-}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RDZV_ID="${RDZV_ID:-arcshard}"
dry_run=0

need_value() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then
        echo "launch/train.sh: $1 needs a value (see --help)" >&2
        exit 2
    fi
}
while [ $# -gt 0 ]; do
    case "$1" in
        --nnodes) need_value "$@"; NNODES="$2"; shift 2 ;;
        --node-rank) need_value "$@"; NODE_RANK="$2"; shift 2 ;;
        --master-addr) need_value "$@"; MASTER_ADDR="$2"; shift 2 ;;
        --master-port) need_value "$@"; MASTER_PORT="$2"; shift 2 ;;
        --nproc-per-node) need_value "$@"; NPROC_PER_NODE="$2"; shift 2 ;;
        --max-restarts) need_value "$@"; MAX_RESTARTS="$2"; shift 2 ;;
        --rdzv-id) need_value "$@"; RDZV_ID="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) break ;;  # the trainer's arguments start here
    esac
done

# shellcheck source=launch/env.sh
source "$ARCSHARD_ROOT/launch/env.sh" || exit 2

for name in NNODES MAX_RESTARTS ${NPROC_PER_NODE:+NPROC_PER_NODE} ${NODE_RANK:+NODE_RANK} ${MASTER_PORT:+MASTER_PORT}; do
    if ! [[ "${!name}" =~ ^[0-9]+$ ]]; then
        echo "launch/train.sh: $name=${!name} is not a non-negative integer" >&2
        exit 2
    fi
done
if [ "$NNODES" -lt 1 ]; then
    echo "launch/train.sh: NNODES=$NNODES must be >= 1" >&2
    exit 2
fi
if [ -n "$NODE_RANK" ] && [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "launch/train.sh: NODE_RANK=$NODE_RANK must be < NNODES=$NNODES" >&2
    exit 2
fi
if [ "$NNODES" -gt 1 ]; then
    if [ -z "$MASTER_ADDR" ]; then
        echo "launch/train.sh: NNODES=$NNODES needs MASTER_ADDR (the host of node rank 0," \
             "reachable from every node)" >&2
        exit 2
    fi
    MASTER_PORT="${MASTER_PORT:-29500}"
else
    MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
    MASTER_PORT="${MASTER_PORT:-0}"  # 0: the rendezvous store picks a free port
fi
if [ -z "$NPROC_PER_NODE" ]; then
    NPROC_PER_NODE="$(arcshard_local_gpus)"
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=2
fi
if [ "$NPROC_PER_NODE" -lt 1 ]; then
    echo "launch/train.sh: NPROC_PER_NODE=$NPROC_PER_NODE must be >= 1" >&2
    exit 2
fi

cmd=("$PYTHON" "$ARCSHARD_ROOT/launch/node_launcher.py"
     --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
     --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID"
     --max_restarts "$MAX_RESTARTS")
if [ -n "$NODE_RANK" ]; then
    if [ "$NODE_RANK" -eq 0 ]; then
        cmd+=(--rdzv_conf is_host=true)
    else
        cmd+=(--rdzv_conf is_host=false)
    fi
fi
cmd+=("$ARCSHARD_ROOT/trainer/train.py" "$@")

arcshard_show "${cmd[@]}"
[ "$dry_run" -eq 0 ] || exit 0
exec "${cmd[@]}"
