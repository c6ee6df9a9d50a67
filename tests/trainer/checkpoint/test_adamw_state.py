"""ShardAdamW's moments and per-row step counts in checkpoints: saved, verified, restored
bit-identically, re-sharded 2 -> 3 with their rows, and an exact resume."""

import torch

from tests.distributed import run_world
from tests.trainer.checkpoint.parts import DIM, NUM_CLASSES
from trainer import checkpoint
from trainer.checkpoint import TrainingParts, TrainState
from trainer.checkpoint.verify import verify_all
from trainer.margins import CombinedMargin
from trainer.optim import ShardAdamW
from trainer.partial_fc import PartialFC


def _parts() -> TrainingParts:
    pfc = PartialFC(NUM_CLASSES, DIM, sample_rate=0.3, margin=CombinedMargin(16.0, 1.0, 0.3, 0.0),
                    seed=3, storage="bf16")
    return TrainingParts(torch.nn.Linear(2, 2), pfc, ShardAdamW(pfc, lr=0.01, weight_decay=0.1))


def _steps(parts, rank, world, first, last):
    for step in range(first, last):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(8, DIM, generator=g)
        parts.pfc(x, torch.randint(0, NUM_CLASSES, (8,), generator=g)).backward()
        parts.shard_optimizer.step()
        parts.shard_optimizer.zero_grad()


def _gather(t, world):
    out = [None] * world
    torch.distributed.all_gather_object(out, t.detach().clone())
    return torch.cat(out)


def _state(parts, world):
    opt = parts.shard_optimizer
    return [_gather(t, world) for t in (parts.pfc.weight, *opt.row_states().values(), opt.row_steps)]


def _save_worker(rank, world, root):
    parts = _parts()
    _steps(parts, rank, world, 0, 4)
    checkpoint.save(root, parts, TrainState(step=4), block_rows=100)
    saved = _state(parts, world)
    _steps(parts, rank, world, 4, 6)
    return saved, _state(parts, world)


def _load_worker(rank, world, ckpt, resume_steps):
    parts = _parts()
    checkpoint.load(ckpt, parts)
    loaded = _state(parts, world)
    _steps(parts, rank, world, 4, 4 + resume_steps)
    return loaded, _state(parts, world)


def test_moments_and_step_counts_resume_and_reshard(tmp_path):
    root = tmp_path / "checkpoints"
    saved, continued = run_world(_save_worker, 2, str(root))[0]
    steps = saved[-1]
    assert steps.max() > 1 and (steps != steps.max()).any()  # rows stepped different times
    ckpt = checkpoint.find_latest(root)
    assert verify_all(ckpt) == []
    for world, resume_steps in ((3, 0), (2, 2)):
        loaded, after = run_world(_load_worker, world, str(ckpt), resume_steps)[0]
        for got, want in zip(loaded, saved):
            assert torch.equal(got, want)  # weight, exp_avg, exp_avg_sq, steps: bit-identical
        if resume_steps:  # same world: the resumed steps equal the uninterrupted ones
            for got, want in zip(after, continued):
                assert torch.equal(got, want)
