"""Optimisers: sparse row optimisers (SGD, AdamW) for the classifier shard, the
backbone's optimiser, and the learning-rate schedule that drives both.

`TrainingOptimizer.step(step)` is the one call per training step. It sets the
scheduled learning rate on both optimisers (each times its `*_lr_scale`), steps the
backbone's (SGD or AdamW, through the GradScaler when fp16 training uses one) and then
the shard's, which reads only the rows PartialFC sampled (`PartialFC.sampled_grad()`)
and writes them back. `ShardSGD` (optim.name sgd):

    g ← grad · inv_scale + weight_decay · w     (rows sampled this step only)
    m ← momentum · m + g                        (their momentum only)
    w ← w − lr · m

`ShardAdamW` (optim.name adamw), with k the row's own step count (rows sampled k times):

    g ← grad · inv_scale;  w ← w · (1 − lr · weight_decay)     (decoupled decay)
    m ← β1 · m + (1 − β1) · g;  v ← β2 · v + (1 − β2) · g²
    w ← w − lr / (1 − β1^k) · m / (√v / √(1 − β2^k) + ε)

For a sampled row each is exactly `torch.optim.SGD(momentum, weight_decay)` /
`torch.optim.AdamW` at that row's k-th step ("lazy" semantics, as TensorFlow's
LazyAdam); rows that were not sampled, their state and their step count are untouched
(a dense optimiser would decay them and keep moving them with stale moments). At
sample rate 1 every row is sampled every step and both equal the dense optimisers.
Cost is O(sampled rows · D) per step.

The optimiser states ([num_local, D] "stores": momentum, AdamW's two moments) live in
the shard's `ShardStorage` (16-bit and/or on the host, like the shard); rows are read
into the compute dtype, updated in place and written back with the shard's rounding,
through the storage's `read_rows` / `write_rows`. AdamW's per-row step counts are an
int32 vector on the compute device (4 bytes per class). The shard step reads nothing
back to the host: the training loop has already checked that the step is finite, and
the AMP loss scale arrives as a device tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from trainer.partial_fc import PartialFC


class ShardRowOptimizer:
    """The shared walk of a sparse shard update: the sampled rows, in chunks of
    CHUNK_ROWS, with each of the optimiser's stores read into one reused buffer per
    store, updated by the subclass's `_update` and written back (16-bit storage rounds
    in chunks too), so no [sampled, D] temporaries are allocated. Every row sampled with
    fp32 storage on the device: the shard and its stores are updated in place.

    `row_states()` names the stores (a checkpoint saves each as row files, re-sharded
    with their rows); `row_steps` is the per-row step count (None: not kept).
    """

    CHUNK_ROWS = 4096
    row_steps: Tensor | None = None

    def __init__(self, pfc: PartialFC, lr: float, weight_decay: float, state_names: tuple[str, ...]) -> None:
        self.pfc = pfc
        self.lr = lr
        self.weight_decay = weight_decay
        self._states = {name: pfc.storage.new_store(pfc.weight) for name in state_names}
        self._chunks: dict[str, Tensor] = {}  # reused gather buffers, by store name

    def row_states(self) -> dict[str, Tensor]:
        """The optimiser's stores (shaped like the shard: storage dtype and device) by name."""
        return dict(self._states)

    @property
    def state_nbytes(self) -> int:
        """Bytes of the optimiser's per-row state (stores and step counts)."""
        steps = 0 if self.row_steps is None else self.row_steps.nbytes
        return sum(s.nbytes for s in self._states.values()) + steps

    def _chunk(self, name: str, rows: int, like: Tensor) -> Tensor:
        buf = self._chunks.get(name)
        if buf is None or buf.shape[0] < rows:
            buf = self._chunks[name] = like.new_empty(rows, like.shape[1])
        return buf[:rows]

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
        if inv_scale is not None:
            grad.mul_(inv_scale)
        if rows.numel() == weight.shape[0] and not storage.copies_rows:
            self._update(weight, grad, self.row_states(), None)  # every row: in place
            return
        # The rows' weights: forward's private copy when there is one.
        w = sampled.values
        if w is None:
            w = storage.read_rows(weight, rows, grad.new_empty(grad.shape))
        generator = storage.rounding_generator(self.pfc.sample_step)
        for lo in range(0, rows.numel(), self.CHUNK_ROWS):
            part = slice(lo, lo + self.CHUNK_ROWS)
            idx = rows[part]
            states = {
                name: storage.read_rows(store, idx, self._chunk(name, idx.numel(), grad))
                for name, store in self._states.items()
            }
            self._update(w[part], grad[part], states, idx)
            for name, values in states.items():
                storage.write_rows(self._states[name], idx, values, generator)
        storage.write_rows(weight, rows, w, generator)

    def _update(self, w: Tensor, g: Tensor, states: dict[str, Tensor], rows: Tensor | None) -> None:
        """Update rows `w` in place from their gradient `g` (may be clobbered) and their
        states (updated in place); `rows`: their local indices (None: every row)."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        self.pfc.zero_grad()


class ShardSGD(ShardRowOptimizer):
    """Momentum SGD over the rows of a PartialFC shard that the last step sampled.
    `momentum_buffer` has the shard's shape, dtype and device (None without momentum)."""

    def __init__(
        self, pfc: PartialFC, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(
                f"ShardSGD: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0; got "
                f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}"
            )
        super().__init__(pfc, lr, weight_decay, ("momentum",) if momentum > 0 else ())
        self.momentum = momentum

    @property
    def momentum_buffer(self) -> Tensor | None:
        return self._states.get("momentum")

    def _update(self, w: Tensor, g: Tensor, states: dict[str, Tensor], rows: Tensor | None) -> None:
        """SGD on rows in place: g += wd·w; m = momentum·m + g; w −= lr·m."""
        if self.weight_decay:
            g.add_(w, alpha=self.weight_decay)
        m = states.get("momentum")
        if m is not None:
            g = m.mul_(self.momentum).add_(g)
        w.sub_(g, alpha=self.lr)


