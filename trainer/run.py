"""Build every training object of one process from a validated Config: the `Run`.

The backbone is replicated (DDP with a summing comm hook), the classifier is this rank's
Partial FC shard, and one `TrainingOptimizer` steps both. The settings chosen here, and
why (docs/performance.md has the measurements):

* Buffers broadcast from rank 0 every forward (DDP's default, `broadcast_buffers=True`,
  named `forward_sync_buffers` from PyTorch 2.13; arcface_torch turns it off): BatchNorm running
  statistics stay identical on every rank, so rank 0's checkpoint is every rank's state
  (exact resume) and verification split over ranks embeds with one network. The cost is
  one broadcast of the BN buffers per forward: 0.15 MB for iresnet50, against 174 MB of
  gradients all-reduced per step.
* `gradient_as_bucket_view=True`: gradients live in DDP's communication buckets instead
  of a second copy (one backbone's worth of memory saved; no semantic change).
* `torch.backends.cudnn.benchmark` is set by `trainer.dist` on GPUs (every batch has the
  same 112x112 shape, so the autotuned kernels are chosen once).
* `backbone.channels_last` (default true) stores the convolution weights NHWC; the batch
  is converted on the device once per step (cheap next to the convolutions; DALI and the
  loaders produce NCHW).
* `backbone.compile`: `nn.Module.compile()` compiles the backbone's forward in place, so
  state_dict keys, checkpoints and ONNX export are those of the eager module; the
  classifier stays eager (its collectives and sparse update are not compiled).
* `backbone.ema_decay` > 0: `trainer.ema.BackboneEMA`, an averaged copy of the backbone
  made from the eager module before it is compiled or wrapped (so its state_dict keys are
  the backbone's and it is evaluated, saved and exported like it); `train_step` updates it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from trainer.backbones import backbone_options, get_backbone
from trainer.checkpoint import TrainingParts
from trainer.config import Config, ConfigError
from trainer.data.source import BatchSource, build_source
from trainer.dist import DistContext
from trainer.ema import BackboneEMA
from trainer.evaluation.evaluator import load_eval_sets
from trainer.margins import build_margin
from trainer.optim import (
    LRSchedule, TrainingOptimizer, make_backbone_optimizer, make_shard_optimizer,
)
from trainer.partial_fc import PartialFC
from trainer.plan import check_fits, plan_for_config

if TYPE_CHECKING:
    from trainer.evaluation.verification import VerificationSet

log = logging.getLogger(__name__)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the backbone, or None for plain fp32. fp16 works on CPU
    too (float16 autocast + GradScaler("cpu")): slow, but it makes the path testable."""
    precision = cfg.backbone.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _sum_allreduce_hook(group, bucket):  # no annotations: DDP checks them at runtime
    """DDP comm hook: sum the backbone gradients over ranks (default DDP averages).

    PartialFC's loss is already the mean over the global batch, so each rank's backbone
    gradient is its share of the global gradient; the shares add up.
    """
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class StepFlags:
    """The step's one host read: [loss finite, gradient finite, any rank signalled]."""

    def __init__(self, device: torch.device) -> None:
        self.stop = torch.zeros(1, device=device)  # reused: no host-to-device copy per step

    def read(self, loss: Tensor, grad_norm: Tensor, stop_requested: bool) -> tuple[bool, bool, bool]:
        self.stop.fill_(float(stop_requested))  # a fill kernel, not a blocking copy
        dist.all_reduce(self.stop, op=dist.ReduceOp.MAX)
        flags = torch.cat([torch.isfinite(loss).reshape(1), torch.isfinite(grad_norm).reshape(1),
                           self.stop > 0])
        loss_ok, grad_ok, stop = flags.tolist()
        return bool(loss_ok), bool(grad_ok), bool(stop)


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
    source: BatchSource
    total_steps: int
    eval_sets: list[VerificationSet]
    flags: StepFlags
    ema: BackboneEMA | None = None  # backbone.ema_decay > 0

    @property
    def module(self) -> nn.Module:
        """The backbone without its DDP wrapper."""
        return self.backbone.module

    @property
    def parts(self) -> TrainingParts:
        """What a checkpoint saves and restores."""
        return TrainingParts(
            self.module, self.pfc, self.optimizer.shard, self.optimizer.backbone, self.scaler, self.cfg,
            self.ema,
        )


