"""The trained backbone for inference: the one loader evaluation and deploy share.

It reads a checkpoint's replicated state (never the classifier) or the `backbone.pt` +
`config.yaml` a finished run leaves, unpickling weights as tensors only. Bare weights
(released arcface_torch `backbone.pth` / `model.pt`, its `checkpoint_gpu_0.pt`, an
arcshard `backbone.pt`) come with no config: `load_weights` builds the named backbone,
`check_weights` refuses a file that does not fit it naming the first mismatching tensor
and what the file looks like (`describe_weights`); `backbone.init` uses the same two.

Which weights (`WEIGHTS`): a checkpoint of a run with `backbone.ema_decay` > 0 holds the
trained backbone and its average (trainer/ema.py). "ema", the default everywhere trained
weights are consumed, takes the average when the checkpoint has one (else the trained
weights); "raw" (the CLIs' `--raw-weights`) the trained weights. The loader says which it
took (`TrainedBackbone.weights`, and a log line).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from trainer.checkpoint.files import load_plain
from trainer.checkpoint.layout import REPLICATED, CheckpointError, resolve
from trainer.checkpoint.loading import read_config, read_index, read_replicated, state_dict_problem
from trainer.config import Config, ConfigError, load_config

log = logging.getLogger("trainer.checkpoint")

FINAL_WEIGHTS = "backbone.pt"  # the served weights: the average when the run kept one
FINAL_RAW_WEIGHTS = "backbone_raw.pt"  # with an average: the trained weights
FINAL_CONFIG = "config.yaml"
WEIGHTS = ("ema", "raw")


class TrainedBackbone(NamedTuple):
    module: nn.Module  # eval mode
    config: Config  # the run's
    weights: str  # which weights `module` holds: "ema" (the average) or "raw" (the trained ones)


def checkpoint_weights(replicated: dict[str, Any], weights: str, where: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone state_dict of a checkpoint's replicated state (read from `where`) for
    `weights` ("ema": the average when there is one, else the trained weights; "raw": the
    trained weights), and which of the two it is."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHTS)}")
    ema = replicated.get("backbone_ema")
    if weights == "raw" or ema is None:
        return replicated["backbone"], "raw"
    if not isinstance(ema, dict) or not isinstance(ema.get("weights"), dict):
        raise CheckpointError(f"{where}: backbone_ema is not a state_dict; the file is damaged")
    return ema["weights"], "ema"


def load_backbone(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", verify: bool = True,
    weights: str = "ema",
) -> TrainedBackbone:
    """The trained backbone (eval mode), the run's config and which weights (`WEIGHTS`:
    "ema" takes the average when the checkpoint has one), from a run output dir (its latest
    checkpoint, else the `backbone.pt` + `config.yaml` a finished run leaves: its trained
    weights) or a checkpoint directory. Reads only the replicated state, never the classifier."""
    path = Path(path)
    try:
        ckpt = resolve(path)
    except CheckpointError:
        if (path / FINAL_WEIGHTS).is_file() and (path / FINAL_CONFIG).is_file():
            return _load_final_backbone(path, map_location, weights)
        raise
    index = read_index(ckpt)
    cfg = read_config(ckpt, index, verify)
    state, used = checkpoint_weights(read_replicated(ckpt, index, verify), weights, ckpt / REPLICATED)
    log.info("%s: %s backbone weights%s", ckpt, used,
             " (the checkpoint has no EMA)" if used != weights else "")
    module = _model(cfg)
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{ckpt / REPLICATED}: does not fit {cfg.backbone.name} with embedding size "
            f"{cfg.backbone.embedding_size} (its config.yaml): {state_dict_problem(e)}"
        ) from None
    return TrainedBackbone(module.to(map_location).eval(), cfg, used)


def _model(cfg: Config) -> nn.Module:
    from trainer.backbones import get_backbone

    return get_backbone(cfg.backbone.name, embedding_size=cfg.backbone.embedding_size)


def _load_final_backbone(run_dir: Path, map_location: str | torch.device, wanted: str) -> TrainedBackbone:
    """A finished run's `backbone.pt` (the average when the run kept one: then its trained
    weights are `backbone_raw.pt`) for `wanted` ("ema" or "raw")."""
    raw = run_dir / FINAL_RAW_WEIGHTS
    used = ("raw" if wanted == "raw" or not raw.is_file() else "ema")
    weights, config = (raw if wanted == "raw" and raw.is_file() else run_dir / FINAL_WEIGHTS), run_dir / FINAL_CONFIG
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
    log.info("%s: %s backbone weights (a finished run's final weights)", weights, used)
    return TrainedBackbone(module.to(map_location).eval(), cfg, used)


# Blocks per stage -> our iresnet name, to say what a file of unknown origin holds.
def _iresnet_name(state: dict[str, torch.Tensor]) -> str | None:
    from trainer.backbones.iresnet import IRESNET_LAYERS

    blocks = tuple(
        1 + max((int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")), default=-1)
        for i in range(1, 5)
    )
    return next((f"iresnet{d}" for d, layers in IRESNET_LAYERS.items() if layers == blocks), None)


def describe_weights(state: dict[str, torch.Tensor]) -> tuple[str | None, int | None]:
    """(backbone name, embedding size) a backbone state_dict looks like; None where it
    cannot tell. arcface_torch's r18..r200 are our iresnet18..200, its mbf our mobilefacenet."""
    if "features.layers.3.weight" in state:  # GDC head: Linear then BatchNorm1d
        return "mobilefacenet", int(state["features.layers.3.weight"].shape[0])
    if "conv1.weight" in state and "features.weight" in state:
        return _iresnet_name(state), int(state["features.weight"].shape[0])
    return None, None


