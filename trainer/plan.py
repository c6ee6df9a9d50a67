"""Memory plan of a training run: bytes per rank by part, and the largest class count that fits.

`arcshard-plan` (trainer/cli/plan.py) prints it; `trainer.run.build` calls
`plan_for_config` + `check_fits` at start-up (logs the table, refuses a run that does not
fit, with the numbers).

The classifier formulae follow the buffers `trainer/partial_fc/` and `trainer/optim.py`
allocate on the worst-loaded rank (n = ceil(C/W) classes, K sampled rows, N = W·B global
batch, D embedding size, s storage bytes per value (4 for fp32, 2 for bf16/fp16),
c = 4 compute bytes):

* class centres n·D·s and momentum n·D·s (AdamW: two moments 2·n·D·s, plus its per-row
  step counts n·4 on the device): on the device, or on the host with offload;
* sampled rows: forward's copy [K, D]·c (none at rate 1 with fp32 on-device storage: the
  shard itself is scored) and its gradient [K, D]·c, both kept from step to step
  (`Workspace`); with host offload the rows pass through host buffers (pinned on CUDA)
  for the rows in and the updated rows and momentum out (3·K·D·s, plus two momentum
  chunks in: a full one and the last) and their device twins;
* logits and their gradient: one fused [N, K]·c buffer (the gradient is computed in place);
* update: ShardSGD's momentum chunk [min(K, 4096), D]·c (ShardAdamW: its two moment
  chunks and the denominator, three), plus, for 16-bit storage,
  the rounding temporaries of one [min(K, 4096), D] chunk (per value: bf16 8 bytes,
  fp16 19 bytes) and (without offload) the s-byte staging chunks of the rows read and
  of the momentum reads (a full and a last chunk); backward's row-wise dot products, a
  [min(K, 8192), D]·c product per chunk; sampling: n+1 random scores (4 bytes each) and
  K-sized top-k/sort outputs; embeddings all-gathered, normalised and their gradient
  (~4 N·D·c).

Backbone (replicated): parameters, gradients, SGD momentum (AdamW: two moments) and
DDP's gradient buckets, 4 bytes per parameter each (parameter counts are exact, from the
model built on the meta device); activations = measured bytes per image × batch: the
bytes of every tensor autograd saves for backward in one fp32 training forward, measured
on CPU with `torch.autograd.graph.saved_tensors_hooks` at batch 2 and 4 (the difference
over 2 images, so parameters saved by convolutions are not counted); under 16-bit
autocast half of it (assumes every saved activation is 16-bit: an estimate, not a
measurement). With backbone.activation_checkpointing=blocks the table measured the same
way with every block checkpointed (what stays: the blocks' inputs and what autograd saves
outside them). DALI (CUDA only): 3 batches of fp32 CHW 112×112 output (prefetch depth 2
+ the one in use) and their uint8 decode, plus a fixed 256 MiB for the decoder
(assumed). Runtime: CUDA context, cuBLAS/cuDNN workspaces and allocator slack, a fixed
1.5 GiB (assumed); on CPU the interpreter, torch and gloo, 0.35 GiB (measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


GIB = 1024**3
STORAGE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
COMPUTE_BYTES = 4
CHUNK_ROWS = 4096  # trainer.optim.ShardRowOptimizer.CHUNK_ROWS (state rows per update chunk)
ROW_CHUNK = 4096  # trainer.partial_fc.storage.ROW_CHUNK (rows per 16-bit conversion / rounding)
ROW_DOT_CHUNK = 8192  # rows per chunk of partial_fc._row_dot (a [chunk, D] product)
ROUNDING_BYTES = {"fp32": 0, "bf16": 8, "fp16": 19}  # per value of one chunk, see above
IMAGE_VALUES = 3 * 112 * 112

# Bytes autograd saves per image in one fp32 training forward (see the module docstring).
ACTIVATION_BYTES_PER_IMAGE = {
    "iresnet18": 46_113_792,
    "iresnet34": 61_166_592,
    "iresnet50": 70_800_384,
    "iresnet100": 111_744_000,
    "iresnet200": 195_437_568,
    "mobilefacenet": 45_214_720,
    "vit_t": 26_169_248,  # ViTs at their default mask ratio (10% of the tokens; vit_h 0)
    "vit_s": 52_108_192,
    "vit_b": 102_907_456,
    "vit_l": 154_208_832,
    "vit_h": 454_658_552,
}
# The same with backbone.activation_checkpointing=blocks (iresnet and ViT only).
ACTIVATION_BYTES_CHECKPOINTED = {
    "iresnet18": 12_897_280,
    "iresnet34": 15_406_080,
    "iresnet50": 17_011_712,
    "iresnet100": 23_835_648,
    "iresnet200": 37_784_576,
    "vit_t": 2_317_576,
    "vit_s": 4_479_240,
    "vit_b": 7_649_544,
    "vit_l": 11_396_360,
    "vit_h": 29_653_120,
}
CUDA_RUNTIME_BYTES = int(1.5 * GIB)
CPU_RUNTIME_BYTES = int(0.35 * GIB)
DALI_DECODER_BYTES = 256 * 2**20
MAX_CLASSES_SEARCHED = 10**13


@dataclass(frozen=True)
class PlanInputs:
    """What a plan depends on. Memory sizes in bytes; `host_memory` None: not checked.
    `device` "cuda" or "cpu" (on CPU, device memory is host memory: everything counts
    against `device_memory`). `backbone` None plans the classifier alone."""

    num_classes: int
    world_size: int
    device_memory: int
    embedding_size: int = 512
    batch_size: int = 128
    sample_rate: float = 0.1
    backbone: str | None = "iresnet100"
    storage: str = "fp32"
    offload: str = "none"
    host_memory: int | None = None
    device: str = "cuda"
    momentum: bool = True
    optimizer: str = "sgd"
    amp16: bool = True  # backbone under 16-bit autocast (halves the activation estimate)
    activation_checkpointing: bool = False  # backbone blocks recomputed in backward
    subcenters: int = 1  # sub-center ArcFace: K centres per class, moved as one K·D row
    ema: bool = False  # backbone.ema_decay > 0: one more fp32 copy of the backbone

    def __post_init__(self) -> None:
        checks = [
            ("num_classes", self.num_classes >= self.world_size,
             f"must be >= the world size {self.world_size}"),
            ("world_size", self.world_size >= 1, "must be >= 1"),
            ("device_memory", self.device_memory > 0, "must be > 0"),
            ("embedding_size", self.embedding_size >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("subcenters", self.subcenters >= 1, "must be >= 1"),
            ("sample_rate", 0 < self.sample_rate <= 1, "must be in (0, 1]"),
            ("storage", self.storage in STORAGE_BYTES,
             f"must be one of {', '.join(STORAGE_BYTES)}"),
            ("offload", self.offload in ("none", "host"), "must be none or host"),
            ("host_memory", self.host_memory is None or self.host_memory > 0, "must be > 0"),
            ("device", self.device in ("cuda", "cpu"), "must be cuda or cpu"),
            ("optimizer", self.optimizer in ("sgd", "adamw"), "must be sgd or adamw"),
            ("backbone", self.backbone is None or self.backbone in ACTIVATION_BYTES_PER_IMAGE,
             f"must be one of {', '.join(ACTIVATION_BYTES_PER_IMAGE)}"),
            ("activation_checkpointing", not self.activation_checkpointing or self.backbone is None
             or self.backbone in ACTIVATION_BYTES_CHECKPOINTED,
             f"needs one of {', '.join(ACTIVATION_BYTES_CHECKPOINTED)}"),
        ]
        for name, good, what in checks:
            if not good:
                raise ValueError(f"{name}: {what}, got {getattr(self, name)!r}")


@dataclass
class Part:
    name: str
    device: int  # bytes on the device
    host: int  # bytes in host memory (beyond what `device` counts on a CPU device)
    formula: str
    classifier: bool  # True: a classifier part (what the CPU validation measures)


@dataclass
class Plan:
    inputs: PlanInputs
    num_local: int
    num_sample: int
    parts: list[Part] = field(default_factory=list)
    max_num_classes: int = 0

    @property
    def device_bytes(self) -> int:
        return sum(p.device for p in self.parts)

    @property
    def host_bytes(self) -> int:
        return sum(p.host for p in self.parts)

    @property
    def classifier_bytes(self) -> int:
        """Device + host bytes of the classifier parts."""
        return sum(p.device + p.host for p in self.parts if p.classifier)

    @property
    def fits(self) -> bool:
        return _fits(self.inputs, self.device_bytes, self.host_bytes)

    def table(self) -> str:
        i = self.inputs
        lines = [
            f"memory plan: {i.num_classes:,} classes, D={i.embedding_size}, {i.world_size} "
            f"rank(s), batch {i.batch_size}/rank (global {i.batch_size * i.world_size}), "
            f"sample rate {i.sample_rate:g}, backbone {i.backbone or 'none'}, storage "
            f"{i.storage}, offload {i.offload}, {i.device} device"
            + (f", {i.subcenters} sub-centres per class (D below: {i.subcenters}·D)"
               if i.subcenters > 1 else ""),
            f"per rank (worst rank): {self.num_local:,} classes, {self.num_sample:,} "
            "sampled rows per step",
            f"{'part':<34} {'device GiB':>10} {'host GiB':>9}  formula",
        ]
        for p in self.parts:
            host = f"{p.host / GIB:9.3f}" if p.host else f"{'-':>9}"
            lines.append(f"{p.name:<34} {p.device / GIB:10.3f} {host}  {p.formula}")
        dev_cap = f"{i.device_memory / GIB:.2f}"
        host_cap = "not checked" if i.host_memory is None else f"{i.host_memory / GIB:.2f}"
        lines.append(f"{'total':<34} {self.device_bytes / GIB:10.3f} {self.host_bytes / GIB:9.3f}")
        lines.append(f"{'available':<34} {dev_cap:>10} {host_cap:>9}")
        lines.append(f"fits: {'yes' if self.fits else 'NO'}")
        lines.append(f"max_num_classes: {self.max_num_classes}")
        return "\n".join(lines)


def saved_activation_bytes(model, x) -> int:
    """Bytes autograd keeps for backward after `model(x)` (a training forward): every
    distinct storage a backward node saves, plus the inputs of checkpointed blocks (the
    checkpoint keeps those and nothing inside). How ACTIVATION_BYTES_PER_IMAGE was
    measured: (bytes at batch 4 − bytes at batch 2) / 2, which cancels saved parameters."""
    import torch

    from trainer.backbones.iresnet import IBasicBlock
    from trainer.backbones.vit import Block

    storages: dict[int, int] = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def block_input(module, args):
        if getattr(model, "checkpoint_blocks", False):
            keep(args[0])

    hooks = [m.register_forward_pre_hook(block_input) for m in model.modules()
             if isinstance(m, (IBasicBlock, Block))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return sum(storages.values())


def _backbone_params(name: str, embedding_size: int) -> int:
    import torch

    from trainer.backbones import get_backbone

    with torch.device("meta"):
        model = get_backbone(name, embedding_size=embedding_size)
    return sum(p.numel() for p in model.parameters())


def _parts(i: PlanInputs, backbone_params: int) -> tuple[int, int, list[Part]]:
    W, D, B = i.world_size, i.embedding_size * i.subcenters, i.batch_size  # D: values per class
    n = math.ceil(i.num_classes / W)
    N = W * B
    # ceil(r·n) rows, or more when the positives do not fit (worst case: N distinct ones)
    k = min(n, max(math.ceil(i.sample_rate * n), N))
    s, c = STORAGE_BYTES[i.storage], COMPUTE_BYTES
    cuda = i.device == "cuda"
    offload = i.offload == "host"
    sixteen = i.storage != "fp32"
    copies = sixteen or offload  # rows are converted/staged, never scored in place
    parts: list[Part] = []

    def add(name: str, nbytes: int, formula: str, classifier: bool = True, on_host: bool = False):
        host = on_host and cuda  # on a CPU device the host is the device
        parts.append(Part(name, 0 if host else nbytes, nbytes if host else 0, formula, classifier))

    add("class centres", n * D * s, f"n·D·{s}", on_host=offload)
    adamw = i.optimizer == "adamw"
    if adamw:
        add("AdamW moments", 2 * n * D * s, f"2·n·D·{s}", on_host=offload)
        add("AdamW per-row step counts", n * 4, "n·4")
    elif i.momentum:
        add("momentum", n * D * s, f"n·D·{s}", on_host=offload)
    states = 2 if adamw else 1  # stores read and written per row
    rows_copy = k < n or copies
    add("sampled rows + gradient", (2 if rows_copy else 1) * k * D * c,
        f"{2 if rows_copy else 1}·K·D·{c}")
    chunk, rchunk = min(k, CHUNK_ROWS), min(k, ROW_CHUNK)
    if offload:  # rows in, rows out, each state out: K rows each; states in: 2 chunks
        staged = (2 + states) * k + 2 * chunk
        add("host staging (rows in/out)", staged * D * s,
            f"({2 + states}K+2·{chunk})·D·{s}", on_host=True)
        add("device staging (rows in/out)", staged * D * s,
            f"({2 + states}K+2·{chunk})·D·{s}")
    add("logits + gradient [N, K]", N * k * c, f"N·K·{c}")
    if i.subcenters > 1:  # every sub-centre's cosine, and each class's arg-max
        add("sub-centre cosines + arg-max", N * k * (i.subcenters * c + 8),
            f"N·K·({i.subcenters}·{c}+8)")
    # ShardSGD's momentum chunk; 16-bit: the rounding temporaries of one chunk and the
    # staging chunks of the rows read and the momentum reads (a full and a last chunk);
    # offload stages whole reads instead.
    per_chunk = (3 if adamw else 1) * chunk * D * c
    if sixteen:
        per_chunk += rchunk * D * (ROUNDING_BYTES[i.storage] + (0 if offload else 3 * s))
    row_dot = min(k, ROW_DOT_CHUNK) * D * c  # backward's chunked row-wise dot products
    sampling = (n + 1) * 4 + k * 32 + 4 * N * (i.embedding_size + 2) * c
    add("update chunks, backward, sampling", per_chunk + row_dot + sampling,
        f"chunks + {min(k, ROW_DOT_CHUNK)}·D·{c} + 4(n+1) + 32K + 4·N·D·4")
    if i.backbone is not None:
        # param, grad, DDP bucket, optimiser state (1 SGD, 2 AdamW), the EMA's copy
        copies_per_param = 3 + (2 if i.optimizer == "adamw" else 1) + (1 if i.ema else 0)
        add("backbone params/grads/opt/DDP", backbone_params * 4 * copies_per_param,
            f"{backbone_params:,}·4·{copies_per_param}", classifier=False)
        table = ACTIVATION_BYTES_CHECKPOINTED if i.activation_checkpointing else ACTIVATION_BYTES_PER_IMAGE
        per_image = table[i.backbone]
        half = i.amp16 and cuda
        add("activations (estimate)", B * per_image // (2 if half else 1),
            f"B·{per_image / 2**20:.1f} MiB{'/2 (16-bit autocast)' if half else ''}"
            f"{' (checkpointed blocks)' if i.activation_checkpointing else ''}",
            classifier=False)
        if cuda:
            add("DALI buffers", 3 * B * IMAGE_VALUES * 5 + DALI_DECODER_BYTES,
                "3·B·3·112²·5 + 256 MiB", classifier=False)
    add("runtime (CUDA ctx / interpreter)", CUDA_RUNTIME_BYTES if cuda else CPU_RUNTIME_BYTES,
        "fixed", classifier=False)
    return n, k, parts


def _fits(i: PlanInputs, device_bytes: int, host_bytes: int) -> bool:
    host_ok = i.host_memory is None or host_bytes <= i.host_memory
    return device_bytes <= i.device_memory and host_ok


def make_plan(inputs: PlanInputs) -> Plan:
    """The plan for `inputs`, with the largest num_classes that fits the same setting."""
    params = _backbone_params(inputs.backbone, inputs.embedding_size) if inputs.backbone else 0
    n, k, parts = _parts(inputs, params)
    plan = Plan(inputs, n, k, parts)

    def fits(c: int) -> bool:
        _, _, p = _parts(_replace(inputs, num_classes=c), params)
        return _fits(inputs, sum(x.device for x in p), sum(x.host for x in p))

    lo, hi = inputs.world_size - 1, MAX_CLASSES_SEARCHED  # fits(lo) assumed, hi: checked
    if fits(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    plan.max_num_classes = lo if lo >= inputs.world_size else 0
    return plan


def _replace(i: PlanInputs, **changes) -> PlanInputs:
    from dataclasses import replace

    return replace(i, **changes)


# ----------------------------------------------------------------------- train.py hooks


def plan_for_config(cfg, world_size: int, device, local_world_size: int = 1) -> Plan:
    """The plan of the run `cfg` (trainer.config.Config) on `world_size` ranks of
    `device`: CUDA memory from the device's properties, host memory the machine's total
    divided by the ranks on this node (on CPU that is the "device"). Totals, not what is
    free now, so every rank reaches the same verdict (a rank refusing alone would hang
    the others)."""
    import psutil
    import torch

    device = torch.device(device)
    host = psutil.virtual_memory()
    if device.type == "cuda":
        device_memory = torch.cuda.get_device_properties(device).total_memory
        host_memory = host.total // local_world_size
        kind = "cuda"
    else:
        device_memory = host.total // local_world_size
        host_memory = None
        kind = "cpu"
    precision = cfg.backbone.precision
    amp16 = precision in ("bf16", "fp16") or (precision == "auto" and kind == "cuda")
    inputs = PlanInputs(
        num_classes=cfg.data.num_classes,
        world_size=world_size,
        device_memory=device_memory,
        embedding_size=cfg.backbone.embedding_size,
        batch_size=cfg.data.batch_size,
        sample_rate=cfg.partial_fc.sample_rate,
        backbone=cfg.backbone.name if cfg.backbone.name in ACTIVATION_BYTES_PER_IMAGE else None,
        storage=cfg.partial_fc.storage,
        offload=cfg.partial_fc.offload,
        host_memory=host_memory,
        device=kind,
        momentum=cfg.optim.momentum > 0,
        optimizer=cfg.optim.name,
        amp16=amp16,
        subcenters=cfg.partial_fc.subcenters,
        activation_checkpointing=cfg.backbone.activation_checkpointing == "blocks",
        ema=cfg.backbone.ema_decay > 0,
    )
    return make_plan(inputs)


def check_fits(plan: Plan) -> None:
    """Raise trainer.config.ConfigError, with the numbers, when `plan` does not fit."""
    from trainer.config import ConfigError

    if plan.fits:
        return
    i = plan.inputs
    where = []
    if plan.device_bytes > i.device_memory:
        where.append(f"device needs {plan.device_bytes / GIB:.2f} GiB per rank, has "
                     f"{i.device_memory / GIB:.2f} GiB")
    if i.host_memory is not None and plan.host_bytes > i.host_memory:
        where.append(f"host needs {plan.host_bytes / GIB:.2f} GiB per rank, has "
                     f"{i.host_memory / GIB:.2f} GiB")
    raise ConfigError(
        f"data.num_classes: {i.num_classes:,} classes do not fit on {i.world_size} rank(s) "
        f"({'; '.join(where)}); at most {plan.max_num_classes:,} fit with storage "
        f"{i.storage}, offload {i.offload}, batch {i.batch_size}, sample rate "
        f"{i.sample_rate:g}: lower partial_fc.sample_rate or data.batch_size, use "
        "partial_fc.storage=bf16 or partial_fc.offload=host, or add ranks"
    )
