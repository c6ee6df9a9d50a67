"""Train a face-recognition model: replicated backbone (DDP) + sharded Partial FC head.

    torchrun --nproc_per_node 8 trainer/train.py --config trainer/configs/ms1mv3_r50.yaml
    torchrun --nproc_per_node 2 trainer/train.py --config trainer/configs/cpu_demo.yaml \\
        optim.lr=0.05 data.batch_size=64
    python -m trainer.train --config ... key=value ...     (single process)

One optimizer step: every rank embeds its batch (autocast on GPU), PartialFC all-gathers
the embeddings and computes the global-batch mean loss over its class shard, backward
reduce-scatters the embedding gradients, DDP sums (not averages: the loss is already the
global mean) the backbone gradients, the backbone gradient is clipped, and
`TrainingOptimizer.step` updates backbone and the shard's sampled rows with the
scheduled learning rate. With `optim.grad_accum_steps = k` the loss of k micro-batches
is averaged before that step (DDP syncs on the last one only).

The step reads one value back to the host: whether loss and gradient norm are finite.
A non-finite step is skipped (no update) and counted on every rank alike (the loss and
the synced gradient norm are identical on all ranks); `run.max_nonfinite` of them in a
row stop the run with exit code 3. Config errors exit with code 2 before any process
group exists.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script (torchrun trainer/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from trainer import checkpoint
from trainer.backbones import get_backbone
from trainer.checkpoint import CheckpointError, TrainingParts, TrainState
from trainer.config import Config, ConfigError, load_config, save_config
from trainer.data.errors import DataError
from trainer.data.recordio_source import make_recordio_source, open_dataset
from trainer.data.synthetic import SyntheticIdentities
from trainer.data.torch_loader import TorchRecordIO
from trainer.dist import DistContext, init_distributed, shutdown
from trainer.margins import CombinedMargin
from trainer.metrics import (
    RunLog, StepMeter, gather_per_rank, memory_summary, setup_logging, start_metrics,
)
from trainer.optim import LRSchedule, ShardSGD, TrainingOptimizer, make_backbone_optimizer
from trainer.partial_fc import PartialFC
from trainer.plan import check_fits, plan_for_config
from trainer.preemption import EXIT_PREEMPTED, Preemption

if TYPE_CHECKING:
    from trainer.data.dali import DaliRecordIO  # imports nvidia.dali, an optional extra
    from trainer.evaluation.verification import VerificationSet

log = logging.getLogger("trainer.train")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4
EXIT_DATA = 5
# EXIT_PREEMPTED = 75 (trainer.preemption): checkpointed after SIGTERM/SIGUSR1; requeue me


class NonFiniteStop(RuntimeError):
    """Too many non-finite steps in a row."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="trainer/train.py",
        description=(
            "Train an ArcFace-family face-recognition model with a class-sharded Partial FC "
            "classifier. Launch one process per GPU with torchrun (or srun); a plain "
            "`python -m trainer.train` runs a single process."
        ),
        epilog=(
            "Overrides are section.key=value pairs, values parsed as YAML, e.g. "
            "optim.lr=0.05 data.batch_size=64 eval.targets=[lfw.bin]. Sections: run, "
            "backbone, margin, partial_fc, optim, data, checkpoint, eval, metrics, dist "
            "(see trainer/config.py for every key and its default). Outputs go to "
            "run.output_dir: config.yaml (resolved config), logs/rank{R}.log, "
            "metrics.jsonl, checkpoints/ (step-N directories, `latest` names the newest "
            "complete one; rerunning the same command resumes from it: "
            "checkpoint.resume=auto|never|PATH), backbone.pt. SIGTERM or SIGUSR1: finish "
            "the step, checkpoint, exit 75. Exit codes: 0 done, 2 config error, "
            "3 stopped after run.max_nonfinite non-finite steps in a row, 4 checkpoint "
            "cannot be loaded, 5 a bad record in the dataset, 75 preempted (checkpoint "
            "written; rerun to resume)."
        ),
    )
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the backbone, or None for plain fp32."""
    precision = cfg.backbone.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("backbone.precision: fp16 needs a GPU (GradScaler); use bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _sum_allreduce_hook(group, bucket):  # no annotations: DDP checks them at runtime
    """DDP comm hook: sum the backbone gradients over ranks (default DDP averages).

    PartialFC's loss is already the mean over the global batch, so each rank's backbone
    gradient is its share of the global gradient; the shares add up.
    """
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


@dataclass
class Run:
    """Everything one training process holds."""

    cfg: Config
    ctx: DistContext
    backbone: nn.Module  # DDP-wrapped
    pfc: PartialFC
    optimizer: TrainingOptimizer
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    source: SyntheticIdentities | TorchRecordIO | DaliRecordIO
    total_steps: int
    eval_sets: list[VerificationSet]

    @property
    def module(self) -> nn.Module:
        """The backbone without its DDP wrapper."""
        return self.backbone.module

    @property
    def parts(self) -> TrainingParts:
        """What a checkpoint saves and restores."""
        return TrainingParts(
            self.module, self.pfc, self.optimizer.shard, self.optimizer.backbone, self.scaler, self.cfg
        )


def build(cfg: Config, ctx: DistContext, first_epoch: int = 0) -> Run:
    """Every training object of this rank; `first_epoch`: the data epoch a resumed run
    starts in (the DALI reader is built for it)."""
    device = ctx.device
    amp_dtype = autocast_dtype(cfg, device)
    torch.manual_seed(cfg.run.seed)  # same backbone init on every rank (DDP also broadcasts)
    if cfg.data.source == "recordio":
        manifest = open_dataset(cfg.data)  # every rank checks the dataset it will read
        cfg.data.num_classes = manifest.num_classes  # resolves null; config.yaml records it
        source = make_recordio_source(
            cfg.data, manifest, ctx.rank, ctx.world_size, cfg.run.seed, device, first_epoch
        )
    else:
        source = SyntheticIdentities(
            cfg.data.num_classes, cfg.data.num_samples, cfg.data.batch_size, ctx.rank,
            ctx.world_size, cfg.data.image_size, cfg.run.seed, cfg.data.synthetic_mode,
        )
    plan = plan_for_config(cfg, ctx.world_size, device, ctx.env.local_world_size)
    if ctx.is_main:
        log.info("memory plan (per rank; arcshard-plan prints the same):\n%s", plan.table())
    check_fits(plan)  # the same verdict on every rank: a ConfigError with the numbers
    steps_per_epoch = source.steps_per_epoch // cfg.optim.grad_accum_steps
    if steps_per_epoch < 1 and cfg.run.max_steps == 0:
        raise ConfigError(
            f"optim.grad_accum_steps: {cfg.optim.grad_accum_steps} exceeds the "
            f"{source.steps_per_epoch} batches per epoch"
        )
    total_steps = cfg.run.max_steps or cfg.run.epochs * steps_per_epoch

    backbone = get_backbone(
        cfg.backbone.name, embedding_size=cfg.backbone.embedding_size, dropout=cfg.backbone.dropout
    ).to(device)
    if cfg.backbone.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    ddp = DistributedDataParallel(
        backbone, device_ids=[device.index] if device.type == "cuda" else None
    )
    ddp.register_comm_hook(None, _sum_allreduce_hook)

    margin = CombinedMargin(
        cfg.margin.s, cfg.margin.m1, cfg.margin.m2, cfg.margin.m3, cfg.margin.interclass_filter
    )
    # On GPU the per-step input check would cost a host sync; labels from our sources
    # are in range (synthetic by construction, recordio checked by the loaders on the
    # host) and batch sizes equal on every rank.
    pfc = PartialFC(
        cfg.data.num_classes, cfg.backbone.embedding_size, sample_rate=cfg.partial_fc.sample_rate,
        margin=margin, seed=cfg.run.seed, device=device, check_inputs=device.type == "cpu",
        storage=cfg.partial_fc.storage, offload=cfg.partial_fc.offload,
    )
    o = cfg.optim
    optimizer = TrainingOptimizer(
        make_backbone_optimizer(ddp.parameters(), o.name, o.lr, o.momentum, o.weight_decay),
        ShardSGD(pfc, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
        LRSchedule(o.lr, total_steps, o.warmup_steps, o.schedule, o.power, o.min_lr),
    )
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    eval_sets = load_eval_sets(cfg)
    return Run(cfg, ctx, ddp, pfc, optimizer, scaler, amp_dtype, source, total_steps, eval_sets)


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


def forward_backward(run: Run, images: Tensor, labels: Tensor, loss_scale: float, sync: bool) -> Tensor:
    """Loss of one micro-batch; backward of loss · loss_scale (DDP syncs when `sync`)."""
    device = run.ctx.device
    images = images.to(device, non_blocking=True)
    if run.cfg.backbone.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.to(device, non_blocking=True)
    with contextlib.nullcontext() if sync else run.backbone.no_sync():
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            embeddings = run.backbone(images)
        loss = run.pfc(embeddings, labels)
        scaled = loss * loss_scale
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    return loss.detach()


def _batches(run: Run, epoch: int, start: int = 0):
    """This rank's batches `start..` of `epoch`, prefetched by `data.workers` processes (the
    RecordIO loaders prefetch on their own)."""
    source, workers = run.source, run.cfg.data.workers
    if workers == 0 or not isinstance(source, SyntheticIdentities):
        return source.epoch_batches(epoch, start)
    steps = range(start, source.steps_per_epoch)
    return torch.utils.data.DataLoader(
        _EpochBatches(source, epoch), batch_size=None, sampler=steps, num_workers=workers,
        pin_memory=run.ctx.device.type == "cuda", prefetch_factor=4,
    )


class _EpochBatches(torch.utils.data.Dataset):
    def __init__(self, source: SyntheticIdentities, epoch: int) -> None:
        self.source, self.epoch = source, epoch

    def __len__(self) -> int:
        return self.source.steps_per_epoch

    def __getitem__(self, step: int):
        return self.source.batch(self.epoch, step)


class Preempted(RuntimeError):
    """SIGTERM/SIGUSR1 arrived; a checkpoint was written."""


def _position(run: Run, state: TrainState) -> TrainState:
    """`state` with an exhausted epoch rolled over to the start of the next one."""
    if state.batch_in_epoch >= run.source.steps_per_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return state


def evaluate(run: Run, state: TrainState, metrics, runlog: RunLog) -> bool:
    """Collective: verification accuracy on every `eval.targets` set; logs and records it,
    and returns whether the `eval.best_target` accuracy is a new best (kept in state.best)."""
    from trainer.evaluation.verification import evaluate_targets

    cfg = run.cfg
    started = time.perf_counter()
    results = evaluate_targets(
        run.module, run.eval_sets, run.ctx.device, cfg.eval.batch_size, cfg.eval.flip
    )
    seconds = time.perf_counter() - started
    for result in results.values():
        log.info("step %d verification %s", state.step, result.summary())
        metrics.verification(result.name, result.accuracy)
    runlog.record({"step": state.step, "eval": {k: r.as_dict() for k, r in results.items()},
                   "eval_seconds": seconds})
    target = Path(cfg.eval.best_target).stem if cfg.eval.best_target else run.eval_sets[0].name
    accuracy = results[target].accuracy
    if accuracy > state.best.get("accuracy", -1.0):
        state.best = {"target": target, "accuracy": accuracy, "step": state.step}
        return True
    return False


def save_checkpoint(run: Run, state: TrainState, metrics) -> Path:
    """Collective: write checkpoint `step-{state.step}` and time it."""
    started = time.perf_counter()
    root = checkpoint.checkpoints_root(run.cfg.run.output_dir)
    inject = run.cfg.checkpoint.inject_kill_during_save == state.step
    ckpt = checkpoint.save(
        root, run.parts, _position(run, state), keep=run.cfg.checkpoint.keep, inject_kill=inject
    )
    seconds = time.perf_counter() - started
    metrics.checkpoint_saved(seconds, state.step)
    log.info("checkpoint %s written in %.2f s", ckpt, seconds)
    return ckpt


def train(
    run: Run, state: TrainState | None = None,
    on_step: Callable[[Run, TrainState], None] | None = None,
) -> TrainState:
    """Train from `state` (a fresh run: step 0) to `run.total_steps`; returns the final
    state. Raises NonFiniteStop or Preempted (after writing a checkpoint). `on_step` is
    called after every optimizer step, once its checkpoint (if any) is written."""
    cfg, pfc = run.cfg, run.pfc
    state = state or TrainState()
    accum = cfg.optim.grad_accum_steps
    params = [p for p in run.backbone.parameters() if p.requires_grad]
    clip = cfg.optim.clip_grad_norm or math.inf
    inject = set(cfg.run.inject_nonfinite)
    samples_per_micro = cfg.data.batch_size * run.ctx.world_size
    device = run.ctx.device
    runlog = RunLog(cfg.run.output_dir, run.ctx.is_main, run.total_steps, state.step)
    meter = StepMeter()
    metrics = start_metrics(cfg, run.ctx)
    momentum = run.optimizer.shard.momentum_buffer  # None without momentum
    metrics.classifier(pfc.num_local, pfc.weight.nbytes + getattr(momentum, "nbytes", 0))
    every = cfg.checkpoint.every
    micro, saved_step = 0, state.step
    step_loss = None
    run.backbone.train()
    pfc.train()
    log.info(
        "training steps %d..%d: %d samples per step over %d ranks, %d classes (%d on this "
        "rank, %d sampled per step)", state.step + 1, run.total_steps, samples_per_micro * accum,
        run.ctx.world_size, pfc.num_classes, pfc.num_local, pfc.num_sample,
    )
    try:
        with Preemption() as preemption:
            step_started = time.perf_counter()
            while state.step < run.total_steps:
                _position(run, state)
                waited_since = time.perf_counter()
                data_wait = 0.0
                for images, labels in _batches(run, state.epoch, state.batch_in_epoch):
                    data_wait += time.perf_counter() - waited_since
                    micro += 1
                    state.batch_in_epoch += 1
                    last = micro % accum == 0
                    loss = forward_backward(run, images, labels, 1.0 / accum, sync=last)
                    if state.step + 1 in inject:
                        loss = loss * float("nan")
                    step_loss = loss / accum if step_loss is None else step_loss + loss / accum
                    if not last:
                        waited_since = time.perf_counter()
                        continue
                    if run.scaler is not None:
                        run.scaler.unscale_(run.optimizer.backbone)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                    check = step_loss if run.scaler is not None else step_loss + grad_norm
                    # Any rank signalled? (MAX over ranks, read with the finiteness check:
                    # still the step's one host read.)
                    stop = torch.tensor(float(preemption.requested), device=device)
                    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
                    finite, stop_now = torch.stack([torch.isfinite(check).float(), stop]).tolist()
                    if finite:
                        run.optimizer.step(state.step, run.scaler)
                        state.nonfinite_in_a_row = 0
                    else:
                        state.nonfinite_in_a_row += 1
                        state.nonfinite_total += 1
                        metrics.nonfinite_step()
                        log.warning(
                            "step %d: non-finite loss or gradient (%d in a row, %d in total): "
                            "update skipped", state.step + 1, state.nonfinite_in_a_row,
                            state.nonfinite_total,
                        )
                        if state.nonfinite_in_a_row >= cfg.run.max_nonfinite:
                            raise NonFiniteStop(
                                f"{state.nonfinite_in_a_row} non-finite steps in a row "
                                f"(run.max_nonfinite={cfg.run.max_nonfinite}) at step "
                                f"{state.step + 1}: lower optim.lr, check the data, or use "
                                "backbone.precision=fp32"
                            )
                    run.optimizer.zero_grad()
                    state.step += 1
                    step = state.step
                    meter.add(step_loss, grad_norm, samples_per_micro * accum, data_wait)
                    step_ended = time.perf_counter()
                    metrics.step_done(
                        step, cfg.data.batch_size * accum, step_ended - step_started, data_wait
                    )
                    step_started = step_ended
                    step_loss, data_wait = None, 0.0
                    if step % cfg.run.log_every == 0 or step == run.total_steps:
                        _log_point(run, state, meter, metrics, runlog)
                    if stop_now:
                        log.warning("preemption signal (%s): checkpointing at step %d",
                                    preemption.describe(), step)
                        save_checkpoint(run, state, metrics)
                        raise Preempted(f"checkpointed at step {step} after {preemption.describe()}")
                    eval_due = run.eval_sets and (
                        step == run.total_steps or (cfg.eval.every and step % cfg.eval.every == 0)
                    )
                    new_best = eval_due and evaluate(run, state, metrics, runlog)
                    if new_best or (every and step % every == 0) or step == run.total_steps:
                        ckpt = save_checkpoint(run, state, metrics)
                        saved_step = step
                        if new_best and run.ctx.is_main:
                            checkpoint.mark_best(ckpt.parent, ckpt)
                            log.info("new best %s accuracy %.4f: %s", state.best["target"],
                                     state.best["accuracy"], ckpt.name)
                    if on_step is not None:
                        on_step(run, state)
                    if step >= run.total_steps:
                        break
                    waited_since = time.perf_counter()
            if saved_step != state.step:
                save_checkpoint(run, state, metrics)
    finally:
        runlog.close()
        metrics.close()
    log.info("finished %d steps (%d skipped as non-finite); %s", state.step,
             state.nonfinite_total, memory_summary(run.ctx.device))
    return state


def _log_point(run: Run, state: TrainState, meter: StepMeter, metrics, runlog: RunLog) -> None:
    values, lr = meter.read(), run.optimizer.schedule(state.step - 1)  # the host sync
    scale = run.scaler.get_scale() if run.scaler is not None else 1.0
    metrics.log_point(values, lr, scale, run.pfc.last_sampled.numel(), run.ctx.device)
    per_rank = gather_per_rank(  # every rank is here: a tiny all-gather
        [values["samples_per_sec"] / run.ctx.world_size, values["data_wait_frac"]],
        run.ctx.device,
    )
    runlog.write(
        state.step, state.epoch, lr, values, nonfinite_total=state.nonfinite_total,
        samples_per_sec_per_rank=[r[0] for r in per_rank],
        data_wait_frac_per_rank=[r[1] for r in per_rank],
    )


def _data_error_line(exc: DataError) -> str:
    """The loader's one-line message (a DataLoader worker's re-raise wraps it in the
    worker's traceback text; its last line is the original)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split("DataError: ", 1)[-1]


