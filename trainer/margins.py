"""Combined angular margin (SphereFace m1, ArcFace m2, CosFace m3) with exact gradients.

For a sample whose class centre makes angle θ with its embedding, the target logit is

    s · (cos(m1·θ + m2) − m3)

and every other logit is `s · cos θ`. ArcFace is (m1, m2, m3) = (1, 0.5, 0), CosFace is
(1, 0, 0.4), SphereFace-style margins use m1 > 1; any combination works.

Gradient. The logits are built from differentiable torch ops (acos, cos), so autograd
gives the *exact* derivative of the formula above. (insightface's arcface_torch passes
the gradient of the target logit straight through the margin as if it were `cos θ`; we
do not.) d/dc cos(m1·acos c + m2) has a 1/sqrt(1 − c²) factor that is infinite at
c = ±1, so the cosine fed to the angular part is clamped to [−1 + ε, 1 − ε]
(ε = 1e-7 in float32, 1e-12 in float64); a target cosine outside that band receives no
gradient through the margin — the only deviation from the exact derivative.

Monotone fallback. cos(m1·θ + m2) stops decreasing once m1·θ + m2 passes π, so a
sample could lower its loss by moving *away* from its centre. Where m1·θ + m2 > π we use

    cos θ − cos θ* − 1,      θ* = (π − m2) / m1      (then − m3 and · s as usual)

It equals −1 = cos(m1·θ* + m2) at θ = θ*, so the target logit is continuous, and it
strictly decreases in θ on (θ*, π]. It is never above `cos θ`, so the margin still
penalises. This generalises the usual ArcFace fallback `cos θ − m·sin m` (which applies
to m1 = 1 only and jumps at the boundary) to any (m1, m2).

Inter-class filtering (Partial FC, CVPR 2022). With `interclass_filter = t > 0`, a
negative class whose cosine to the sample exceeds t is treated as a likely duplicate
identity (label noise): its cosine is replaced by 0, so its logit is 0 and it gets no
gradient. The target class is never filtered.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class CombinedMargin(nn.Module):
    """Turn cosines and target columns into margin logits.

    forward(cosines [N, K], target_cols [N] int64) -> logits [N, K]. `target_cols[i]` is
    the column of sample i's class in `cosines`, or −1 when that class is not among the
    K columns (in Partial FC: owned by another rank). No host synchronisation.
    """

    def __init__(
        self,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        interclass_filter: float = 0.0,
    ) -> None:
        super().__init__()
        if not s > 0:
            raise ValueError(f"margin scale s must be > 0, got {s}")
        if not m1 >= 1:
            raise ValueError(f"margin m1 must be >= 1 (1 disables SphereFace), got {m1}")
        if not 0 <= interclass_filter < 1:
            raise ValueError(
                f"interclass_filter must be in [0, 1) (0 disables), got {interclass_filter}"
            )
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filter = float(interclass_filter)
        # Angle beyond which cos(m1·θ + m2) is no longer monotone.
        self.theta_star = (math.pi - self.m2) / self.m1

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filter={self.interclass_filter}"
        )

    def target_logit(self, cos: Tensor) -> Tensor:
        """Margin-adjusted cosine of the target class, before scaling by s."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos - self.m3  # pure CosFace: no angle needed, no clamp
        eps = 1e-12 if cos.dtype == torch.float64 else 1e-7
        c = cos.clamp(-1.0 + eps, 1.0 - eps)
        theta = torch.acos(c)
        angular = torch.cos(self.m1 * theta + self.m2)
        if self.theta_star < math.pi:
            fallback = cos - (math.cos(self.theta_star) + 1.0)
            angular = torch.where(theta > self.theta_star, fallback, angular)
        return angular - self.m3

    def forward(self, cosines: Tensor, target_cols: Tensor) -> Tensor:
        has_target = target_cols >= 0
        col = target_cols.clamp_min(0).unsqueeze(1)
        if self.interclass_filter > 0:
            with torch.no_grad():
                keep = cosines <= self.interclass_filter
                # Never filter the target itself (rows without a target keep column 0's
                # own verdict).
                keep.scatter_(1, col, keep.gather(1, col) | has_target.unsqueeze(1))
            cosines = cosines * keep
        target = cosines.gather(1, col)
        adjusted = torch.where(has_target.unsqueeze(1), self.target_logit(target), target)
        return cosines.scatter(1, col, adjusted) * self.s
