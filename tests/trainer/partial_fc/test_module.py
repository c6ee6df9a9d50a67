"""PartialFC against a single-process float64 reference, in real gloo groups of 1, 2, 4."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed import RankFailed, run_world
from trainer.margins import CombinedMargin
from trainer.optim import ShardSGD
from trainer.partial_fc import PartialFC, shard_range
from trainer.partial_fc.sharding import init_class_centres

ARCFACE = (64.0, 1.0, 0.5, 0.0)
COMBINED = (32.0, 1.2, 0.3, 0.1)
FILTERED = (64.0, 1.0, 0.5, 0.0, 0.2)  # ArcFace + inter-class filtering at cos > 0.2


def _global_batch(n: int, dim: int, num_classes: int, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return x, labels


def reference(x, labels, weight_rows, row_classes, margin_args):
    """Full softmax CE in one process over the class centres `weight_rows`
    (whose global class ids are `row_classes`, sorted)."""
    margin = CombinedMargin(*margin_args)
    cols = torch.searchsorted(row_classes, labels)
    assert torch.equal(row_classes[cols], labels)
    cos = F.normalize(x, dim=1) @ F.normalize(weight_rows, dim=1).T
    return F.cross_entropy(margin(cos, cols), cols)


def _full_softmax_worker(rank, world, num_classes, dim, batch, margin_args):
    x, labels = _global_batch(world * batch, dim, num_classes)
    pfc = PartialFC(
        num_classes, dim, sample_rate=1.0, margin=CombinedMargin(*margin_args),
        dtype=torch.float64, seed=7,
    )
    start, count = shard_range(num_classes, world, rank)
    assert (pfc.class_start, pfc.num_local) == (start, count)
    full_w = init_class_centres(num_classes, 0, num_classes, dim, 7, torch.float64)
    assert torch.equal(pfc.weight.detach(), full_w[start : start + count])

    local_x = x[rank * batch : (rank + 1) * batch].clone().requires_grad_()
    loss = pfc(local_x, labels[rank * batch : (rank + 1) * batch])
    loss.backward()
    assert torch.equal(pfc.last_sampled, torch.arange(count))

    ref_x = x.clone().requires_grad_()
    ref_w = full_w.clone().requires_grad_()
    ref_loss = reference(ref_x, labels, ref_w, torch.arange(num_classes), margin_args)
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        local_x.grad, ref_x.grad[rank * batch : (rank + 1) * batch], rtol=1e-5, atol=1e-12
    )
    # The logged early-warning pair: the largest logit of the global batch over all
    # classes, and the mean cosine to the own class centre.
    with torch.no_grad():
        cos = F.normalize(x, dim=1) @ F.normalize(full_w, dim=1).T
        ref_stats = torch.stack([
            CombinedMargin(*margin_args)(cos, labels).max(), cos.gather(1, labels[:, None]).mean()
        ])
    torch.testing.assert_close(pfc.last_logit_stats, ref_stats, rtol=1e-10, atol=1e-12)
    lr = 0.5
    ShardSGD(pfc, lr=lr, momentum=0.0, weight_decay=0.0).step()
    expected = (full_w - lr * ref_w.grad)[start : start + count]
    torch.testing.assert_close(pfc.weight.detach(), expected, rtol=1e-5, atol=1e-12)
    return loss.item()


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize(
    "margin_args", [ARCFACE, COMBINED, FILTERED], ids=["arcface", "combined", "filtered"]
)
def test_full_softmax_equals_single_process_reference(world, margin_args):
    losses = run_world(_full_softmax_worker, world, 37, 16, 5, margin_args)
    assert len(set(losses)) == 1, f"ranks disagree on the loss: {losses}"


def _sampled_worker(rank, world, num_classes, dim, batch, rate, steps):
    pfc = PartialFC(
        num_classes, dim, sample_rate=rate, margin=CombinedMargin(*ARCFACE),
        dtype=torch.float64, seed=3,
    )
    opt = ShardSGD(pfc, lr=0.1, momentum=0.9, weight_decay=5e-4)
    start, count = pfc.class_start, pfc.num_local
    samples = []
    for step in range(steps):
        x, labels = _global_batch(world * batch, dim, num_classes, seed=step)
        local_x = x[rank * batch : (rank + 1) * batch].clone().requires_grad_()
        before_w = pfc.weight.detach().clone()
        before_m = opt.momentum_buffer.clone()
        loss = pfc(local_x, labels[rank * batch : (rank + 1) * batch])
        loss.backward()
        rows = pfc.last_sampled
        samples.append(rows.tolist())

        # Every positive owned here is sampled; row count as specified.
        mine = labels[(labels >= start) & (labels < start + count)] - start
        assert set(mine.tolist()) <= set(rows.tolist())
        expected_rows = max(math.ceil(rate * count), len(set(mine.tolist())))
        assert rows.numel() == expected_rows
        assert torch.equal(rows, rows.sort().values) and rows.unique().numel() == rows.numel()

        # Loss and embedding gradient equal the reference on exactly the sampled rows.
        parts = [None] * world
        dist.all_gather_object(parts, (rows + start).tolist())
        union = torch.tensor(sorted(c for p in parts for c in p))
        full_w = torch.cat([t for t in _gather_weights(before_w, world)])
        ref_x = x.clone().requires_grad_()
        ref_loss = reference(ref_x, labels, full_w[union], union, ARCFACE)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(
            local_x.grad, ref_x.grad[rank * batch : (rank + 1) * batch], rtol=1e-5, atol=1e-12
        )

        opt.step()
        opt.zero_grad()
        untouched = torch.ones(count, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(pfc.weight.detach()[untouched], before_w[untouched])
        assert torch.equal(opt.momentum_buffer[untouched], before_m[untouched])
        assert not torch.equal(pfc.weight.detach()[rows], before_w[rows])
    return samples


def _gather_weights(local_w, world):
    out = [None] * world
    dist.all_gather_object(out, local_w)
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sampling_matches_reference_and_leaves_unsampled_rows_alone(world):
    samples = run_world(_sampled_worker, world, 403, 8, 6, 0.1, 3)
    assert len(samples) == world
    if world > 1:
        # Different ranks draw different negatives.
        assert samples[0][0] != samples[1][0]
    # A second run with the same seed samples identically, step by step.
    assert run_world(_sampled_worker, world, 403, 8, 6, 0.1, 3) == samples


def test_more_positives_than_sample_size_keeps_all_positives():
    # 2 ranks x 12 samples over 40 classes at rate 0.05: ceil(0.05*20) = 1 row, but
    # each rank owns several of the batch's classes.
    run_world(_sampled_worker, 2, 40, 8, 12, 0.05, 2)


BAD_INPUTS = {
    "label_high": "label 10 outside [0, 10)",
    "label_negative": "label -1 outside [0, 10)",
    "embedding_size": "embedding size 5 != PartialFC embedding_size 4",
    "batch_size": "ranks disagree on the batch size (rank 0: 3, rank 1: 2)",
    "label_count": "3 embeddings but 2 labels",
    "float_labels": "labels integer",
}


def _bad_input_worker(rank, world):
    """Each bad input on one rank: every rank must raise (no hang), then the group goes
    on to the next case — proof that no collective was left half-done."""
    pfc = PartialFC(10, 4)
    messages = {}
    for case in BAD_INPUTS:
        x, labels = torch.randn(3, 4), torch.tensor([0, 1, 2])
        if case == "label_high" and rank == 1:
            labels = torch.tensor([0, 10, 2])
        if case == "label_negative" and rank == 0:
            labels = torch.tensor([0, -1, 2])
        if case == "embedding_size" and rank == 1:
            x = torch.randn(3, 5)
        if case == "batch_size" and rank == 1:
            x, labels = torch.randn(2, 4), torch.tensor([0, 1])
        if case == "label_count" and rank == 0:
            labels = torch.tensor([0, 1])
        if case == "float_labels":
            labels = labels.float()
        try:
            pfc(x, labels)
            messages[case] = None
        except ValueError as exc:
            messages[case] = str(exc)
    # Still usable afterwards.
    loss = pfc(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    return messages, torch.isfinite(loss).item()


def test_bad_input_fails_on_every_rank_without_hanging():
    results = run_world(_bad_input_worker, 2, timeout=90, collective_timeout=20)
    for messages, finite_after in results:
        assert finite_after
        for case, needle in BAD_INPUTS.items():
            assert messages[case] is not None and needle in messages[case], (case, messages)


def _constructor_worker(rank, world, kwargs):
    try:
        PartialFC(**kwargs)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(num_classes=10, embedding_size=4, sample_rate=0.0), "sample_rate must be in (0, 1]"),
        (dict(num_classes=10, embedding_size=4, sample_rate=1.5), "sample_rate must be in (0, 1]"),
        (dict(num_classes=1, embedding_size=4), "smaller than the world size"),
    ],
)
def test_bad_constructor_arguments(kwargs, needle):
    for msg in run_world(_constructor_worker, 2, kwargs):
        assert msg is not None and needle in msg


def test_needs_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="initialised process group"):
        PartialFC(10, 4)


def _accumulation_worker(rank, world):
    """Two forwards before one step: the update uses the union of sampled rows with
    summed gradients — same as one forward over the concatenated batch at r = 1."""
    torch.manual_seed(0)
    x = torch.randn(world * 8, 6, dtype=torch.float64)
    labels = torch.randint(0, 50, (world * 8,))
    mine = slice(rank * 8, (rank + 1) * 8)
    halves = [slice(rank * 8, rank * 8 + 4), slice(rank * 8 + 4, (rank + 1) * 8)]

    one = PartialFC(50, 6, sample_rate=1.0, dtype=torch.float64)
    (one(x[mine], labels[mine]) ).backward()
    ShardSGD(one, lr=0.1, momentum=0.0, weight_decay=0.0).step()

    two = PartialFC(50, 6, sample_rate=1.0, dtype=torch.float64)
    # Mean over halves equals mean over the whole batch: weight each half by 1/2.
    for half in halves:
        (two(x[half], labels[half]) / 2).backward()
    ShardSGD(two, lr=0.1, momentum=0.0, weight_decay=0.0).step()
    torch.testing.assert_close(one.weight, two.weight, rtol=1e-10, atol=1e-14)

    sampled = PartialFC(50, 6, sample_rate=0.2, dtype=torch.float64)
    for half in halves:
        sampled(x[half], labels[half]).backward()
    grad = sampled.sampled_grad()
    rows = [r for r, _ in sampled._sampled]
    assert torch.equal(grad.rows, torch.cat(rows).unique())
    return True


def test_gradient_accumulation_sums_sparse_gradients():
    run_world(_accumulation_worker, 2)


def test_rank_failure_is_reported():
    with pytest.raises(RankFailed):
        run_world(_constructor_worker, 1, {"num_classes": 10})


def _chunked_sgd_worker(rank, world):
    """ShardSGD in small chunks equals the SGD formula row by row, over two steps."""
    pfc = PartialFC(40, 6, sample_rate=0.5, dtype=torch.float64)
    opt = ShardSGD(pfc, lr=0.3, momentum=0.9, weight_decay=0.01)
    opt.CHUNK_ROWS = 3  # several chunks, the last one partial
    mom = torch.zeros_like(pfc.weight)
    for step in range(2):
        x, labels = _global_batch(5, 6, 40, seed=step)
        w0 = pfc.weight.detach().clone()
        pfc(x.requires_grad_(), labels).backward()
        sampled = pfc.sampled_grad()
        rows, grad = sampled.rows, sampled.grad.clone()
        assert rows.numel() > 2 * opt.CHUNK_ROWS
        g = grad + 0.01 * w0[rows]
        mom[rows] = 0.9 * mom[rows] + g
        expected = w0.clone()
        expected[rows] -= 0.3 * mom[rows]
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(pfc.weight.detach(), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.momentum_buffer, mom, rtol=1e-12, atol=1e-14)
    return True


def test_shard_sgd_in_chunks_follows_the_sgd_formula():
    run_world(_chunked_sgd_worker, 1)
