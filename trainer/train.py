"""Train a face-recognition model: replicated backbone (DDP) + sharded Partial FC head.

    torchrun --nproc_per_node 8 trainer/train.py --config trainer/configs/ms1mv3_r50.yaml
    torchrun --nproc_per_node 2 trainer/train.py --config trainer/configs/cpu_demo.yaml \\
        optim.lr=0.05 data.batch_size=64
    python -m trainer.train --config ... key=value ...     (single process)

The entry point: parse the config, join the process group, lock the output directory,
build the run (`trainer.run.build`), resume it from its checkpoint, hand it to the loop
(`trainer.loop.train`), and turn every known failure into one line and its exit code
(`trainer.exit_codes`). Config errors exit with code 2 before any process group exists.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun trainer/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from data_tools.atomic import write_atomic, write_atomic_with
from trainer import exit_codes
from trainer.checkpoint import CheckpointError, checkpoints_root, find_latest, read_index, resume_point
from trainer.checkpoint.backbone import check_weights, read_weights
from trainer.config import Config, ConfigError, load_config, save_config
from trainer.data.errors import DataError
from trainer.dist import DistContext, detect_env, init_distributed, shutdown
from trainer.loop import NonFiniteStop, Preempted, train
from trainer.run import Run, build
from trainer.run_lock import RunLock, RunLocked
from trainer.state import TrainState
from trainer.telemetry import setup_logging

log = logging.getLogger("trainer.train")


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
            "checkpoint.resume=auto|never|PATH), backbone.pt. One run at a time per "
            "run.output_dir (a second is refused with exit 2). backbone.init=PATH starts a "
            "new run from pretrained backbone weights (arcface_torch backbone.pth, model.pt "
            "or checkpoint_gpu_0.pt, an arcshard run or backbone.pt; ignored when resuming). "
            "SIGTERM or SIGUSR1: finish the step, checkpoint, exit 75. Under plain torchrun a worker's exit code "
            "becomes torchrun's 1; launch/train.sh and the sbatch scripts pass it through. "
            + exit_codes.describe(exit_codes.TRAINER)
        ),
    )
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def _launcher_rank() -> int:
    """This process's rank as its launcher set it (0 when it cannot tell): before the
    process group exists only rank 0 prints, so a config error is one line, not W."""
    try:
        return detect_env(os.environ).rank
    except ValueError:
        return 0


def check_world(cfg: Config) -> None:
    """What can be refused before the process group starts."""
    try:
        world = detect_env(os.environ).world_size
    except ValueError as exc:
        raise ConfigError(f"launcher environment: {exc}") from None
    classes = cfg.data.num_classes
    if classes is not None and classes < world:
        raise ConfigError(
            f"data.num_classes: {classes} classes cannot be sharded over {world} ranks "
            "(every rank owns at least one class); use fewer processes or more classes"
        )


def _lock(cfg: Config, ctx: DistContext) -> tuple[RunLock, str]:
    """Collective: rank 0 locks run.output_dir (every rank raises RunLocked if that
    failed) and reads or creates the run's id (OUTPUT/run_id: the same for every restart
    of this run, recorded in its checkpoints); returns the lock and the id."""
    lock = RunLock(cfg.run.output_dir)
    outcome: list = [None, None]
    if ctx.is_main:
        try:
            lock.acquire()
            outcome[1] = _run_id(Path(cfg.run.output_dir) / "run_id")
        except RunLocked as exc:
            outcome[0] = str(exc)
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RunLocked(outcome[0])
    return lock, outcome[1]


def _run_id(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        run_id = uuid.uuid4().hex
        write_atomic(path, run_id + "\n")
        return run_id


def init_weights(cfg: Config) -> dict[str, torch.Tensor] | None:
    """`backbone.init`'s weights, checked to fit the configured backbone, when this run
    starts fresh (a run with checkpoints of its own, or `checkpoint.resume=PATH`, resumes
    instead); read before the process group so a bad file is one config line."""
    if cfg.backbone.init is None or cfg.checkpoint.resume not in ("auto", "never"):
        return None
    if find_latest(checkpoints_root(cfg.run.output_dir)) is not None:
        return None
    try:
        state = read_weights(cfg.backbone.init)
        check_weights(state, cfg.backbone.init, cfg.backbone.name, cfg.backbone.embedding_size)
    except CheckpointError as exc:
        raise ConfigError(f"backbone.init: {exc}") from None
    return state


def start(
    cfg: Config, ctx: DistContext, init: dict[str, torch.Tensor] | None = None
) -> tuple[Run, TrainState]:
    """The run and the state it starts from (its checkpoint's, or step 0 with the
    backbone weights `init` when given)."""
    checkpoint = resume_point(cfg, ctx.is_main)
    first_epoch = read_index(checkpoint)["train_state"]["epoch"] if checkpoint else 0
    run = build(cfg, ctx, first_epoch)
    if cfg.data.num_classes == 1 and ctx.is_main:
        log.warning("data.num_classes is 1: the softmax has nothing to separate and the loss "
                    "goes to 0 without learning anything; train on at least two identities")
    state = TrainState()
    if checkpoint is not None:
        from trainer.checkpoint import load

        state = load(checkpoint, run.parts, verify=cfg.checkpoint.verify, config=cfg)
        log.info("resumed from %s: step %d, epoch %d, batch %d of the epoch",
                 checkpoint, state.step, state.epoch, state.batch_in_epoch)
        if cfg.backbone.init is not None:
            log.info("backbone.init=%s ignored: resuming, the run's own checkpoint wins", cfg.backbone.init)
    elif init is not None:
        run.module.load_state_dict(init)  # every rank loads the same file: replicas stay equal
        log.info("backbone weights from %s (backbone.init); the classifier starts fresh", cfg.backbone.init)
    if ctx.is_main:
        save_config(cfg, Path(cfg.run.output_dir) / "config.yaml")
        log.info("output in %s; resolved config in config.yaml", cfg.run.output_dir)
    if state.step >= run.total_steps:
        log.info("nothing to do: the checkpoint is at step %d of %d", state.step, run.total_steps)
    return run, state


def save_backbone(run: Run) -> None:
    """Rank 0: OUTPUT/backbone.pt, the weights the run serves as CPU tensors (loads
    anywhere): the average with `backbone.ema_decay` > 0 (then the trained weights go to
    OUTPUT/backbone_raw.pt), else the trained weights."""
    if not run.ctx.is_main:
        return
    out = Path(run.cfg.run.output_dir)
    files = [("backbone.pt", run.module, "trained")]
    if run.ema is not None:
        files = [("backbone.pt", run.ema.module, "averaged (EMA)"), ("backbone_raw.pt", run.module, "trained")]
    for name, module, what in files:
        weights = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        write_atomic_with(out / name, lambda f: torch.save(weights, f))
        log.info("saved %s backbone weights to %s", what, out / name)


def _one_line(exc: BaseException) -> str:
    """An error's own one-line message (a DataLoader worker's re-raise wraps it in the
    worker's traceback text; its last line is the original)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split("DataError: ", 1)[-1]


