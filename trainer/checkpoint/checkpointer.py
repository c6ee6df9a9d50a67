"""The training loop's checkpointing component, and where a run starts from.

The loop only tells the Checkpointer the step (and whether it is a new best or must be
saved now, on preemption); the Checkpointer decides itself whether a save is due, so
the schedule (`checkpoint.every`, the final step, `keep`, fault injection) lives here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import torch.distributed as dist

from trainer.checkpoint.collective import world
from trainer.checkpoint.layout import (
    checkpoints_root, find_latest, mark_best, remove_incomplete, resolve, step_dir_name,
)
from trainer.checkpoint.parts import TrainingParts
from trainer.checkpoint.saving import save
from trainer.config import Config, ConfigError
from trainer.state import TrainState

log = logging.getLogger("trainer.checkpoint")


class SaveMetrics(Protocol):
    """What the Checkpointer reports each save's duration to (trainer.metrics)."""

    def checkpoint_saved(self, seconds: float, step: int) -> None: ...


class Checkpointer:
    """Saves `parts` under `run.output_dir/checkpoints` when a save is due (collective:
    every rank calls it at every step with the same arguments)."""

    def __init__(
        self, cfg: Config, parts: TrainingParts, steps_per_epoch: int, total_steps: int,
        metrics: SaveMetrics, *, run_id: str | None = None, resumed_at: int | None = None,
    ) -> None:
        """`steps_per_epoch`: batches per epoch of this rank's data source (what
        `TrainState.batch_in_epoch` counts); `run_id`: this run's id, recorded in every
        checkpoint so that a step directory another run wrote is never taken as ours;
        `resumed_at`: the step of the checkpoint the run started from (already saved)."""
        self.cfg, self.parts, self.metrics = cfg, parts, metrics
        self.steps_per_epoch, self.total_steps, self.run_id = steps_per_epoch, total_steps, run_id
        self.root = checkpoints_root(cfg.run.output_dir)
        self.last_saved: int | None = resumed_at

    def due(self, step: int) -> bool:
        """Whether the schedule alone asks for a save after step `step`."""
        every = self.cfg.checkpoint.every
        return bool(every and step % every == 0) or step == self.total_steps

    def maybe_save(self, state: TrainState, *, best: bool = False, force: bool = False) -> Path | None:
        """Save after step `state.step` when forced, a new best, or due; returns the
        checkpoint written, or None. A step already saved is not saved again (a new best
        at it only moves the `best` pointer)."""
        if not (force or best or self.due(state.step)):
            return None
        if self.last_saved == state.step:
            if best:
                self._mark_best(self.root / step_dir_name(state.step), state)
            return None
        ckpt = self._save(state)
        if best:
            self._mark_best(ckpt, state)
        return ckpt

    def finish(self, state: TrainState) -> Path | None:
        """At the end of training: save unless `state.step` is already saved."""
        return None if self.last_saved == state.step else self._save(state)

    def _save(self, state: TrainState) -> Path:
        started = time.perf_counter()
        ckpt = save(
            self.root, self.parts, state.rolled_over(self.steps_per_epoch),
            keep=self.cfg.checkpoint.keep,
            inject_kill=self.cfg.checkpoint.inject_kill_during_save == state.step,
            run_id=self.run_id,
        )
        seconds = time.perf_counter() - started
        self.last_saved = state.step
        self.metrics.checkpoint_saved(seconds, state.step)
        log.info("checkpoint %s written in %.2f s", ckpt, seconds)
        return ckpt

    def _mark_best(self, ckpt: Path, state: TrainState) -> None:
        if world()[0] != 0:
            return
        mark_best(self.root, ckpt)
        log.info("new best %s accuracy %.4f: %s", state.best.get("target"),
                 state.best.get("accuracy", float("nan")), ckpt.name)


def resume_point(cfg: Config, is_main: bool) -> Path | None:
    """The checkpoint this run starts from (collective: rank 0 first removes interrupted
    saves). The run's own `latest` always wins, so a requeued or restarted job continues
    where it stopped; `checkpoint.resume=PATH` only seeds a run that has none yet."""
    root = checkpoints_root(cfg.run.output_dir)
    if is_main:
        remove_incomplete(root)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    own = find_latest(root)
    mode = cfg.checkpoint.resume
    if mode == "never":
        if own is not None:
            raise ConfigError(
                f"checkpoint.resume: never, but {root} holds checkpoints (latest {own.name}); "
                "use another run.output_dir or delete them"
            )
        return None
    if own is not None:
        if mode != "auto":
            log.info("%s has checkpoints: resuming from %s (checkpoint.resume=%s ignored)",
                     cfg.run.output_dir, own, mode)
        return own
    if mode == "auto":
        return None
    return resolve(mode)
