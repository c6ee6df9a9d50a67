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
    num_classes: int, start: int, count: int, dim: int, seed: int, dtype: torch.dtype
) -> Tensor:
    """Rows [start, start+count) of an N(0, INIT_STD²) [num_classes, dim] matrix.

    Row c depends only on (seed, c), never on how the classes are sharded.
    """
    out = torch.empty(count, dim, dtype=dtype)
    first, last = start // INIT_BLOCK_ROWS, (start + count - 1) // INIT_BLOCK_ROWS
    for block in range(first, last + 1):
        b0 = block * INIT_BLOCK_ROWS
        rows = min(INIT_BLOCK_ROWS, num_classes - b0)
        g = torch.Generator().manual_seed(mixed_seed(1, seed, block))
        lo, hi = max(start, b0), min(start + count, b0 + rows)
        if (lo, hi) == (b0, b0 + rows):  # whole block: draw in place, no temporary
            out[lo - start : hi - start].normal_(0.0, INIT_STD, generator=g)
        else:
            values = torch.empty(rows, dim, dtype=dtype).normal_(0.0, INIT_STD, generator=g)
            out[lo - start : hi - start] = values[lo - b0 : hi - b0]
    return out


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

    def take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        buf = self._free.pop(name, None)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = like.new_empty(shape)
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
    autograd), `last_sampled` (sorted local row indices used by the last forward).
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
        self.class_start, self.num_local = shard_range(num_classes, self.world_size, self.rank)
        self.num_sample = min(self.num_local, math.ceil(self.sample_rate * self.num_local))
        weight = init_class_centres(
            num_classes, self.class_start, self.num_local, embedding_size, seed, dtype
        )
        self.weight = nn.Parameter(weight.to(device), requires_grad=False)
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
            f"num_sample={self.num_sample}"
        )

    # -- state (the sampling position travels with the weights) -------------------
    def get_extra_state(self) -> dict:
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
        """Sorted local rows to score: every local class in `labels` + random negatives."""
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
        dtype, dim = self.weight.dtype, self.embedding_size
        with torch.autocast(local_embeddings.device.type, enabled=False):
            emb = local_embeddings.to(dtype)
            labels = local_labels.to(torch.int64).reshape(-1, 1)
            # Labels ride in the same all-gather, bit-cast to the embedding dtype.
            packed = torch.cat([emb, labels.view(dtype)], dim=1)
            gathered = _AllGather.apply(packed, self.group)
            x = gathered[:, :dim]
            global_labels = gathered[:, dim:].contiguous().view(torch.int64).reshape(-1)

            rows = self._sample_rows(global_labels)
            self.last_sampled = rows
            sub = self._scored_rows(rows)
            if self.samples_all:
                target_cols = global_labels - self.class_start
            else:
                local = (global_labels - self.class_start).clamp(0, self.num_local - 1)
                target_cols = torch.searchsorted(rows, local)
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
        of the sampled rows (in a reused buffer), or the shard itself at rate 1."""
        if self.samples_all:
            return self.weight.detach().requires_grad_(True)
        with torch.no_grad():
            sub = torch.index_select(
                self.weight, 0, rows,
                out=self.workspace.take("rows", (rows.numel(), self.embedding_size), self.weight),
            )
        return sub.requires_grad_(True)

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
        grad.index_add_(0, inverse, torch.cat([g for _, g in parts]))
        return SampledGrad(union, grad)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 (nn.Module API)
        """Drop the sampled rows' gradients; their buffers are kept for the next step."""
        for rows, sub in self._sampled:
            if rows.numel() < self.num_local:  # a copy, not the shard itself
                self.workspace.give("rows", sub)
            self.workspace.give("grad_rows", sub.grad)
            sub.grad = None
        self._sampled.clear()
