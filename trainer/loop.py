"""The training loop and one optimizer step.

`train_step` is one optimizer step: every rank embeds its micro-batches (autocast when
configured), PartialFC all-gathers the embeddings and computes the global-batch mean
loss over its class shard, backward reduce-scatters the embedding gradients, DDP sums
(not averages: the loss is already the global mean) the backbone gradients, the
backbone gradient is unscaled (fp16) and clipped, and `TrainingOptimizer.step` updates
backbone and the shard's sampled rows with the scheduled learning rate. With
`optim.grad_accum_steps = k` the loss of k micro-batches is averaged before that step
(DDP syncs on the last one only).

For the first `optim.freeze_backbone_steps` steps only the classifier trains (fine-tuning
from `backbone.init`: random class centres would otherwise send large gradients into
pretrained features): the backbone runs in eval mode (BatchNorm statistics and dropout
frozen) without autograd, so it gets no gradient, no update and no weight decay. Whether a
step is frozen depends only on its number, so a resumed run freezes exactly the same steps.

The step reads one value back to the host (`StepFlags.read`): whether loss and gradient
norm are finite and whether any rank was asked to stop (SIGTERM/SIGUSR1). A step with a
non-finite loss (or, without a loss scaler, a non-finite gradient) is skipped and
counted on every rank alike (the loss and the synced gradient norm are identical on
all ranks); `run.max_nonfinite` of them in a row stop the run with exit code 3. With
fp16 a non-finite gradient at a finite loss is the loss scale overflowing: the update is
skipped and the GradScaler lowers its scale, as `GradScaler.step` would, uncounted.

With `backbone.ema_decay` > 0 an applied step also updates the backbone's average
(`trainer.ema`: device-side foreach ops, no host read); a skipped step does not.

`train` is the loop: batches, the step, then the components that keep their own time
(telemetry, evaluation, checkpointing), each told only the step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.checkpoint import Checkpointer
from trainer.evaluation.evaluator import Evaluator
from trainer.preemption import Preemption
from trainer.run import Run
from trainer.state import TrainState
from trainer.telemetry import Telemetry, memory_summary

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]


class NonFiniteStop(RuntimeError):
    """Too many non-finite steps in a row."""


class Preempted(RuntimeError):
    """SIGTERM/SIGUSR1 arrived; a checkpoint was written."""


@dataclass
class StepResult:
    loss: Tensor  # mean over the step's micro-batches (on the device, detached)
    grad_norm: Tensor  # backbone gradient norm before clipping
    applied: bool  # the update was applied
    nonfinite: bool  # skipped for a non-finite loss (or gradient): counted
    stop: bool  # some rank was signalled: checkpoint and stop
    data_wait: float = 0.0  # seconds spent waiting for this step's batches
    logit_stats: Tensor | None = None  # [max logit, mean target cosine] (device, detached)


@contextlib.contextmanager
def _frozen(backbone: torch.nn.Module) -> Iterator[None]:
    """The backbone in eval mode (BatchNorm statistics and dropout frozen) without
    autograd; its mode is restored after."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        backbone.train(was_training)


def forward_backward(
    run: Run, images: Tensor, labels: Tensor, loss_scale: float, sync: bool, frozen: bool = False
) -> Tensor:
    """Loss of one micro-batch; backward of loss · loss_scale (DDP syncs when `sync`);
    `frozen`: the backbone embeds in eval mode without autograd (see the module docstring)."""
    device = run.ctx.device
    images = images.to(device, non_blocking=True)
    if run.cfg.backbone.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.to(device, non_blocking=True)
    with contextlib.nullcontext() if sync else run.backbone.no_sync():
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None), \
                _frozen(run.backbone) if frozen else contextlib.nullcontext():
            embeddings = run.backbone(images)
        loss = run.pfc(embeddings, labels)
        scaled = loss * loss_scale
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    return loss.detach()


def train_step(run: Run, micro_batches: list[Batch], step: int, stop_requested: bool) -> StepResult:
    """Optimizer step `step` (1-based) on `micro_batches`; see the module docstring."""
    accum = len(micro_batches)
    frozen = step <= run.cfg.optim.freeze_backbone_steps
    losses, stats = [], []
    for i, (images, labels) in enumerate(micro_batches):
        losses.append(forward_backward(run, images, labels, 1.0 / accum, sync=i == accum - 1,
                                       frozen=frozen))
        stats.append(run.pfc.last_logit_stats)
    loss = sum(losses) / accum
    logit_stats = torch.stack(stats)  # [accum, 2]: (max logit, mean target cosine)
    logit_stats = torch.stack([logit_stats[:, 0].max(), logit_stats[:, 1].mean()])
    if step in run.cfg.run.inject_nonfinite:  # fault injection for tests and drills
        loss = loss * float("nan")
    scaler = run.scaler
    if scaler is not None:
        scaler.unscale_(run.optimizer.backbone)
    params = [p for p in run.backbone.parameters() if p.requires_grad]
    grad_norm = (
        torch.zeros((), device=run.ctx.device) if frozen  # no backbone gradient to clip
        else torch.nn.utils.clip_grad_norm_(params, run.cfg.optim.clip_grad_norm or math.inf)
    )
    loss_ok, grad_ok, stop = run.flags.read(loss, grad_norm, stop_requested)
    applied = loss_ok and grad_ok
    if applied:
        run.optimizer.step(step - 1, scaler)
        if run.ema is not None:  # the backbone's average: applied steps only, no host read
            run.ema.update()
    elif scaler is not None:
        scaler.update()  # after unscale_: lowers the scale on overflow, re-arms unscale_
    run.optimizer.zero_grad()
    nonfinite = not loss_ok or (not grad_ok and scaler is None)
    return StepResult(loss, grad_norm, applied, nonfinite, stop, logit_stats=logit_stats)


