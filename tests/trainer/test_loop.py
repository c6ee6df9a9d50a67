"""The loop and one optimizer step: fp16 with GradScaler on CPU (skip, resume), the
step's single host read, one run per output directory, metrics.jsonl after a kill."""

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

from tests.distributed import run_world
from trainer.config import load_config
from trainer.dist import DistContext, DistEnv

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "backbone.name=mobilefacenet", "backbone.embedding_size=32", "backbone.channels_last=false",
    "data.num_classes=24", "data.batch_size=4", "data.num_samples=48",
    "margin.s=16", "margin.m2=0.2", "partial_fc.sample_rate=0.5",
    "optim.lr=0.1", "optim.warmup_steps=2", "run.log_every=2", "data.workers=0",
]


def _ctx(rank: int, world: int) -> DistContext:
    env = DistEnv(rank, world, rank, world, "127.0.0.1", 0, "single")
    return DistContext(env, torch.device("cpu"), "gloo")


class _Stop(Exception):
    pass


def _fp16_worker(rank, world, base: str):
    """fp16 autocast + GradScaler("cpu"): 8 steps straight vs 4, stop, resume, 4; a NaN
    loss injected at step 3 is skipped (it used to crash the next unscale_)."""
    from trainer import checkpoint
    from trainer.checkpoint import resume_point
    from trainer.loop import train
    from trainer.run import build

    def cfg_for(name):
        return load_config(REPO / "trainer/configs/cpu_demo.yaml", [
            *TINY, f"run.output_dir={base}/{name}", "run.max_steps=8", "checkpoint.every=4",
            "backbone.precision=fp16", "run.inject_nonfinite=[3]",
        ])

    def stop_at_4(run, state):
        if state.step == 4:
            raise _Stop

    ctx = _ctx(rank, world)
    straight = build(cfg_for("straight"), ctx)
    assert straight.scaler is not None and straight.amp_dtype == torch.float16
    state = train(straight)
    cfg = cfg_for("resumed")
    try:
        train(build(cfg, ctx), on_step=stop_at_4)
    except _Stop:
        pass
    start = resume_point(cfg, ctx.is_main)
    run = build(cfg, ctx, checkpoint.read_index(start)["train_state"]["epoch"])
    resumed = checkpoint.load(start, run.parts, config=cfg)
    scale_at_load = run.scaler.get_scale()
    resumed = train(run, resumed)
    weights = [{k: v.clone() for k, v in r.module.state_dict().items()} for r in (straight, run)]
    return (state.nonfinite_total, resumed.nonfinite_total, straight.scaler.get_scale(),
            run.scaler.get_scale(), scale_at_load, weights,
            [r.pfc.weight.detach().clone() for r in (straight, run)])


def test_fp16_loop_on_cpu_skips_a_nonfinite_step_and_resumes_exactly(tmp_path):
    ((n_straight, n_resumed, scale_a, scale_b, scale_at_load, (wa, wb), (ca, cb)),) = run_world(
        _fp16_worker, 1, str(tmp_path), timeout=600)
    assert n_straight == n_resumed == 1
    assert scale_a == scale_b and scale_at_load > 0
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=0)
    torch.testing.assert_close(cb, ca, rtol=0, atol=0)


def _host_reads_worker(rank, world):
    """Count the host reads of tensor values during optimizer steps 3..5."""
    from trainer.loop import train_step
    from trainer.run import build

    # 64 classes: each rank samples more rows than the global batch has labels, as in
    # real runs (else counting the positives is a documented host read, see sampling.py)
    cfg = load_config(REPO / "trainer/configs/cpu_demo.yaml",
                      [*TINY, "run.max_steps=6", "data.num_classes=64"])
    run = build(cfg, _ctx(rank, world))
    run.pfc.check_inputs = False  # the CPU-only input validation; GPUs never run it
    batches = iter(list(run.source.epoch_batches(0, 0))[:5])  # made before counting
    for step in (1, 2):
        train_step(run, [next(batches)], step, False)
    reads = []
    originals = {}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        originals[name] = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, **kw):
            reads.append(_name)
            return originals[_name](self, *a, **kw)

        setattr(torch.Tensor, name, counted)
    try:
        results = [train_step(run, [next(batches)], step, False) for step in (3, 4, 5)]
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    return reads, [r.applied for r in results]


@pytest.mark.parametrize("world", [1, 2])
def test_one_host_read_per_optimizer_step(world):
    """The CPU stand-in for the GPU sync count: the step reads one value (the finite +
    preemption flags) back to Python; the shard update reads none."""
    for reads, applied in run_world(_host_reads_worker, world, timeout=300):
        assert applied == [True, True, True]
        assert reads == ["tolist"] * 3, reads