class ShardAdamW(ShardRowOptimizer):
    """AdamW over the rows of a PartialFC shard that the last step sampled, each row
    bias-corrected by its own step count `row_steps` (int32, one per row of the shard, on
    the compute device): a row updated k times is exactly `torch.optim.AdamW`'s k-th step on it."""

    def __init__(
        self, pfc: PartialFC, lr: float, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or not all(0 <= b < 1 for b in betas) or eps <= 0 or weight_decay < 0:
            raise ValueError(
                f"ShardAdamW: need lr >= 0, 0 <= betas < 1, eps > 0, weight_decay >= 0; got "
                f"lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        super().__init__(pfc, lr, weight_decay, ("exp_avg", "exp_avg_sq"))
        self.beta1, self.beta2 = betas
        self.eps = eps
        # one count per row of the shard (per sub-centre with Sub-center ArcFace)
        self.row_steps = torch.zeros(pfc.weight.shape[0], dtype=torch.int32, device=pfc.device)

    def _update(self, w: Tensor, g: Tensor, states: dict[str, Tensor], rows: Tensor | None) -> None:
        """AdamW on rows in place, in torch.optim.AdamW's order of operations."""
        m, v = states["exp_avg"], states["exp_avg_sq"]
        if rows is None:
            self.row_steps.add_(1)
            steps = self.row_steps
        else:
            idx = rows.to(self.row_steps.device)
            steps = self.row_steps[idx].add_(1)
            self.row_steps[idx] = steps
        k = steps.to(w.dtype).unsqueeze(1)
        if self.weight_decay:
            w.mul_(1 - self.lr * self.weight_decay)
        m.lerp_(g, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        bias1 = 1 - torch.pow(self.beta1, k)
        step_size = torch.full_like(bias1, self.lr).div_(bias1)
        bias2_sqrt = (1 - torch.pow(self.beta2, k)).sqrt_()
        denom = torch.sqrt(v, out=self._chunk("denom", v.shape[0], v))
        denom.div_(bias2_sqrt).add_(self.eps)
        w.sub_(torch.div(m, denom, out=denom).mul_(step_size))


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


def make_shard_optimizer(
    pfc: PartialFC,
    name: Literal["sgd", "adamw"],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> ShardRowOptimizer:
    """The shard's sparse optimiser of the same kind as the backbone's (arcface_torch
    steps backbone and classifier with one optimiser of `config.optimizer`)."""
    if name == "sgd":
        return ShardSGD(pfc, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return ShardAdamW(pfc, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer name must be sgd or adamw, got {name!r}")


class TrainingOptimizer:
    """Backbone optimiser + shard optimiser + schedule, stepped by one call.

    The scheduled learning rate is multiplied by `backbone_lr_scale` for the backbone
    and by `classifier_lr_scale` for the shard (1.0 and 1.0: one learning rate, as
    arcface_torch uses; a fine-tune from pretrained weights may give the backbone a
    fraction of the classifier's)."""

    def __init__(
        self, backbone: torch.optim.Optimizer, shard: ShardRowOptimizer, schedule: LRSchedule,
        backbone_lr_scale: float = 1.0, classifier_lr_scale: float = 1.0,
    ) -> None:
        if backbone_lr_scale < 0 or classifier_lr_scale < 0:
            raise ValueError(
                f"TrainingOptimizer: lr scales must be >= 0, got backbone {backbone_lr_scale}, "
                f"classifier {classifier_lr_scale}"
            )
        self.backbone = backbone
        self.shard = shard
        self.schedule = schedule
        self.backbone_lr_scale = backbone_lr_scale
        self.classifier_lr_scale = classifier_lr_scale

    def set_lr(self, step: int) -> float:
        """Set both learning rates for `step`; returns the scheduled (unscaled) one."""
        lr = self.schedule(step)
        for group in self.backbone.param_groups:
            group["lr"] = lr * self.backbone_lr_scale
        self.shard.lr = lr * self.classifier_lr_scale
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
