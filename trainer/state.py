"""Where training stands: the plain data (besides tensors) an exact resume needs.

It lives next to the loop, which advances it; a checkpoint stores it as a dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """The training position and counters the loop keeps between steps."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data epoch being read
    batch_in_epoch: int = 0  # batches of `epoch` already consumed by this rank
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    best: dict[str, Any] = field(default_factory=dict)  # {"target", "accuracy", "step"}

    def rolled_over(self, steps_per_epoch: int) -> TrainState:
        """This state, moved to the start of the next epoch when all `steps_per_epoch`
        batches of its epoch are consumed (in place; returned for chaining): the reader
        then opens the next epoch, and a checkpoint resumes there, not in an exhausted one."""
        if self.batch_in_epoch >= steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return self
