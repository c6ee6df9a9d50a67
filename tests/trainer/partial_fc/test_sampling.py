"""Sampling: a pure function of (seed, step, rank) and the labels, whatever the storage."""

import pytest
import torch

from tests.distributed import run_world
from trainer.optim import ShardSGD
from trainer.partial_fc import PartialFC
from trainer.partial_fc.sampling import sample_rows

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sampling_is_pure_function_worker(rank, world):
    out = []
    for seed in (1, 1, 2):
        pfc = PartialFC(1000, 4, sample_rate=0.05, seed=seed)
        pfc.sample_step = 5
        labels = torch.arange(world * 3)
        pfc(torch.randn(3, 4), labels[rank * 3 : (rank + 1) * 3])
        out.append(pfc.last_sampled.tolist())
    return out


def test_sampling_is_a_function_of_seed_step_rank():
    (r0, r1) = run_world(_sampling_is_pure_function_worker, 2)
    assert r0[0] == r0[1] and r1[0] == r1[1]
    assert r0[0] != r0[2]
    assert r0[0] != r1[0]


def _offload_sampling_worker(rank, world, device):
    """{(storage, offload): the rows sampled at each of 6 training steps}."""
    out = {}
    for storage in ("fp32", "bf16"):
        for offload in ("none", "host"):
            pfc = PartialFC(3000, 8, sample_rate=0.05, seed=4, device=device,
                            storage=storage, offload=offload)
            opt = ShardSGD(pfc, lr=0.1, momentum=0.9)
            steps = []
            for step in range(6):
                g = torch.Generator().manual_seed(10 * step + rank)
                x = torch.randn(5, 8, generator=g).to(device).requires_grad_()
                labels = torch.randint(0, 3000, (5,), generator=g).to(device)
                pfc(x, labels).backward()
                opt.step()
                opt.zero_grad()
                assert pfc.last_sampled.device == pfc.weight.device
                steps.append(pfc.last_sampled.tolist())
            out[storage, offload] = steps
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_host_offload_samples_the_same_rows(device):
    """Toggling offload (or the storage format) across a resume must not change which
    classes are sampled: the draw runs on the compute device either way."""
    for result in run_world(_offload_sampling_worker, 2, device):
        first = result["fp32", "none"]
        assert len({tuple(map(tuple, s)) for s in result.values()}) == 1, result.keys()
        assert len({tuple(s) for s in first}) == len(first), "steps must draw differently"


@pytest.mark.parametrize("device", DEVICES)
def test_sample_rows_keeps_positives_and_stays_on_the_labels_device(device):
    labels = torch.tensor([3, 17, 17, 250, 40], device=device)  # 250: another rank's
    rows = sample_rows(labels, 0, 200, 20, seed=1, step=2, rank=0)
    assert rows.device == labels.device and rows.numel() == 20
    assert torch.equal(rows, rows.sort().values)
    assert {3, 17, 40} <= set(rows.tolist())
    again = sample_rows(labels, 0, 200, 20, seed=1, step=2, rank=0)
    assert torch.equal(rows, again)
    assert not torch.equal(rows, sample_rows(labels, 0, 200, 20, seed=1, step=3, rank=0))
