"""Checkpoints under real failures: torchrun groups killed mid-save, signalled, restarted.

Every run here is a real `torchrun --nproc_per_node 2` of trainer/train.py on gloo. The
reference is one uninterrupted run; the interrupted ones must end in the same state.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.distributed import free_port

REPO = Path(__file__).resolve().parents[3]
STEPS, EVERY = 16, 4
TINY = [
    "backbone.name=mobilefacenet", "backbone.embedding_size=32", "backbone.channels_last=false",
    "data.num_classes=24", "data.batch_size=4", "data.num_samples=56", "data.workers=0",
    "margin.s=16", "margin.m2=0.2", "partial_fc.sample_rate=0.5",
    "optim.lr=0.1", "optim.warmup_steps=2", "run.log_every=1",
    f"run.max_steps={STEPS}", f"checkpoint.every={EVERY}",
]


def _cmd(out: Path, *overrides: str, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), f"--max-restarts={max_restarts}",
        "trainer/train.py", "--config", "trainer/configs/cpu_demo.yaml",
        f"run.output_dir={out}", *TINY, *overrides,
    ]


def _run(out: Path, *overrides: str, max_restarts: int = 0, timeout: int = 300):
    return subprocess.run(
        _cmd(out, *overrides, max_restarts=max_restarts), cwd=REPO, capture_output=True,
        text=True, timeout=timeout,
    )


def _start(out: Path, *overrides: str, max_restarts: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(out, *overrides, max_restarts=max_restarts), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    log = out / "logs" / "rank0.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and re.search(rf"step {step}/{STEPS}\b", log.read_text()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(proc.pid).children(recursive=True)
    return [c for c in children if "trainer/train.py" in " ".join(c.cmdline())]


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def _backbone(out: Path) -> dict:
    return torch.load(out / "backbone.pt", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final backbone."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _latest(out) == f"step-{STEPS:09d}"
    return _backbone(out)


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, reference):
    """Rank 1 is SIGKILLed while writing step 8's files: `latest` stays at step 4, the
    partial directory is ignored, removed on restart, and the resumed run finishes with
    the uninterrupted run's weights."""
    out = tmp_path / "run"
    proc = _run(out, "checkpoint.inject_kill_during_save=8")
    assert proc.returncode != 0
    ckpts = out / "checkpoints"
    assert _latest(out) == "step-000000004"
    partial = ckpts / "step-000000008"
    assert partial.is_dir() and not (partial / "COMPLETE").exists()
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "logs" / "rank0.log").read_text()
    assert "removed incomplete checkpoint" in log and "step-000000008" in log
    assert re.search(r"resumed from \S+step-000000004: step 4,", log)
    assert _latest(out) == f"step-{STEPS:09d}"
    _assert_same_weights(_backbone(out), reference)


def test_sigterm_checkpoints_exits_75_and_resumes_there(tmp_path, reference):
    """SIGTERM to the launcher (what `scancel` or a preemption does): torchrun forwards it,
    both ranks finish the step, write a checkpoint and exit 75; rerunning resumes from
    that exact step and ends where the uninterrupted run ends."""
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_step(out, 6, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun re-raises the signal it got
    for rank in (0, 1):  # both workers returned 75 (torchrun itself does not report it)
        assert "exit 75" in (out / "logs" / f"rank{rank}.log").read_text(), output[-3000:]
    log = (out / "logs" / "rank0.log").read_text()
    stopped = int(re.search(r"checkpointing at step (\d+)", log).group(1))
    assert 6 <= stopped < STEPS and _latest(out) == f"step-{stopped:09d}"
    assert "preempted" in (out / "logs" / "rank1.log").read_text()
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "logs" / "rank0.log").read_text()
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped:09d}'}: step {stopped}," in log
    _assert_same_weights(_backbone(out), reference)


def test_usr1_to_one_rank_stops_both(tmp_path):
    """SIGUSR1 reaches only rank 1: the ranks agree (MAX all-reduce) and both stop at the
    same step with exit code 75."""
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_step(out, 3, proc)
    workers = _workers(proc)
    assert len(workers) == 2
    rank1 = [w for w in workers if w.environ().get("RANK") == "1"][0]
    os.kill(rank1.pid, signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert "exitcode" in output and "75" in output, output[-3000:]
    steps = [
        int(re.search(r"checkpointing at step (\d+)", (out / "logs" / f"rank{r}.log").read_text()).group(1))
        for r in (0, 1)
    ]
    assert steps[0] == steps[1] and _latest(out) == f"step-{steps[0]:09d}"


def test_elastic_restart_after_a_worker_dies(tmp_path, reference):
    """torchrun --max-restarts=1: one worker is SIGKILLed after step 10; torchrun restarts
    the group, which resumes from `latest` (step 8) and finishes like the uninterrupted run."""
    out = tmp_path / "run"
    proc = _start(out, max_restarts=1)
    _wait_for_step(out, 10, proc)
    victim = _workers(proc)[1]
    victim.send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    log = (out / "logs" / "rank0.log").read_text()
    assert re.search(r"resumed from \S+step-0000000(08|12): step (8|12),", log), log[-2000:]
    assert re.search(rf"finished {STEPS} steps", log)
    _assert_same_weights(_backbone(out), reference)
