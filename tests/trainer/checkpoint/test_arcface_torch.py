"""`arcshard-ckpt import-arcface-torch` against the real thing: arcface_torch's own
`PartialFC_V2` in a 2-rank gloo group (`Tensor.cuda` made the identity), two SGD steps
with train_v2.py's optimizer setup, its `checkpoint_gpu_{rank}.pt` files; the import then
resumes at world 1 and 3 with every class centre (and its momentum) the anchor's row and,
at r = 1, the anchor's loss. Bad inputs are one line, exit 2, nothing written."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_world

ANCHOR = Path(__file__).resolve().parents[3].parent / "shared" / "anchors" / "arcface_torch"
C, D, B = 11, 16, 2
# s = 16, not 64: with random probe embeddings some target probabilities fall below the
# 1e-30 that PartialFC_V2 clamps them at before the log, which caps its loss per sample.
S = 16.0


def _anchor_imports():
    if str(ANCHOR) not in sys.path:
        sys.path.insert(0, str(ANCHOR))
    torch.Tensor.cuda = lambda self, *a, **k: self  # the anchor moves everything to the GPU
    from backbones import get_model
    from losses import CombinedMarginLoss
    from partial_fc_v2 import PartialFC_V2

    return get_model, CombinedMarginLoss, PartialFC_V2


def _probe():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2 * B, D, generator=g), torch.randint(0, C, (2 * B,), generator=g)


def _anchor_worker(rank, world, out: str):
    get_model, CombinedMarginLoss, PartialFC_V2 = _anchor_imports()
    torch.manual_seed(0)
    backbone = get_model("mbf", num_features=D).train()
    pfc = PartialFC_V2(CombinedMarginLoss(S, 1.0, 0.5, 0.0, 0), D, C, 1.0, False).train()
    opt = torch.optim.SGD(  # train_v2.py's setup
        params=[{"params": backbone.parameters()}, {"params": pfc.parameters()}],
        lr=0.1, momentum=0.9, weight_decay=5e-4)
    # PolynomialLRWarmup passes `verbose`, which torch 2.13's LRScheduler no longer takes:
    # its state_dict (the scheduler's __dict__ but the optimizer) is written by hand below.
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(2):
        images, labels = torch.randn(B, 3, 112, 112, generator=g), torch.randint(0, C, (B,), generator=g)
        loss = pfc(backbone(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
    checkpoint = {  # exactly as train_v2.py writes it
        "epoch": 1, "global_step": 2,
        "state_dict_backbone": backbone.state_dict(),
        "state_dict_softmax_fc": pfc.state_dict(),
        "state_optimizer": opt.state_dict(),
        "state_lr_scheduler": {"warmup_iters": 1, "total_iters": 10, "power": 1.0, "base_lrs": [0.1, 0.1],
                               "last_epoch": 2, "_step_count": 3},
    }
    torch.save(checkpoint, Path(out) / f"checkpoint_gpu_{rank}.pt")
    embeddings, labels = _probe()
    with torch.no_grad():
        probe_loss = pfc(embeddings[rank * B:(rank + 1) * B].clone(), labels[rank * B:(rank + 1) * B].clone())
    momentum = opt.state[pfc.weight]["momentum_buffer"]
    backbone_momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in backbone.named_parameters()
                         if p in opt.state}
    return pfc.class_start, pfc.weight.detach().clone(), momentum.clone(), float(probe_loss), backbone_momentum


def _resume_worker(rank, world, ckpt: str, config: str):
    from trainer import checkpoint
    from trainer.backbones import get_backbone
    from trainer.checkpoint import TrainingParts
    from trainer.config import load_config
    from trainer.margins import CombinedMargin
    from trainer.optim import ShardSGD, make_backbone_optimizer
    from trainer.partial_fc import PartialFC

    module = get_backbone("mobilefacenet", embedding_size=D)
    pfc = PartialFC(C, D, margin=CombinedMargin(S, 1.0, 0.5, 0.0, 0.0))
    shard = ShardSGD(pfc, lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = make_backbone_optimizer(module.parameters(), "sgd", 0.1, 0.9, 5e-4)
    cfg = load_config(config, ["data.batch_size=64"])  # the import's config.yaml, as a user resumes
    state = checkpoint.load(ckpt, TrainingParts(module, pfc, shard, opt), config=cfg)
    loss = None
    if world == 1:
        embeddings, labels = _probe()
        with torch.no_grad():
            loss = float(pfc(embeddings, labels))
    backbone_momentum = {n: opt.state[p]["momentum_buffer"] for n, p in module.named_parameters() if p in opt.state}
    return pfc.class_start, pfc.weight.detach().clone(), shard.momentum_buffer.clone(), loss, state.step, \
        backbone_momentum


@pytest.fixture(scope="module")
def anchor_run(tmp_path_factory):
    if not ANCHOR.is_dir():
        pytest.skip(f"needs {ANCHOR} (../shared absent)")
    src = tmp_path_factory.mktemp("arcface_run")
    return src, run_world(_anchor_worker, 2, str(src), timeout=300)


def test_import_resumes_at_world_1_and_3_with_the_anchors_rows_and_loss(anchor_run, tmp_path):
    from trainer.cli.ckpt import main

    src, ranks = anchor_run
    rows = torch.cat([r[1] for r in ranks])
    momentum = torch.cat([r[2] for r in ranks])
    assert main(["import-arcface-torch", str(src), str(tmp_path / "out"), "--num-classes", str(C),
                 "--backbone", "mobilefacenet"]) == 0
    ckpt = tmp_path / "out" / "checkpoints" / "step-000000002"
    for world in (1, 3):
        config = str(tmp_path / "out" / "config.yaml")
        for start, weight, mom, loss, step, bb_mom in run_world(_resume_worker, world, str(ckpt), config,
                                                                timeout=300):
            assert step == 2
            assert bb_mom.keys() == ranks[0][4].keys() and len(bb_mom) > 10
            assert all(torch.equal(bb_mom[k], v) for k, v in ranks[0][4].items())  # rank 0's backbone momentum
            assert torch.equal(weight, rows[start:start + len(weight)])
            assert torch.equal(mom, momentum[start:start + len(mom)])
            if world == 1:
                assert loss == pytest.approx(ranks[0][3], rel=1e-5, abs=1e-5)


def _refused(capsys, src: Path, out: Path, *extra: str) -> str:
    from trainer.cli.ckpt import main

    assert main(["import-arcface-torch", str(src), str(out), "--backbone", "mobilefacenet", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not out.exists(), err
    return err[0]


def test_missing_ranks_bad_shapes_and_wrong_class_counts_are_refused(anchor_run, tmp_path, capsys):
    src, _ = anchor_run
    out = tmp_path / "out"
    assert "checkpoint_gpu_1.pt: holds 5 class centres, but 12 classes" in _refused(
        capsys, src, out, "--num-classes", "12")
    gap = tmp_path / "gap"
    gap.mkdir()
    shutil.copy(src / "checkpoint_gpu_0.pt", gap / "checkpoint_gpu_0.pt")
    shutil.copy(src / "checkpoint_gpu_1.pt", gap / "checkpoint_gpu_2.pt")
    assert f"{gap / 'checkpoint_gpu_1.pt'}: missing" in _refused(capsys, gap, out, "--num-classes", str(C))
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(src / "checkpoint_gpu_0.pt", odd / "checkpoint_gpu_0.pt")
    state = torch.load(src / "checkpoint_gpu_1.pt", weights_only=True)
    state["state_dict_softmax_fc"]["weight"] = torch.zeros(5, D + 1)
    torch.save(state, odd / "checkpoint_gpu_1.pt")
    assert "checkpoint_gpu_1.pt: class centres are 17-d" in _refused(capsys, odd, out, "--num-classes", str(C))
    assert "does not fit iresnet18" in _refused(
        capsys, src, out, "--num-classes", str(C), "--backbone", "iresnet18")
