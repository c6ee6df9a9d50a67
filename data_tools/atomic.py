"""One atomic file write for the whole project (every layer imports it from here).

A reader sees either the old file or the complete new one, never a half-written file,
and a crash or power loss after `write_atomic` returns cannot take the new file back:
write a temporary file in the same directory, flush + fsync it, rename it over the
target, then fsync the directory so the rename itself is durable.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory `path` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_with(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Atomically replace `path` with what `write(f)` writes to the binary file `f`
    (the directory is created if needed; the file gets mode 0644). On any error the
    temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> str:
    """Atomically replace `path` with `data` (str is written as UTF-8); returns the
    sha256 hex digest of the bytes written."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    write_atomic_with(path, lambda f: f.write(raw))
    return hashlib.sha256(raw).hexdigest()


def publish(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Atomically move a finished temporary file `tmp` (written and checked by the
    caller, in `path`'s directory) to `path`: fsync it, make it 0644, rename, fsync the
    directory. For files a library writes itself (an ONNX model checked before it may
    replace the old one)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
