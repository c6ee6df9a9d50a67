"""Sharded, atomic, verifiable checkpoints that re-shard to any world size.

Layout (`run.output_dir/checkpoints/`)::

    latest                      text: the directory name of the newest complete checkpoint
    best                        text: the one with the best verification accuracy (if any)
    step-000001234/
        replicated.pt           backbone, backbone optimizer, AMP scaler, training position,
                                PartialFC sampling position (written once, by rank 0)
        config.yaml             the run's resolved config
        rng/rank00003.pt        each rank's RNG states
        classifier/weight.0000000000-0000500000.bin    raw row-major rows [start, end) of
        classifier/momentum.0000000000-0000500000.bin  the class centres / their momentum
        index.json              every file's size and sha256 (classifier files: one sha256
                                per block of BLOCK_ROWS rows), world size, shapes, dtypes
        COMPLETE                written last; a directory without it is never loaded

Why not `torch.distributed.checkpoint` (DCP): DCP re-shards DTensor/ShardedTensor state
whose sharding it knows; our shard is a plain tensor holding an arbitrary contiguous row
range, and we want three things DCP leaves to the caller anyway: a per-file checksum that
names the broken file, a completion marker plus an atomic `latest` pointer, and files a
person can inspect (`arcshard-ckpt info`). Raw row files make re-sharding trivial and
cheap: a rank at the new world size memory-maps the saved files overlapping its new class
range and copies exactly those rows (never the whole classifier), verifying only the
checksum blocks it reads.

Saving is collective (every rank calls `save`): each rank writes its classifier rows and
RNG state (rank 0 also the replicated state) to temporary names, fsyncs and renames them;
the per-rank file entries are gathered on rank 0, which writes `index.json`, then
`COMPLETE`, then replaces `latest` atomically, then deletes checkpoints beyond
`checkpoint.keep`. A crash at any point leaves `latest` naming the previous complete
checkpoint; the half-written directory is removed by the next save or start-up.

Loading is collective too: every rank reads the replicated state, its own class range
and (when the world size is unchanged) its RNG state; every file read is checked against
`index.json` when `verify` is on. A failure on any rank raises `CheckpointError` on every
rank (no rank is left waiting in a collective).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.config import Config, ConfigError, load_config
from trainer.optim import ShardSGD
from trainer.partial_fc import PartialFC, shard_range

log = logging.getLogger("trainer.checkpoint")

FORMAT = "arcshard-checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"
INDEX = "index.json"
COMPLETE = "COMPLETE"
REPLICATED = "replicated.pt"
CONFIG = "config.yaml"
BLOCK_ROWS = 65536  # checksum granularity of the classifier files
_STEP_DIR = re.compile(r"^step-(\d{9,})$")
_HASH_CHUNK = 64 << 20

# Config keys whose change makes a checkpoint unusable: they fix tensor shapes.
SHAPE_KEYS = ("data.num_classes", "backbone.embedding_size", "backbone.name")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what to do."""


@dataclass
class TrainState:
    """Where training stands: everything besides tensors that an exact resume needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data epoch being read
    batch_in_epoch: int = 0  # batches of `epoch` already consumed by this rank
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    best: dict[str, Any] = field(default_factory=dict)  # {"target", "accuracy", "step"}


@dataclass
class TrainingParts:
    """The objects a checkpoint saves and restores."""

    module: nn.Module  # the backbone, without its DDP wrapper
    pfc: PartialFC
    shard_optimizer: ShardSGD
    backbone_optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    config: Config | None = None


# --------------------------------------------------------------------------- paths


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoints_root(output_dir: str | os.PathLike[str]) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / INDEX).is_file()


def _read_pointer(root: Path, name: str) -> Path | None:
    """The complete checkpoint a pointer file names, or None (missing or dangling)."""
    pointer = root / name
    try:
        target = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not _STEP_DIR.match(target):
        raise CheckpointError(f"{pointer}: does not name a checkpoint ({target!r}); delete it")
    path = root / target
    return path if is_complete(path) else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names; if that pointer is missing or dangling (a crash
    between the marker and the pointer), the newest complete directory."""
    named = _read_pointer(root, LATEST)
    if named is not None:
        return named
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def resolve(path: str | os.PathLike[str]) -> Path:
    """A complete checkpoint directory from a run output dir, a `checkpoints` dir or a
    checkpoint dir itself; CheckpointError says what was looked for."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist (give a run output dir or a checkpoint dir)")
    if _STEP_DIR.match(path.name) or (path / INDEX).exists():
        if not is_complete(path):
            raise CheckpointError(
                f"{path}: incomplete checkpoint (no {COMPLETE} marker: its save was interrupted); "
                "use an earlier one"
            )
        return path
    for root in (path / CHECKPOINTS_DIR, path):
        found = find_latest(root) if root.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(
        f"{path}: no complete checkpoint found (looked for {path / CHECKPOINTS_DIR / LATEST})"
    )


# --------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> str:
    """Write `data` to `path` (temp name, fsync, rename); returns its sha256."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _tensor_bytes(t: Tensor) -> np.ndarray:
    """A host uint8 view of `t`'s bytes (copied off an accelerator if needed)."""
    host = t.detach().contiguous().cpu()
    return host.view(torch.uint8).numpy().reshape(-1)


