"""launch/train.sh on one host standing in for two nodes, and its preemption exit code.

Two launcher processes (`NNODES=2`, one worker each) meet in torchrun's c10d
rendezvous on 127.0.0.1, exactly as two machines would at MASTER_ADDR, and train the
CPU demo; the result must equal a one-node run with two workers (same global ranks,
same data, same sampled classes: only the process layout differs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = str(REPO / "launch" / "train.sh")
sys.path.insert(0, str(REPO / "launch"))
from node_launcher import EXIT_PREEMPTED, passed_code, preempted  # noqa: E402

TINY = [
    "--config", str(REPO / "trainer/configs/cpu_demo.yaml"), "backbone.embedding_size=32",
    "data.num_classes=8", "data.batch_size=2", "data.num_samples=400",
    "optim.warmup_steps=2", "run.log_every=1",
]  # fmt: skip
LAUNCH_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE",
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _env(**launch: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, **launch)
    return env


def _start(out: Path, *extra: str, **launch: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", TRAIN_SH, *TINY, f"run.output_dir={out}", *extra], env=_env(**launch),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_two_nodes_on_one_host_match_one_node_with_two_workers(tmp_path):
    steps = "run.max_steps=3"
    port = str(free_port())
    nodes = [
        _start(tmp_path / "two_nodes", steps, NNODES="2", NODE_RANK=str(r), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port, NPROC_PER_NODE="1")
        for r in (0, 1)
    ]  # fmt: skip
    single = _start(tmp_path / "one_node", steps, NPROC_PER_NODE="2")
    outputs = _finish([*nodes, single])
    for proc, output in zip([*nodes, single], outputs):
        assert proc.returncode == 0, output[-4000:]
    # The resolved command is printed; both launchers joined one c10d rendezvous.
    for r, output in enumerate(outputs[:2]):
        assert f"--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:{port}" in output
        assert f"is_host={'true' if r == 0 else 'false'}" in output
    for rank in (0, 1):
        text = (tmp_path / "two_nodes" / "logs" / f"rank{rank}.log").read_text()
        assert "samples per step over 2 ranks" in text and "finished 3 steps" in text

    two, one = tmp_path / "two_nodes", tmp_path / "one_node"
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5) and len(_losses(one)) == 3
    w2 = torch.load(two / "backbone.pt", map_location="cpu")
    w1 = torch.load(one / "backbone.pt", map_location="cpu")
    assert w1.keys() == w2.keys()
    worst = max(float((w2[k].double() - w1[k].double()).abs().max()) for k in w1)
    print(f"largest backbone weight difference, 2 nodes x 1 vs 1 node x 2: {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.integration
def test_sigterm_to_the_launcher_checkpoints_and_exits_75(tmp_path):
    """What a scheduler without SLURM's requeue does (Kubernetes, a spot VM): SIGTERM
    to train.sh's process; the launcher forwards it and reports 'requeue me'."""
    out = tmp_path / "run"
    proc = _start(out, "run.max_steps=100", NPROC_PER_NODE="2")
    log = out / "logs" / "rank0.log"
    deadline = time.monotonic() + 180
    while not (log.exists() and "step 1/" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, _finish([proc])[0][-4000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # train.sh exec'd the launcher: same PID
    output = _finish([proc])[0]
    assert proc.returncode == EXIT_PREEMPTED, output[-4000:]
    assert "node_launcher: workers stopped after SIGTERM" in output
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.rsplit("-", 1)[1])
    assert 1 <= step < 100
    for rank in (0, 1):
        text = (out / "logs" / f"rank{rank}.log").read_text()
        assert f"checkpointing at step {step}" in text, text[-2000:]


@pytest.mark.parametrize(
    "codes, received, expected",
    [
        ([75, 75], [signal.SIGUSR1], True),
        ([75, -signal.SIGTERM], [signal.SIGUSR1], True),  # torchrun stopped the other one
        ([-signal.SIGUSR1], [signal.SIGUSR1], True),  # killed before the trainer's handler
        ([75], [], True),
        ([-signal.SIGUSR1], [], False),  # a signal this launcher did not forward
        ([1, 75], [signal.SIGUSR1], False),  # a real failure
        ([-signal.SIGTERM], [signal.SIGUSR1], False),
        ([-signal.SIGKILL], [], False),  # e.g. the OOM killer
    ],
)
def test_exit_code_rule(codes, received, expected):
    assert preempted(codes, received) is expected


@pytest.mark.parametrize(
    "codes, received, expected",
    [
        ([2, 2], [], 2),  # a config error on every rank
        ([5, 1], [], 5),  # a data error on one rank; the other crashed in its collective
        ([1, 5], [], 5),
        ([4, -signal.SIGTERM], [], 4),  # torchrun stopped the other one
        ([1, -signal.SIGTERM], [], 1),  # a crash
        ([-signal.SIGKILL], [], 1),
        ([75, 75], [signal.SIGUSR1], 75),
        ([1, 75], [signal.SIGUSR1], 1),
    ],
)
def test_launcher_passes_the_workers_code_through(codes, received, expected):
    assert passed_code(codes, received) == expected


@pytest.mark.integration
def test_config_error_under_the_launcher_is_exit_2_in_one_line(tmp_path):
    """Plain torchrun would turn the workers' 2 into 1 and print its ChildFailedError
    report; scripts and SLURM must be able to tell 'fix the config' from 'crashed'."""
    proc = _start(tmp_path / "run", "optim.lr=-1", NPROC_PER_NODE="2")
    output = _finish([proc], timeout=120)[0]
    assert proc.returncode == 2, output[-3000:]
    assert "arcshard: config error: optim.lr" in output
    assert "node_launcher: workers failed (" in output and "exit 2, config error" in output
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]


def test_help_and_bad_arguments():
    help_text = subprocess.run(["bash", TRAIN_SH, "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "NNODES" in help_text.stdout and "c10d" in help_text.stdout
    proc = subprocess.run(["bash", TRAIN_SH, "--nnodes", "2", "--dry-run"], env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "needs MASTER_ADDR" in proc.stderr
    proc = subprocess.run(["bash", TRAIN_SH, "--dry-run", "--config", "x.yaml", "a.b=1"],
                          env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--nnodes 1 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:0" in proc.stderr
    assert proc.stderr.rstrip().endswith("trainer/train.py --config x.yaml a.b=1")
    gpus = _env()
    gpus["CUDA_VISIBLE_DEVICES"] = "0,1,2"  # one worker per visible GPU
    proc = subprocess.run(["bash", TRAIN_SH, "--dry-run"], env=gpus, capture_output=True, text=True)
    assert proc.returncode == 0 and "--nproc_per_node 3 " in proc.stderr
    proc = subprocess.run(["bash", TRAIN_SH, "--dry-run"], env=_env(NPROC_PER_NODE="two"),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "NPROC_PER_NODE=two is not a non-negative integer" in proc.stderr
