"""Optimisers: sparse momentum SGD for the classifier shard, the backbone's optimiser,
and the learning-rate schedule that drives both.

`TrainingOptimizer.step(step)` is the one call per training step. It sets the
scheduled learning rate on both optimisers, steps the backbone's (SGD or AdamW, through
the GradScaler when fp16 training uses one) and then the shard's `ShardSGD`, which
reads only the rows PartialFC sampled (`PartialFC.sampled_grad()`) and writes them back:

    g ← grad · inv_scale + weight_decay · w     (rows sampled this step only)
    m ← momentum · m + g                        (their momentum only)
    w ← w − lr · m

For a sampled row this is exactly `torch.optim.SGD(momentum, weight_decay)`; rows that
were not sampled, and their momentum, are untouched (a dense optimiser would decay them
and keep moving them with stale momentum). Cost is O(sampled rows · D) per step.

The momentum buffer is a store of the shard's `ShardStorage` (16-bit and/or on the
host, like the shard); rows are read into the compute dtype, updated in place and
written back with the shard's rounding, through the storage's `read_rows` / `write_rows`.
The shard step reads nothing back to the host: the training loop has already checked
that the step is finite, and the AMP loss scale arrives as a device tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

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
        self.momentum_buffer: Tensor | None = (
            pfc.storage.new_store(pfc.weight) if momentum > 0 else None
        )
        self._chunk: Tensor | None = None  # reused gather buffer for momentum rows

    @torch.no_grad()
    def step(self, inv_scale: Tensor | None = None) -> None:
        """Apply the update to the sampled rows (nothing without a gradient). `inv_scale`
        (AMP: 1 / loss scale, a one-element tensor on the compute device) multiplies the
        gradient first, in place. Reads nothing back to the host: a non-finite step must
        be skipped by the caller (the training loop checks one flag per step)."""
        sampled = self.pfc.sampled_grad()
        if sampled is None:
            return
        rows, grad = sampled.rows, sampled.grad
        storage, weight = self.pfc.storage, self.pfc.weight
        if rows.numel() == weight.shape[0] and not storage.copies_rows:
            self._update(weight, grad, self.momentum_buffer, inv_scale)  # every row: in place
            return
        # The rows' weights: forward's private copy when there is one.
        w = sampled.values
        if w is None:
            w = storage.read_rows(weight, rows, grad.new_empty(grad.shape))
        generator = storage.rounding_generator(self.pfc.sample_step)
        buf = self.momentum_buffer
        for lo in range(0, rows.numel(), self.CHUNK_ROWS):
            part = slice(lo, lo + self.CHUNK_ROWS)
            m = None
            if buf is not None:
                n = rows[part].numel()
                if self._chunk is None or self._chunk.shape[0] < n:
                    self._chunk = grad.new_empty(n, grad.shape[1])
                m = storage.read_rows(buf, rows[part], self._chunk[:n])
            self._update(w[part], grad[part], m, inv_scale)
            if m is not None:
                storage.write_rows(buf, rows[part], m, generator)
        storage.write_rows(weight, rows, w, generator)

    def _update(self, w: Tensor, g: Tensor, m: Tensor | None, inv_scale: Tensor | None) -> None:
        """SGD on rows in place: g ·= inv_scale; g += wd·w; m = momentum·m + g; w −= lr·m."""
        if inv_scale is not None:
            g.mul_(inv_scale)
        if self.weight_decay:
            g.add_(w, alpha=self.weight_decay)
        if m is not None:
            g = m.mul_(self.momentum).add_(g)
        w.sub_(g, alpha=self.lr)

    def zero_grad(self) -> None:
        self.pfc.zero_grad()


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

    def step(self, step: int, scaler: torch.amp.GradScaler | None = None) -> None:
        """Update backbone and shard with the learning rate of `step`.

        Call it for finite steps only: the training loop skips a step whose loss or
        (unscaled) gradient norm is not finite, so nothing here checks again. With an
        (enabled) GradScaler the caller must already have called
        `scaler.unscale_(self.backbone)` (the loop does, to clip; `update()` refuses
        otherwise). The backbone then steps directly: `scaler.step` would only re-check
        the finiteness the loop already read, with a host read of its own. The shard gets
        the inverse loss scale as a device tensor (`get_scale()` would be a host read).
        """
        self.set_lr(step)
        if scaler is None or not scaler.is_enabled():
            self.backbone.step()
            self.shard.step()
            return
        # The scale the loss was multiplied by; update() may change it in place.
        inv_scale = scaler._get_scale_async().double().reciprocal().float()  # as unscale_ does
        self.backbone.step()
        scaler.update()
        self.shard.step(inv_scale)

    def zero_grad(self) -> None:
        self.backbone.zero_grad(set_to_none=True)
        self.shard.zero_grad()
