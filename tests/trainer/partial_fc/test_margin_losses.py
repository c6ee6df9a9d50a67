"""CurricularFace, AdaFace and sub-center ArcFace in PartialFC against a float64
single-process reference (written here from the formulas), in gloo groups of 1, 2, 4.

One global batch for every world size: 37 classes (uneven shards), labels only below
class 19 (at world 2 and 4 some ranks own no positive), samples 0 and 1 opposite their
class's every sub-centre and of small norm (θ + m > π: the monotone fallback; AdaFace's
ẑ = −1), sample 2 close to a sub-centre with a large norm (AdaFace's θ − m·ẑ < 0 clamp).
Each case runs two steps (different negatives) so the running statistics advance twice.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_world
from trainer.margins import AdaFace, CombinedMargin, CurricularFace
from trainer.partial_fc import PartialFC, shard_range
from trainer.partial_fc.sampling import sample_rows
from trainer.partial_fc.sharding import init_class_centres

NUM_CLASSES, DIM, N, POSITIVE_BELOW, SEED, S = 37, 16, 12, 19, 5, 16.0
CASES = [(name, k, rate) for name in ("arcface", "curricular", "adaface")
         for k in (1, 3) for rate in (1.0, 0.3)]


def make_margin(name: str):
    if name == "arcface":
        return CombinedMargin(S, 1.0, 0.5, 0.0)
    if name == "curricular":
        return CurricularFace(S, 0.5, t_momentum=0.5)
    margin = AdaFace(S, 0.4, h=0.333, t_alpha=0.1)
    margin.norm_mean.fill_(10.0)  # statistics that put ẑ across [−1, 1] for norms 1..30
    margin.norm_std.fill_(2.0)
    return margin


def global_problem(k: int):
    """(x [N, D] with norms in [1, 30], labels [N], class centres [C·K, D])."""
    g = torch.Generator().manual_seed(11)
    direction = F.normalize(torch.randn(N, DIM, generator=g, dtype=torch.float64), dim=1)
    norms = torch.rand(N, 1, generator=g, dtype=torch.float64) * 29 + 1
    labels = torch.randint(0, POSITIVE_BELOW, (N,), generator=g)
    labels[:3] = torch.tensor([3, 7, 11])
    norms[:3] = torch.tensor([[1.0], [1.5], [30.0]], dtype=torch.float64)
    w = init_class_centres(NUM_CLASSES * k, 0, NUM_CLASSES * k, DIM, SEED, torch.float64)
    for i in (0, 1):  # every sub-centre of the class opposite the sample
        noise = torch.randn(k, DIM, generator=g, dtype=torch.float64)
        w[labels[i] * k : labels[i] * k + k] = -0.01 * direction[i] + 5e-4 * noise
    w[labels[2] * k] = 0.01 * direction[2] + 2e-4 * torch.randn(DIM, generator=g, dtype=torch.float64)
    return direction * norms, labels, w


def reference_step(name, stats, x, labels, w_rows, classes, k):
    """Advance `stats` (dict) and return (loss, fallback hit) with autograd to x, w_rows."""
    cols = torch.searchsorted(classes, labels).unsqueeze(1)
    cos = (F.normalize(x, dim=1) @ F.normalize(w_rows, dim=1).T)
    cos = cos.view(N, -1, k).max(dim=2).values
    target_cos = cos.gather(1, cols)
    m2: float | torch.Tensor = 0.5
    with torch.no_grad():
        if name == "curricular":
            stats["t"] = 0.5 * stats["t"] + 0.5 * target_cos.mean()
        if name == "adaface":
            n = x.norm(dim=1).clamp(1e-3, 100.0)
            stats["norm_mean"] = 0.9 * stats["norm_mean"] + 0.1 * n.mean()
            stats["norm_std"] = 0.9 * stats["norm_std"] + 0.1 * n.std()
            z = (0.333 * (n - stats["norm_mean"]) / (stats["norm_std"] + 1e-3)).clamp(-1, 1)
            m2 = -0.4 * z.unsqueeze(1)
    theta = torch.acos(target_cos.clamp(-1 + 1e-12, 1 - 1e-12))
    star = math.pi - m2
    cos_star = torch.cos(star) if isinstance(star, torch.Tensor) else math.cos(star)
    past = theta > star
    target = torch.where(past, target_cos - cos_star - 1, torch.cos((theta + m2).clamp_min(0)))
    if name == "adaface":
        target = target - (0.4 - m2)  # − (m·ẑ + m)
    others = cos
    if name == "curricular":
        hard = cos > target.detach()
        others = torch.where(hard, cos * (stats["t"] + cos), cos)
    logits = others.scatter(1, cols, target) * S
    return F.cross_entropy(logits, cols.squeeze(1)), bool(past.any())


def _union_rows(labels, world, rate, step, k):
    """Global classes every rank samples at `step`, and their rows in the [C·K, D] matrix."""
    classes = []
    for r in range(world):
        start, count = shard_range(NUM_CLASSES, world, r)
        rows = sample_rows(labels, start, count, min(count, math.ceil(rate * count)),
                           seed=SEED, step=step, rank=r)
        classes.append(rows + start)
    classes = torch.cat(classes)
    rows = (classes.unsqueeze(1) * k + torch.arange(k)).reshape(-1)
    return classes, rows


def _run_case(rank, world, name, k, rate):
    x, labels, full_w = global_problem(k)
    batch = N // world
    mine = slice(rank * batch, (rank + 1) * batch)
    margin = make_margin(name)
    stats = {key: buf.clone() for key, buf in margin.named_buffers()}
    pfc = PartialFC(NUM_CLASSES, DIM, sample_rate=rate, margin=margin, subcenters=k,
                    dtype=torch.float64, seed=SEED)
    start = pfc.class_start
    if world > 1 and rank == world - 1:  # this rank owns no positive of the batch
        assert not ((labels >= start) & (labels < start + pfc.num_local)).any()
    assert pfc.weight.shape == (pfc.num_local * k, DIM)
    pfc.weight.data.copy_(full_w[start * k : (start + pfc.num_local) * k])
    losses, fallback = [], False
    for step in range(2):
        local_x = x[mine].clone().requires_grad_()
        loss = pfc(local_x, labels[mine])
        loss.backward()
        classes, rows = _union_rows(labels, world, rate, step, k)
        ref_x, ref_w = x.clone().requires_grad_(), full_w[rows].clone().requires_grad_()
        ref_loss, hit = reference_step(name, stats, ref_x, labels, ref_w, classes, k)
        ref_loss.backward()
        fallback |= hit
        tol = dict(rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(loss, ref_loss, **tol)
        torch.testing.assert_close(local_x.grad, ref_x.grad[mine], **tol)
        grad = pfc.sampled_grad()
        where = torch.searchsorted(rows, grad.rows + start * k)
        assert torch.equal(rows[where], grad.rows + start * k)
        torch.testing.assert_close(grad.grad, ref_w.grad[where], **tol)
        for key, value in margin.named_buffers():
            torch.testing.assert_close(value, stats[key], rtol=1e-12, atol=0)
        pfc.zero_grad()
        losses.append(loss.item())
    return losses, {key: float(v) for key, v in margin.named_buffers()}, fallback


def _worker(rank, world):
    return [_run_case(rank, world, *case) for case in CASES]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_margin_losses_match_float64_reference(world):
    results = run_world(_worker, world)
    for i, case in enumerate(CASES):
        per_rank = [r[i] for r in results]
        assert len({repr(r[:2]) for r in per_rank}) == 1, f"{case}: ranks disagree: {per_rank}"
        assert any(r[2] for r in per_rank), f"{case}: no target took the θ + m > π fallback"
