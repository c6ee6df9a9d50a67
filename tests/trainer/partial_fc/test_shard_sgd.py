"""ShardSGD / ShardAdamW and TrainingOptimizer: no host read in the shard step, the AMP loss scale."""

import contextlib
import itertools

import pytest
import torch

from tests.distributed import run_world
from trainer.optim import LRSchedule, ShardSGD, TrainingOptimizer, make_shard_optimizer
from trainer.partial_fc import PartialFC

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    """Every Python-level way to read a tensor's value on the host raises inside."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name}")
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _batch(step, rank, dim, num_classes):
    g = torch.Generator().manual_seed(50 * step + rank)
    return torch.randn(6, dim, generator=g), torch.randint(0, num_classes, (6,), generator=g)


def _no_host_read_worker(rank, world):
    """Every optimiser × storage × offload × rate, with and without an inverse loss scale:
    the shard step and TrainingOptimizer.step (no scaler) must not read a value to the host."""
    done = []
    for storage, offload, rate, name in itertools.product(
        ("fp32", "bf16"), ("none", "host"), (1.0, 0.3), ("sgd", "adamw")
    ):
        pfc = PartialFC(300, 8, sample_rate=rate, storage=storage, offload=offload)
        shard = make_shard_optimizer(pfc, name, lr=0.1, momentum=0.9, weight_decay=5e-4)
        backbone = torch.nn.Linear(8, 8)
        opt = TrainingOptimizer(
            torch.optim.SGD(backbone.parameters(), lr=0.1), shard, LRSchedule(0.1, 10)
        )
        for step, inv_scale in enumerate((None, torch.tensor(0.25))):
            x, labels = _batch(step, rank, 8, 300)
            pfc(backbone(x), labels).backward()
            before = pfc.weight.detach().clone()
            with no_host_reads():
                if inv_scale is None:
                    opt.step(step)
                else:
                    shard.step(inv_scale)
            pfc.flush()
            assert not torch.equal(before, pfc.weight), (storage, offload, rate)
            opt.zero_grad()
        done.append((storage, offload, rate, name))
    return done


def test_shard_step_reads_nothing_back_to_the_host():
    assert len(run_world(_no_host_read_worker, 2)[0]) == 16


def test_no_host_reads_catches_a_read():
    with pytest.raises(AssertionError, match="host read"), no_host_reads():
        bool(torch.isfinite(torch.ones(2)).all())


def _scaled_run(rank, scale):
    """Weight and momentum after one TrainingOptimizer step with a CPU GradScaler at
    `scale` (None: no scaler), and the scaler's scale afterwards."""
    torch.manual_seed(0)
    pfc = PartialFC(200, 8, sample_rate=0.5, storage="fp32")
    backbone = torch.nn.Linear(8, 8)
    shard = ShardSGD(pfc, lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = TrainingOptimizer(
        torch.optim.SGD(backbone.parameters(), lr=0.1), shard, LRSchedule(0.1, 10)
    )
    x, labels = _batch(0, rank, 8, 200)
    loss = pfc(backbone(x), labels)
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(opt.backbone)  # the loop does, to clip (TrainingOptimizer.step's contract)
    opt.step(0, scaler)
    return (pfc.weight.detach().clone(), shard.momentum_buffer.clone(), backbone.weight.detach(),
            None if scaler is None else scaler.get_scale())


def _scaler_worker(rank, world):
    w0, m0, b0, _ = _scaled_run(rank, None)
    w1, m1, b1, scale = _scaled_run(rank, 1024.0)
    assert scale == 1024.0
    fresh = PartialFC(200, 8, sample_rate=0.5, storage="fp32").weight.detach()
    assert not torch.equal(w1, fresh)
    # The scale is divided out of the shard's gradient as out of the backbone's.
    for scaled, plain in ((w1, w0), (m1, m0), (b1, b0)):
        torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-9)
    return True


def test_amp_loss_scale_is_divided_out_of_the_shard_update():
    run_world(_scaler_worker, 2)
