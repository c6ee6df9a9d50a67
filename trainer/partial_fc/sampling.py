"""Which shard rows a step scores: the batch's positives plus uniform negatives.

The draw is a pure function of (seed, step, rank) and of the labels, so a resumed run
samples the same classes. It runs on the device the labels are on (the compute device)
with a generator seeded from (seed, step, rank) only, never on where the shard is
stored: toggling host offload across a resume must not change the sampled rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.partial_fc.sharding import mixed_seed


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The generator seed for negative sampling at (seed, step, rank)."""
    return mixed_seed(0, seed, step, rank)


def sample_rows(
    labels: Tensor,
    class_start: int,
    num_local: int,
    num_sample: int,
    *,
    seed: int,
    step: int,
    rank: int,
) -> Tensor:
    """Sorted local rows (on `labels.device`) to score: every class of `labels` in
    [class_start, class_start + num_local) and uniformly drawn other rows, `num_sample`
    in total, or all positives when there are more of them (reading their count is one
    host read, needed only when `labels` could hold more than `num_sample` classes)."""
    device = labels.device
    if num_sample >= num_local:
        return torch.arange(num_local, device=device)
    local = labels - class_start
    owned = (local >= 0) & (local < num_local)
    slot = torch.where(owned, local, num_local)  # slot num_local = "not mine"
    g = torch.Generator(device=device).manual_seed(sampling_seed(seed, step, rank))
    score = torch.rand(num_local + 1, generator=g, device=device)
    score.index_fill_(0, slot, 2.0)  # positives outrank every negative (rand < 1)
    score = score[:num_local]
    k = num_sample
    if labels.numel() > k:  # positives might not fit: needs their count (host read)
        k = max(k, int((score > 1.5).sum()))
    return score.topk(k, sorted=False).indices.sort().values


def subcenter_rows(class_rows: Tensor, subcenters: int) -> Tensor:
    """The shard rows of sorted local classes `class_rows` when each class has
    `subcenters` consecutive rows (class i: rows i·K … i·K + K − 1), sorted."""
    if subcenters == 1:
        return class_rows
    offsets = torch.arange(subcenters, device=class_rows.device)
    return (class_rows.unsqueeze(1) * subcenters + offsets).reshape(-1)
