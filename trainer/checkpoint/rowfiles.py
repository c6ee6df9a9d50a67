"""The classifier's raw row files: row-major rows [start, end) with one sha256 per block.

A file is nothing but the rows' bytes, so any rank at any world size can read exactly
the rows of its new class range with plain seeks and reads, and check only the
checksum blocks it touches (BLOCK_ROWS rows each) instead of hashing whole shards.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from data_tools.atomic import write_atomic_with
from trainer.checkpoint.layout import CheckpointError

BLOCK_ROWS = 65536  # checksum granularity of the classifier files
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Row kinds: the centres, the optimiser's [n, D] stores (SGD momentum, AdamW moments), and
# AdamW's per-row step counts (STEPS: one int32 per row, whatever the classifier dtype).
KINDS = ("weight", "momentum", "exp_avg", "exp_avg_sq", "steps")
STEPS = "steps"
CLASSIFIER_FILE = re.compile(rf"^classifier/({'|'.join(KINDS)})\.(\d+)-(\d+)\.bin$")  # kind, start, end


def classifier_name(kind: str, start: int, end: int) -> str:
    """The file of `kind` (one of KINDS) rows [start, end), relative to the checkpoint."""
    return f"classifier/{kind}.{start:010d}-{end:010d}.bin"


def row_format(index: dict[str, Any], kind: str = "weight") -> tuple[torch.dtype, int]:
    """(dtype, values per row) of the `kind` rows of the checkpoint described by `index`
    (a row is one class: K sub-centres of D values, or K step counts)."""
    k = index.get("subcenters", 1)
    if kind == STEPS:
        return torch.int32, k
    return DTYPES[index["classifier_dtype"]], index["embedding_size"] * k


def row_bytes(index: dict[str, Any], kind: str = "weight") -> int:
    """Bytes per `kind` row of the checkpoint described by `index`."""
    dtype, width = row_format(index, kind)
    return width * torch.empty((), dtype=dtype).element_size()


def _host_bytes(t: Tensor) -> np.ndarray:
    """A host uint8 view of `t`'s bytes (copied off an accelerator if needed)."""
    host = t.detach().contiguous().cpu()
    return host.view(torch.uint8).numpy().reshape(-1)


def write_rows(path: Path, rows: Tensor, block_rows: int) -> dict[str, Any]:
    """Write `rows` raw and atomically; returns the index entry (bytes, per-block sha256).
    Each block is hashed on a second thread while it is written (both release the GIL)."""
    blocks: list[str] = []

    def write(f: BinaryIO) -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash") as pool:
            hashes = []
            for start in range(0, rows.shape[0], block_rows):
                if len(hashes) >= 2:  # at most two blocks in flight (host copies of GPU rows)
                    hashes[-2].result()
                data = memoryview(_host_bytes(rows[start : start + block_rows]))
                hashes.append(pool.submit(lambda d: hashlib.sha256(d).hexdigest(), data))
                f.write(data)
            blocks.extend(h.result() for h in hashes)

    write_atomic_with(path, write)
    nbytes = rows.shape[0] * rows.shape[1] * rows.element_size()
    return {"bytes": nbytes, "block_rows": block_rows, "blocks": blocks}


def read_blocks(
    path: Path, entry: dict[str, Any], row_size: int, first: int, last: int, verify: bool
) -> Iterator[tuple[int, memoryview]]:
    """Yield (first row, bytes) of rows [first, last) of a classifier file, one checksum
    block at a time through one reused buffer (plain reads: faster than page-faulting a
    memory map). With `verify`, whole blocks are read and checked against the index."""
    block_rows = entry["block_rows"]
    total_rows = entry["bytes"] // row_size
    rows = min(block_rows, total_rows) if verify else min(block_rows, max(last - first, 1))
    buf = bytearray(rows * row_size)
    with open(path, "rb", buffering=0) as f:
        for b in range(first // block_rows, (last - 1) // block_rows + 1):
            lo, hi = b * block_rows, min((b + 1) * block_rows, total_rows)
            if not verify:
                lo, hi = max(lo, first), min(hi, last)
            view = memoryview(buf)[: (hi - lo) * row_size]
            f.seek(lo * row_size)
            if f.readinto(view) != len(view):
                raise CheckpointError(
                    f"{path}: ends early at row {lo} (truncated); resume from an earlier checkpoint"
                )
            if verify and hashlib.sha256(view).hexdigest() != entry["blocks"][b]:
                raise CheckpointError(
                    f"{path}: checksum mismatch in rows {lo}-{hi - 1} (the file is corrupted); "
                    "resume from an earlier checkpoint (checkpoint.resume=PATH)"
                )
            yield lo, view
