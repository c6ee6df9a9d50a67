"""Preemption: turn SIGTERM / SIGUSR1 into "checkpoint after this step, then exit 75".

Schedulers announce the end of a job with a signal: SLURM sends the one named by
`sbatch --signal=USR1@120` shortly before the time limit (and SIGTERM on `scancel` or
preemption), torchrun forwards SIGTERM to its workers when it is itself stopped. The
handler only records the signal; the training loop polls `requested` once per step,
agrees with the other ranks (a MAX all-reduce, so one signalled rank is enough), finishes
the step, writes a checkpoint and exits with `exit_codes.PREEMPTED` (75, EX_TEMPFAIL: "try
again later"), which the SLURM scripts turn into a requeue.

A second signal while the checkpoint is being written is recorded and otherwise ignored,
so it cannot interrupt the save half-way; SIGKILL (which nothing can catch) at any point
leaves the previous checkpoint as `latest` (see trainer/checkpoint.py).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger("trainer.preemption")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Records SIGTERM/SIGUSR1 while installed (a context manager; main thread only)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.count = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        self.count += 1
        if self.signal is None:
            self.signal = signum
        # logging from a signal handler can deadlock on the handler's own lock; write
        # nothing here, the loop logs when it acts on the request.

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:  # signal handlers can only be installed from the main thread
            log.warning("not in the main thread: SIGTERM/SIGUSR1 will not checkpoint")
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def describe(self) -> str:
        name = signal.Signals(self.signal).name if self.signal is not None else "none"
        return f"{name} ({self.count} signal{'s' if self.count != 1 else ''} received)"