# Failure -> exit code, the start of its one line on stderr (None: logged only), and
# whether every rank prints it (a data error may happen on one rank only; the others
# are raised on every rank alike).
_FAILURES: list[tuple[type[BaseException], int, str | None, bool]] = [
    (RunLocked, exit_codes.CONFIG, "config error", False),
    (ConfigError, exit_codes.CONFIG, "config error", False),
    (CheckpointError, exit_codes.CHECKPOINT, "checkpoint error", False),
    (DataError, exit_codes.DATA, "data error", True),
    (NonFiniteStop, exit_codes.NONFINITE, None, False),
    (Preempted, exit_codes.PREEMPTED, None, False),
]


def _failed(exc: BaseException, ctx: DistContext) -> int:
    kind, code, label, every_rank = next(f for f in _FAILURES if isinstance(exc, f[0]))
    message = _one_line(exc)
    if kind is Preempted:
        log.warning("preempted: %s; exit %d (rerun the same command to resume)", message, code)
    elif label is None:
        log.error("stopping: %s", message)
    elif kind not in (RunLocked, ConfigError):  # those come before or instead of the logs
        log.error("%s: %s", label, message)
    if label is not None and (ctx.is_main or every_rank):
        where = f" (rank {ctx.rank})" if every_rank else ""
        print(f"arcshard: {label}{where}: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_world(cfg)
        init = init_weights(cfg)
        ctx = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    except (ConfigError, ValueError) as exc:  # ValueError: the device/backend choice
        if _launcher_rank() == 0:
            print(f"arcshard: config error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG
    lock = None
    try:
        lock, run_id = _lock(cfg, ctx)
        setup_logging(cfg.run.output_dir, ctx.rank)
        run, state = start(cfg, ctx, init)
        train(run, state, run_id=run_id)
        save_backbone(run)
        dist.barrier()
        return exit_codes.OK
    except tuple(f[0] for f in _FAILURES) as exc:
        return _failed(exc, ctx)
    finally:
        if lock is not None:
            lock.release()
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
