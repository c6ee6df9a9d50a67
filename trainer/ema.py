"""An exponential moving average (EMA) of the backbone: `backbone.ema_decay`.

`BackboneEMA` holds an eager copy of the backbone (same class, same state_dict keys, so
every loader of backbone weights loads it) and, after every *applied* optimizer step,
moves it towards the trained weights: at the t-th update (t = 0, 1, ...)

    d_t = min(decay, (1 + t) / (10 + t))        average <- d_t · average + (1 − d_t) · weights

The warm-up term matters: the first weights are random, and a plain d = 0.999 would keep
averaging them in for thousands of steps (their share after n steps is 0.999ⁿ: still 37 %
after 1000), while small-data runs have only hundreds of steps. With the warm-up the
average follows the weights closely at first (d_0 = 0.1, d_90 = 0.91) and only later
averages over ~1/(1 − decay) steps. A skipped (non-finite) step changes no weight and is
not an update: t counts applied steps since the average started (it lives on the host, a
Python int, known without reading anything back from the device).

Buffers: BatchNorm running mean and variance are *averaged* with the same d_t (as
torchvision's EMA, `use_buffers=True`, and timm's do): the averaged weights' activations
are an average over the same window of steps, so statistics averaged over that window fit
them better than the raw network's statistics of its last ~10 batches would (BatchNorm
momentum 0.1). Integer buffers (`num_batches_tracked`) are copied.

Identical on every rank: DDP keeps the parameters identical, but a rank's BatchNorm
buffers after its forward hold its own batch's statistics (DDP broadcasts rank 0's at the
start of the next forward), so after averaging, rank 0's floating buffers are broadcast
to the other ranks: one collective on one flat tensor (the EMA's floating buffers are
views into it), 0.15 MB for iresnet50, no host read (on NCCL it is queued on the stream).

No host synchronisation: the update is one `torch._foreach_lerp_` over parameters and
floating buffers with a Python-float weight, one `torch._foreach_copy_` of the integer
buffers and that broadcast; nothing is read back to the host. (`torch.optim.swa_utils.
AveragedModel.update_parameters` is not used: it compares a device tensor on the host.)

The copy is made from the eager module before `backbone.compile()` (trainer/run.py), and
the update reads the parameters of that underlying module, never a DDP or compile wrapper.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["BackboneEMA", "effective_decay"]


def effective_decay(decay: float, updates: int) -> float:
    """d_t of the `updates`-th update (0-based): `decay` after the warm-up."""
    return min(decay, (1 + updates) / (10 + updates))


class BackboneEMA:
    """The averaged copy of `source` (an unwrapped backbone) and its update."""

    def __init__(self, source: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"backbone.ema_decay: {decay} must be in (0, 1) for an average")
        self.decay = decay
        self.updates = 0  # applied updates since the average started: t of the next one is this
        self.source = source
        self.module = copy.deepcopy(source).eval().requires_grad_(False)
        self._flat_buffers = _flatten_float_buffers(self.module)
        ours, theirs = self.module.state_dict(keep_vars=True), source.state_dict(keep_vars=True)
        if list(ours) != list(theirs):
            raise ValueError("BackboneEMA: the copy's state_dict keys differ from the backbone's")
        floats = [k for k, v in ours.items() if v.is_floating_point()]
        others = [k for k in ours if k not in set(floats)]
        self._avg, self._src = [ours[k].data for k in floats], [theirs[k].data for k in floats]
        self._copy_dst, self._copy_src = [ours[k].data for k in others], [theirs[k].data for k in others]

    @torch.no_grad()
    def update(self) -> None:
        """One update after an applied optimizer step (collective when the process group
        has more than one rank: every rank calls it at the same steps)."""
        weight = 1.0 - effective_decay(self.decay, self.updates)
        torch._foreach_lerp_(self._avg, self._src, weight)
        if self._copy_dst:
            torch._foreach_copy_(self._copy_dst, self._copy_src)
        self._broadcast_buffers()
        self.updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average afresh from the backbone's current weights (a new run, after
        `backbone.init`; a resume from a checkpoint without an average)."""
        self.module.load_state_dict(self.source.state_dict())
        self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: the averaged weights (the backbone's keys), the update
        count (exact resume of the warm-up) and the decay (for `arcshard-ckpt info`)."""
        return {"weights": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output; the decay stays this run's `backbone.ema_decay`."""
        if not isinstance(state, dict) or not isinstance(state.get("weights"), dict):
            raise TypeError("not an EMA state (a dict with 'weights' and 'updates')")
        updates = state.get("updates")
        if not isinstance(updates, int) or updates < 0:
            raise ValueError(f"EMA update count {updates!r} is not an integer >= 0")
        self.module.load_state_dict(state["weights"])
        self.updates = updates

    def _broadcast_buffers(self) -> None:
        if self._flat_buffers is not None and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(self._flat_buffers, src=0)


def _flatten_float_buffers(module: nn.Module) -> Tensor | None:
    """Re-point `module`'s floating-point buffers at views of one flat tensor (returned;
    None without such buffers), so broadcasting them is one collective. All must share a
    dtype and device (they do for every backbone here: fp32 BatchNorm statistics)."""
    named = [(m, name, b) for m in module.modules() for name, b in m._buffers.items()
             if b is not None and b.is_floating_point()]
    if not named:
        return None
    kinds = {(b.dtype, b.device) for _, _, b in named}
    if len(kinds) != 1:
        raise ValueError(f"BackboneEMA: floating buffers of several dtypes/devices {sorted(map(str, kinds))}")
    flat = torch.cat([b.detach().reshape(-1) for _, _, b in named])
    offset = 0
    for owner, name, b in named:
        owner._buffers[name] = flat[offset : offset + b.numel()].view_as(b)
        offset += b.numel()
    return flat
