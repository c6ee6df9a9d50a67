"""The training loop, end to end, in real torchrun/gloo process groups."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import free_port, run_world
from trainer.config import load_config
from trainer.dist import DistContext, DistEnv

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Small enough for 2 CPU cores: a few seconds per step at most.
TINY = [
    "backbone.name=mobilefacenet", "backbone.embedding_size=64",
    "data.num_classes=16", "data.batch_size=8", "data.num_samples=160",
    "margin.s=16", "margin.m2=0.2", "partial_fc.sample_rate=0.5",
    "optim.lr=0.1", "optim.warmup_steps=2", "run.log_every=2",
]


def _torchrun(out_dir: Path, *overrides: str, nproc: int = 2, timeout: int = 600):
    cmd = [
        *TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
        "trainer/train.py", "--config", "trainer/configs/cpu_demo.yaml",
        f"run.output_dir={out_dir}", *TINY, *overrides,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _finished_steps(out_dir: Path, rank: int) -> int:
    text = (out_dir / "logs" / f"rank{rank}.log").read_text()
    return int(re.search(r"finished (\d+) steps", text).group(1))


@pytest.mark.integration
def test_two_process_run_learns_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(out, "run.max_steps=40", "data.synthetic_mode=identities")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(2, 41, 2))
    for r in rows:
        assert {"step", "loss", "lr", "samples_per_sec", "data_wait_frac", "epoch"} <= set(r)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < 0.8 * first, f"loss did not fall: {first} -> {last}"
    assert _finished_steps(out, 0) == _finished_steps(out, 1) == 40
    resolved = load_config(out / "config.yaml")
    assert resolved.run.max_steps == 40 and resolved.data.num_classes == 16
    assert (out / "backbone.pt").is_file()
    assert "step 40/40" in (out / "logs" / "rank0.log").read_text()


@pytest.mark.integration
def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(
        out, "run.max_steps=4", "run.inject_nonfinite=[3]", "run.max_nonfinite=2",
        "data.workers=1",  # also exercises the prefetching DataLoader path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert rows[-1]["step"] == 4 and rows[-1]["nonfinite_total"] == 1
    for rank in (0, 1):
        text = (out / "logs" / f"rank{rank}.log").read_text()
        assert "step 3: non-finite loss" in text


@pytest.mark.integration
def test_nonfinite_steps_in_a_row_stop_every_rank(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(
        out, "run.max_steps=8", "run.inject_nonfinite=[2,3,4]", "run.max_nonfinite=3",
        timeout=300,
    )
    assert proc.returncode != 0
    for rank in (0, 1):
        text = (out / "logs" / f"rank{rank}.log").read_text()
        assert "stopping: 3 non-finite steps in a row (run.max_nonfinite=3) at step 4" in text
    assert not (out / "backbone.pt").exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("data.batch_size=abc", "data.batch_size"),
        ("partial_fc.sample_rate=0", "partial_fc.sample_rate"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.source=recordio", "data.path"),
        ("backbone.name=resnet9", "backbone.name"),
    ],
)
def test_config_errors_exit_with_one_line_naming_the_key(tmp_path, override, needle):
    proc = subprocess.run(
        [sys.executable, "trainer/train.py", "--config", "trainer/configs/cpu_demo.yaml",
         f"run.output_dir={tmp_path}", override],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_help_explains_usage():
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0
    assert "torchrun" in proc.stdout and "section.key=value" in proc.stdout


def _grads_worker(rank, world, global_batch, accum=1):
    from trainer.loop import forward_backward
    from trainer.run import build

    cfg = load_config(
        REPO / "trainer/configs/cpu_demo.yaml",
        [*TINY, f"data.batch_size={global_batch // world}", "partial_fc.sample_rate=1.0",
         "backbone.channels_last=false"],
    )
    env = DistEnv(rank, world, rank, world, "127.0.0.1", 0, "single")
    run = build(cfg, DistContext(env, torch.device("cpu"), "gloo"))
    run.backbone.eval()  # BatchNorm on running stats: the batch split must not matter
    torch.set_default_dtype(torch.float32)
    images, labels = run.source.batch(0, 0)
    losses = [
        forward_backward(run, x, y, 1.0 / accum, sync=i == accum - 1)
        for i, (x, y) in enumerate(zip(images.chunk(accum), labels.chunk(accum)))
    ]
    loss = sum(losses) / accum
    grads = {n: p.grad.clone() for n, p in run.module.named_parameters() if p.grad is not None}
    return loss.item(), grads, run.pfc.sampled_grad().grad.clone()


@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_partial_fc_gradients_at_world_2_equal_world_1(accum):
    """World 2 (optionally in 2 accumulated micro-batches) == world 1, same global batch."""
    (loss1, grads1, shard1), = run_world(_grads_worker, 1, 8)
    (loss2a, grads2, shard2a), (loss2b, _, shard2b) = run_world(_grads_worker, 2, 8, accum)
    assert loss1 == pytest.approx(loss2a, rel=1e-5) and loss2a == loss2b
    assert grads1.keys() == grads2.keys() and len(grads1) > 10
    def rel_err(a, b):
        return float((a - b).norm() / b.norm())

    # Relative to each tensor's norm: float32 sums in another order differ by ~1e-7.
    worst = max((rel_err(grads2[n], grads1[n]), n) for n in grads1)
    print(f"worst backbone gradient relative error {worst[0]:.2e} ({worst[1]})")
    assert worst[0] < 1e-4, worst
    # The classifier shards of world 2 are the two halves of world 1's.
    assert rel_err(torch.cat([shard2a, shard2b]), shard1) < 1e-4
