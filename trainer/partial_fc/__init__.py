"""The sharded classifier, `PartialFC`, and the pieces it is made of.

sharding (class ranges per rank, world-size-invariant initialisation), sampling (the
rows a step scores), functional (the fused margin softmax and the all-gather), storage
(`ShardStorage`: 16-bit formats, stochastic rounding, host offload), module (`PartialFC`).
"""

from trainer.partial_fc.module import PartialFC
from trainer.partial_fc.sharding import shard_range

__all__ = ["PartialFC", "shard_range"]