def _write_rows(path: Path, rows: Tensor, block_rows: int) -> dict[str, Any]:
    """Write `rows` raw; returns the index entry (bytes, per-block sha256). Each block is
    hashed on a second thread while it is written (both release the GIL)."""
    tmp = path.with_name(f".{path.name}.tmp")
    row_bytes = rows.shape[1] * rows.element_size()
    with open(tmp, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash") as pool:
        hashes = []
        for start in range(0, rows.shape[0], block_rows):
            if len(hashes) >= 2:  # at most two blocks in flight (host copies of GPU rows)
                hashes[-2].result()
            data = memoryview(_tensor_bytes(rows[start : start + block_rows]))
            hashes.append(pool.submit(lambda d: hashlib.sha256(d).hexdigest(), data))
            f.write(data)
        blocks = [h.result() for h in hashes]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": rows.shape[0] * row_bytes, "block_rows": block_rows, "blocks": blocks}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_file(ckpt: Path, rel: str, entry: dict[str, Any]) -> Path:
    """`ckpt/rel` exists with the size the index records (else CheckpointError)."""
    path = ckpt / rel
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint (listed in {INDEX})") from None
    if size != entry["bytes"]:
        raise CheckpointError(
            f"{path}: {size} bytes, {INDEX} says {entry['bytes']} (truncated or overwritten); "
            "this checkpoint is damaged: resume from an earlier one (checkpoint.resume=PATH)"
        )
    return path


def _read_verified(ckpt: Path, rel: str, entry: dict[str, Any], verify: bool) -> bytes:
    path = _check_file(ckpt, rel, entry)
    data = path.read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(
            f"{path}: checksum mismatch (the file is corrupted); resume from an earlier "
            "checkpoint (checkpoint.resume=PATH)"
        )
    return data


# --------------------------------------------------------------------------- save


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _classifier_name(kind: str, start: int, end: int) -> str:
    return f"classifier/{kind}.{start:010d}-{end:010d}.bin"


def _replicated_state(parts: TrainingParts, state: TrainState) -> dict[str, Any]:
    shard = parts.shard_optimizer
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "backbone": parts.module.state_dict(),
        "backbone_optimizer": (
            parts.backbone_optimizer.state_dict() if parts.backbone_optimizer is not None else None
        ),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "train_state": asdict(state),
        "partial_fc": {"sample_step": parts.pfc.sample_step, "seed": parts.pfc.seed},
        "shard_optimizer": {
            "lr": shard.lr, "momentum": shard.momentum, "weight_decay": shard.weight_decay,
        },
    }


