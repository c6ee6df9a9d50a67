"""Checking a whole checkpoint: every file's size and checksum, and that its `.pt`
files hold nothing but tensors and plain data (what `arcshard-ckpt verify` runs).

A forged file can come with a forged `index.json` whose checksums match it, so
"intact" also means "safe to load": a `.pt` file that would unpickle anything else
is reported, by name, like a corrupted one.
"""

from __future__ import annotations

from pathlib import Path

from trainer.checkpoint import rng
from trainer.checkpoint.files import check_file, load_plain, sha256_file
from trainer.checkpoint.layout import REPLICATED, CheckpointError
from trainer.checkpoint.loading import read_index
from trainer.checkpoint.rowfiles import CLASSIFIER_FILE, read_blocks, row_bytes


def verify_all(ckpt: Path) -> list[str]:
    """Problems found checking every file of `ckpt` against its index (empty: intact)."""
    try:
        index = read_index(ckpt)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    for rel, entry in index["files"].items():
        try:
            path = check_file(ckpt, rel, entry)
            if "sha256" not in entry:
                size = row_bytes(index, CLASSIFIER_FILE.match(rel).group(1))
                rows = entry["bytes"] // size
                if rows:
                    for _ in read_blocks(path, entry, size, 0, rows, True):
                        pass
            elif sha256_file(path) != entry["sha256"]:
                problems.append(f"{path}: checksum mismatch (the file is corrupted)")
            elif rel == REPLICATED:
                load_plain(path.read_bytes(), path)
            elif rel.startswith("rng/"):
                rng.read(path.read_bytes(), path)
        except CheckpointError as e:
            problems.append(str(e))
    return problems
