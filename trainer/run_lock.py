"""One run per output directory: rank 0 holds an exclusive lock on it for the run's life.

Two runs writing one `run.output_dir` would resume from each other's checkpoints, skip
each other's saves and interleave metrics.jsonl. Rank 0 takes `OUTPUT/.arcshard.lock`
with `flock` before anything is written and keeps it until the process ends; the kernel
releases it when the holder exits in any way (also SIGKILL or a crash), so a stale lock
never blocks the rerun that resumes a dead run. The file names the holder (host, pid,
start time) for the error a second run prints. Where the filesystem cannot lock (some
Lustre mounts without `-o flock`), the run warns and goes on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".arcshard.lock"


class RunLocked(RuntimeError):
    """Another live run holds the output directory."""


class RunLock:
    """An exclusive, process-lifetime lock on an output directory (see module doc)."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunLocked naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLocked(
                    f"{self.path.parent}: another run is using this output directory "
                    f"({self.holder()}); wait for it, stop it, or choose another run.output_dir"
                ) from None
            log.warning("%s: cannot lock (%s): this filesystem does not support flock; "
                        "make sure no other run uses this output directory", self.path, exc)
            return
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        """'host H, pid P, since T' from the lock file (what the holder wrote)."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
