"""Fine-tuning from released arcface_torch weights: `backbone.init` round trips against the
anchor's own models (r18, r50, r100, mbf), `optim.freeze_backbone_steps` (nothing of the
backbone moves, BatchNorm statistics included; a resumed run freezes the same steps), and
the one-line refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_world
from trainer.config import load_config
from trainer.dist import DistContext, DistEnv

REPO = Path(__file__).resolve().parents[2]
ANCHOR = REPO.parent / "shared" / "anchors" / "arcface_torch"
OURS = {"r18": "iresnet18", "r50": "iresnet50", "r100": "iresnet100", "mbf": "mobilefacenet"}
EMBEDDING = 64
needs_anchor = pytest.mark.skipif(not ANCHOR.is_dir(), reason=f"needs {ANCHOR} (../shared absent)")


def _ctx(rank: int, world: int) -> DistContext:
    return DistContext(DistEnv(rank, world, rank, world, "127.0.0.1", 0, "single"), torch.device("cpu"), "gloo")


def anchor_model(name: str, embedding_size: int = EMBEDDING) -> torch.nn.Module:
    """arcface_torch's own `get_model(name)`, BatchNorm statistics re-estimated on two
    random batches (fresh statistics would make every output near-constant). Skips the
    calling test (or fixture) when ../shared is absent."""
    if not ANCHOR.is_dir():
        pytest.skip(f"needs {ANCHOR} (../shared absent)")
    if str(ANCHOR) not in sys.path:
        sys.path.insert(0, str(ANCHOR))
    from backbones import get_model

    torch.manual_seed(0)
    model = get_model(name, num_features=embedding_size)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 112, 112))
    return model.eval()


def _cfg(out: str, name: str, init: str, *extra: str):
    return load_config(None, [
        f"backbone.name={name}", f"backbone.embedding_size={EMBEDDING}", "backbone.channels_last=false",
        f"backbone.init={init}", "data.num_classes=8", "data.batch_size=2", "data.num_samples=8",
        "data.workers=0", "run.max_steps=2", "optim.freeze_backbone_steps=2", "run.log_every=1",
        "metrics.tensorboard=false", f"run.output_dir={out}", *extra,
    ])


def _round_trip_worker(rank, world, base: str):
    from trainer.loop import train
    from trainer.train import init_weights, start

    results = {}
    for theirs, ours in OURS.items():
        model = anchor_model(theirs)
        path = Path(base) / f"{theirs}_backbone.pth"
        torch.save(model.state_dict(), path)  # as arcface_torch saves model.pt / backbone.pth
        cfg = _cfg(f"{base}/{theirs}", ours, str(path))
        run, state = start(cfg, _ctx(rank, world), init_weights(cfg))
        pfc_before = run.pfc.weight.detach().clone()
        train(run, state)
        saved = torch.load(path, weights_only=True)
        same = all(torch.equal(saved[k], v) for k, v in run.module.state_dict().items())
        x = torch.randn(3, 3, 112, 112)
        with torch.no_grad():
            diff = (run.module.eval()(x) - model(x)).abs().max().item()
            spread = model(x).std().item()
        results[theirs] = (same, diff, spread, torch.equal(pfc_before, run.pfc.weight.detach()))
    return results


@needs_anchor
def test_released_weights_init_a_frozen_run_bit_for_bit(tmp_path):
    (results,) = run_world(_round_trip_worker, 1, str(tmp_path), timeout=600)
    for name, (same, diff, spread, classifier_unchanged) in results.items():
        assert same, f"{name}: the run's backbone differs from the file after 2 frozen steps"
        assert diff < 1e-5 and spread > 1e-3, (name, diff, spread)
        assert not classifier_unchanged, f"{name}: the classifier did not train"


def _resume_worker(rank, world, base: str):
    from trainer import checkpoint
    from trainer.checkpoint import resume_point
    from trainer.loop import train
    from trainer.run import build

    class Stop(Exception):
        pass

    def cfg_for(name):
        return load_config(REPO / "trainer/configs/cpu_demo.yaml", [
            "backbone.embedding_size=32", "backbone.channels_last=false", "data.num_classes=16",
            "data.batch_size=4", "data.num_samples=32", "run.max_steps=4", "checkpoint.every=1",
            "optim.freeze_backbone_steps=2", "metrics.tensorboard=false", f"run.output_dir={base}/{name}",
        ])

    ctx = _ctx(rank, world)
    straight = build(cfg_for("straight"), ctx)
    initial = {k: v.clone() for k, v in straight.module.state_dict().items()}
    snapshots = []
    train(straight, on_step=lambda run, state: snapshots.append(
        {k: v.clone() for k, v in run.module.state_dict().items()}))

    def stop_at_1(run, state):
        if state.step == 1:
            raise Stop

    cfg = cfg_for("resumed")
    try:
        train(build(cfg, ctx), on_step=stop_at_1)
    except Stop:
        pass
    start = resume_point(cfg, ctx.is_main)
    run = build(cfg, ctx, checkpoint.read_index(start)["train_state"]["epoch"])
    train(run, checkpoint.load(start, run.parts, config=cfg))
    from trainer.checkpoint.backbone import read_weights

    final = straight.module.state_dict()
    from_run = read_weights(f"{base}/straight")  # an arcshard run dir: its latest checkpoint
    if rank == 0:  # one writer: the other rank must not read a half-written file
        torch.save(final, Path(base) / "backbone.pt")  # a finished run's backbone.pt, no checkpoints
    torch.distributed.barrier()
    loaded = [all(torch.equal(final[k], w[k]) for k in final) for w in (from_run, read_weights(base))]
    moved = [any(not torch.equal(initial[k], s[k]) for k in initial) for s in snapshots]
    exact = all(torch.equal(v, straight.module.state_dict()[k]) for k, v in run.module.state_dict().items())
    return moved, exact, torch.equal(run.pfc.weight, straight.pfc.weight), loaded


def test_freeze_backbone_steps_freezes_exactly_those_steps_across_a_resume(tmp_path):
    ((moved, exact, classifier_exact, loaded),) = run_world(_resume_worker, 2, str(tmp_path), timeout=600)[:1]
    assert moved == [False, False, True, True]  # BatchNorm statistics included
    assert exact and classifier_exact
    assert loaded == [True, True]  # backbone.init also reads arcshard runs and backbone.pt


def _train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", "trainer/configs/cpu_demo.yaml", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.integration
@needs_anchor
def test_a_mismatching_init_file_is_one_config_line_naming_the_tensor(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(anchor_model("r18", 512).state_dict(), path)
    out = tmp_path / "run"
    proc = _train(f"run.output_dir={out}", "backbone.name=iresnet50", f"backbone.init={path}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and "layer1.2.bn1.weight is missing from the file" in lines[0]
    assert "the file looks like iresnet18 with embedding size 512" in lines[0]
    assert not out.exists()


def test_init_ignored_on_resume_and_refused_when_not_a_state_dict(tmp_path):
    from trainer.checkpoint import CheckpointError
    from trainer.checkpoint.backbone import read_weights
    from trainer.train import init_weights

    bad = tmp_path / "opt.pt"
    torch.save({"state": {}, "param_groups": [1]}, bad)
    with pytest.raises(CheckpointError, match="not a backbone state_dict"):
        read_weights(bad)
    (tmp_path / "run/checkpoints/step-000000001").mkdir(parents=True)
    for name in ("COMPLETE", "index.json"):
        (tmp_path / "run/checkpoints/step-000000001" / name).write_text("{}")
    cfg = load_config(None, [f"backbone.init={bad}", f"run.output_dir={tmp_path / 'run'}"])
    assert init_weights(cfg) is None  # the run's own checkpoint wins: the file is not read
