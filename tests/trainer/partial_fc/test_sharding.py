"""Class ranges per rank and a world-size-invariant initial classifier."""

import torch

from trainer.partial_fc import shard_range
from trainer.partial_fc.sharding import init_class_centres


def test_init_is_independent_of_sharding():
    full = init_class_centres(20000, 0, 20000, 4, 11, torch.float32)
    for world in (3, 7):
        parts = [
            init_class_centres(20000, *shard_range(20000, world, r), 4, 11, torch.float32)
            for r in range(world)
        ]
        assert torch.equal(torch.cat(parts), full)


def test_shard_range_covers_every_class_once():
    for c, w in [(10, 3), (7, 7), (100, 8), (5, 1)]:
        ranges = [shard_range(c, w, r) for r in range(w)]
        owned = [k for s, n in ranges for k in range(s, s + n)]
        assert owned == list(range(c))
        assert [n for _, n in ranges] == [c // w + (r < c % w) for r in range(w)]
