"""Reading a checkpoint back: collective, verified, re-sharded to this world size.

Every rank reads the replicated state, exactly the saved rows of its own class range
(from whichever saved shards overlap it, at any saved world size) and, when the world
size is unchanged, its RNG state; every file read is checked against `index.json`
when `verify` is on, and every `.pt` file is unpickled as tensors and plain data only.
A failure on any rank raises `CheckpointError` on every rank (no rank is left waiting
in a collective).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainer.checkpoint import rng
from trainer.checkpoint.collective import all_ok, world
from trainer.checkpoint.files import check_file, load_plain, read_verified
from trainer.checkpoint.layout import (
    CONFIG, FORMAT, FORMAT_VERSION, INDEX, REPLICATED, CheckpointError, rng_name,
)
from trainer.checkpoint.parts import TrainingParts
from trainer.checkpoint.rowfiles import STEPS, read_blocks, row_bytes, row_format
from trainer.config import Config, ConfigError, config_changes, load_config
from trainer.partial_fc import shard_range
from trainer.state import TrainState

log = logging.getLogger("trainer.checkpoint")


def read_index(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's `index.json`, checked to be a format this code reads."""
    path = ckpt / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{path}: a JSON {type(index).__name__}, not an index; the checkpoint is damaged")
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {index.get('format')!r} version {index.get('version')!r}; this "
            f"arcshard reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return index


def read_config(ckpt: Path, index: dict[str, Any], verify: bool = True) -> Config:
    """The resolved config the checkpoint's run was using."""
    entry = index["files"].get(CONFIG)
    if entry is None:
        raise CheckpointError(f"{ckpt / CONFIG}: not in the checkpoint")
    read_verified(ckpt, CONFIG, entry, verify)
    try:
        return load_config(ckpt / CONFIG)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / CONFIG}: {e}") from None


def read_replicated(ckpt: Path, index: dict[str, Any], verify: bool = True) -> dict[str, Any]:
    """The state rank 0 saved for every rank: backbone, its optimizer, scaler, position."""
    data = read_verified(ckpt, REPLICATED, index["files"][REPLICATED], verify)
    state = load_plain(data, ckpt / REPLICATED)
    if not isinstance(state, dict) or "backbone" not in state:
        raise CheckpointError(f"{ckpt / REPLICATED}: not an arcshard replicated state; the file is damaged")
    return state


