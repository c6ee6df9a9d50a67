"""Writing a checkpoint: collective, atomic, and committed only once every rank is done.

Every rank calls `save`: each writes its classifier rows and RNG state (rank 0 also the
replicated state and config) atomically under the step directory; the per-rank file
entries are gathered on rank 0, which writes `index.json`, then `COMPLETE`, then
replaces `latest`, then prunes beyond `checkpoint.keep`. A crash at any point leaves
`latest` naming the previous complete checkpoint; the half-written directory is removed
by the next save or start-up. A failure on any rank (disk full, say) is one
CheckpointError line, logged and raised on every rank.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.distributed as dist

from data_tools.atomic import write_atomic
from trainer.checkpoint import rng
from trainer.checkpoint.collective import all_ok, world
from trainer.checkpoint.files import torch_bytes, writing
from trainer.checkpoint.layout import (
    COMPLETE, CONFIG, FORMAT, FORMAT_VERSION, INDEX, LATEST, REPLICATED, CheckpointError,
    commit_pointer, is_complete, prune, rng_name, step_dir_name,
)
from trainer.checkpoint.loading import read_index
from trainer.checkpoint.parts import TrainingParts
from trainer.checkpoint.rowfiles import (
    BLOCK_ROWS, CLASSIFIER_FILE, STEPS, classifier_name, write_rows,
)
from trainer.state import TrainState

log = logging.getLogger("trainer.checkpoint")


def save(
    root: str | os.PathLike[str],
    parts: TrainingParts,
    state: TrainState,
    *,
    keep: int = 3,
    inject_kill: bool = False,
    block_rows: int = BLOCK_ROWS,
    run_id: str | None = None,
) -> Path:
    """Write checkpoint `step-{state.step}` under `root` (collective); returns its path.

    `latest` names it only after every rank's files are on disk and the index and the
    COMPLETE marker are written. A complete checkpoint of the same step saved by this
    run (same `run_id`) is kept as is; one saved by another run is refused.
    """
    root = Path(root)
    rank, size = world()
    ckpt = root / step_dir_name(state.step)
    try:
        decision = [_prepare(ckpt, run_id) if rank == 0 else None]
        if size > 1:
            dist.broadcast_object_list(decision, src=0)
        if decision[0] == "exists":
            if rank == 0:
                with writing(root / LATEST):
                    commit_pointer(root, LATEST, ckpt)
            return ckpt
        if decision[0] != "write":
            raise CheckpointError(str(decision[0]))
        entries = _collect(lambda: _write_rank_files(
            ckpt, parts, state, rank, inject_kill and rank == size - 1, block_rows
        ), "write its checkpoint files")
        gathered: list[Any] = [None] * size
        if size > 1:
            dist.all_gather_object(gathered, entries)
        else:
            gathered = [entries]
        commit = (lambda: _commit(root, ckpt, parts, state, size, gathered, keep, run_id))
        _collect(commit if rank == 0 else (lambda: None), "commit the checkpoint")
    except CheckpointError as e:
        log.error("checkpoint step %d not saved: %s", state.step, e)
        raise
    return ckpt


def _collect(work: Callable[[], Any], what: str) -> Any:
    """Run `work` on this rank; a CheckpointError on any rank raises on every rank."""
    result, error = None, None
    try:
        result = work()
    except CheckpointError as e:
        error = str(e)
    all_ok(error, what)
    return result


def _prepare(ckpt: Path, run_id: str | None) -> str:
    """Rank 0: "exists" (already saved by this run), "write" (fresh empty directory made)
    or the error that stops the save."""
    try:
        if is_complete(ckpt):
            other = read_index(ckpt).get("run_id")
            if run_id is not None and other is not None and other != run_id:
                return (f"{ckpt}: already saved by another run (run id {other}; this run is "
                        f"{run_id}): two runs share run.output_dir; give this one its own")
            return "exists"
        with writing(ckpt):
            if ckpt.exists():
                shutil.rmtree(ckpt)
            ckpt.mkdir(parents=True)
    except CheckpointError as e:
        return str(e)
    return "write"


def _replicated_state(parts: TrainingParts, state: TrainState) -> dict[str, Any]:
    """Rank 0's `replicated.pt`; `backbone_ema` only with an average (backbone.ema_decay > 0:
    a run without one writes what it always did)."""
    ema = {"backbone_ema": parts.ema.state_dict()} if parts.ema is not None else {}
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "backbone": parts.module.state_dict(),
        "backbone_optimizer": (
            parts.backbone_optimizer.state_dict() if parts.backbone_optimizer is not None else None
        ),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "train_state": asdict(state),
        "partial_fc": {
            "sample_step": parts.pfc.sample_step, "seed": parts.pfc.seed,
            "margin": {k: v.cpu() for k, v in parts.pfc.margin.state_dict().items()},
        },
        **ema,
    }


def _write_file(ckpt: Path, rel: str, data: bytes) -> dict[str, Any]:
    with writing(ckpt / rel):
        return {"bytes": len(data), "sha256": write_atomic(ckpt / rel, data)}


def _write_rank_files(
    ckpt: Path, parts: TrainingParts, state: TrainState, rank: int, kill_midway: bool,
    block_rows: int,
) -> dict[str, dict[str, Any]]:
    """This rank's files; returns {relative path: index entry}."""
    pfc = parts.pfc
    pfc.flush()  # host offload: land the last step's write-back before reading the rows
    start, end = pfc.class_start, pfc.class_start + pfc.num_local
    opt = parts.shard_optimizer
    rows = {"weight": pfc.weight.data, **opt.row_states()}
    if opt.row_steps is not None:
        rows[STEPS] = opt.row_steps.view(-1, 1)
    entries: dict[str, dict[str, Any]] = {}
    for kind, tensor in rows.items():
        tensor = tensor.view(pfc.num_local, -1)  # one file row per class: its K sub-centres
        rel = classifier_name(kind, start, end)
        with writing(ckpt / rel):
            entries[rel] = write_rows(ckpt / rel, tensor, block_rows)
        if kill_midway:  # fault injection: die with the shard half-written, before the commit
            log.warning("checkpoint.inject_kill_during_save: killing rank %d mid-save", rank)
            os.kill(os.getpid(), signal.SIGKILL)
    entries[rng_name(rank)] = _write_file(ckpt, rng_name(rank), torch_bytes(rng.capture()))
    if rank == 0:
        entries[REPLICATED] = _write_file(ckpt, REPLICATED, torch_bytes(_replicated_state(parts, state)))
        if parts.config is not None:
            entries[CONFIG] = _write_file(ckpt, CONFIG, parts.config.to_yaml().encode())
    return entries