def step_batches(run: Run, state: TrainState) -> Iterator[tuple[list[Batch], float]]:
    """This rank's batches from where `state` stands, in groups of `grad_accum_steps`
    (a group may span an epoch boundary), each with the seconds spent waiting for it.
    Advances `state.epoch` / `state.batch_in_epoch` as batches are taken."""
    accum, group, waited = run.cfg.optim.grad_accum_steps, [], 0.0
    while True:
        state.rolled_over(run.source.steps_per_epoch)
        since = time.perf_counter()
        for batch in run.source.epoch_batches(state.epoch, state.batch_in_epoch):
            waited += time.perf_counter() - since
            state.batch_in_epoch += 1
            group.append(batch)
            if len(group) == accum:
                yield group, waited
                group, waited = [], 0.0
            since = time.perf_counter()


def _count(run: Run, state: TrainState, result: StepResult) -> None:
    """Non-finite bookkeeping for step `state.step`; raises NonFiniteStop at the limit."""
    if not result.nonfinite:
        state.nonfinite_in_a_row = 0
        return
    state.nonfinite_in_a_row += 1
    state.nonfinite_total += 1
    limit = run.cfg.run.max_nonfinite
    log.warning("step %d: non-finite loss or gradient (%d in a row, %d in total): update skipped",
                state.step, state.nonfinite_in_a_row, state.nonfinite_total)
    if state.nonfinite_in_a_row >= limit:
        raise NonFiniteStop(
            f"{state.nonfinite_in_a_row} non-finite steps in a row (run.max_nonfinite={limit}) "
            f"at step {state.step}: lower optim.lr, check the data, or use backbone.precision=fp32"
        )


def train(
    run: Run, state: TrainState | None = None,
    on_step: Callable[[Run, TrainState], None] | None = None, run_id: str | None = None,
) -> TrainState:
    """Train from `state` (a fresh run: step 0; a resumed one: its checkpoint's) to
    `run.total_steps`; returns the final state. Raises NonFiniteStop, or Preempted after
    writing a checkpoint. `on_step` (a test hook) is called after every optimizer step,
    once its checkpoint (if any) is written; `run_id` marks this run's checkpoints."""
    state = state or TrainState()
    telemetry = Telemetry(run, state.step)
    evaluator = Evaluator(run, telemetry)
    checkpointer = Checkpointer(
        run.cfg, run.parts, run.source.steps_per_epoch, run.total_steps, telemetry,
        run_id=run_id, resumed_at=state.step or None,
    )
    run.backbone.train()
    run.pfc.train()
    if run.ema is not None and state.step == 0:
        run.ema.reset()  # a new run's average starts from its first weights (backbone.init's too)
    _log_start(run, state)
    try:
        with Preemption() as preemption:
            batches = step_batches(run, state)
            while state.step < run.total_steps:
                micro_batches, data_wait = next(batches)
                result = train_step(run, micro_batches, state.step + 1, preemption.requested)
                result.data_wait = data_wait
                state.step += 1
                _count(run, state, result)
                telemetry.step_done(state, result)
                if result.stop:
                    log.warning("preemption signal (%s): checkpointing at step %d",
                                preemption.describe(), state.step)
                    checkpointer.maybe_save(state, force=True)
                    raise Preempted(f"checkpointed at step {state.step} after {preemption.describe()}")
                checkpointer.maybe_save(state, best=evaluator.maybe_run(state))
                if on_step is not None:
                    on_step(run, state)
            checkpointer.finish(state)
    finally:
        telemetry.close()
    log.info("finished %d steps (%d skipped as non-finite); %s", state.step,
             state.nonfinite_total, memory_summary(run.ctx.device))
    return state


def _log_start(run: Run, state: TrainState) -> None:
    cfg, pfc = run.cfg, run.pfc
    log.info(
        "training steps %d..%d: %d samples per step over %d ranks, %d classes (%d on this "
        "rank, %d sampled per step)", state.step + 1, run.total_steps,
        cfg.data.batch_size * run.ctx.world_size * cfg.optim.grad_accum_steps,
        run.ctx.world_size, pfc.num_classes, pfc.num_local, pfc.num_sample,
    )
    if run.ema is not None:
        log.info("backbone EMA: decay %g after a warm-up, %d updates so far; evaluation, best, "
                 "export and embedding use it (--raw-weights: the trained weights)",
                 run.ema.decay, run.ema.updates)