def state_dict_problem(error: Exception) -> str:
    """The informative line of a load_state_dict error (the first size mismatch or missing
    key), not its generic first line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = [line for line in lines[1:] if line.startswith(("size mismatch", "Missing", "Unexpected"))]
    return (detail or lines or [type(error).__name__])[0][:300]


def load(
    path: str | os.PathLike[str],
    parts: TrainingParts,
    *,
    verify: bool = True,
    config: Config | None = None,
) -> TrainState:
    """Restore `parts` from checkpoint `path` (collective; re-shards to this world size).

    `config` (the run's current config) is compared with the saved one: a change of
    num_classes, embedding size or backbone raises CheckpointError listing the
    differences; other changes (lr, batch size, world size, ...) are logged.
    """
    rank, size = world()
    error: str | None = None
    result: TrainState | None = None
    try:
        result = _load_local(Path(path), parts, rank, size, verify, config)
    except CheckpointError as e:
        error = str(e)
    all_ok(error, "load the checkpoint")
    assert result is not None
    return result


def _check_config(ckpt: Path, index: dict[str, Any], config: Config, rank: int, verify: bool) -> None:
    shape, other = config_changes(read_config(ckpt, index, verify), config)
    if shape:
        raise CheckpointError(
            f"{ckpt}: saved for a different model ({'; '.join(shape)}); these fix tensor "
            "shapes: use the original values or start a new run (another run.output_dir)"
        )
    if other and rank == 0:
        log.info("config differs from the checkpoint's: %s", "; ".join(other))


def _load_local(
    ckpt: Path, parts: TrainingParts, rank: int, size: int, verify: bool, config: Config | None
) -> TrainState:
    index = read_index(ckpt)
    pfc = parts.pfc
    if config is not None:
        _check_config(ckpt, index, config, rank, verify)
    saved = (index["num_classes"], index.get("subcenters", 1), index["embedding_size"])
    if saved != (pfc.num_classes, pfc.subcenters, pfc.embedding_size):
        raise CheckpointError(
            f"{ckpt / INDEX}: classifier is {saved[0]} classes x {saved[1]} sub-centres x "
            f"{saved[2]}, this run's is {pfc.num_classes} x {pfc.subcenters} x {pfc.embedding_size}"
        )
    if index["world_size"] != size and rank == 0:
        log.info("re-sharding the classifier from %d to %d ranks", index["world_size"], size)
    replicated = read_replicated(ckpt, index, verify)
    _restore_replicated(ckpt, parts, replicated)
    _restore_ema(ckpt, parts, replicated.get("backbone_ema"), rank)
    _restore_rows(ckpt, index, parts, size, rank, verify)
    pfc.sample_step = int(replicated["partial_fc"]["sample_step"])
    _restore_margin(ckpt, pfc.margin, replicated["partial_fc"].get("margin", {}), rank)
    state = TrainState(**replicated["train_state"])
    rel = rng_name(rank)
    if index["world_size"] == size and rel in index["files"]:
        rng.restore(read_verified(ckpt, rel, index["files"][rel], verify), ckpt / rel)
    elif rank == 0:
        log.info("world size changed: RNG streams (dropout, augmentation) restart from the seed")
    return state


def _restore_replicated(ckpt: Path, parts: TrainingParts, replicated: dict[str, Any]) -> None:
    """Backbone, backbone optimizer and scaler (a `shard_optimizer` entry, which older
    checkpoints hold, is ignored: the shard optimizer's settings come from the config)."""
    try:
        parts.module.load_state_dict(replicated["backbone"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt / REPLICATED}: backbone does not match this model: {state_dict_problem(e)}"
        ) from None
    if parts.backbone_optimizer is not None and replicated["backbone_optimizer"] is not None:
        parts.backbone_optimizer.load_state_dict(replicated["backbone_optimizer"])
    if parts.scaler is not None and replicated["scaler"] is not None:
        parts.scaler.load_state_dict(replicated["scaler"])


def _restore_ema(ckpt: Path, parts: TrainingParts, saved: Any, rank: int) -> None:
    """The backbone's average and its update count (exact resume of the warm-up). A
    checkpoint without one (backbone.ema_decay was 0, or an older arcshard) starts the
    average from the weights just loaded; one this run does not keep is left unused."""
    ema = parts.ema
    if ema is None:
        if saved is not None and rank == 0:
            log.info("%s: has backbone EMA weights; backbone.ema_decay is 0, so this run neither "
                     "updates nor saves them", ckpt)
        return
    if saved is None:
        ema.reset()
        if rank == 0:
            log.info("%s: no backbone EMA weights (saved with backbone.ema_decay=0 or by an older "
                     "arcshard): the average starts from the loaded weights", ckpt)
        return
    try:
        ema.load_state_dict(saved)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{ckpt / REPLICATED}: backbone EMA does not match this model: {state_dict_problem(e)}"
        ) from None


def _restore_margin(ckpt: Path, margin: torch.nn.Module, saved: dict[str, Tensor], rank: int) -> None:
    """The margin's running statistics (CurricularFace t, AdaFace norm mean/std), when
    the checkpoint has this margin's; otherwise (another margin.type) they start fresh."""
    if set(saved) == set(margin.state_dict()):
        margin.load_state_dict(saved)
    elif rank == 0:
        log.info("%s: margin statistics %s are not %s's: starting them fresh",
                 ckpt, sorted(saved), type(margin).__name__)


def _restore_rows(
    ckpt: Path, index: dict[str, Any], parts: TrainingParts, size: int, rank: int, verify: bool
) -> None:
    """This rank's classifier rows and their optimiser state (momentum, or AdamW's moments
    and step counts), from whatever shards hold them; a state the checkpoint lacks (saved
    by another optimiser) starts at 0."""
    pfc = parts.pfc
    start = pfc.class_start
    assert (start, pfc.num_local) == shard_range(pfc.num_classes, size, rank)
    pfc.flush()  # host offload: no pending write-back may land on the restored rows
    with torch.no_grad():
        _load_rows(ckpt, index, "weight", pfc.weight.data.view(pfc.num_local, -1), start, verify)
        opt = parts.shard_optimizer
        states = opt.row_states()
        if opt.row_steps is not None:
            states[STEPS] = opt.row_steps.view(-1, 1)
        for kind, tensor in states.items():
            if index["classifier"].get(kind):
                _load_rows(ckpt, index, kind, tensor.view(pfc.num_local, -1), start, verify)
            else:
                tensor.zero_()
                log.warning("%s has no classifier %s (saved without it): starting at 0", ckpt, kind)


def _load_rows(
    ckpt: Path, index: dict[str, Any], kind: str, dst: Tensor, start: int, verify: bool
) -> None:
    """Copy rows [start, start + len(dst)) of the saved `kind` matrix into `dst`."""
    end = start + dst.shape[0]
    dtype, dim = row_format(index, kind)
    covered = 0
    for shard in sorted(index["classifier"][kind], key=lambda s: s["start"]):
        lo, hi = max(start, shard["start"]), min(end, shard["end"])
        if lo >= hi:
            continue
        entry = index["files"][shard["file"]]
        path = check_file(ckpt, shard["file"], entry)
        first, last = lo - shard["start"], hi - shard["start"]
        for row, data in read_blocks(path, entry, row_bytes(index, kind), first, last, verify):
            rows = torch.frombuffer(data, dtype=dtype).view(-1, dim)
            a, b = max(row, first), min(row + rows.shape[0], last)
            base = shard["start"] - start
            dst[base + a : base + b].copy_(rows[a - row : b - row])
        covered += hi - lo
    if covered != end - start:
        raise CheckpointError(
            f"{ckpt / INDEX}: the saved {kind} shards do not cover classes [{start}, {end})"
        )
