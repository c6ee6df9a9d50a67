import math

import pytest
import torch

from trainer.margins import AdaFace, CombinedMargin, CurricularFace

MARGINS = {
    "arcface": (64.0, 1.0, 0.5, 0.0),
    "cosface": (64.0, 1.0, 0.0, 0.4),
    "combined": (32.0, 1.0, 0.3, 0.2),
    "sphereface_m2": (30.0, 2.0, 0.0, 0.0),
    "sphereface_m1.35_combined": (30.0, 1.35, 0.25, 0.1),
}


def _cosines(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, k, generator=g, dtype=torch.float64) * 1.9 - 0.95)


@pytest.mark.parametrize("name", list(MARGINS))
def test_gradcheck(name):
    margin = CombinedMargin(*MARGINS[name])
    cos = _cosines(6, 5).requires_grad_()
    # Keep cosines away from the fallback boundary θ*, where the derivative jumps.
    theta_star = margin.theta_star
    with torch.no_grad():
        near = (torch.acos(cos) - theta_star).abs() < 0.05
        cos[near] = math.cos(theta_star / 2)
    cols = torch.tensor([0, 1, 4, -1, 2, 3])
    assert torch.autograd.gradcheck(lambda c: margin(c, cols), (cos,))


@pytest.mark.parametrize("name", ["arcface", "combined", "sphereface_m2"])
def test_target_gradient_is_exact_derivative_not_straight_through(name):
    s, m1, m2, m3 = MARGINS[name]
    margin = CombinedMargin(s, m1, m2, m3)
    theta = torch.tensor([0.3, 0.7, 1.0], dtype=torch.float64)
    theta = theta[m1 * theta + m2 < math.pi]
    cos = torch.cos(theta).unsqueeze(1).requires_grad_()
    cols = torch.zeros(len(theta), dtype=torch.long)
    margin(cos, cols).sum().backward()
    analytic = s * m1 * torch.sin(m1 * theta + m2) / torch.sin(theta)
    torch.testing.assert_close(cos.grad.squeeze(1), analytic, rtol=1e-10, atol=0)
    # Straight-through (arcface_torch) would give s; the exact derivative differs.
    assert (cos.grad.squeeze(1) - s).abs().min() > 1e-3


@pytest.mark.parametrize("name", list(MARGINS))
def test_target_logit_monotone_and_continuous_over_whole_range(name):
    margin = CombinedMargin(*MARGINS[name])
    theta = torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)[1:-1]
    logit = margin(torch.cos(theta).unsqueeze(1), torch.zeros(len(theta), dtype=torch.long))
    steps = logit.squeeze(1).diff()
    assert (steps < 0).all(), "target logit must strictly decrease as θ grows"
    # Continuous: no jump bigger than the grid's slope allows (the ArcFace fallback
    # cos θ − m·sin m would jump by ~0.12·s at θ = π − m).
    assert steps.abs().max() < margin.s * margin.m1 * 1e-3


def test_fallback_region_formula():
    margin = CombinedMargin(64.0, 1.0, 0.5, 0.0)
    theta = torch.tensor([math.pi - 0.2], dtype=torch.float64)  # θ + m > π
    cos = torch.cos(theta)
    got = margin(cos.unsqueeze(1), torch.zeros(1, dtype=torch.long)).item()
    expected = 64.0 * (cos.item() - math.cos(math.pi - 0.5) - 1.0)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got < 64.0 * cos.item()  # still a penalty


def test_non_target_logits_are_scaled_cosines():
    margin = CombinedMargin(64.0, 1.0, 0.5, 0.0)
    cos = _cosines(4, 3)
    cols = torch.tensor([1, -1, 0, 2])
    out = margin(cos, cols)
    mask = torch.ones_like(cos, dtype=torch.bool)
    mask[0, 1] = mask[2, 0] = mask[3, 2] = False
    torch.testing.assert_close(out[mask], 64.0 * cos[mask])
    assert torch.equal(out[1], 64.0 * cos[1])  # no target on this shard: unchanged
    assert (out[~mask] < 64.0 * cos[~mask]).all()


def test_cosface_is_exact_shift():
    margin = CombinedMargin(64.0, 1.0, 0.0, 0.4)
    cos = _cosines(3, 4)
    out = margin(cos, torch.tensor([0, 1, 2]))
    expected = 64.0 * cos.clone()
    for i in range(3):
        expected[i, i] = 64.0 * (cos[i, i] - 0.4)
    torch.testing.assert_close(out, expected)


