"""Where checkpoints live and which one counts: step directories and their pointers.

`run.output_dir/checkpoints/` holds `step-NNNNNNNNN/` directories and two pointer files,
`latest` (the newest complete checkpoint) and `best` (the best verification accuracy).
A directory counts only once it has its `COMPLETE` marker (written after every other
file), so a crash mid-save leaves the previous checkpoint in charge; this module finds,
resolves, prunes and cleans up after that rule.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from data_tools.atomic import write_atomic

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
STEP_DIR = re.compile(r"^step-(\d{9,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what to do."""


def step_dir_name(step: int) -> str:
    """`step-000001234`: zero-padded so the names sort by step."""
    return f"step-{step:09d}"


def rng_name(rank: int) -> str:
    """The file holding rank `rank`'s RNG states, relative to the checkpoint."""
    return f"rng/rank{rank:05d}.pt"


def checkpoints_root(output_dir: str | os.PathLike[str]) -> Path:
    """The directory a run's checkpoints go to."""
    return Path(output_dir) / CHECKPOINTS_DIR


def is_complete(path: Path) -> bool:
    """Whether `path` is a checkpoint whose save finished (index and marker written)."""
    return (path / COMPLETE).is_file() and (path / INDEX).is_file()


def _is_step_dir(path: Path) -> bool:
    return bool(STEP_DIR.match(path.name)) and path.is_dir()


def _pointed(root: Path, name: str) -> Path | None:
    """The directory pointer file `root/name` names (complete or not), or None if absent."""
    pointer = root / name
    try:
        target = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not STEP_DIR.match(target):
        raise CheckpointError(f"{pointer}: does not name a checkpoint ({target!r}); delete it")
    return root / target


def read_pointer(root: Path, name: str) -> Path | None:
    """The complete checkpoint a pointer file names, or None (missing or dangling)."""
    path = _pointed(root, name)
    return path if path is not None and is_complete(path) else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names; if that pointer is missing or dangling (a crash
    between the marker and the pointer, or a directory deleted by hand), the newest
    complete directory; a dangling pointer is logged, naming both."""
    named = _pointed(root, LATEST)
    if named is not None and is_complete(named):
        return named
    complete = complete_checkpoints(root)
    newest = complete[-1] if complete else None
    if named is not None:
        log.warning("%s names %s, which is missing or incomplete; using %s instead",
                    root / LATEST, named, newest or "no checkpoint (none is complete)")
    return newest


def resolve(path: str | os.PathLike[str]) -> Path:
    """A complete checkpoint directory from a run output dir, a `checkpoints` dir or a
    checkpoint dir itself; CheckpointError says what was looked for."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist (give a run output dir or a checkpoint dir)")
    if STEP_DIR.match(path.name) or (path / INDEX).exists():
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


def commit_pointer(root: Path, name: str, ckpt: Path) -> None:
    """Point `root/name` at `ckpt` atomically (rank 0 only)."""
    write_atomic(root / name, f"{ckpt.name}\n")


def mark_best(root: str | os.PathLike[str], ckpt: Path) -> None:
    """Point `best` at `ckpt` (rank 0 only); `prune` never deletes it."""
    commit_pointer(Path(root), BEST, ckpt)


def _safe_best(root: Path) -> Path | None:
    try:
        return read_pointer(root, BEST)
    except CheckpointError:
        return None


def prune(root: Path, keep: int, current: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (never `best`, `latest` or
    `current`) and every incomplete directory except `current`; returns what was removed."""
    protected = {p for p in (current, read_pointer(root, LATEST), _safe_best(root)) if p}
    complete = complete_checkpoints(root)
    doomed = [p for p in complete[: max(0, len(complete) - keep)] if p not in protected]
    doomed += [p for p in root.iterdir() if _is_step_dir(p) and not is_complete(p) and p != current]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed checkpoint %s", path)
    return doomed


def remove_incomplete(root: Path) -> list[Path]:
    """Delete interrupted saves (directories without COMPLETE); rank 0 at start-up."""
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        if _is_step_dir(path) and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.warning("removed incomplete checkpoint %s (its save was interrupted)", path)
    return removed
