"""The in-training Evaluator: verification on `eval.targets` when it is due.

The loop tells it the step (`maybe_run`); it decides itself whether verification is due
(every `eval.every` steps and at the last step), runs it on every rank (the pairs are
split over ranks), logs and records the results, and says whether the
`eval.best_target` accuracy is a new best (kept in `state.best`), so the Checkpointer
can keep that checkpoint as `best`. With `backbone.ema_decay` > 0 it verifies the
backbone's average (trainer/ema.py), the weights export and evaluation take from a
checkpoint by default, so `best` is chosen by the weights that will be deployed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import Config, ConfigError

if TYPE_CHECKING:
    from trainer.evaluation.verification import VerificationSet
    from trainer.run import Run
    from trainer.state import TrainState
    from trainer.telemetry import Telemetry

log = logging.getLogger(__name__)


def load_eval_sets(cfg: Config) -> list[VerificationSet]:
    """The `eval.targets` verification sets, decoded once (a bad file is a ConfigError)."""
    if not cfg.eval.targets:
        return []
    from trainer.evaluation.verification import load_bin

    sets = []
    for i, path in enumerate(cfg.eval.targets):
        try:
            sets.append(load_bin(path, cfg.data.image_size))
        except (ValueError, TypeError, OSError) as e:
            raise ConfigError(f"eval.targets[{i}]: {e}") from None
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.targets: the file names must differ (they name the results), got {names}")
    best = cfg.eval.best_target
    if best is not None and best not in names and Path(best).stem not in names:
        raise ConfigError(f"eval.best_target: {best!r} is none of the targets ({', '.join(names)})")
    return sets


class Evaluator:
    """Verification of the run's backbone on its `eval_sets`, on schedule."""

    def __init__(self, run: Run, telemetry: Telemetry) -> None:
        self.run, self.telemetry = run, telemetry
        cfg = run.cfg
        self.every = cfg.eval.every
        self.target = (
            Path(cfg.eval.best_target).stem if cfg.eval.best_target
            else run.eval_sets[0].name if run.eval_sets else None
        )

    def due(self, step: int) -> bool:
        if not self.run.eval_sets:
            return False
        return step == self.run.total_steps or bool(self.every and step % self.every == 0)

    def maybe_run(self, state: TrainState) -> bool:
        """Collective: verify if due at `state.step`; returns whether it set a new best."""
        if not self.due(state.step):
            return False
        from trainer.evaluation.verification import evaluate_targets

        run = self.run
        module, weights = (run.module, "raw") if run.ema is None else (run.ema.module, "ema")
        started = time.perf_counter()
        results = evaluate_targets(
            module, run.eval_sets, run.ctx.device, run.cfg.eval.batch_size, run.cfg.eval.flip
        )
        seconds = time.perf_counter() - started
        for result in results.values():
            log.info("step %d verification %s (%s weights)", state.step, result.summary(), weights)
            self.telemetry.metrics.verification(result.name, result.accuracy)
        self.telemetry.runlog.record({
            "step": state.step, "eval": {k: r.as_dict() for k, r in results.items()},
            "eval_seconds": seconds, "eval_weights": weights,
        })
        accuracy = results[self.target].accuracy
        if accuracy > state.best.get("accuracy", -1.0):
            state.best = {"target": self.target, "accuracy": accuracy, "step": state.step}
            return True
        return False
