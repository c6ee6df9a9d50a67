"""Activation checkpointing of one block (backbone.activation_checkpointing: blocks).

A checkpointed block keeps only its input for backward and runs its forward again there
(torch.utils.checkpoint, non-reentrant, RNG state preserved so drop path and dropout
draw the same masks): gradients are those of the plain forward, the activations saved
inside the block are not held between forward and backward.

The recomputation would update BatchNorm running statistics a second time (a plain
torch.utils.checkpoint around an iresnet block does): the block's BatchNorm buffers
are put back as they were after the recomputation, so buffers too equal those of a run
without checkpointing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, x: Tensor, checkpointed: bool) -> Tensor:
    """`block(x)`, checkpointed when `checkpointed` and the block trains with autograd on."""
    if not (checkpointed and block.training and torch.is_grad_enabled()):
        return block(x)
    return checkpoint(block, x, use_reentrant=False, context_fn=partial(_contexts, block))


def _contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    """(around the first forward, around the recomputation)."""
    return contextlib.nullcontext(), _batchnorm_buffers_kept(block)


@contextlib.contextmanager
def _batchnorm_buffers_kept(block: nn.Module) -> Iterator[None]:
    """Restore the running statistics of `block`'s BatchNorms on exit."""
    norms = [m for m in block.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, values in zip(norms, saved):
                for buf, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), values):
                    buf.copy_(value)