def _commit(
    root: Path, ckpt: Path, parts: TrainingParts, state: TrainState, size: int,
    gathered: list[dict[str, dict[str, Any]]], keep: int, run_id: str | None,
) -> None:
    """Rank 0: the index, the COMPLETE marker, `latest`, then pruning."""
    files = {k: v for part in gathered for k, v in part.items()}
    index = json.dumps(_index(parts, state, size, files, run_id), indent=1)
    _write_file(ckpt, INDEX, index.encode())
    _write_file(ckpt, COMPLETE, f"{state.step}\n".encode())
    with writing(root / LATEST):
        commit_pointer(root, LATEST, ckpt)
    prune(root, keep, current=ckpt)


def _index(
    parts: TrainingParts, state: TrainState, size: int, files: dict[str, dict[str, Any]],
    run_id: str | None,
) -> dict:
    pfc = parts.pfc
    cfg = parts.config
    shards: dict[str, list[dict[str, Any]]] = {"weight": [], "momentum": []}  # always listed
    for rel in sorted(files):
        m = CLASSIFIER_FILE.match(rel)
        if m:
            shards.setdefault(m.group(1), []).append({"file": rel, "start": int(m.group(2)), "end": int(m.group(3))})
    ema = parts.ema
    ema_facts = {"backbone_ema": {"decay": ema.decay, "updates": ema.updates}} if ema is not None else {}
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": state.step,
        "world_size": size,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "num_classes": pfc.num_classes,
        "embedding_size": pfc.embedding_size,
        "subcenters": pfc.subcenters,
        "classifier_dtype": str(pfc.weight.dtype).removeprefix("torch."),
        "backbone": cfg.backbone.name if cfg is not None else None,
        "train_state": asdict(state),
        "classifier": shards,
        "files": dict(sorted(files.items())),
        **ema_facts,
    }
