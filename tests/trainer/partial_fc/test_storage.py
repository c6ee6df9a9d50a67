"""16-bit class-centre storage (stochastic rounding) and host offload of the shard."""

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_world
from trainer.optim import ShardSGD
from trainer.partial_fc import PartialFC
from trainer.partial_fc import storage as storage_module
from trainer.partial_fc.storage import FP16_MAX, ShardStorage, round_to_storage

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two `dtype` values around each of `x` (equal where x is representable)."""
    near = x.to(dtype).float()
    other = torch.where(
        near > x, torch.nextafter(near.to(dtype), torch.tensor(-torch.inf, dtype=dtype)).float(),
        torch.nextafter(near.to(dtype), torch.tensor(torch.inf, dtype=dtype)).float(),
    )
    other = torch.where(near == x, near, other)
    return torch.minimum(near, other), torch.maximum(near, other)


@pytest.mark.parametrize("storage", ["bf16", "fp16"])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(storage):
    dtype = HALF[storage]
    g = torch.Generator().manual_seed(0)
    # Magnitudes from fp16's subnormal range to large, both signs.
    x = torch.randn(64, generator=g) * torch.logspace(-7, 3, 64)
    x[:4] = torch.tensor([0.0, 1.0, -2.5, 1e-8])  # representable values and a tiny one
    draws = 20_000
    rounded = round_to_storage(x.repeat(draws, 1), dtype, g).float()
    lo, hi = _neighbours(x, dtype)
    assert bool(((rounded == lo) | (rounded == hi)).all()), "not one of the two neighbours"
    assert torch.equal(rounded[:, :3], x[:3].expand(draws, 3)), "representable values must stay"
    # The mean of many roundings is x: error within 5 standard errors of one draw's spread.
    spread = (hi - lo) / 2
    tol = 5 * spread / draws**0.5 + 1e-12
    assert bool(((rounded.mean(0) - x).abs() <= tol).all())
    # Deterministic for a given generator state.
    again = round_to_storage(x.clone(), dtype, torch.Generator().manual_seed(3))
    assert torch.equal(again, round_to_storage(x.clone(), dtype, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("storage", ["bf16", "fp16"])
def test_round_to_nearest_loses_small_updates_stochastic_keeps_them(storage):
    """300 updates of +3e-4 on weights of 1.0 (below half an ulp: bf16's is 2⁻⁷, fp16's
    2⁻¹⁰): round-to-nearest drops every one; stochastic rounding adds them up on average."""
    dtype = HALF[storage]
    g = torch.Generator().manual_seed(1)
    nearest = torch.ones(4096, dtype=dtype)
    stochastic = torch.ones(4096, dtype=dtype)
    for _ in range(300):
        nearest = round_to_storage(nearest.float() + 3e-4, dtype, None)
        stochastic = round_to_storage(stochastic.float() + 3e-4, dtype, g)
    assert bool((nearest == 1).all())
    assert abs(stochastic.float().mean().item() - 1.09) < 0.005


def test_fp16_storage_refuses_to_overflow():
    g = torch.Generator().manual_seed(0)
    for bad in (FP16_MAX * 1.001, -1e6, float("inf"), float("nan")):
        for gen in (g, None):
            with pytest.raises(FloatingPointError, match="outside the fp16 range"):
                round_to_storage(torch.tensor([1.0, bad]), torch.float16, gen)
    assert round_to_storage(torch.tensor([FP16_MAX]), torch.float16, g).item() == FP16_MAX


def _forward_backward_worker(rank, world, storages):
    """Same batch through PartialFC with 16-bit storage and two fp32 ones: one holding the
    16-bit values (must match exactly: the math is fp32 on the gathered rows), one with
    the original fp32 initialisation (must match within the 16-bit format's precision)."""
    for storage in storages:
        kwargs = dict(sample_rate=0.3, seed=5)
        half = PartialFC(300, 32, storage=storage, **kwargs)
        same = PartialFC(300, 32, **kwargs)
        full = PartialFC(300, 32, **kwargs)
        assert half.weight.dtype == HALF[storage] and half.weight.shape == full.weight.shape
        with torch.no_grad():
            same.weight.copy_(half.weight.float())
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(6, 32, generator=g)
        labels = torch.randint(0, 300, (6,), generator=g)
        out = []
        for pfc in (half, same, full):
            xi = x.clone().requires_grad_()
            loss = pfc(xi, labels)
            loss.backward()
            out.append((loss.detach(), xi.grad, pfc.sampled_grad().grad.clone()))
        for a, b in zip(out[0], out[1]):
            assert torch.equal(a, b), storage
        tol = {"bf16": 2e-2, "fp16": 2e-3}[storage]
        for a, b in zip(out[0], out[2]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
    return True


def test_16bit_storage_forward_backward_equal_fp32():
    run_world(_forward_backward_worker, 2, ["bf16", "fp16"])


def _offload_worker(rank, world, steps):
    """{(storage, offload): (losses, weight, momentum)} after `steps` steps."""
    out = {}
    for storage in ("fp32", "bf16"):
        for offload in ("none", "host"):
            pfc = PartialFC(2000, 16, sample_rate=0.1, seed=2, storage=storage, offload=offload)
            opt = ShardSGD(pfc, lr=0.5, momentum=0.9, weight_decay=5e-4)
            losses = []
            for step in range(steps):
                g = torch.Generator().manual_seed(100 * step + rank)
                x = torch.randn(8, 16, generator=g).requires_grad_()
                loss = pfc(x, torch.randint(0, 2000, (8,), generator=g))
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            before = pfc.weight.detach().clone()
            pfc.flush()  # offload: the last step's rows land in the host store now
            assert torch.equal(before, pfc.weight) == (offload == "none")
            out[storage, offload] = (
                losses, pfc.weight.detach().clone(), opt.momentum_buffer.clone()
            )
    return out


def test_host_offload_equals_no_offload_after_20_steps():
    """On CPU the offload path (rows staged, converted, written back) runs with host =
    device: weights, momentum and losses must be bit-identical to offload none."""
    for rank_result in run_world(_offload_worker, 2, 20):
        for storage, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            (l0, w0, m0), (l1, w1, m1) = rank_result[storage, "none"], rank_result[storage, "host"]
            assert l0 == l1, storage
            assert torch.equal(w0, w1) and torch.equal(m0, m1), storage
            assert w0.dtype == m0.dtype == dtype
        # The runs did train (16-bit weights differ from fp32 ones, both moved).
        bf16, fp32 = rank_result["bf16", "none"][1], rank_result["fp32", "none"][1]
        assert not torch.equal(bf16.float(), fp32)


def _training_worker(rank, world, runs, steps):
    """The synthetic identities task on the classifier alone: fixed class prototypes,
    embeddings = prototype + noise; the loss of each (storage, rounding) run."""
    num_classes, dim, batch = 1000, 512, 64
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    curves = {}
    for storage, rounding in runs:
        pfc = PartialFC(
            num_classes, dim, sample_rate=0.2, seed=1, storage=storage, rounding=rounding
        )
        opt = ShardSGD(pfc, lr=1e-5, momentum=0.9, weight_decay=5e-4)
        losses = []
        for step in range(steps):
            g = torch.Generator().manual_seed(1000 + step * world + rank)
            labels = torch.randint(0, num_classes, (batch,), generator=g)
            x = protos[labels] + 0.5 * torch.randn(batch, dim, generator=g) / dim**0.5
            loss = pfc(x, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[(storage, rounding)] = losses
    return curves


def test_16bit_storage_training_tracks_fp32():
    """Small learning rate: most single updates are below half a bf16 ulp of the weight.
    Stochastic rounding tracks fp32 (final loss within 5%, and the loss decrease within 5%);
    bf16 with round-to-nearest loses most of the progress (shown, for comparison)."""
    runs = [("fp32", "stochastic"), ("bf16", "stochastic"), ("fp16", "stochastic"),
            ("bf16", "nearest")]
    (curves,) = run_world(_training_worker, 1, runs, 300)

    def start_end(key):
        c = curves[key]
        return sum(c[:5]) / 5, sum(c[-10:]) / 10

    start32, end32 = start_end(("fp32", "stochastic"))
    assert end32 < start32 - 0.5, "fp32 run did not learn: the comparison means nothing"
    for storage in ("bf16", "fp16"):
        start, end = start_end((storage, "stochastic"))
        assert abs(end - end32) <= 0.05 * end32, (storage, end, end32)
        assert abs((start - end) - (start32 - end32)) <= 0.05 * (start32 - end32), storage
    start, end = start_end(("bf16", "nearest"))
    assert start - end < 0.5 * (start32 - end32), "round-to-nearest was expected to stall"


def _bits(*patterns: int) -> torch.Tensor:
    """fp32 values with the given bit patterns (as unsigned 32-bit integers)."""
    signed = [p - (1 << 32) if p >= 1 << 31 else p for p in patterns]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


# CUDA's NaN, CPU's default NaN, a NaN with only its lowest mantissa bit set.
NANS = {"cuda": 0x7FFFFFFF, "cpu": 0xFFC00000, "low_bit": 0x7F800001}


@pytest.mark.parametrize("nan", NANS.values(), ids=NANS.keys())
def test_bf16_stochastic_rounding_keeps_nan_and_inf(nan):
    """Noise added to the bit pattern must not carry a NaN into the sign bit (→ −0) or
    truncate it to inf; ±inf stay ±inf. Many draws, so any noise value would show."""
    x = _bits(nan, 0x7F800000, 0xFF800000).repeat(2000)
    assert bool(x[0::3].isnan().all())
    out = round_to_storage(x.clone(), torch.bfloat16, torch.Generator().manual_seed(0))
    assert bool(out[0::3].isnan().all())
    assert bool((out[1::3] == float("inf")).all()) and bool((out[2::3] == -float("inf")).all())


@pytest.mark.parametrize("nan", NANS.values(), ids=NANS.keys())
def test_fp16_rounding_refuses_every_nan_pattern(nan):
    """fp16 cannot store a NaN silently either: every pattern is refused, not rounded."""
    for gen in (torch.Generator().manual_seed(0), None):
        with pytest.raises(FloatingPointError, match="outside the fp16 range"):
            round_to_storage(_bits(nan).repeat(100), torch.float16, gen)


@pytest.mark.parametrize("offload", ["none", "host"])
def test_bf16_store_keeps_a_written_nan(offload):
    storage = ShardStorage(compute_dtype=torch.float32, compute_device=torch.device("cpu"),
                           kind="bf16", offload=offload)
    store = storage.new_store(torch.empty(50, 4))
    values = torch.ones(50, 4)
    values[7, 2] = _bits(NANS["cuda"])[0]
    storage.write_rows(store, torch.arange(50), values, storage.rounding_generator(0))
    storage.flush()
    assert store.dtype == torch.bfloat16 and bool(store[7, 2].isnan())
    assert int(store.isnan().sum()) == 1


class _FakeEvent:
    """Stands in for a CUDA event: records when the host waits for it."""

    def __init__(self, waits: list, index: int) -> None:
        self.waits, self.index = waits, index

    def synchronize(self) -> None:
        self.waits.append(self.index)


def test_offloaded_reads_alternate_two_staging_buffers(monkeypatch):
    """Chunk i's gather may only wait for the copy of chunk i−2 (the last one that used
    its buffer), never for chunk i−1's: the copies pipeline with the host gathers."""
    monkeypatch.setattr(storage_module, "ROW_CHUNK", 4)
    storage = ShardStorage(compute_dtype=torch.float32, compute_device=torch.device("cpu"),
                           kind="bf16", offload="host")
    waits, copies = [], []

    def fake_copy(dst, src, wait):
        dst.copy_(src)
        copies.append(_FakeEvent(waits, len(copies)))
        return copies[-1]

    monkeypatch.setattr(storage, "_copy", fake_copy)
    store = torch.randn(40, 3).to(torch.bfloat16)
    rows = torch.tensor([1, 4, 5, 9, 11, 12, 20, 21, 22, 30, 33, 34, 35, 39])  # 4 chunks
    out = storage.read_rows(store, rows, torch.empty(rows.numel(), 3))
    assert torch.equal(out, store[rows].float())
    assert len(copies) == 4 and waits == [0, 1]


def _small_chunk_offload_worker(rank, world, steps):
    """{(storage, offload): (losses, weight, momentum)} with chunks of 5 rows, so reads
    and writes span several alternating staging buffers."""
    storage_module.ROW_CHUNK = 5
    out = {}
    for storage in ("fp32", "bf16", "fp16"):
        for offload in ("none", "host"):
            pfc = PartialFC(600, 8, sample_rate=0.1, seed=3, storage=storage, offload=offload)
            opt = ShardSGD(pfc, lr=0.5, momentum=0.9, weight_decay=5e-4)
            opt.CHUNK_ROWS = 7  # momentum chunks that straddle the storage's chunks
            losses = []
            for step in range(steps):
                g = torch.Generator().manual_seed(100 * step + rank)
                x = torch.randn(4, 8, generator=g).requires_grad_()
                loss = pfc(x, torch.randint(0, 600, (4,), generator=g))
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            pfc.flush()
            out[storage, offload] = (
                losses, pfc.weight.detach().clone(), opt.momentum_buffer.clone()
            )
    return out


def test_double_buffered_offload_equals_no_offload_bit_for_bit():
    for result in run_world(_small_chunk_offload_worker, 2, 6):
        for storage in ("fp32", "bf16", "fp16"):
            (l0, w0, m0), (l1, w1, m1) = result[storage, "none"], result[storage, "host"]
            assert l0 == l1, storage
            assert torch.equal(w0, w1) and torch.equal(m0, m1), storage
