"""The trained backbone for inference: the one loader evaluation and deploy share.

It reads a checkpoint's replicated state (never the classifier) or the `backbone.pt` +
`config.yaml` a finished run leaves, unpickling weights as tensors only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from trainer.checkpoint.files import load_plain
from trainer.checkpoint.layout import REPLICATED, CheckpointError, resolve
from trainer.checkpoint.loading import read_config, read_index, read_replicated, state_dict_problem
from trainer.config import Config, ConfigError, load_config

FINAL_WEIGHTS = "backbone.pt"
FINAL_CONFIG = "config.yaml"


def load_backbone(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", verify: bool = True
) -> tuple[nn.Module, Config]:
    """The trained backbone (eval mode) and the run's config, from a run output dir (its
    latest checkpoint, else the `backbone.pt` + `config.yaml` a finished run leaves) or a
    checkpoint directory. Reads only the replicated state, never the classifier."""
    path = Path(path)
    try:
        ckpt = resolve(path)
    except CheckpointError:
        if (path / FINAL_WEIGHTS).is_file() and (path / FINAL_CONFIG).is_file():
            return _load_final_backbone(path, map_location)
        raise
    index = read_index(ckpt)
    cfg = read_config(ckpt, index, verify)
    state = read_replicated(ckpt, index, verify)["backbone"]
    module = _model(cfg)
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{ckpt / REPLICATED}: does not fit {cfg.backbone.name} with embedding size "
            f"{cfg.backbone.embedding_size} (its config.yaml): {state_dict_problem(e)}"
        ) from None
    return module.to(map_location).eval(), cfg


def _model(cfg: Config) -> nn.Module:
    from trainer.backbones import get_backbone

    return get_backbone(cfg.backbone.name, embedding_size=cfg.backbone.embedding_size)


def _load_final_backbone(run_dir: Path, map_location: str | torch.device) -> tuple[nn.Module, Config]:
    weights, config = run_dir / FINAL_WEIGHTS, run_dir / FINAL_CONFIG
    try:
        cfg = load_config(config)
    except ConfigError as e:
        raise CheckpointError(f"{config}: {e}") from None
    module = _model(cfg)
    state = load_plain(weights.read_bytes(), weights)  # refuses a file that could run code
    try:
        module.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - not a state_dict, or mismatched weights
        raise CheckpointError(
            f"{weights}: cannot be loaded as {cfg.backbone.name} with embedding size "
            f"{cfg.backbone.embedding_size} ({config}): {state_dict_problem(e)}; the weights "
            f"and {FINAL_CONFIG} must come from the same run"
        ) from None
    return module.to(map_location).eval(), cfg
