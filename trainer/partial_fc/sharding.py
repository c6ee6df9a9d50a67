"""Which classes a rank owns, and class centres that do not depend on the world size.

A checkpoint taken at one world size resumes at another (trainer/checkpoint re-shards
by class range), and a run must start from the same classifier at any world size: so
the shard layout is a formula of (num_classes, world_size, rank) and row c of the
initial classifier is a function of (seed, c) only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Class centres are initialised in blocks of this many rows, each block from its own
# seeded generator, so the initial classifier is the same whatever the world size.
INIT_BLOCK_ROWS = 8192
INIT_STD = 0.01


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, count) of the classes rank `rank` owns: n_r = C//W + (r < C%W), contiguous."""
    base, extra = divmod(num_classes, world_size)
    count = base + (rank < extra)
    start = rank * base + min(rank, extra)
    return start, count


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit generator seed from non-negative integers (the first part
    names the purpose, so initialisation, sampling and rounding never share a stream)."""
    state = np.random.SeedSequence(list(parts)).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def init_class_centres(
    num_classes: int,
    start: int,
    count: int,
    dim: int,
    seed: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype | None = None,
    pin_memory: bool = False,
) -> Tensor:
    """Rows [start, start+count) of an N(0, INIT_STD²) [num_classes, dim] matrix.

    Row c depends only on (seed, c), never on how the classes are sharded. Values are
    drawn in `dtype` and stored in `out_dtype` (default `dtype`; a narrower dtype is
    converted block by block, round to nearest, so no full-size `dtype` copy exists).
    """
    out_dtype = dtype if out_dtype is None else out_dtype
    out = torch.empty(count, dim, dtype=out_dtype, pin_memory=pin_memory)
    first, last = start // INIT_BLOCK_ROWS, (start + count - 1) // INIT_BLOCK_ROWS
    scratch = None  # one block, reused (a fresh one per block fragments the heap)
    for block in range(first, last + 1):
        b0 = block * INIT_BLOCK_ROWS
        rows = min(INIT_BLOCK_ROWS, num_classes - b0)
        g = torch.Generator().manual_seed(mixed_seed(1, seed, block))
        lo, hi = max(start, b0), min(start + count, b0 + rows)
        if (lo, hi) == (b0, b0 + rows) and out_dtype == dtype:  # draw in place, no temporary
            out[lo - start : hi - start].normal_(0.0, INIT_STD, generator=g)
        else:
            if scratch is None:
                scratch = torch.empty(INIT_BLOCK_ROWS, dim, dtype=dtype)
            values = scratch[:rows].normal_(0.0, INIT_STD, generator=g)
            out[lo - start : hi - start] = values[lo - b0 : hi - b0]
    return out
