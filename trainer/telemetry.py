"""What a training run tells its people: rank log files, rank 0's progress line,
`metrics.jsonl`, and (through `trainer.metrics`) the Prometheus exporter.

Every rank logs to `OUTPUT/logs/rank{R}.log`; rank 0 also prints progress to stderr.
Rank 0 appends one JSON object per logged step to `OUTPUT/metrics.jsonl` with at least
`step`, `epoch`, `loss`, `lr`, `samples_per_sec`, `data_wait_frac`, `grad_norm`,
`max_logit` (the largest logit any sample had on any class in the window: s · cos plus
the margin; it climbs towards s before a diverging run's loss does) and `target_cos`
(the window's mean cosine between an embedding and its own class centre),
`nonfinite_total`, `time` (seconds since start), and per rank (index = rank)
`samples_per_sec_per_rank`, `data_wait_frac_per_rank`. With `metrics.tensorboard` (default:
when the `tensorboard` package is installed) rank 0 also writes TensorBoard event files to
`OUTPUT/tensorboard/`: `train/loss`, `train/lr`, `train/samples_per_sec`,
`train/data_wait_frac`, `train/grad_norm`, `train/max_logit`, `train/target_cos` at
every log point, `verification/<target>`
accuracy at every evaluation and `checkpoint/seconds` at every save, by optimizer step.
A resumed run appends to the same directory and purges the events a killed run wrote
past its checkpoint, so every step's curve is the one the resumed run trained.

`Telemetry` is the component the loop tells about every step (`step_done`); it decides
itself when a log point is due (`run.log_every`, and the last step). Step values stay on
the device between log points (`StepMeter.add` does no host read); a log point reads
them once, in the same place the step already synchronises.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from trainer.metrics import Metrics, start_metrics

if TYPE_CHECKING:
    from trainer.loop import StepResult
    from trainer.run import Run
    from trainer.state import TrainState

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
    max_logit: Tensor | None = None
    target_cos_sum: Tensor | None = None
    steps: int = 0
    samples: int = 0
    data_wait: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(
        self, loss: Tensor, grad_norm: Tensor | None, samples: int, data_wait: float,
        logit_stats: Tensor | None = None,
    ) -> None:
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        if grad_norm is not None:
            self.grad_norm = grad_norm.detach().float()
        if logit_stats is not None:  # [max logit, mean target cosine] of the step
            top, cos = logit_stats.detach().float().unbind()
            self.max_logit = top if self.max_logit is None else torch.maximum(self.max_logit, top)
            self.target_cos_sum = cos if self.target_cos_sum is None else self.target_cos_sum + cos
        self.steps += 1
        self.samples += samples
        self.data_wait += data_wait

    def read(self) -> dict[str, float]:
        """Window averages (one host read), then start a new window."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        steps = max(self.steps, 1)
        held = {"loss": self.loss_sum, "grad_norm": self.grad_norm,
                "max_logit": self.max_logit, "target_cos": self.target_cos_sum}
        present = {k: v for k, v in held.items() if v is not None}
        read = torch.stack(list(present.values())).tolist() if present else []
        out = {k: float("nan") for k in held} | dict(zip(present, read))
        out["loss"] /= steps
        out["target_cos"] /= steps
        out["samples_per_sec"] = self.samples / elapsed
        out["data_wait_frac"] = min(1.0, self.data_wait / elapsed)
        self.__init__()  # type: ignore[misc]
        return out


