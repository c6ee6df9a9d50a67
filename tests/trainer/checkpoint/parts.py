"""A small classifier's training parts, for tests that save and load them directly."""

import hashlib
import json
from pathlib import Path

import torch

from trainer.checkpoint import TrainingParts
from trainer.margins import CombinedMargin
from trainer.optim import ShardSGD
from trainer.partial_fc import PartialFC

NUM_CLASSES, DIM = 1003, 16  # odd: shards of unequal size at every world size


def pfc_parts(momentum=0.9, storage="fp32", offload="none") -> TrainingParts:
    """Parts of this rank (a process group must be up: PartialFC reads its rank)."""
    pfc = PartialFC(NUM_CLASSES, DIM, sample_rate=1.0, margin=CombinedMargin(16.0, 1.0, 0.3, 0.0),
                    seed=3, storage=storage, offload=offload)
    shard = ShardSGD(pfc, lr=0.5, momentum=momentum, weight_decay=0.0)
    return TrainingParts(torch.nn.Linear(2, 2), pfc, shard)


def reforge_index(ckpt: Path, rel: str) -> None:
    """Make `ckpt`'s index.json match the current bytes of file `rel` (what someone
    handing over a doctored checkpoint would do)."""
    data = (ckpt / rel).read_bytes()
    index = json.loads((ckpt / "index.json").read_text())
    index["files"][rel].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "index.json").write_text(json.dumps(index))
