"""What a checkpoint saves and restores: the training objects of one rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.config import Config
from trainer.ema import BackboneEMA
from trainer.optim import ShardRowOptimizer
from trainer.partial_fc import PartialFC


@dataclass
class TrainingParts:
    """The objects a checkpoint saves and restores."""

    module: nn.Module  # the backbone, without its DDP wrapper
    pfc: PartialFC
    shard_optimizer: ShardRowOptimizer  # ShardSGD or ShardAdamW
    backbone_optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    config: Config | None = None
    ema: BackboneEMA | None = None  # the backbone's average (backbone.ema_decay > 0)