def _write_rank_files(
    ckpt: Path, parts: TrainingParts, state: TrainState, rank: int, kill_midway: bool,
    block_rows: int,
) -> dict[str, dict[str, Any]]:
    """This rank's files; returns {relative path: index entry}."""
    pfc = parts.pfc
    pfc.flush()  # host offload: land the last step's write-back before reading the rows
    start, end = pfc.class_start, pfc.class_start + pfc.num_local
    entries: dict[str, dict[str, Any]] = {}
    (ckpt / "classifier").mkdir(exist_ok=True)
    (ckpt / "rng").mkdir(exist_ok=True)
    rel = _classifier_name("weight", start, end)
    entries[rel] = _write_rows(ckpt / rel, pfc.weight.data, block_rows)
    if kill_midway:  # fault injection: die with the shard half-written, before the commit
        log.warning("checkpoint.inject_kill_during_save: killing rank %d mid-save", rank)
        os.kill(os.getpid(), signal.SIGKILL)
    momentum = parts.shard_optimizer.momentum_buffer
    if momentum is not None:
        rel = _classifier_name("momentum", start, end)
        entries[rel] = _write_rows(ckpt / rel, momentum, block_rows)
    rel = f"rng/rank{rank:05d}.pt"
    data = _torch_bytes(_rng_state())
    entries[rel] = {"bytes": len(data), "sha256": _write_atomic(ckpt / rel, data)}
    if rank == 0:
        data = _torch_bytes(_replicated_state(parts, state))
        entries[REPLICATED] = {"bytes": len(data), "sha256": _write_atomic(ckpt / REPLICATED, data)}
        if parts.config is not None:
            data = parts.config.to_yaml().encode()
            entries[CONFIG] = {"bytes": len(data), "sha256": _write_atomic(ckpt / CONFIG, data)}
    return entries


def _index(
    parts: TrainingParts, state: TrainState, world: int, files: dict[str, dict[str, Any]]
) -> dict:
    pfc = parts.pfc
    cfg = parts.config
    shards: dict[str, list[dict[str, Any]]] = {"weight": [], "momentum": []}
    for rel in sorted(files):
        m = re.match(r"^classifier/(weight|momentum)\.(\d+)-(\d+)\.bin$", rel)
        if m:
            shards[m.group(1)].append({"file": rel, "start": int(m.group(2)), "end": int(m.group(3))})
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": state.step,
        "world_size": world,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "num_classes": pfc.num_classes,
        "embedding_size": pfc.embedding_size,
        "classifier_dtype": str(pfc.weight.dtype).removeprefix("torch."),
        "backbone": cfg.backbone.name if cfg is not None else None,
        "train_state": asdict(state),
        "classifier": shards,
        "files": dict(sorted(files.items())),
    }