def test_interclass_filter_zeroes_confusing_negatives_but_never_the_target():
    margin = CombinedMargin(10.0, 1.0, 0.0, 0.0, interclass_filter=0.5)
    cos = torch.tensor(
        [[0.9, 0.6, 0.1], [0.7, 0.2, 0.8]], dtype=torch.float64, requires_grad=True
    )
    out = margin(cos, torch.tensor([0, -1]))
    expected = torch.tensor([[9.0, 0.0, 1.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    torch.testing.assert_close(
        cos.grad, torch.tensor([[10.0, 0.0, 10.0], [0.0, 10.0, 0.0]], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "kwargs",
    [dict(s=0.0), dict(m1=0.5), dict(interclass_filter=1.0), dict(interclass_filter=-0.1)],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        CombinedMargin(**kwargs)


# ------------------------------------------------------------ CurricularFace and AdaFace


def _cosines_and_cols(n=6, k=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    cos = (torch.rand(n, k, generator=g, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    return cos, torch.randint(0, k, (n,), generator=g)


def test_curricular_face_reweights_only_hard_negatives_and_differentiates_exactly():
    margin = CurricularFace(4.0, 0.5, t_momentum=0.3)
    cos, cols = _cosines_and_cols()
    margin.eval()  # statistics frozen: t stays what we set
    margin.t.fill_(0.4)
    logits = margin(cos, cols)
    target = torch.cos(torch.acos(cos.detach().gather(1, cols[:, None])) + 0.5)
    hard = cos.detach() > target
    expected = torch.where(hard, cos.detach() * (0.4 + cos.detach()), cos.detach())
    expected.scatter_(1, cols[:, None], target)
    torch.testing.assert_close(logits, 4.0 * expected)
    assert hard.sum() > 0 and (~hard).sum() > 0
    assert torch.autograd.gradcheck(lambda c: margin(c, cols), (cos,))


def test_curricular_face_t_follows_the_target_cosine_mean_in_training():
    margin = CurricularFace(4.0, 0.5, t_momentum=0.25)
    cos, cols = _cosines_and_cols()
    margin(cos, cols)
    mean = cos.detach().gather(1, cols[:, None]).mean()
    torch.testing.assert_close(margin.t, 0.25 * mean)
    assert margin.statistics() == {"t": pytest.approx(float(0.25 * mean))}


@pytest.mark.parametrize("z", [-1.0, 0.0, 1.0])
def test_adaface_target_logit_is_monotone_and_continuous_at_every_quality(z):
    margin = AdaFace(1.0, 0.4, h=1.0, t_alpha=0.0)
    margin.norm_mean.fill_(10.0)
    margin.norm_std.fill_(1.0 - 1e-3)  # ẑ = (‖x‖ − 10) / 1
    cos = torch.linspace(-1, 1, 20001, dtype=torch.float64).unsqueeze(1)
    norms = torch.full((cos.shape[0],), 10.0 + z, dtype=torch.float64)
    t = margin.target_logit(cos, norms).squeeze(1)
    assert (t[1:] - t[:-1] >= -1e-12).all()  # non-decreasing in cos: non-increasing in θ
    assert (t[1:] - t[:-1]).abs().max() < 1e-2  # no jump
    theta = torch.acos(cos.squeeze(1).clamp(-1 + 1e-12, 1 - 1e-12))
    mid = (theta > 0.5) & (theta < math.pi - 0.5)
    torch.testing.assert_close(t[mid], torch.cos(theta[mid] - 0.4 * z) - (0.4 * z + 0.4))


def test_adaface_needs_norms_and_is_exactly_differentiable():
    margin = AdaFace(4.0, 0.4, 0.333, 0.5)
    cos, cols = _cosines_and_cols()
    norms = torch.tensor([1.0, 5.0, 20.0, 40.0, 90.0, 300.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="norms"):
        margin(cos, cols)
    margin.eval()
    assert torch.autograd.gradcheck(lambda c: margin(c, cols, norms), (cos,))
    margin.train()
    margin(cos, cols, norms)
    clipped = norms.clamp(1e-3, 100.0)
    torch.testing.assert_close(margin.norm_mean, 0.5 * 20.0 + 0.5 * clipped.mean())
    torch.testing.assert_close(margin.norm_std, 0.5 * 100.0 + 0.5 * clipped.std())


@pytest.mark.parametrize("make", [
    lambda: CurricularFace(0.0), lambda: CurricularFace(64.0, t_momentum=1.5),
    lambda: AdaFace(64.0, h=0.0), lambda: AdaFace(64.0, t_alpha=-0.1), lambda: AdaFace(64.0, m=2.0),
])
def test_invalid_margin_parameters_are_refused(make):
    with pytest.raises(ValueError):
        make()
