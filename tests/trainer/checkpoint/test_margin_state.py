"""Margin running statistics and sub-centres through a checkpoint: an exact resume at
the same world size, and a re-shard 2 → 3 that keeps each class's K sub-centres together."""

from pathlib import Path

import pytest
import torch

from tests.distributed import run_world
from trainer import checkpoint
from trainer.checkpoint import TrainingParts
from trainer.margins import AdaFace, CurricularFace
from trainer.optim import ShardSGD
from trainer.partial_fc import PartialFC
from trainer.state import TrainState

NUM_CLASSES, DIM, K, TOTAL = 101, 8, 3, 24  # 101 classes: uneven shards at 2 and 3 ranks


def _parts(name: str) -> TrainingParts:
    margin = CurricularFace(16.0, 0.5, 0.2) if name == "curricular" else AdaFace(16.0, 0.4, 0.333, 0.2)
    pfc = PartialFC(NUM_CLASSES, DIM, margin=margin, subcenters=K, seed=3)
    return TrainingParts(torch.nn.Linear(2, 2), pfc, ShardSGD(pfc, lr=0.5, momentum=0.9, weight_decay=0.0))


def _steps(parts, rank, world, first, count):
    """Train `count` steps on fixed batches; [(loss, statistics)] after each."""
    out = []
    for step in range(first, first + count):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(TOTAL, DIM, generator=g, ) * (1 + 5 * torch.rand(TOTAL, 1, generator=g))
        y = torch.randint(NUM_CLASSES, (TOTAL,), generator=g)
        per = TOTAL // world
        loss = parts.pfc(x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
        loss.backward()
        parts.shard_optimizer.step()
        parts.shard_optimizer.zero_grad()
        out.append((loss.item(), parts.pfc.margin.statistics()))
    return out


def _gathered_weight(parts, world):
    rows = [None] * world
    torch.distributed.all_gather_object(rows, parts.pfc.weight.detach().view(-1, K, DIM))
    return torch.cat(rows)  # [C, K, D]: class c's sub-centres, whatever the world size


def _save_worker(rank, world, root, name):
    parts = _parts(name)
    _steps(parts, rank, world, 0, 3)
    checkpoint.save(root, parts, TrainState(step=3), block_rows=7)
    return _gathered_weight(parts, world), parts.pfc.margin.statistics(), _steps(parts, rank, world, 3, 2)


def _load_worker(rank, world, root, name):
    parts = _parts(name)
    checkpoint.load(checkpoint.find_latest(Path(root)), parts)
    return _gathered_weight(parts, world), parts.pfc.margin.statistics(), _steps(parts, rank, world, 3, 2)


def _parts_defaults(name):
    return (CurricularFace() if name == "curricular" else AdaFace()).statistics()


@pytest.mark.parametrize("name", ["curricular", "adaface"])
def test_statistics_resume_exactly_and_subcentres_reshard_together(tmp_path, name):
    saved = run_world(_save_worker, 2, str(tmp_path), name)
    weight, stats, after = saved[0]
    assert stats != _parts_defaults(name)
    assert saved[1][1] == stats and saved[1][2] == after  # identical on every rank
    same = run_world(_load_worker, 2, str(tmp_path), name)
    assert all(r[1] == stats and r[2] == after for r in same)  # bit for bit
    assert torch.equal(same[0][0], weight)
    resharded = run_world(_load_worker, 3, str(tmp_path), name)
    for w, s, continued in resharded:
        assert torch.equal(w, weight) and s == stats
        for (loss, st), (ref_loss, ref_st) in zip(continued, after):
            assert loss == pytest.approx(ref_loss, rel=1e-5)
            assert st == pytest.approx(ref_st, rel=1e-5)