def _all_ok(error: str | None, what: str) -> None:
    """Raise on every rank if any rank reported an error (keeps ranks in step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error:
            raise CheckpointError(error)
        return
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        rank, first = bad[0]
        mine = error or f"rank {rank} failed to {what}: {first}"
        raise CheckpointError(mine)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save(
    root: str | os.PathLike[str],
    parts: TrainingParts,
    state: TrainState,
    *,
    keep: int = 3,
    inject_kill: bool = False,
    block_rows: int = BLOCK_ROWS,
) -> Path:
    """Write checkpoint `step-{state.step}` under `root` (collective); returns its path.

    `latest` names it only after every rank's files are on disk and the index and the
    COMPLETE marker are written. A complete checkpoint of the same step is kept as is.
    """
    root = Path(root)
    rank, world = _world()
    ckpt = root / step_dir_name(state.step)
    decision: list[Any] = [None]
    if rank == 0:
        try:
            if is_complete(ckpt):
                decision[0] = "exists"
            else:
                if ckpt.exists():
                    shutil.rmtree(ckpt)
                ckpt.mkdir(parents=True)
                decision[0] = "write"
        except OSError as e:
            decision[0] = f"cannot create {ckpt}: {e.strerror or e}"
    if world > 1:
        dist.broadcast_object_list(decision, src=0)
    if decision[0] == "exists":
        if rank == 0:
            _commit_pointer(root, LATEST, ckpt)
        return ckpt
    if decision[0] != "write":
        raise CheckpointError(str(decision[0]))
    error = None
    entries: dict[str, dict[str, Any]] = {}
    try:
        entries = _write_rank_files(
            ckpt, parts, state, rank, inject_kill and rank == world - 1, block_rows
        )
    except OSError as e:
        error = f"{e.filename or ckpt}: cannot write checkpoint file: {e.strerror or e}"
    _all_ok(error, "write its checkpoint files")
    gathered: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, entries)
    else:
        gathered = [entries]
    error = None
    if rank == 0:
        try:
            files = {k: v for part in gathered for k, v in part.items()}
            index = json.dumps(_index(parts, state, world, files), indent=1).encode()
            _write_atomic(ckpt / INDEX, index)
            _write_atomic(ckpt / COMPLETE, f"{state.step}\n".encode())
            _fsync_dir(ckpt)
            _commit_pointer(root, LATEST, ckpt)
            prune(root, keep, current=ckpt)
        except OSError as e:
            error = f"{e.filename or ckpt}: cannot commit checkpoint: {e.strerror or e}"
    _all_ok(error, "commit the checkpoint")
    return ckpt


def _commit_pointer(root: Path, name: str, ckpt: Path) -> None:
    """Point `root/name` at `ckpt` atomically (rank 0 only)."""
    _write_atomic(root / name, f"{ckpt.name}\n".encode())
    _fsync_dir(root)


def mark_best(root: str | os.PathLike[str], ckpt: Path) -> None:
    """Point `best` at `ckpt` (rank 0 only); `prune` never deletes it."""
    _commit_pointer(Path(root), BEST, ckpt)


def prune(root: Path, keep: int, current: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (never `best`, `latest` or
    `current`) and every incomplete directory except `current`; returns what was removed."""
    protected = {p for p in (current, _read_pointer(root, LATEST), _safe_best(root)) if p}
    complete = complete_checkpoints(root)
    doomed = [p for p in complete[: max(0, len(complete) - keep)] if p not in protected]
    doomed += [
        p for p in root.iterdir()
        if _STEP_DIR.match(p.name) and p.is_dir() and not is_complete(p) and p != current
    ]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed checkpoint %s", path)
    return doomed


def _safe_best(root: Path) -> Path | None:
    try:
        return _read_pointer(root, BEST)
    except CheckpointError:
        return None


def remove_incomplete(root: Path) -> list[Path]:
    """Delete interrupted saves (directories without COMPLETE); rank 0 at start-up."""
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        if _STEP_DIR.match(path.name) and path.is_dir() and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.warning("removed incomplete checkpoint %s (its save was interrupted)", path)
    return removed


# --------------------------------------------------------------------------- load


def read_index(ckpt: Path) -> dict[str, Any]:
    path = ckpt / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is damaged") from None
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
    _read_verified(ckpt, CONFIG, entry, verify)
    try:
        return load_config(ckpt / CONFIG)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / CONFIG}: {e}") from None


def read_replicated(ckpt: Path, index: dict[str, Any], verify: bool = True) -> dict[str, Any]:
    data = _read_verified(ckpt, REPLICATED, index["files"][REPLICATED], verify)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{ckpt / REPLICATED}: cannot be read ({e})") from None


def config_changes(saved: Config, current: Config) -> tuple[list[str], list[str]]:
    """(shape-changing differences, other differences) as 'key: old -> new' lines."""
    old, new = saved.to_dict(), current.to_dict()
    shape, other = [], []
    for section, values in new.items():
        for key, value in values.items():
            before = old.get(section, {}).get(key)
            if before != value:
                name = f"{section}.{key}"
                (shape if name in SHAPE_KEYS else other).append(f"{name}: {before!r} -> {value!r}")
    return shape, other


