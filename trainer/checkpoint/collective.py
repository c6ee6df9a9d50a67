"""Keeping ranks in step through a collective save or load.

A failure on one rank must fail every rank: a rank that raised while the others wait
in the next collective would hang the job until the process-group timeout.
"""

from __future__ import annotations

import torch.distributed as dist

from trainer.checkpoint.layout import CheckpointError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_ok(error: str | None, what: str) -> None:
    """Raise CheckpointError on every rank if any rank reported an error: its own
    message on the failing rank, 'rank R failed to <what>: ...' on the others."""
    if world()[1] == 1:
        if error:
            raise CheckpointError(error)
        return
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        rank, first = bad[0]
        raise CheckpointError(error or f"rank {rank} failed to {what}: {first}")