def _looks_like(state: dict[str, torch.Tensor]) -> str:
    name, size = describe_weights(state)
    if name is None and size is None:
        return "no backbone arcshard knows"
    return f"{name or 'an unknown iresnet depth'} with embedding size {size}"


def first_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """The first tensor (in the model's order) whose name or shape differs, as one phrase."""
    for key, tensor in expected.items():
        if key not in state:
            return f"{key} is missing from the file"
        if not isinstance(state[key], torch.Tensor) or state[key].shape != tensor.shape:
            got = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            return f"{key} is {got} in the file, {tuple(tensor.shape)} in the model"
    extra = [k for k in state if k not in expected]
    return f"{extra[0]} is in the file but not in the model" if extra else None


def read_weights(path: str | os.PathLike[str], weights: str = "ema") -> dict[str, torch.Tensor]:
    """A backbone state_dict from an arcface_torch `backbone.pth` / `model.pt` (a bare
    state_dict), its `checkpoint_gpu_{rank}.pt` (`state_dict_backbone`), an arcshard
    `backbone.pt`, or an arcshard run / checkpoint directory (`weights` chooses its EMA or
    its trained weights, as in `load_backbone`); tensors only (unpickled with
    weights_only=True). CheckpointError names the file."""
    path = Path(path)
    if path.is_dir():
        try:
            ckpt = resolve(path)
        except CheckpointError:
            if not (path / FINAL_WEIGHTS).is_file():
                raise
            raw = path / FINAL_RAW_WEIGHTS
            return read_weights(raw if weights == "raw" and raw.is_file() else path / FINAL_WEIGHTS)
        state, used = checkpoint_weights(read_replicated(ckpt, read_index(ckpt)), weights, ckpt / REPLICATED)
        log.info("%s: %s backbone weights", ckpt, used)
        return state
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read weights ({e.strerror or e})") from None
    state = load_plain(data, path)
    if isinstance(state, dict) and isinstance(state.get("state_dict_backbone"), dict):
        state = state["state_dict_backbone"]  # an arcface_torch checkpoint_gpu_{rank}.pt
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: not a backbone state_dict (a dict of tensors, or an arcface_torch "
            "checkpoint with state_dict_backbone)"
        )
    return state


def check_weights(
    state: dict[str, torch.Tensor], path: str | os.PathLike[str], name: str, embedding_size: int
) -> None:
    """Refuse `state` (from `path`) unless it fits backbone `name` with `embedding_size`
    exactly: one line naming the first mismatching tensor and what the file looks like."""
    from trainer.backbones import get_backbone

    with torch.device("meta"):  # shapes only: nothing allocated
        expected = get_backbone(name, embedding_size=embedding_size).state_dict()
    problem = first_mismatch(expected, state)
    if problem is not None:
        raise CheckpointError(
            f"{path}: does not fit {name} with embedding size {embedding_size}: {problem}; the "
            f"file looks like {_looks_like(state)}"
        )


def load_weights(
    path: str | os.PathLike[str], name: str, embedding_size: int | None = None,
    map_location: str | torch.device = "cpu", weights: str = "ema",
) -> tuple[nn.Module, Config]:
    """Backbone `name` (eval mode) with the bare weights at `path` (`read_weights`, which
    `weights` is passed to), and a default Config naming it; `embedding_size` None: the
    file's own."""
    from trainer.backbones import available_backbones, get_backbone

    if name not in available_backbones():
        raise CheckpointError(f"--backbone {name}: not one of {', '.join(available_backbones())}")
    state = read_weights(path, weights)
    size = embedding_size if embedding_size is not None else describe_weights(state)[1] or 512
    check_weights(state, path, name, size)
    module = get_backbone(name, embedding_size=size)
    module.load_state_dict(state)
    cfg = Config()
    cfg.backbone.name, cfg.backbone.embedding_size = name, size
    return module.to(map_location).eval(), cfg