def _read_blocks(
    path: Path, entry: dict[str, Any], row_bytes: int, first: int, last: int, verify: bool
) -> Iterator[tuple[int, memoryview]]:
    """Yield (first row, bytes) of rows [first, last) of a classifier file, one checksum
    block at a time through one reused buffer (plain reads: faster than page-faulting a
    memory map). With `verify`, whole blocks are read and checked against the index."""
    block_rows = entry["block_rows"]
    total_rows = entry["bytes"] // row_bytes
    buf = bytearray(min(block_rows, max(last - first, 1)) * row_bytes if not verify
                    else min(block_rows, total_rows) * row_bytes)
    with open(path, "rb", buffering=0) as f:
        for b in range(first // block_rows, (last - 1) // block_rows + 1):
            lo, hi = b * block_rows, min((b + 1) * block_rows, total_rows)
            if not verify:
                lo, hi = max(lo, first), min(hi, last)
            view = memoryview(buf)[: (hi - lo) * row_bytes]
            f.seek(lo * row_bytes)
            got = f.readinto(view)
            if got != len(view):
                raise CheckpointError(f"{path}: ends early at row {lo} (truncated); resume from an earlier checkpoint")
            if verify and hashlib.sha256(view).hexdigest() != entry["blocks"][b]:
                raise CheckpointError(
                    f"{path}: checksum mismatch in rows {lo}-{hi - 1} (the file is corrupted); "
                    "resume from an earlier checkpoint (checkpoint.resume=PATH)"
                )
            yield lo, view


def _load_rows(
    ckpt: Path, index: dict[str, Any], kind: str, dst: Tensor, start: int, verify: bool
) -> None:
    """Copy rows [start, start + len(dst)) of the saved `kind` matrix into `dst`."""
    end = start + dst.shape[0]
    dtype = _DTYPES[index["classifier_dtype"]]
    dim = index["embedding_size"]
    row_bytes = dim * torch.empty((), dtype=dtype).element_size()
    covered = 0
    for shard in sorted(index["classifier"][kind], key=lambda s: s["start"]):
        lo, hi = max(start, shard["start"]), min(end, shard["end"])
        if lo >= hi:
            continue
        entry = index["files"][shard["file"]]
        path = _check_file(ckpt, shard["file"], entry)
        first, last = lo - shard["start"], hi - shard["start"]
        for row, data in _read_blocks(path, entry, row_bytes, first, last, verify):
            rows = torch.frombuffer(data, dtype=dtype).view(-1, dim)
            a, b = max(row, first), min(row + rows.shape[0], last)
            base = shard["start"] - start
            dst[base + a : base + b].copy_(rows[a - row : b - row])
        covered += hi - lo
    if covered != end - start:
        raise CheckpointError(
            f"{ckpt / INDEX}: the saved {kind} shards do not cover classes [{start}, {end})"
        )


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
    rank, world = _world()
    error: str | None = None
    result: TrainState | None = None
    try:
        result = _load_local(Path(path), parts, rank, world, verify, config)
    except CheckpointError as e:
        error = str(e)
    _all_ok(error, "load the checkpoint")
    assert result is not None
    return result


def _load_local(
    ckpt: Path, parts: TrainingParts, rank: int, world: int, verify: bool, config: Config | None
) -> TrainState:
    index = read_index(ckpt)
    pfc = parts.pfc
    if config is not None:
        saved = read_config(ckpt, index, verify)
        shape, other = config_changes(saved, config)
        if shape:
            raise CheckpointError(
                f"{ckpt}: saved for a different model ({'; '.join(shape)}); these fix tensor "
                "shapes: use the original values or start a new run (another run.output_dir)"
            )
        if other and rank == 0:
            log.info("config differs from the checkpoint's: %s", "; ".join(other))
    if (index["num_classes"], index["embedding_size"]) != (pfc.num_classes, pfc.embedding_size):
        raise CheckpointError(
            f"{ckpt / INDEX}: classifier is {index['num_classes']} x {index['embedding_size']}, "
            f"this run's is {pfc.num_classes} x {pfc.embedding_size}"
        )
    if index["world_size"] != world and rank == 0:
        log.info("re-sharding the classifier from %d to %d ranks", index["world_size"], world)
    replicated = read_replicated(ckpt, index, verify)
    try:
        parts.module.load_state_dict(replicated["backbone"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt / REPLICATED}: backbone does not match this model: {_state_dict_problem(e)}"
        ) from None
    if parts.backbone_optimizer is not None and replicated["backbone_optimizer"] is not None:
        parts.backbone_optimizer.load_state_dict(replicated["backbone_optimizer"])
    if parts.scaler is not None and replicated["scaler"] is not None:
        parts.scaler.load_state_dict(replicated["scaler"])
    start = pfc.class_start
    assert (start, pfc.num_local) == shard_range(pfc.num_classes, world, rank)
    pfc.flush()  # host offload: no pending write-back may land on the restored rows
    with torch.no_grad():
        _load_rows(ckpt, index, "weight", pfc.weight.data, start, verify)
        momentum = parts.shard_optimizer.momentum_buffer
        if momentum is not None:
            if index["classifier"]["momentum"]:
                _load_rows(ckpt, index, "momentum", momentum, start, verify)
            else:
                momentum.zero_()
                log.warning("%s has no classifier momentum (saved without momentum): starting at 0", ckpt)
    pfc.sample_step = int(replicated["partial_fc"]["sample_step"])
    state = TrainState(**replicated["train_state"])
    rng = f"rng/rank{rank:05d}.pt"
    if index["world_size"] == world and rng in index["files"]:
        data = _read_verified(ckpt, rng, index["files"][rng], verify)
        _set_rng_state(torch.load(io.BytesIO(data), weights_only=False))
    elif rank == 0:
        log.info("world size changed: RNG streams (dropout, augmentation) restart from the seed")
    return state


def _state_dict_problem(error: Exception) -> str:
    """The informative line of a load_state_dict error (the first size mismatch or missing
    key), not its generic first line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = [line for line in lines[1:] if line.startswith(("size mismatch", "Missing", "Unexpected"))]
    return (detail or lines or [type(error).__name__])[0][:300]


def load_backbone(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", verify: bool = True
) -> tuple[nn.Module, Config]:
    """The trained backbone (eval mode) and the run's config, from a run output dir (its
    latest checkpoint, else the `backbone.pt` + `config.yaml` a finished run leaves) or a
    checkpoint directory. Reads only the replicated state, never the classifier."""
    from trainer.backbones import get_backbone

    path = Path(path)
    try:
        ckpt = resolve(path)
    except CheckpointError:
        if (path / "backbone.pt").is_file() and (path / "config.yaml").is_file():
            return _load_final_backbone(path, map_location)
        raise
    index = read_index(ckpt)
    cfg = read_config(ckpt, index, verify)
    state = read_replicated(ckpt, index, verify)["backbone"]
    module = get_backbone(cfg.backbone.name, embedding_size=cfg.backbone.embedding_size)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt / REPLICATED}: does not fit {cfg.backbone.name} with embedding size "
            f"{cfg.backbone.embedding_size} (its config.yaml): {_state_dict_problem(e)}"
        ) from None
    return module.to(map_location).eval(), cfg


def _load_final_backbone(run_dir: Path, map_location: str | torch.device) -> tuple[nn.Module, Config]:
    from trainer.backbones import get_backbone

    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{run_dir / 'config.yaml'}: {e}") from None
    module = get_backbone(cfg.backbone.name, embedding_size=cfg.backbone.embedding_size)
    try:
        state = torch.load(run_dir / "backbone.pt", map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - unreadable or mismatched weights
        raise CheckpointError(
            f"{run_dir / 'backbone.pt'}: cannot be loaded as {cfg.backbone.name} with embedding "
            f"size {cfg.backbone.embedding_size} ({run_dir / 'config.yaml'}): "
            f"{_state_dict_problem(e)}; the weights and config.yaml must come from the same run"
        ) from None
    return module.to(map_location).eval(), cfg


def verify_all(ckpt: Path) -> list[str]:
    """Problems found checking every file of `ckpt` against its index (empty: intact)."""
    problems = []
    try:
        index = read_index(ckpt)
    except CheckpointError as e:
        return [str(e)]
    dtype = _DTYPES[index["classifier_dtype"]]
    row_bytes = index["embedding_size"] * torch.empty((), dtype=dtype).element_size()
    for rel, entry in index["files"].items():
        try:
            path = _check_file(ckpt, rel, entry)
            if "sha256" in entry:
                if _sha256_file(path) != entry["sha256"]:
                    problems.append(f"{path}: checksum mismatch (the file is corrupted)")
            elif entry["bytes"]:
                for _ in _read_blocks(path, entry, row_bytes, 0, entry["bytes"] // row_bytes, True):
                    pass
        except CheckpointError as e:
            problems.append(str(e))
    return problems