def resume_point(cfg: Config, ctx: DistContext) -> Path | None:
    """The checkpoint this run starts from (collective: rank 0 first removes interrupted
    saves). The run's own `latest` always wins, so a requeued or restarted job continues
    where it stopped; `checkpoint.resume=PATH` only seeds a run that has none yet."""
    root = checkpoint.checkpoints_root(cfg.run.output_dir)
    if ctx.is_main:
        checkpoint.remove_incomplete(root)
    dist.barrier()
    own = checkpoint.find_latest(root)
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
    return checkpoint.resolve(mode)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"arcshard: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    ctx = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        setup_logging(cfg.run.output_dir, ctx.rank)
        try:
            start = resume_point(cfg, ctx)
            first_epoch = 0
            if start is not None:
                first_epoch = checkpoint.read_index(start)["train_state"]["epoch"]
            run = build(cfg, ctx, first_epoch)
            state = TrainState()
            if start is not None:
                state = checkpoint.load(start, run.parts, verify=cfg.checkpoint.verify, config=cfg)
                log.info("resumed from %s: step %d, epoch %d, batch %d of the epoch",
                         start, state.step, state.epoch, state.batch_in_epoch)
        except ConfigError as exc:
            if ctx.is_main:
                print(f"arcshard: config error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except CheckpointError as exc:
            log.error("cannot resume: %s", exc)
            if ctx.is_main:
                print(f"arcshard: checkpoint error: {exc}", file=sys.stderr)
            return EXIT_CHECKPOINT
        if ctx.is_main:
            save_config(cfg, Path(cfg.run.output_dir) / "config.yaml")
            log.info("output in %s; resolved config in config.yaml", cfg.run.output_dir)
        if state.step >= run.total_steps:
            log.info("nothing to do: the checkpoint is at step %d of %d", state.step, run.total_steps)
        try:
            train(run, state)
        except NonFiniteStop as exc:
            log.error("stopping: %s", exc)
            return EXIT_NONFINITE
        except Preempted as exc:
            log.warning("preempted: %s; exit %d (rerun the same command to resume)", exc, EXIT_PREEMPTED)
            return EXIT_PREEMPTED
        except DataError as exc:
            message = _data_error_line(exc)
            log.error("data error: %s", message)
            print(f"arcshard: data error (rank {ctx.rank}): {message}", file=sys.stderr)
            return EXIT_DATA
        if ctx.is_main:
            out = Path(cfg.run.output_dir) / "backbone.pt"
            tmp = out.with_name(out.name + ".tmp")
            torch.save(run.module.state_dict(), tmp)
            tmp.replace(out)  # atomic: never a half-written backbone.pt
            log.info("saved backbone weights to %s", out)
        dist.barrier()
        return EXIT_OK
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
