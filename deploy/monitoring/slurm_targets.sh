#!/usr/bin/env bash
# Writes the Prometheus file_sd targets of one SLURM training job: every rank's exporter,
# HOST:PORT+i for each node of the job and each local rank i < RANKS_PER_NODE (the
# trainer serves /metrics on metrics.port + LOCAL_RANK). Prometheus
# (deploy/monitoring/prometheus.yml) picks the file up within its refresh interval and
# stops scraping the job when the file is removed.
#
#   usage: slurm_targets.sh TARGETS_DIR PORT RANKS_PER_NODE
#
# In the sbatch script, before `srun`:
#   targets=$(deploy/monitoring/slurm_targets.sh /shared/prometheus/targets 9400 8)
#   trap 'rm -f "$targets"' EXIT
#   srun ... python trainer/train.py --config ... metrics.port=9400 run.name=my_run
#
# Nodes come from `scontrol show hostnames "$SLURM_JOB_NODELIST"`; ARCSHARD_NODES
# ("host1 host2 ...") overrides that. The file is TARGETS_DIR/arcshard-$SLURM_JOB_ID.json,
# written atomically (Prometheus never reads half of it); its path is printed. Each target
# carries the label slurm_job_id; the trainer's own labels (job = run.name, rank, node)
# come with the scraped series.
set -euo pipefail
if [ $# -ne 3 ]; then
    echo "usage: $0 TARGETS_DIR PORT RANKS_PER_NODE" >&2
    exit 2
fi
dir=$1 port=$2 per_node=$3
job_id=${SLURM_JOB_ID:?SLURM_JOB_ID is not set: run this inside an sbatch script}
nodes=${ARCSHARD_NODES:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}")}
targets=""
for node in $nodes; do
    for ((i = 0; i < per_node; i++)); do
        targets+="${targets:+, }\"$node:$((port + i))\""
    done
done
mkdir -p "$dir"
out="$dir/arcshard-$job_id.json"
tmp=$(mktemp "$dir/.arcshard-$job_id.XXXXXX")
printf '[{"targets": [%s], "labels": {"slurm_job_id": "%s"}}]\n' "$targets" "$job_id" >"$tmp"
chmod 644 "$tmp"
mv "$tmp" "$out"
echo "$out"
