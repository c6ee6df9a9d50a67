"""Partial FC: a classifier sharded by class across ranks, with a distributed softmax.

Every rank owns a contiguous block of class centres (`shard_range`). One step:

1. all-gather the batch's embeddings and labels from every rank (one collective; its
   backward is one reduce-scatter that returns each rank the gradient of its own rows);
2. pick the shard rows to score: all classes of the global batch that this rank owns
   plus uniformly drawn negatives, `ceil(sample_rate · num_local)` rows in total, drawn
   as a pure function of (seed, step, rank);
3. cosines between normalised embeddings and normalised sampled centres, margin on
   the target class (`CombinedMargin`);
4. softmax cross-entropy over the union of all ranks' sampled rows without
   materialising them on one rank: all-reduce MAX of the row maxima, all-reduce SUM of
   the exp-sums (and of the target logit, which only its owner contributes).

The sampled rows are copied out of the shard into a leaf tensor, so backward produces a
gradient of shape [num_sampled, D] only; `ShardSGD` (trainer/optim.py) writes the update
back into those rows. No dense gradient of the shard is ever allocated and nothing in
forward/backward reads a value back to the host, except the optional input validation
(`check_inputs`, one tiny all-gather and host read per step) and the rare case where a
rank owns more distinct classes of the batch than it samples rows.

Storage (`storage`, `offload`). The shard (`weight`) and ShardSGD's momentum may be kept
in 16 bits (bf16 or fp16) and/or in host memory. The math never changes: the sampled rows
are gathered and converted to the compute dtype on the compute device (`read_rows`), and
updated rows are written back (`write_rows`) with stochastic rounding to 16 bits, so an
update smaller than half a 16-bit ulp still moves a weight by that amount on average
(round-to-nearest would drop it). With host offload the sampled rows travel through
host staging buffers (pinned on CUDA machines) to a device buffer, and updated rows back;
the write-back into the host store is finished at the start of the next forward
(`flush`). On a CUDA device the copies run on a side stream, so the write-back overlaps
the next step's backbone forward (the rows read in forward cannot: they are known only
once the labels are all-gathered, and reading them to the host is one sync); on a CPU
device the same code runs with host = device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from trainer.margins import CombinedMargin

# Class centres are initialised in blocks of this many rows, each block from its own
# seeded generator, so the initial classifier is the same whatever the world size.
INIT_BLOCK_ROWS = 8192
INIT_STD = 0.01

# partial_fc.storage -> the dtype the shard and its momentum are kept in (None: `dtype`).
STORAGE_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}
OFFLOADS = ("none", "host")
ROUNDINGS = ("stochastic", "nearest")
# Rows converted / rounded per chunk when reading or writing 16-bit or offloaded storage.
ROW_CHUNK = 4096
FP16_MAX = 65504.0


# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (
    getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
)


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, count) of the classes rank `rank` owns: n_r = C//W + (r < C%W), contiguous."""
    base, extra = divmod(num_classes, world_size)
    count = base + (rank < extra)
    start = rank * base + min(rank, extra)
    return start, count


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit generator seed from non-negative integers."""
    state = np.random.SeedSequence(list(parts)).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The generator seed for negative sampling at (seed, step, rank)."""
    return mixed_seed(0, seed, step, rank)


