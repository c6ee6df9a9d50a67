"""Margin losses on the target class, with exact gradients, for one process or a shard.

Every margin turns cosines (a sample's embedding against class centres) into logits:
the target class gets a margin, the others `s · cos θ` (CurricularFace re-weights the
hard ones). `CombinedMargin` is the default; `CurricularFace` and `AdaFace` keep running
statistics (buffers, saved in checkpoints through `state_dict`) that every rank updates
identically from the global batch.

CombinedMargin (SphereFace m1, ArcFace m2, CosFace m3). Target logit

    s · (cos(m1·θ + m2) − m3)

ArcFace is (m1, m2, m3) = (1, 0.5, 0), CosFace (1, 0, 0.4), SphereFace-style m1 > 1.

CurricularFace (Huang et al., CVPR 2020). Target `s · cos(θ_y + m)` (ArcFace with the
same fallback); a negative whose cosine exceeds the target's margin cosine T_y (the
value after the fallback) is a hard negative and gets `s · cos θ_j · (t + cos θ_j)`;
`t ← (1 − α)·t + α·mean(cos θ_y)` over the global batch, updated before the logits and
not differentiated (t = 0 at the start, as in the authors' code). In a shard every
rank needs every sample's T_y: one all-reduce of the [N] target cosines.

AdaFace (Kim et al., CVPR 2022). With ‖x‖ the un-normalised embedding norm (detached,
clipped to [0.001, 100]) and running mean μ, std σ of the norms (updated first:
`μ ← (1 − α)·μ + α·mean`, same for σ with the unbiased batch std; μ = 20, σ = 100 at the
start, as in the authors' code), `ẑ = clip(h·(‖x‖ − μ)/(σ + 0.001), −1, 1)` and the
target logit is `s · (cos(θ_y − m·ẑ) − (m·ẑ + m))`: ArcFace-like for low-norm
(low-quality) images, CosFace-like for high-norm ones. The embedding given to the
classifier must not be normalised upstream (the norm is the quality signal). Every rank
has the whole global batch's embeddings already: no extra communication.

Gradient. Target logits are differentiable torch ops (acos, cos), so autograd gives the
*exact* derivative of the formulas above (insightface's arcface_torch passes the target
gradient straight through the margin; we do not). d/dc cos(m1·acos c + m2) has a
1/sqrt(1 − c²) factor, infinite at c = ±1, so the cosine in the angular part is clamped
to [−1 + ε, 1 − ε] (ε = 1e-7 in float32, 1e-12 in float64): a target cosine outside
that band gets no gradient through the margin, the only deviation from the exact
derivative.

Monotone fallback. With angle a = m1·θ + m2 (m2 may be per sample, AdaFace's −m·ẑ),
cos a stops decreasing in θ once a passes π, so a sample could lower its loss by moving
*away* from its centre. Where a > π we use

    cos θ − cos θ* − 1,      θ* = (π − m2) / m1

(−1 = cos(m1·θ* + m2) at θ = θ*: continuous, strictly decreasing on (θ*, π], never
above cos θ). This generalises the usual `cos θ − m·sin m` (m1 = 1 only, and it jumps
at the boundary). Where a < 0 (AdaFace, θ < m·ẑ) the angle is clamped to 0, as in the
authors' code: the target cosine part is 1 there, constant.

Inter-class filtering (Partial FC, CVPR 2022; CombinedMargin only). With
`interclass_filter = t > 0` a negative whose cosine exceeds t is taken for a duplicate
identity (label noise): its cosine becomes 0 (logit 0, no gradient). The target is
never filtered.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.config import MarginConfig

ADAFACE_EPS = 1e-3  # the authors' eps in the norm standardisation
NORM_CLIP = (1e-3, 100.0)  # the authors' clip of the embedding norm


def angular_margin(cos: Tensor, m1: float, m2: float | Tensor) -> Tensor:
    """cos(m1·θ + m2) with the monotone fallback beyond π and the angle clamped at 0
    (see the module docstring); `m2` a float or a tensor broadcasting with `cos`."""
    eps = 1e-12 if cos.dtype == torch.float64 else 1e-7
    theta = torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))
    angular = torch.cos((m1 * theta + m2).clamp_min(0.0))
    theta_star = (math.pi - m2) / m1
    if isinstance(theta_star, Tensor):
        cos_star = torch.cos(theta_star)
    elif theta_star < math.pi:
        cos_star = math.cos(theta_star)
    else:
        return angular  # m1·θ + m2 <= π on all of [0, π]: no fallback needed
    return torch.where(theta > theta_star, cos - (cos_star + 1.0), angular)


def _with_derivative(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(fn(x), d fn / d x) for an elementwise `fn`, by autograd on a detached copy."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        y = fn(leaf)
        (dy,) = torch.autograd.grad(y.sum(), leaf)
    return y.detach(), dy


@dataclass
class ShardLogits:
    """What `Margin.shard_logits_` leaves for backward: this rank's target logits / s
    ([N, 1], 0 on rows whose target another rank owns), their derivative w.r.t. the
    target cosine ([N, 1]), and the derivative of every other logit / s w.r.t. its
    cosine ([N, S], or None where it is 1 everywhere; the target column is not read)."""

    target: Tensor
    d_target: Tensor
    d_other: Tensor | None


class _Negatives(torch.autograd.Function):
    """`Margin.negatives_` as a differentiable op (for the single-process forward)."""

    @staticmethod
    def forward(ctx, cos: Tensor, target: Tensor, margin: Margin) -> Tensor:  # type: ignore[override]
        out = cos.detach().clone()
        ctx.derivative = margin.negatives_(out, target)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        d = ctx.derivative
        return (grad if d is None else grad * d), None, None


class Margin(nn.Module, ABC):
    """A margin head: scale `s`, a target logit, a rule for the negatives, statistics.

    forward(cosines [N, K], target_cols [N] int64, norms [N] | None) -> logits [N, K],
    differentiable: the single-process form. `target_cols[i]` is the column of sample
    i's class, or −1 when it is not among the K columns; `norms` the un-normalised
    embedding norms (AdaFace only). `shard_logits_` is the same math in place on one
    rank's shard of the columns (trainer.partial_fc). No host synchronisation.
    """

    global_targets = False  # True: the negatives need every sample's target (all-reduce)

    def __init__(self, s: float) -> None:
        super().__init__()
        if not s > 0:
            raise ValueError(f"margin scale s must be > 0, got {s}")
        self.s = float(s)

    @abstractmethod
    def target_logit(self, cos: Tensor, norms: Tensor | None = None) -> Tensor:
        """Margin-adjusted cosine [N, 1] of the target class, before scaling by s."""

    def negatives_(self, cos: Tensor, target: Tensor) -> Tensor | None:
        """Non-target logits / s in place from cosines [N, S] and the samples' target
        logits / s [N, 1]; returns their derivative w.r.t. the cosine (None: 1)."""
        return None

    def update_statistics(self, target_cos: Tensor | None, norms: Tensor | None) -> None:
        """Advance the running statistics (in training, before the logits; once per
        forward, so per micro-batch under gradient accumulation) from the global batch's
        target cosines [N, 1] (None unless `global_targets`) and embedding norms [N];
        none by default."""

    def statistics(self) -> dict[str, float]:
        """The running statistics by name, for logs (a host read; empty without any)."""
        return {name: float(buf) for name, buf in self.named_buffers()}

    def forward(self, cosines: Tensor, target_cols: Tensor, norms: Tensor | None = None) -> Tensor:
        has_target = (target_cols >= 0).unsqueeze(1)
        col = target_cols.clamp_min(0).unsqueeze(1)
        target_cos = cosines.gather(1, col)
        if self.training:
            self.update_statistics(target_cos.detach()[has_target].unsqueeze(1), norms)
        target = self.target_logit(target_cos, norms)
        others = _Negatives.apply(cosines, target.detach(), self)
        adjusted = torch.where(has_target, target, others.gather(1, col))
        return others.scatter(1, col, adjusted) * self.s

    def shard_logits_(
        self, cos: Tensor, col: Tensor, has_target: Tensor, norms: Tensor, group
    ) -> ShardLogits:
        """This rank's cosines [N, S] → logits / s, in place. `col` [N, 1]: each
        sample's target column here (anything where `has_target` [N, 1] is False:
        another rank owns it); `norms` [N]: the global batch's embedding norms."""
        target_cos = cos.gather(1, col)
        everyone = None
        if self.global_targets:  # each sample's target is owned by exactly one rank
            everyone = torch.where(has_target, target_cos, 0.0)
            dist.all_reduce(everyone, op=dist.ReduceOp.SUM, group=group)
            target_cos = everyone  # the same values on the owner, bit for bit
        if self.training:
            self.update_statistics(everyone, norms)
        target, d_target = _with_derivative(lambda c: self.target_logit(c, norms), target_cos)
        d_other = self.negatives_(cos, target)
        target = torch.where(has_target, target, 0.0)
        cos.scatter_(1, col, torch.where(has_target, target, cos.gather(1, col)))
        return ShardLogits(target, d_target, d_other)


