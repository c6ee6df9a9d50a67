"""Optimisers: sparse momentum SGD for the classifier shard, the backbone's optimiser,
and the learning-rate schedule that drives both.

`TrainingOptimizer.step(step)` is the one call per training step. It sets the
scheduled learning rate on both optimisers, steps the backbone's (SGD or AdamW, through
the GradScaler when fp16 training uses one) and then the shard's `ShardSGD`, which
reads only the rows PartialFC sampled (`PartialFC.sampled_grad()`) and writes them back:

    g ← grad + weight_decay · w          (rows sampled this step only)
    m ← momentum · m + g                 (their momentum only)
    w ← w − lr · m

For a sampled row this is exactly `torch.optim.SGD(momentum, weight_decay)`; rows that
were not sampled, and their momentum, are untouched (a dense optimiser would decay them
and keep moving them with stale momentum). Cost is O(sampled rows · D) per step.

The momentum buffer is stored like the shard (`PartialFC.new_store`: 16-bit and/or on
the host); rows are read into the compute dtype, updated in fp32 and written back with
the shard's rounding (`PartialFC.read_rows` / `write_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import Tensor, nn

from trainer.partial_fc import PartialFC


class ShardSGD:
    """Momentum SGD over the rows of a PartialFC shard that the last step sampled.

    Rows are updated in chunks of CHUNK_ROWS through one reused buffer, so the update
    allocates no [sampled, D] temporaries (16-bit storage rounds in chunks too).
    `momentum_buffer` has the shard's shape, dtype and device (None without momentum).
    """

    CHUNK_ROWS = 4096

    def __init__(
        self, pfc: PartialFC, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(
                f"ShardSGD: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0; got "
                f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}"
            )
        self.pfc = pfc
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.momentum_buffer: Tensor | None = pfc.new_store() if momentum > 0 else None
        self._chunk: Tensor | None = None  # reused gather buffer for momentum rows

    @torch.no_grad()
    def step(self, grad_scale: Tensor | float | None = None) -> bool:
        """Apply the update; `grad_scale` divides the gradient first (AMP loss scale).

        Returns False, changing nothing, when there is no gradient or it is not finite.
        """
        sampled = self.pfc.sampled_grad()
        if sampled is None:
            return False
        rows, grad = sampled.rows, sampled.grad
        if grad_scale is not None:
            grad = grad / grad_scale
            if not bool(torch.isfinite(grad).all()):
                return False
        pfc = self.pfc
        weight = pfc.weight
        if rows.numel() == weight.shape[0] and not pfc.copies_rows:
            self._update(weight, grad, self.momentum_buffer)  # every row: in place
            return True
        # The rows' weights: forward's private copy when there is one.
        w = sampled.values
        if w is None:
            w = pfc.read_rows(weight, rows, grad.new_empty(grad.shape), "in_weight")
        generator = pfc.rounding_generator()
        buf = self.momentum_buffer
        for lo in range(0, rows.numel(), self.CHUNK_ROWS):
            part = slice(lo, lo + self.CHUNK_ROWS)
            m = None
            if buf is not None:
                n = rows[part].numel()
                if self._chunk is None or self._chunk.shape[0] < n:
                    self._chunk = grad.new_empty(n, grad.shape[1])
                # named by size: a full chunk and the last, partial one keep their buffers
                m = pfc.read_rows(buf, rows[part], self._chunk[:n], f"in_momentum{n}")
            self._update(w[part], grad[part], m)
            if m is not None:
                pfc.write_rows(buf, rows[part], m, generator, f"out_momentum{lo}")
        pfc.write_rows(weight, rows, w, generator, "out_weight")
        return True

    def _update(self, w: Tensor, g: Tensor, m: Tensor | None) -> None:
        """SGD on rows in place: g += wd·w; m = momentum·m + g; w −= lr·m."""
        if self.weight_decay:
            g.add_(w, alpha=self.weight_decay)
        if m is not None:
            g = m.mul_(self.momentum).add_(g)
        w.sub_(g, alpha=self.lr)

    def zero_grad(self) -> None:
        self.pfc.zero_grad()

    def state_dict(self) -> dict:
        self.pfc.flush()  # host offload: the last write-back lands in the momentum buffer
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "momentum_buffer": self.momentum_buffer,
        }

    def load_state_dict(self, state: dict) -> None:
        buf = state["momentum_buffer"]
        if (buf is None) != (self.momentum_buffer is None) or (
            buf is not None and buf.shape != self.momentum_buffer.shape
        ):
            raise ValueError("ShardSGD state does not match this shard (momentum buffer shape)")
        self.lr, self.momentum, self.weight_decay = (
            state["lr"], state["momentum"], state["weight_decay"]
        )
        if buf is not None:
            self.momentum_buffer.copy_(buf)


@dataclass(frozen=True)
class LRSchedule:
    """Per-step learning rate: linear warmup from 0, then polynomial or cosine decay.

    polynomial: min_lr + (base − min_lr) · (1 − p)^power; cosine: min_lr + (base −
    min_lr) · (1 + cos πp) / 2, with p the fraction of post-warmup steps done.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: Literal["polynomial", "cosine"] = "polynomial"
    power: float = 2.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.warmup_steps:
            raise ValueError(
                f"LRSchedule: need total_steps >= 1 and warmup_steps >= 0, got "
                f"{self.total_steps} and {self.warmup_steps}"
            )
        if self.kind not in ("polynomial", "cosine"):
            raise ValueError(f"LRSchedule: kind must be polynomial or cosine, got {self.kind!r}")

    def __call__(self, step: int) -> float:
        """Learning rate for 0-based optimizer step `step`."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        p = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * p))
        else:
            factor = (1.0 - p) ** self.power
        return self.min_lr + (self.base_lr - self.min_lr) * factor


def make_backbone_optimizer(
    params: Iterable[nn.Parameter],
    name: Literal["sgd", "adamw"],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    """The backbone's ordinary (dense, replicated) optimiser."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer name must be sgd or adamw, got {name!r}")


class TrainingOptimizer:
    """Backbone optimiser + shard optimiser + schedule, stepped by one call."""

    def __init__(
        self, backbone: torch.optim.Optimizer, shard: ShardSGD, schedule: LRSchedule
    ) -> None:
        self.backbone = backbone
        self.shard = shard
        self.schedule = schedule

    def set_lr(self, step: int) -> float:
        lr = self.schedule(step)
        for group in self.backbone.param_groups:
            group["lr"] = lr
        self.shard.lr = lr
        return lr

    def step(self, step: int, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Update backbone and shard with the learning rate of `step`.

        With an (enabled) GradScaler the caller may already have called
        `scaler.unscale_(self.backbone)` (e.g. to clip); this calls `scaler.step` and
        `scaler.update()`, and skips the shard too when the scaler skipped the backbone
        (it then lowered its scale). Returns whether the update was applied.
        """
        self.set_lr(step)
        if scaler is None or not scaler.is_enabled():
            self.backbone.step()
            return self.shard.step()
        scale = scaler.get_scale()
        scaler.step(self.backbone)
        scaler.update()
        if scaler.get_scale() < scale:  # inf/nan found: backbone step was skipped
            return False
        return self.shard.step(grad_scale=scale)

    def zero_grad(self) -> None:
        self.backbone.zero_grad(set_to_none=True)
        self.shard.zero_grad()

    def state_dict(self) -> dict:
        return {"backbone": self.backbone.state_dict(), "shard": self.shard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.shard.load_state_dict(state["shard"])