def test_runlog_cuts_a_partial_last_line_before_appending(tmp_path, caplog):
    from trainer.telemetry import RunLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 1.0')  # killed mid-write
    with caplog.at_level("WARNING"):
        runlog = RunLog(tmp_path, True, total_steps=10, first_step=2)
    runlog.record({"step": 4, "loss": 0.5})
    runlog.close()
    assert path.read_text() == '{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n'
    assert "removed a cut-off last line" in caplog.text
    RunLog(tmp_path, True, total_steps=10).close()  # a complete file is left alone
    assert path.read_text().endswith('{"step": 4, "loss": 0.5}\n')


def _train_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "trainer.train", "--config", "trainer/configs/cpu_demo.yaml",
            *TINY, f"run.output_dir={out}", *overrides]


@pytest.mark.integration
def test_second_run_in_one_output_directory_is_refused_and_a_dead_holder_does_not_block(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_train_cmd(out, "run.max_steps=400", "checkpoint.every=2"), cwd=REPO,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "latest").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.2)
        config_before = (out / "config.yaml").read_text()
        second = subprocess.run(_train_cmd(out, "optim.lr=0.05", "run.max_steps=400"), cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"another run is using this output directory (host {os.uname().nodename}, " \
               f"pid {first.pid}, since " in lines[0]
        assert (out / "config.yaml").read_text() == config_before  # nothing written
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock
        first.wait()
    at = int((out / "checkpoints" / "latest").read_text().strip().rsplit("-", 1)[1])
    resumed = subprocess.run(_train_cmd(out, f"run.max_steps={at + 2}"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints'}" in (out / "logs" / "rank0.log").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == at + 2


@pytest.mark.integration
def test_fewer_classes_than_ranks_is_one_config_line_before_the_group(tmp_path):
    from tests.distributed import free_port

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
         str(free_port()), "trainer/train.py", "--config", "trainer/configs/cpu_demo.yaml", *TINY,
         f"run.output_dir={tmp_path}", "data.num_classes=3"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("arcshard:")]
    assert ours == ["arcshard: config error: data.num_classes: 3 classes cannot be sharded over "
                    "4 ranks (every rank owns at least one class); use fewer processes or more "
                    "classes"], proc.stderr[-3000:]
    assert not any(tmp_path.iterdir())  # (plain torchrun adds its own report; see test_multinode)


@pytest.mark.integration
def test_one_class_warns(tmp_path):
    proc = subprocess.run(_train_cmd(tmp_path / "run", "data.num_classes=1", "run.max_steps=1"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data.num_classes is 1: the softmax has nothing to separate" in proc.stderr


def _compile_worker(rank, world, base: str):
    """backbone.compile=true vs eager on the same batch: loss and gradients; then the
    compiled run trains 2 steps and writes its checkpoint (state_dict keys unchanged)."""
    from trainer.loop import forward_backward, train
    from trainer.run import build

    out = {}
    for compiled in (False, True):
        cfg = load_config(REPO / "trainer/configs/cpu_demo.yaml", [
            *TINY, f"run.output_dir={base}/{compiled}", "run.max_steps=2",
            f"backbone.compile={str(compiled).lower()}", "partial_fc.sample_rate=1.0"])
        run = build(cfg, _ctx(rank, world))
        images, labels = next(iter(run.source.epoch_batches(0, 0)))
        loss = forward_backward(run, images, labels, 1.0, sync=True)
        grads = {n: p.grad.clone() for n, p in run.module.named_parameters()}
        run.optimizer.zero_grad()
        if compiled:
            train(run)
        out[compiled] = (float(loss), grads, list(run.module.state_dict()))
    return out


@pytest.mark.integration
def test_compiled_backbone_matches_eager_and_its_run_exports(tmp_path):
    """torch.compile (inductor, CPU): about two minutes of compilation on 2 cores."""
    from deploy.export import main as export_main

    (out,) = run_world(_compile_worker, 1, str(tmp_path), timeout=900)
    (loss_e, grads_e, keys_e), (loss_c, grads_c, keys_c) = out[False], out[True]
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    assert keys_c == keys_e  # no `_orig_mod.` prefix: checkpoints load into eager modules
    # Compared over the whole backbone: many BatchNorm biases feed another BatchNorm, so
    # their exact gradient is 0 and per-tensor relative errors are float noise around it.
    eager = torch.cat([g.flatten() for g in grads_e.values()])
    compiled = torch.cat([grads_c[name].flatten() for name in grads_e])
    # Inductor reorders float32 reductions; through ~25 train-mode BatchNorms at batch 4
    # the difference grows to 1.9e-3 of the gradient's norm here (7.5e-6 for the bare
    # backbone on random input): a tolerance, not a bit-for-bit claim.
    assert float((compiled - eager).norm() / eager.norm()) < 1e-2
    assert float((compiled - eager).abs().max()) <= 1e-2 * float(eager.abs().max())
    ckpt = tmp_path / "True" / "checkpoints" / "step-000000002"
    assert export_main(["onnx", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 100_000