def init_class_centres(
    num_classes: int,
    start: int,
    count: int,
    dim: int,
    seed: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype | None = None,
    pin_memory: bool = False,
) -> Tensor:
    """Rows [start, start+count) of an N(0, INIT_STD²) [num_classes, dim] matrix.

    Row c depends only on (seed, c), never on how the classes are sharded. Values are
    drawn in `dtype` and stored in `out_dtype` (default `dtype`; a narrower dtype is
    converted block by block, round to nearest, so no full-size `dtype` copy exists).
    """
    out_dtype = dtype if out_dtype is None else out_dtype
    out = torch.empty(count, dim, dtype=out_dtype, pin_memory=pin_memory)
    first, last = start // INIT_BLOCK_ROWS, (start + count - 1) // INIT_BLOCK_ROWS
    scratch = None  # one block, reused (a fresh one per block fragments the heap)
    for block in range(first, last + 1):
        b0 = block * INIT_BLOCK_ROWS
        rows = min(INIT_BLOCK_ROWS, num_classes - b0)
        g = torch.Generator().manual_seed(mixed_seed(1, seed, block))
        lo, hi = max(start, b0), min(start + count, b0 + rows)
        if (lo, hi) == (b0, b0 + rows) and out_dtype == dtype:  # draw in place, no temporary
            out[lo - start : hi - start].normal_(0.0, INIT_STD, generator=g)
        else:
            if scratch is None:
                scratch = torch.empty(INIT_BLOCK_ROWS, dim, dtype=dtype)
            values = scratch[:rows].normal_(0.0, INIT_STD, generator=g)
            out[lo - start : hi - start] = values[lo - b0 : hi - b0]
    return out


def _round_bf16_stochastic(x: Tensor, generator: torch.Generator) -> Tensor:
    """fp32 → bf16 with stochastic rounding; `x` (contiguous fp32) is clobbered.

    bf16 is the upper half of an fp32. Adding a uniform random 16-bit integer to the
    fp32 bit pattern and dropping the lower half carries into the kept part with
    probability (dropped bits)/2¹⁶, i.e. rounds the magnitude up with probability equal
    to the distance from the lower bf16 neighbour in ulps: unbiased, for either sign
    (sign-magnitude format). ±inf stay ±inf; a NaN stays NaN or may become ±inf.
    """
    bits = x.view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32
    )
    bits.add_(noise).bitwise_and_(-65536)  # -65536 = 0xFFFF0000
    return x.to(torch.bfloat16)  # exact: the low 16 bits are zero


def _check_fp16_range(x: Tensor) -> None:
    """Raise instead of letting fp16 storage overflow to inf (or store a NaN)."""
    peak = x.abs().amax()
    if not bool(peak <= FP16_MAX):  # one host read per chunk; NaN fails too
        raise FloatingPointError(
            f"partial_fc.storage=fp16: a class-centre or momentum value reached {float(peak):.4g}, "
            f"outside the fp16 range ±{FP16_MAX:g} (or not finite); the update was stopped "
            "part-way. Use partial_fc.storage=bf16 (fp32's range) or a lower learning rate, "
            "and resume from the last checkpoint"
        )


def _round_fp16_stochastic(x: Tensor, generator: torch.Generator) -> Tensor:
    """fp32 → fp16 with stochastic rounding (unbiased): with u the fp16 ulp at |x| (2⁻²⁴
    in the subnormal range), |x| = (k + f)·u with k integer, 0 <= f < 1; store (k + 1)·u
    with probability f, else k·u. Every step is exact in fp32. Raises FloatingPointError
    if |x| > 65504 or x is not finite (fp16 would store inf)."""
    _check_fp16_range(x)
    a = x.abs()
    exponent = (a.view(torch.int32) >> 23) - 127  # floor(log2 |x|) for normal fp32
    ulp = ((exponent - 10).clamp_(min=-24) + 127).bitwise_left_shift_(23).view(torch.float32)
    a.div_(ulp)  # = k + f, exact (power of two)
    k = a.floor()
    a.sub_(k)  # f
    k.add_(torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) < a)
    return k.mul_(ulp).copysign_(x).to(torch.float16)  # exact: representable in fp16