def _total_steps(cfg: Config, source: BatchSource) -> int:
    if source.steps_per_epoch < 1:
        raise ConfigError(
            f"data: this rank gets no batch per epoch (batch size {cfg.data.batch_size}); "
            "lower data.batch_size or use more data"
        )
    optimizer_steps = source.steps_per_epoch // cfg.optim.grad_accum_steps
    if optimizer_steps < 1 and cfg.run.max_steps == 0:
        raise ConfigError(
            f"optim.grad_accum_steps: {cfg.optim.grad_accum_steps} exceeds the "
            f"{source.steps_per_epoch} batches per epoch"
        )
    return cfg.run.max_steps or cfg.run.epochs * optimizer_steps


def _backbone(cfg: Config, device: torch.device) -> tuple[DistributedDataParallel, BackboneEMA | None]:
    """The DDP-wrapped backbone and its average (None when backbone.ema_decay is 0),
    copied from the eager module before compile and DDP touch it."""
    backbone = get_backbone(
        cfg.backbone.name, embedding_size=cfg.backbone.embedding_size, dropout=cfg.backbone.dropout,
        **backbone_options(cfg.backbone),
    ).to(device)
    if cfg.backbone.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    ema = BackboneEMA(backbone, cfg.backbone.ema_decay) if cfg.backbone.ema_decay > 0 else None
    if cfg.backbone.compile:
        backbone.compile()
    ddp = DistributedDataParallel(
        backbone, device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,  # buffers broadcast every forward: DDP's default
    )
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    return ddp, ema


def _decay(part: float | None, o) -> float:
    """A part's weight decay: its own setting, else optim.weight_decay."""
    return o.weight_decay if part is None else part


def build(cfg: Config, ctx: DistContext, first_epoch: int = 0) -> Run:
    """Every training object of this rank; `first_epoch`: the data epoch a resumed run
    starts in (the DALI reader is built for it)."""
    device = ctx.device
    amp_dtype = autocast_dtype(cfg, device)
    torch.manual_seed(cfg.run.seed)  # same backbone init on every rank (DDP also broadcasts)
    source = build_source(cfg.data, ctx.rank, ctx.world_size, cfg.run.seed, device, first_epoch)
    plan = plan_for_config(cfg, ctx.world_size, device, ctx.env.local_world_size)
    if ctx.is_main:
        log.info("memory plan (per rank; arcshard-plan prints the same):\n%s", plan.table())
    check_fits(plan)  # the same verdict on every rank: a ConfigError with the numbers
    total_steps = _total_steps(cfg, source)
    ddp, ema = _backbone(cfg, device)
    margin = build_margin(cfg.margin)
    # On GPU the per-step input check would cost a host sync; labels from our sources
    # are in range (synthetic by construction, recordio checked by the loaders on the
    # host) and batch sizes equal on every rank.
    pfc = PartialFC(
        cfg.data.num_classes, cfg.backbone.embedding_size, sample_rate=cfg.partial_fc.sample_rate,
        margin=margin, subcenters=cfg.partial_fc.subcenters, seed=cfg.run.seed, device=device,
        check_inputs=device.type == "cpu",
        storage=cfg.partial_fc.storage, offload=cfg.partial_fc.offload,
    )
    o = cfg.optim
    optimizer = TrainingOptimizer(
        make_backbone_optimizer(
            ddp.parameters(), o.name, o.lr, o.momentum, _decay(o.backbone_weight_decay, o)
        ),
        make_shard_optimizer(pfc, o.name, o.lr, o.momentum, _decay(o.classifier_weight_decay, o)),
        LRSchedule(o.lr, total_steps, o.warmup_steps, o.schedule, o.power, o.min_lr),
        o.backbone_lr_scale, o.classifier_lr_scale,
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    eval_sets = load_eval_sets(cfg)
    return Run(
        cfg, ctx, ddp, pfc, optimizer, scaler, amp_dtype, source, total_steps, eval_sets,
        StepFlags(device), ema,
    )
