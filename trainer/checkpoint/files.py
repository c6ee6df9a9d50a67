"""Reading and writing a checkpoint's whole files: index checks, safe unpickling, errors.

Every file a user hands us is untrusted, a checkpoint included: its `.pt` files are
unpickled with `torch.load(weights_only=True)` only, which builds tensors and plain data
(dicts, lists, tuples, numbers, strings) and refuses any other global *before* calling
it, so a pickle crafted to run code (`os.system` in a `__reduce__`) is refused with its
name instead of executed. A matching sha256 in `index.json` proves nothing here: whoever
forged the file can forge the index too.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint.layout import INDEX, CheckpointError

_HASH_CHUNK = 64 << 20


def human_size(n: float) -> str:
    """`1.5 GiB`: a byte count for people."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def torch_bytes(obj: Any) -> bytes:
    """`obj` as `torch.save` writes it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_plain(data: bytes, path: Path) -> Any:
    """Unpickle `data` (the bytes of `path`) into tensors and plain data only; anything
    that would need another global is refused with one line naming `path` and it."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        needs = ", ".join(sorted(unsafe_globals(data))) or "an object that is not a tensor or plain data"
        raise CheckpointError(
            f"{path}: refused: loading it would call {needs} (arcshard files hold only tensors "
            "and plain data; this one may be crafted to run code): do not use it"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure means a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: cannot be read ({reason}); the file is damaged") from None


def unsafe_globals(data: bytes) -> set[str]:
    """The globals beyond tensors and plain data that unpickling `data` would call,
    listed without calling any of them (empty for a file torch cannot parse: loading
    it then fails with its own error)."""
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
    except Exception:  # noqa: BLE001 - any parse failure
        return set()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_file(ckpt: Path, rel: str, entry: dict[str, Any]) -> Path:
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


def read_verified(ckpt: Path, rel: str, entry: dict[str, Any], verify: bool) -> bytes:
    """The bytes of `ckpt/rel`, size-checked and (with `verify`) checksum-checked."""
    path = check_file(ckpt, rel, entry)
    data = path.read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(
            f"{path}: checksum mismatch (the file is corrupted); resume from an earlier "
            "checkpoint (checkpoint.resume=PATH)"
        )
    return data


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` (disk full, permission denied) into one
    CheckpointError line naming the file and the free space left where it goes."""
    try:
        yield
    except OSError as e:
        target = Path(e.filename) if e.filename else path
        try:
            free = f"{human_size(shutil.disk_usage(target.parent).free)} free there"
        except OSError:
            free = "free space unknown"
        raise CheckpointError(
            f"{target}: cannot write checkpoint file ({e.strerror or e}; {free}); make room "
            "(or lower checkpoint.keep) and rerun to resume from the last complete checkpoint"
        ) from None
