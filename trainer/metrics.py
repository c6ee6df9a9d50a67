"""Run logging: rank-prefixed log files, rank-0 progress lines, and `metrics.jsonl`.

Every rank logs to `OUTPUT/logs/rank{R}.log`; rank 0 also prints progress to stderr.
Rank 0 appends one JSON object per logged step to `OUTPUT/metrics.jsonl` with at least
`step`, `epoch`, `loss`, `lr`, `samples_per_sec`, `data_wait_frac`, `grad_norm`,
`nonfinite_total`, `time` (seconds since start).

Step values stay on the device between log points (`StepMeter.add` does no host read);
`StepMeter.read` syncs once per `log_every` steps.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def setup_logging(output_dir: str | os.PathLike[str], rank: int) -> Path:
    """Send `logging` to OUTPUT/logs/rank{R}.log (all ranks) and to stderr (rank 0)."""
    log_dir = Path(output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"rank{rank}.log"
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(console)
    return path


@dataclass
class StepMeter:
    """Accumulates per-step values between two log points without host syncs."""

    loss_sum: Tensor | None = None
    grad_norm: Tensor | None = None
    steps: int = 0
    samples: int = 0
    data_wait: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: Tensor, grad_norm: Tensor | None, samples: int, data_wait: float) -> None:
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        if grad_norm is not None:
            self.grad_norm = grad_norm.detach().float()
        self.steps += 1
        self.samples += samples
        self.data_wait += data_wait

    def read(self) -> dict[str, float]:
        """Window averages (one host read), then start a new window."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {
            "loss": float(self.loss_sum) / self.steps if self.steps else float("nan"),
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else float("nan"),
            "samples_per_sec": self.samples / elapsed,
            "data_wait_frac": min(1.0, self.data_wait / elapsed),
        }
        self.__init__()  # type: ignore[misc]
        return out


class RunLog:
    """Rank 0's progress line and metrics.jsonl; a no-op on the other ranks."""

    def __init__(self, output_dir: str | os.PathLike[str], is_main: bool, total_steps: int) -> None:
        self.is_main = is_main
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8") if is_main else None

    def write(self, step: int, epoch: int, lr: float, values: dict[str, float], **extra) -> None:
        if not self.is_main:
            return
        elapsed = time.perf_counter() - self.start
        record = {"step": step, "epoch": epoch, "lr": lr, **values, **extra, "time": elapsed}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        eta = (self.total_steps - step) * elapsed / max(step, 1)
        log.info(
            "step %d/%d  epoch %d  loss %.4f  lr %.5f  %.1f img/s  data-wait %.0f%%  eta %s",
            step, self.total_steps, epoch, values["loss"], lr, values["samples_per_sec"],
            100 * values["data_wait_frac"], _duration(eta),
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def memory_summary(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak device memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    import resource

    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
