"""The sbatch scripts on a real SLURM cluster (slurmctld + slurmd on this host, CPU, gloo).

`launch/slurm/train.sbatch` (one torchrun per node) and `train_srun.sbatch` (one srun
task per rank) train the CPU demo to completion; then a job is sent SIGUSR1 the way
`--signal=USR1@120` does near its time limit, checkpoints, requeues itself and resumes.
Jobs are submitted from the checkout (as users do) with `--chdir` to a temporary
directory, where `logs/%x-%j.out` lands.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "trainer/configs/cpu_demo.yaml")
# A few tenths of a second per step on 2 busy cores.
TINY = [
    "backbone.embedding_size=32", "data.num_classes=8", "data.batch_size=2",
    "data.num_samples=400", "optim.warmup_steps=2", "run.log_every=2",
]  # fmt: skip
JOB_TIMEOUT = 240


def _submit(slurm, tmp_path: Path, script: str, *sbatch_opts: str, steps: int, **env) -> tuple[int, Path]:
    (tmp_path / "logs").mkdir(exist_ok=True)
    out = tmp_path / "run"
    job = slurm.sbatch(
        f"--chdir={tmp_path}", *sbatch_opts, f"launch/slurm/{script}",
        "--config", CONFIG, f"run.output_dir={out}", f"run.max_steps={steps}", *TINY,
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env},
    )  # fmt: skip
    return job, out


def _log(tmp_path: Path, job: int) -> str:
    path = tmp_path / "logs" / f"arcshard-{job}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def _assert_completed(slurm, job: int, tmp_path: Path, out: Path, steps: int) -> dict:
    info = slurm.wait(job, JOB_TIMEOUT)
    log = _log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{log}"
    records = [r for r in slurm.completion_records() if r.get("JobId") == str(job)]
    assert records and records[-1]["JobState"] == "COMPLETED", records
    assert f"step {steps}/{steps}" in log, log  # rank 0's progress, in the job's log
    for rank in (0, 1):  # every rank's own log: one group of 2 ranks, all steps done
        rank_log = (out / "logs" / f"rank{rank}.log").read_text()
        assert f"[rank {rank}]" in rank_log and "samples per step over 2 ranks" in rank_log
        assert f"finished {steps} steps" in rank_log, rank_log[-2000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith(f"step-{steps:09d}"), latest
    assert (out / "checkpoints" / f"step-{steps:09d}").is_dir()
    return info


def test_torchrun_per_node_script_trains_to_completion(slurm, tmp_path):
    job, out = _submit(slurm, tmp_path, "train.sbatch", steps=10, NPROC_PER_NODE="2")
    _assert_completed(slurm, job, tmp_path, out, 10)
    log = _log(tmp_path, job)
    assert "--rdzv_backend c10d --rdzv_endpoint localhost:" in log
    assert f"--rdzv_id {job}" in log and "1 node(s) x 2 workers" in log


def test_srun_per_rank_script_trains_to_completion(slurm, tmp_path):
    job, out = _submit(slurm, tmp_path, "train_srun.sbatch", "-n", "2", steps=10)
    _assert_completed(slurm, job, tmp_path, out, 10)
    assert "2 tasks, rendezvous localhost:" in _log(tmp_path, job)


def _wait_for_step(path: Path, step: int, slurm, job: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(rf"step {step}/", path.read_text()):
            return
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before step {step}"
        time.sleep(0.3)
    raise AssertionError(f"no 'step {step}/' in {path} after {timeout}s")


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """scancel --signal=USR1 is what --signal=USR1@120 sends near the time limit."""
    steps = 12
    job, out = _submit(slurm, tmp_path, "train.sbatch", steps=steps, NPROC_PER_NODE="2")
    _wait_for_step(out / "logs" / "rank0.log", 2, slurm, job, JOB_TIMEOUT)
    signalled = slurm.run("scancel", "--signal=USR1", str(job))
    assert signalled.returncode == 0, signalled.stderr
    info = _assert_completed(slurm, job, tmp_path, out, steps)
    log = _log(tmp_path, job)
    assert info["Restarts"] == "1", f"{info}\n{log}"
    assert f"requeueing job {job}" in log and "run 1 on localhost" in log, log
    rank0 = (out / "logs" / "rank0.log").read_text()
    saved = re.search(r"checkpointing at step (\d+)", rank0)
    assert saved, rank0[-3000:]
    stop = int(saved.group(1))
    assert 2 <= stop < steps
    resumed = re.search(r"resum\w+ from .*step-(\d+)", rank0)
    assert resumed and int(resumed.group(1)) == stop, rank0[-3000:]
    # The two runs are the two completion records of the same job id.
    states = [r["JobState"] for r in slurm.completion_records() if r.get("JobId") == str(job)]
    assert states[-1] == "COMPLETED" and len(states) == 2, states