def round_to_storage(x: Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    """`x` (contiguous, compute dtype) rounded to the 16-bit storage `dtype`: stochastically
    with `generator`, to nearest when it is None. `x` may be clobbered."""
    if x.dtype != torch.float32:
        x = x.float()
    if dtype == torch.float16:
        if generator is None:
            _check_fp16_range(x)
            return x.to(dtype)
        return _round_fp16_stochastic(x, generator)
    if dtype == torch.bfloat16:
        return x.to(dtype) if generator is None else _round_bf16_stochastic(x, generator)
    raise ValueError(f"no 16-bit rounding to {dtype}")


class Workspace:
    """Large step buffers kept from one step to the next, by name.

    A fresh multi-hundred-MB tensor every step costs a page fault per 4 KiB on first
    touch (on CPU, glibc hands big blocks back to the OS when freed): at 2M classes,
    r = 0.1 that was about a quarter of the step. `take` hands out a buffer of the right
    shape (reusing the one last `give`n back under that name, else allocating) and
    forgets it, so autograd may own it; `give` returns it for the next step.
    """

    def __init__(self) -> None:
        self._free: dict[str, Tensor] = {}

    def take(
        self,
        name: str,
        shape: tuple[int, ...],
        like: Tensor,
        device: torch.device | None = None,
        pin: bool = False,
    ) -> Tensor:
        """A buffer of `shape` with `like`'s dtype, on `device` (default `like`'s),
        in pinned host memory if `pin`."""
        device = like.device if device is None else device
        buf = self._free.pop(name, None)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != device:
            buf = torch.empty(shape, dtype=like.dtype, device=device, pin_memory=pin)
        return buf

    def give(self, name: str, buf: Tensor | None) -> None:
        if buf is not None:
            self._free[name] = buf.detach()


class _AllGather(torch.autograd.Function):
    """All-gather rows in forward; reduce-scatter (sum) their gradients in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        world = dist.get_world_size(group)
        if world == 1:
            return x.clone()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        world = dist.get_world_size(ctx.group)
        if world == 1:
            return grad, None
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        _reduce_scatter_single(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def _row_dot(a: Tensor, b: Tensor, chunk: int = 8192) -> Tensor:
    """Row-wise dot products of two [K, D] tensors, in chunks (no [K, D] temporary)."""
    out = a.new_empty(a.shape[0])
    for lo in range(0, a.shape[0], chunk):
        torch.linalg.vecdot(a[lo : lo + chunk], b[lo : lo + chunk], out=out[lo : lo + chunk])
    return out


class _ShardMarginSoftmax(torch.autograd.Function):
    """Cosines → margin logits → distributed softmax cross-entropy, fused for memory.

    forward(x_hat [N, D] unit rows, sub [K, D] sampled centres (not normalised),
    target_cols [N] (column of sample i's class here, −1 if another rank owns it))
    returns the mean loss over the N samples, the same on every rank:

        cos = x_hat · (sub / |sub|)ᵀ,  logits = margin(cos),
        loss_i = log Σ_{all ranks' columns} exp(logit) − logit_target

    with all-reduce MAX of the row maxima and one all-reduce SUM of (exp-sum, target
    logit). One [N, K] buffer holds cosines, then logits, then probabilities, then the
    gradient; the normalised centres are never materialised (their norms scale the
    columns instead). The target logit's derivative is taken by autograd from
    `CombinedMargin.target_logit` on the N target cosines, so the margin's math lives
    in one place. Backward needs no communication.
    """

    @staticmethod
    def forward(ctx, x_hat, sub, target_cols, margin: CombinedMargin, group, ws: Workspace):  # type: ignore[override]
        n = x_hat.shape[0]
        has_target = (target_cols >= 0).unsqueeze(1)
        col = target_cols.clamp_min(0).unsqueeze(1)
        inv_norm = sub.norm(dim=1).clamp_min(1e-12).reciprocal_()
        buf = torch.mm(x_hat, sub.t(), out=ws.take("logits", (n, sub.shape[0]), sub))
        buf.mul_(inv_norm)  # cosines
        keep = None
        if margin.interclass_filter > 0:
            keep = buf <= margin.interclass_filter
            keep.scatter_(1, col, keep.gather(1, col) | has_target)
            buf.mul_(keep)
        target_cos = buf.gather(1, col)
        with torch.enable_grad():
            t = target_cos.detach().requires_grad_(True)
            target_logit = margin.target_logit(t)
            (d_target,) = torch.autograd.grad(target_logit.sum(), t)
        target_logit = torch.where(has_target, target_logit.detach(), target_cos)
        buf.scatter_(1, col, target_logit).mul_(margin.s)  # logits
        row_max = buf.max(dim=1, keepdim=True).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        buf.sub_(row_max).exp_()
        sums = torch.cat([buf.sum(dim=1, keepdim=True), margin.s * target_logit * has_target], 1)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        exp_sum, target = sums[:, :1], sums[:, 1:]
        loss = (exp_sum.log() + row_max - target).mean()
        buf.div_(exp_sum)  # this rank's softmax probabilities
        ctx.save_for_backward(buf, x_hat, sub, inv_norm, col, has_target, d_target, keep)
        ctx.n, ctx.s, ctx.ws = n, margin.s, ws
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):  # type: ignore[override]
        buf, x_hat, sub, inv_norm, col, has_target, d_target, keep = ctx.saved_tensors
        grad = buf  # used once: (softmax − one-hot) · g / N, in place
        grad.scatter_add_(1, col, -has_target.to(grad.dtype))
        grad.mul_(grad_loss * ctx.s / ctx.n)  # d loss / d (logit / s)
        at_target = grad.gather(1, col)
        grad.scatter_(1, col, torch.where(has_target, at_target * d_target, at_target))
        if keep is not None:
            grad.mul_(keep)  # now d loss / d cos
        # cos = x_hat · ŵᵀ with ŵ = sub / |sub|: first d/dŵ, then through the norm.
        grad_w_hat = torch.mm(grad.t(), x_hat, out=ctx.ws.take("grad_rows", sub.shape, sub))
        grad.mul_(inv_norm)
        grad_x_hat = torch.mm(grad, sub)
        ctx.ws.give("logits", grad)
        radial = _row_dot(grad_w_hat, sub).unsqueeze(1)
        radial.mul_(inv_norm.unsqueeze(1) ** 2)  # (d/dŵ · w) / |w|²
        grad_sub = grad_w_hat.addcmul_(sub, radial, value=-1.0).mul_(inv_norm.unsqueeze(1))
        return grad_x_hat, grad_sub, None, None, None, None


@dataclass
class SampledGrad:
    """Gradient of the loss w.r.t. some rows of the shard: rows (sorted local indices
    into `PartialFC.weight`) and grad [len(rows), D]. `values`, when not None, holds the
    rows' current weights, taken in forward: a private copy (the optimiser may update it
    in place and write it back), or the shard itself when every row was sampled."""

    rows: Tensor
    grad: Tensor
    values: Tensor | None = None


class PartialFC(nn.Module):
    """Sharded margin-softmax classifier. Create inside an initialised process group.

    forward(local_embeddings [B, D], local_labels [B] int64) -> mean cross-entropy over
    the global batch (W·B samples), the same value on every rank; its backward gives
    `local_embeddings.grad` and a gradient for the sampled rows only (see
    `sampled_grad`). All ranks must call forward with the same B (it may change from
    step to step, e.g. a last partial batch).

    Attributes: `class_start`, `num_local` (this rank's classes are
    [class_start, class_start + num_local)), `weight` ([num_local, D], not trained by
    autograd; its storage dtype, on the host when offloaded), `last_sampled` (sorted
    local row indices used by the last forward, on `weight`'s device).

    `dtype` is the compute dtype (and the storage dtype of storage "fp32"); `storage`
    "bf16"/"fp16" keeps the shard in 16 bits, written back with `rounding` "stochastic"
    (default) or "nearest" (for comparison only: it drops small updates); `offload`
    "host" keeps it in host memory (pinned when CUDA is available) while the math runs on
    `device`. With host offload, call `flush()` before reading `weight` or the momentum
    buffer directly (a checkpoint): the last step's write-back lands at the next forward.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        sample_rate: float = 1.0,
        margin: CombinedMargin | None = None,
        group: dist.ProcessGroup | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        check_inputs: bool = True,
        storage: str = "fp32",
        offload: str = "none",
        rounding: str = "stochastic",
    ) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError(
                "PartialFC needs an initialised process group (trainer.dist.init_distributed() "
                "or torch.distributed.init_process_group); world size 1 is fine"
            )
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        for name, value, allowed in (
            ("storage", storage, tuple(STORAGE_DTYPES)), ("offload", offload, OFFLOADS),
            ("rounding", rounding, ROUNDINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if num_classes < self.world_size:
            raise ValueError(
                f"num_classes={num_classes} is smaller than the world size {self.world_size}: "
                "every rank must own at least one class"
            )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.sample_rate = float(sample_rate)
        self.margin = margin if margin is not None else CombinedMargin(64.0, 1.0, 0.5, 0.0)
        self.seed = seed
        self.check_inputs = check_inputs
        self.storage, self.offload, self.rounding = storage, offload, rounding
        self.dtype = dtype  # compute dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        store_dtype = STORAGE_DTYPES[storage] or dtype
        store_device = torch.device("cpu") if offload == "host" else self.device
        # Host memory the GPU copies from/to asynchronously must be pinned.
        self._pin = offload == "host" and torch.cuda.is_available()
        self.class_start, self.num_local = shard_range(num_classes, self.world_size, self.rank)
        self.num_sample = min(self.num_local, math.ceil(self.sample_rate * self.num_local))
        weight = init_class_centres(
            num_classes, self.class_start, self.num_local, embedding_size, seed, dtype,
            out_dtype=store_dtype, pin_memory=self._pin,
        )
        self.weight = nn.Parameter(weight.to(store_device), requires_grad=False)
        # Scoring needs a converted (or staged) copy even of every row unless the shard
        # is already in the compute dtype and not offloaded.
        self.copies_rows = store_dtype != dtype or offload == "host"
        self._side_stream = None  # CUDA + host offload: the copy stream (created lazily)
        self._host_busy: dict[str, object] = {}  # pinned buffer name -> CUDA event of its copy
        # host offload: write-backs waiting for `flush` (store, rows, host, dev, stage, event)
        self._pending: list[tuple] = []
        self.sample_step = 0
        self.last_sampled: Tensor | None = None
        self._sampled: list[tuple[Tensor, Tensor]] = []  # (rows, leaf copy) since zero_grad
        self.workspace = Workspace()

    @property
    def samples_all(self) -> bool:
        return self.num_sample == self.num_local

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"rank={self.rank}/{self.world_size}, classes=[{self.class_start}, "
            f"{self.class_start + self.num_local}), sample_rate={self.sample_rate}, "
            f"num_sample={self.num_sample}, storage={self.storage}, offload={self.offload}"
        )

    # -- state (the sampling position travels with the weights) -------------------
    def get_extra_state(self) -> dict:
        self.flush()  # whoever saves the state saves the weights next
        return {
            "sample_step": self.sample_step,
            "num_classes": self.num_classes,
            "class_start": self.class_start,
            "num_local": self.num_local,
        }

    def set_extra_state(self, state: dict) -> None:
        mine = (self.num_classes, self.class_start, self.num_local)
        theirs = (state["num_classes"], state["class_start"], state["num_local"])
        if mine != theirs:
            raise ValueError(
                f"PartialFC state is for (num_classes, class_start, num_local)={theirs}, "
                f"this rank has {mine}"
            )
        self.sample_step = int(state["sample_step"])

    # -- validation -------------------------------------------------------------
    def _validate(self, embeddings: Tensor, labels: Tensor) -> None:
        """Check inputs of every rank on every rank, so all raise together (no hang)."""
        shape_ok = embeddings.dim() == 2 and labels.dim() == 1
        kind_ok = embeddings.is_floating_point() and not labels.is_floating_point()
        kind_ok = kind_ok and labels.dtype != torch.bool
        rows = embeddings.shape[0] if embeddings.dim() >= 1 else -1
        dim = embeddings.shape[1] if embeddings.dim() == 2 else -1
        lo = hi = 0
        if shape_ok and kind_ok and labels.numel() > 0:
            lo, hi = labels.min(), labels.max()
        meta = torch.stack(
            [torch.as_tensor(v, dtype=torch.int64, device=embeddings.device)
             for v in (int(shape_ok), int(kind_ok), rows, dim, labels.numel(), lo, hi)]
        )
        table = _AllGather.apply(meta.unsqueeze(0), self.group).tolist()
        for rank, (shape_ok_r, kind_ok_r, rows_r, dim_r, nlab_r, lo_r, hi_r) in enumerate(table):
            where = f"PartialFC input on rank {rank}"
            if not shape_ok_r:
                raise ValueError(f"{where}: embeddings must be [B, D] and labels [B]")
            if not kind_ok_r:
                raise ValueError(f"{where}: embeddings must be floating point, labels integer")
            if rows_r < 1:
                raise ValueError(f"{where}: empty batch")
            if nlab_r != rows_r:
                raise ValueError(f"{where}: {rows_r} embeddings but {nlab_r} labels")
            if dim_r != self.embedding_size:
                raise ValueError(
                    f"{where}: embedding size {dim_r} != PartialFC embedding_size "
                    f"{self.embedding_size} (backbone and classifier disagree)"
                )
            if lo_r < 0 or hi_r >= self.num_classes:
                bad = lo_r if lo_r < 0 else hi_r
                raise ValueError(
                    f"{where}: label {bad} outside [0, {self.num_classes}) "
                    "(does num_classes match the dataset?)"
                )
        sizes = {row[2] for row in table}
        if len(sizes) > 1:
            per_rank = ", ".join(f"rank {r}: {row[2]}" for r, row in enumerate(table))
            raise ValueError(f"PartialFC: ranks disagree on the batch size ({per_rank})")

    # -- sampling -----------------------------------------------------------------
    def _sample_rows(self, labels: Tensor) -> Tensor:
        """Sorted local rows to score: every local class in `labels` + random negatives,
        on the storage device (`labels` must be there too)."""
        device = self.weight.device
        if self.samples_all:
            return torch.arange(self.num_local, device=device)
        local = labels - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        slot = torch.where(owned, local, self.num_local)  # slot num_local = "not mine"
        g = torch.Generator(device=device).manual_seed(
            sampling_seed(self.seed, self.sample_step, self.rank)
        )
        score = torch.rand(self.num_local + 1, generator=g, device=device)
        score.index_fill_(0, slot, 2.0)  # positives outrank every negative (rand < 1)
        score = score[: self.num_local]
        k = self.num_sample
        if labels.numel() > k:  # positives might not fit: needs their count (host read)
            k = max(k, int((score > 1.5).sum()))
        return score.topk(k, sorted=False).indices.sort().values

    # -- forward ------------------------------------------------------------------
    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        if self.check_inputs:
            self._validate(local_embeddings, local_labels)
        dtype, dim = self.dtype, self.embedding_size
        with torch.autocast(local_embeddings.device.type, enabled=False):
            emb = local_embeddings.to(dtype)
            labels = local_labels.to(torch.int64).reshape(-1, 1)
            # Labels ride in the same all-gather, bit-cast to the embedding dtype.
            packed = torch.cat([emb, labels.view(dtype)], dim=1)
            gathered = _AllGather.apply(packed, self.group)
            x = gathered[:, :dim]
            global_labels = gathered[:, dim:].contiguous().view(torch.int64).reshape(-1)

            self.flush()
            rows = self._sample_rows(global_labels.to(self.weight.device))
            self.last_sampled = rows
            sub = self._scored_rows(rows)
            if self.samples_all:
                target_cols = global_labels - self.class_start
            else:
                local = (global_labels - self.class_start).clamp(0, self.num_local - 1)
                target_cols = torch.searchsorted(rows.to(x.device, non_blocking=True), local)
            owned = (global_labels >= self.class_start) & (
                global_labels < self.class_start + self.num_local
            )
            target_cols = torch.where(owned, target_cols, -1)
            if self.training:
                self._sampled.append((rows, sub))

            loss = _ShardMarginSoftmax.apply(
                F.normalize(x, dim=1), sub, target_cols, self.margin, self.group, self.workspace
            )
        if self.training:
            self.sample_step += 1
        return loss

    def _scored_rows(self, rows: Tensor) -> Tensor:
        """The centres to score, as a leaf whose gradient is the sparse gradient: a copy
        of the sampled rows in the compute dtype on the compute device (in a reused
        buffer), or the shard itself at rate 1 when it needs no conversion."""
        if self.samples_all and not self.copies_rows:
            return self.weight.detach().requires_grad_(True)
        with torch.no_grad():
            like = torch.empty(0, dtype=self.dtype, device=self.device)
            out = self.workspace.take("rows", (rows.numel(), self.embedding_size), like)
            sub = self.read_rows(self.weight, rows, out, "in_rows")
        return sub.requires_grad_(True)

    # -- storage: reading and writing rows of the shard (or of its momentum) ----------
    def new_store(self) -> Tensor:
        """A zeroed tensor with `weight`'s shape, dtype and device (pinned like it): the
        optimiser's momentum buffer."""
        w = self.weight
        return torch.zeros(w.shape, dtype=w.dtype, device=w.device, pin_memory=self._pin)

    def rounding_generator(self) -> torch.Generator | None:
        """The generator for this update's stochastic rounding, a pure function of
        (seed, step, rank); None when nothing is rounded (storage in the compute dtype,
        or rounding "nearest")."""
        if self.weight.dtype == self.dtype or self.rounding == "nearest":
            return None
        g = torch.Generator(device=self.device)
        return g.manual_seed(mixed_seed(2, self.seed, self.sample_step, self.rank))

    def read_rows(self, store: Tensor, rows: Tensor, out: Tensor, stage: str) -> Tensor:
        """Rows `rows` (indices on `store`'s device) of `store` (`weight` or a tensor from
        `new_store`) into `out` (compute dtype and device); returns `out`. `stage` names
        the reused buffers the rows pass through when a conversion or copy is needed."""
        if self.offload == "host":
            host = self._host_buffer(stage, out.shape, store)
            torch.index_select(store, 0, rows, out=host)
            dev = self.workspace.take(stage + "_dev", out.shape, store, device=out.device)
            self._host_busy[stage] = self._copy(dev, host, wait=True)
            out.copy_(dev)  # to the compute dtype, on the device
            self.workspace.give(stage, host)
            self.workspace.give(stage + "_dev", dev)
        elif store.dtype != out.dtype:  # in chunks: no [rows, D] 16-bit temporary
            buf = self.workspace.take(stage, (min(ROW_CHUNK, rows.numel()), out.shape[1]), store)
            for lo in range(0, rows.numel(), ROW_CHUNK):
                part = buf[: rows[lo : lo + ROW_CHUNK].numel()]
                torch.index_select(store, 0, rows[lo : lo + ROW_CHUNK], out=part)
                out[lo : lo + part.shape[0]] = part
            self.workspace.give(stage, buf)
        else:
            torch.index_select(store, 0, rows, out=out)
        return out

    def write_rows(
        self,
        store: Tensor,
        rows: Tensor,
        values: Tensor,
        generator: torch.Generator | None,
        stage: str,
    ) -> None:
        """Write `values` (compute dtype and device; clobbered) into rows `rows` of
        `store`, rounded to its dtype (stochastically with `generator`, else to nearest).
        With host offload the rows are staged in `stage` buffers and land in `store` at the
        next `flush` (on CUDA their copy to the host overlaps what runs until then)."""
        if self.offload == "host":
            dev = self.workspace.take(stage + "_dev", values.shape, store, device=values.device)
            for lo in range(0, values.shape[0], ROW_CHUNK):
                part = values[lo : lo + ROW_CHUNK]
                dev[lo : lo + ROW_CHUNK] = self._rounded(part, store, generator)
            host = self._host_buffer(stage, values.shape, store)
            event = self._copy(host, dev, wait=False)
            self._pending.append((store, rows, host, dev, stage, event))
        elif store.dtype != values.dtype:
            for lo in range(0, values.shape[0], ROW_CHUNK):
                part = self._rounded(values[lo : lo + ROW_CHUNK], store, generator)
                store.index_copy_(0, rows[lo : lo + ROW_CHUNK], part)
        else:
            store.index_copy_(0, rows, values)

    @staticmethod
    def _rounded(values: Tensor, store: Tensor, generator: torch.Generator | None) -> Tensor:
        if values.dtype == store.dtype:
            return values
        return round_to_storage(values, store.dtype, generator)

    def flush(self) -> None:
        """Finish the pending host-offload write-backs (none without offload). Forward
        calls it first; call it before reading `weight` or the momentum buffer directly."""
        for store, rows, host, dev, stage, event in self._pending:
            if event is not None:
                event.synchronize()
            store.index_copy_(0, rows, host)
            self.workspace.give(stage, host)
            self.workspace.give(stage + "_dev", dev)
        self._pending.clear()

    # -- host offload: staging buffers; the only CUDA-specific code ----------------------
    def _host_buffer(self, stage: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Host buffer `stage` (pinned on a CUDA machine), once its last copy is done."""
        event = self._host_busy.pop(stage, None)
        if event is not None:
            event.synchronize()
        return self.workspace.take(stage, shape, like, device=torch.device("cpu"), pin=self._pin)

    def _copy(self, dst: Tensor, src: Tensor, wait: bool):
        """dst.copy_(src); between host and a CUDA device: on a side stream, ordered after
        the work queued so far (and, if `wait`, the current stream waits for it; a
        write-back does not, so the next step's kernels run during the copy); returns the
        copy's CUDA event (None on CPU). `src` and `dst` must stay untouched until the
        event has completed (`_host_buffer`, `flush`)."""
        if self.device.type != "cuda":
            dst.copy_(src)
            return None
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        side, main = self._side_stream, torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        if wait:
            main.wait_stream(side)
        return event

    # -- the sparse gradient --------------------------------------------------------
    def sampled_grad(self) -> SampledGrad | None:
        """Gradient of the shard rows used since the last `zero_grad` (None if none).

        One forward/backward: exactly its sampled rows. Several (gradient
        accumulation): the union of their rows with the gradients summed.
        """
        parts = [(rows, sub) for rows, sub in self._sampled if sub.grad is not None]
        if not parts:
            return None
        if len(parts) == 1:
            rows, sub = parts[0]
            return SampledGrad(rows, sub.grad, sub.detach())
        parts = [(rows, sub.grad) for rows, sub in parts]
        rows = torch.cat([r for r, _ in parts])
        union, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        grad = parts[0][1].new_zeros(union.numel(), self.embedding_size)
        grad.index_add_(0, inverse.to(grad.device), torch.cat([g for _, g in parts]))
        return SampledGrad(union, grad)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 (nn.Module API)
        """Drop the sampled rows' gradients; their buffers are kept for the next step."""
        for rows, sub in self._sampled:
            if self.copies_rows or rows.numel() < self.num_local:  # a copy, not the shard
                self.workspace.give("rows", sub)
            self.workspace.give("grad_rows", sub.grad)
            sub.grad = None
        self._sampled.clear()