class CombinedMargin(Margin):
    """s·(cos(m1·θ + m2) − m3) on the target, optional inter-class filter (module doc)."""

    def __init__(
        self,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        interclass_filter: float = 0.0,
    ) -> None:
        super().__init__(s)
        if not m1 >= 1:
            raise ValueError(f"margin m1 must be >= 1 (1 disables SphereFace), got {m1}")
        if not 0 <= interclass_filter < 1:
            raise ValueError(
                f"interclass_filter must be in [0, 1) (0 disables), got {interclass_filter}"
            )
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self.interclass_filter = float(interclass_filter)
        self.theta_star = (math.pi - self.m2) / self.m1  # cos(m1·θ + m2) monotone below it

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filter={self.interclass_filter}"
        )

    def target_logit(self, cos: Tensor, norms: Tensor | None = None) -> Tensor:
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos - self.m3  # pure CosFace: no angle needed, no clamp
        return angular_margin(cos, self.m1, self.m2) - self.m3

    def negatives_(self, cos: Tensor, target: Tensor) -> Tensor | None:
        if self.interclass_filter <= 0:
            return None
        keep = cos <= self.interclass_filter
        cos.mul_(keep)
        return keep


class CurricularFace(Margin):
    """Target s·cos(θ_y + m); hard negatives s·cos θ_j·(t + cos θ_j) (module doc)."""

    global_targets = True

    def __init__(self, s: float = 64.0, m: float = 0.5, t_momentum: float = 0.01) -> None:
        super().__init__(s)
        if not 0 <= m < math.pi:
            raise ValueError(f"CurricularFace margin m must be in [0, pi), got {m}")
        if not 0 <= t_momentum <= 1:
            raise ValueError(f"CurricularFace t_momentum must be in [0, 1], got {t_momentum}")
        self.m, self.t_momentum = float(m), float(t_momentum)
        self.register_buffer("t", torch.zeros((), dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, t_momentum={self.t_momentum}"

    def target_logit(self, cos: Tensor, norms: Tensor | None = None) -> Tensor:
        return angular_margin(cos, 1.0, self.m)

    def update_statistics(self, target_cos: Tensor | None, norms: Tensor | None) -> None:
        if target_cos is not None and target_cos.numel():
            a = self.t_momentum
            self.t.mul_(1 - a).add_(a * target_cos.to(torch.float64).mean())

    def negatives_(self, cos: Tensor, target: Tensor) -> Tensor | None:
        hard = cos > target
        derivative = cos.mul(2.0).add_(self.t).masked_fill_(~hard, 1.0)  # t + 2·cos
        cos.mul_(cos.add(self.t).masked_fill_(~hard, 1.0))  # cos·(t + cos) where hard
        return derivative


class AdaFace(Margin):
    """Target s·(cos(θ_y − m·ẑ) − (m·ẑ + m)), ẑ from the embedding norm (module doc)."""

    uses_norms = True

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01) -> None:
        super().__init__(s)
        if not 0 <= m < math.pi / 2:
            raise ValueError(f"AdaFace margin m must be in [0, pi/2), got {m}")
        if not h > 0:
            raise ValueError(f"AdaFace h must be > 0, got {h}")
        if not 0 <= t_alpha <= 1:
            raise ValueError(f"AdaFace t_alpha must be in [0, 1], got {t_alpha}")
        self.m, self.h, self.t_alpha = float(m), float(h), float(t_alpha)
        self.register_buffer("norm_mean", torch.full((), 20.0, dtype=torch.float64))
        self.register_buffer("norm_std", torch.full((), 100.0, dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"

    def _norms(self, norms: Tensor | None) -> Tensor:
        if norms is None:
            raise ValueError("AdaFace needs the un-normalised embedding norms (norms=...)")
        return norms.detach().to(torch.float64).clamp(*NORM_CLIP)

    def update_statistics(self, target_cos: Tensor | None, norms: Tensor | None) -> None:
        x = self._norms(norms)
        a = self.t_alpha
        self.norm_mean.mul_(1 - a).add_(a * x.mean())
        self.norm_std.mul_(1 - a).add_(a * x.std(correction=1 if x.numel() > 1 else 0))

    def quality(self, norms: Tensor) -> Tensor:
        """ẑ = clip(h·(‖x‖ − μ)/(σ + eps), −1, 1) per sample [N] (float64, detached)."""
        z = (self._norms(norms) - self.norm_mean) / (self.norm_std + ADAFACE_EPS)
        return (self.h * z).clamp(-1.0, 1.0)

    def target_logit(self, cos: Tensor, norms: Tensor | None = None) -> Tensor:
        mz = (self.m * self.quality(norms)).to(cos.dtype).reshape(cos.shape)
        return angular_margin(cos, 1.0, -mz) - (mz + self.m)


def build_margin(cfg: MarginConfig) -> Margin:
    """The margin the config's `margin` section names (`margin.type`)."""
    if cfg.type == "curricular":
        return CurricularFace(cfg.s, cfg.m2, cfg.t_momentum)
    if cfg.type == "adaface":
        return AdaFace(cfg.s, cfg.m, cfg.h, cfg.t_alpha)
    return CombinedMargin(cfg.s, cfg.m1, cfg.m2, cfg.m3, cfg.interclass_filter)