def truncate_partial_line(path: Path) -> int:
    """Cut `path` back to its last complete line (a run killed mid-write leaves half a
    JSON object that the next append would glue onto); returns the bytes removed."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    with open(path, "rb+") as f:
        keep = size
        while keep > 0:
            start = max(keep - 65536, 0)
            f.seek(start)
            block = f.read(keep - start)
            if keep == size and block.endswith(b"\n"):
                return 0
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        f.truncate(keep)
    return size - keep


def tensorboard_enabled(setting: bool | None) -> bool:
    """`metrics.tensorboard`: null means on when the `tensorboard` package is installed."""
    return setting if setting is not None else importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """Scalars by optimizer step into `output_dir/tensorboard/` event files."""

    def __init__(self, output_dir: str | os.PathLike[str], first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: hide what a killed run logged beyond the checkpoint we resume from
        purge = first_step + 1 if first_step else None
        self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunLog:
    """Rank 0's progress line, metrics.jsonl and TensorBoard; a no-op on the other ranks."""

    def __init__(
        self, output_dir: str | os.PathLike[str], is_main: bool, total_steps: int, first_step: int = 0,
        tensorboard: bool = False,
    ) -> None:
        """Appends to `output_dir/metrics.jsonl` (a resumed run continues it, after cutting
        off a line left half-written by a kill); `first_step`: the step this process
        started from (for the ETA); `tensorboard`: also write event files."""
        self.is_main = is_main
        self.total_steps = total_steps
        self.first_step = first_step
        self.start = time.perf_counter()
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            removed = truncate_partial_line(self.path)
            if removed:
                log.warning("%s: removed a cut-off last line (%d bytes, written when the run "
                            "was killed) before appending", self.path, removed)
            self._file = open(self.path, "a", encoding="utf-8")
        self.tensorboard = TensorBoardLog(output_dir, first_step) if is_main and tensorboard else None

    def write(self, step: int, epoch: int, lr: float, values: dict[str, float], **extra) -> None:
        if not self.is_main:
            return
        elapsed = time.perf_counter() - self.start
        self.record({"step": step, "epoch": epoch, "lr": lr, **values, **extra, "time": elapsed})
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, {"train/lr": lr, **{f"train/{k}": v for k, v in values.items()}})
        eta = (self.total_steps - step) * elapsed / max(step - self.first_step, 1)
        log.info(
            "step %d/%d  epoch %d  loss %.4f  lr %.5f  %.1f img/s  data-wait %.0f%%  eta %s",
            step, self.total_steps, epoch, values["loss"], lr, values["samples_per_sec"],
            100 * values["data_wait_frac"], _duration(eta),
        )

    def record(self, record: dict) -> None:
        """Append one JSON object (e.g. evaluation results) to metrics.jsonl (rank 0)."""
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self.tensorboard is not None and "eval" in record:
            self.tensorboard.scalars(record["step"], {
                f"verification/{name}": result["accuracy"] for name, result in record["eval"].items()
            })

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


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


def gather_per_rank(values: Sequence[float], device: torch.device) -> list[list[float]]:
    """`values` of every rank, indexed by rank: one tiny all-gather plus one host read.

    A collective: every rank must call it at the same point. Meant for log points, where
    the step has already synced (`StepMeter.read`).
    """
    local = torch.tensor(list(values), dtype=torch.float64, device=device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.stack(parts).tolist()


class Telemetry:
    """The run's logs and metrics; the loop calls `step_done` after every optimizer step."""

    def __init__(self, run: Run, first_step: int) -> None:
        self.run = run
        cfg = run.cfg
        self.metrics: Metrics = start_metrics(cfg, run.ctx)
        self.runlog = RunLog(cfg.run.output_dir, run.ctx.is_main, run.total_steps, first_step,
                             tensorboard_enabled(cfg.metrics.tensorboard))
        self.meter = StepMeter()
        self.samples_per_step = cfg.data.batch_size * cfg.optim.grad_accum_steps
        self._step_started = time.perf_counter()
        self.metrics.classifier(run.pfc.num_local, run.pfc.weight.nbytes + run.optimizer.shard.state_nbytes)

    def step_done(self, state: TrainState, result: StepResult) -> None:
        """Record step `state.step`; log (collective, all ranks alike) when it is due."""
        if result.nonfinite:
            self.metrics.nonfinite_step()
        ended = time.perf_counter()
        self.metrics.step_done(
            state.step, self.samples_per_step, ended - self._step_started, result.data_wait
        )
        self._step_started = ended
        world = self.run.ctx.world_size
        self.meter.add(result.loss, result.grad_norm, self.samples_per_step * world,
                       result.data_wait, result.logit_stats)
        if state.step % self.run.cfg.run.log_every == 0 or state.step == self.run.total_steps:
            self._log_point(state)

    def _log_point(self, state: TrainState) -> None:
        run = self.run
        values, lr = self.meter.read(), run.optimizer.schedule(state.step - 1)  # the host sync
        values.update({f"margin_{k}": v for k, v in run.pfc.margin.statistics().items()})
        scale = run.scaler.get_scale() if run.scaler is not None else 1.0
        self.metrics.log_point(values, lr, scale, run.pfc.last_sampled.numel(), run.ctx.device)
        per_rank = gather_per_rank(  # every rank is here: a tiny all-gather
            [values["samples_per_sec"] / run.ctx.world_size, values["data_wait_frac"]],
            run.ctx.device,
        )
        self.runlog.write(
            state.step, state.epoch, lr, values, nonfinite_total=state.nonfinite_total,
            samples_per_sec_per_rank=[r[0] for r in per_rank],
            data_wait_frac_per_rank=[r[1] for r in per_rank],
        )

    def checkpoint_saved(self, seconds: float, step: int) -> None:
        """The Checkpointer's report (a `SaveMetrics`): Prometheus and TensorBoard."""
        self.metrics.checkpoint_saved(seconds, step)
        if self.runlog.tensorboard is not None:
            self.runlog.tensorboard.scalars(step, {"checkpoint/seconds": seconds})

    def close(self) -> None:
        self.runlog.close()
        self.metrics.close()
