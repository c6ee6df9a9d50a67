"""The step's autograd functions: the embedding all-gather and the fused cosine + margin +
distributed softmax cross-entropy, and the buffers they keep from step to step.

Both are written as `torch.autograd.Function`s for memory and communication, not for
speed of writing: the all-gather's backward is one reduce-scatter, and the loss keeps one
[N, K] buffer through cosines, logits, probabilities and gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from trainer.margins import Margin

# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (
    getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
)


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
        """A buffer of `shape` with `like`'s dtype and device."""
        buf = self._free.pop(name, None)
        if buf is None or (buf.shape, buf.dtype, buf.device) != (shape, like.dtype, like.device):
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def give(self, name: str, buf: Tensor | None) -> None:
        """Keep `buf` for the next `take` of `name` (None: nothing to keep)."""
        if buf is not None:
            self._free[name] = buf.detach()


class AllGather(torch.autograd.Function):
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


class ShardMarginSoftmax(torch.autograd.Function):
    """Cosines → margin logits → distributed softmax cross-entropy, fused for memory.

    forward(x_hat [N, D] unit rows, sub [S·K, D] sampled centres (not normalised; K
    consecutive sub-centres per sampled class), target_cols [N] (column of sample i's
    class among the S here, −1 if another rank owns it), norms [N] (the embeddings'
    norms, for AdaFace), margin, group, workspace, K) returns the mean loss over the N
    samples and `stats` = [largest logit, mean target cosine] (not differentiable; the
    early signs of a divergence, read at log points only), both the same on every rank:

        cos = max_k x_hat · (sub / |sub|)ᵀ,  logits = margin(cos),
        loss_i = log Σ_{all ranks' columns} exp(logit) − logit_target

    with all-reduce MAX of the row maxima and one all-reduce SUM of (exp-sum, target
    logit, target cosine) (CurricularFace adds one of the target cosines). One [N, S·K] buffer holds
    the cosines, then (K = 1) logits, probabilities and gradient; with K > 1 the class
    cosines (max over each class's sub-centres) go to a second [N, S] buffer and the
    gradient reaches the arg-max sub-centre only. The normalised centres are never
    materialised (their norms scale the columns instead). The margin's math and
    derivatives live in `Margin.shard_logits_`. Backward needs no communication.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x_hat, sub, target_cols, norms, margin: Margin, group, ws: Workspace, k: int = 1
    ):
        n = x_hat.shape[0]
        has_target = (target_cols >= 0).unsqueeze(1)
        col = target_cols.clamp_min(0).unsqueeze(1)
        inv_norm = sub.norm(dim=1).clamp_min(1e-12).reciprocal_()
        cosines = torch.mm(x_hat, sub.t(), out=ws.take("logits", (n, sub.shape[0]), sub))
        cosines.mul_(inv_norm)
        best = None
        buf = cosines
        if k > 1:  # a class's cosine: the best of its K sub-centres
            buf = ws.take("class_logits", (n, sub.shape[0] // k), sub)
            best = torch.empty(buf.shape, dtype=torch.int64, device=sub.device)
            torch.max(cosines.view(n, -1, k), dim=2, out=(buf, best))
        target_cos = buf.gather(1, col).mul_(has_target)  # before the margin rewrites buf
        out = margin.shard_logits_(buf, col, has_target, norms, group)
        buf.mul_(margin.s)  # logits
        row_max = buf.max(dim=1, keepdim=True).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        buf.sub_(row_max).exp_()
        sums = torch.cat([buf.sum(dim=1, keepdim=True), margin.s * out.target, target_cos], 1)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        exp_sum, target = sums[:, :1], sums[:, 1:2]
        loss = (exp_sum.log() + row_max - target).mean()
        stats = torch.stack([row_max.max(), sums[:, 2].mean()]).detach()
        ctx.mark_non_differentiable(stats)
        buf.div_(exp_sum)  # this rank's softmax probabilities
        ctx.save_for_backward(
            buf, cosines, best, x_hat, sub, inv_norm, col, has_target, out.d_target, out.d_other
        )
        ctx.n, ctx.s, ctx.ws, ctx.k = n, margin.s, ws, k
        return loss, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_stats):  # type: ignore[override]
        buf, cosines, best, x_hat, sub, inv_norm, col, has_target, d_target, d_other = ctx.saved_tensors
        grad = buf  # used once: (softmax − one-hot) · g / N, in place
        grad.scatter_add_(1, col, -has_target.to(grad.dtype))
        grad.mul_(grad_loss * ctx.s / ctx.n)  # d loss / d (logit / s)
        at_target = grad.gather(1, col)
        if d_other is not None:
            grad.mul_(d_other)
        grad.scatter_(1, col, torch.where(has_target, at_target * d_target, grad.gather(1, col)))
        if ctx.k > 1:  # d loss / d cos reaches each class's arg-max sub-centre only
            grad_classes, grad = grad, cosines.zero_()
            grad.view(ctx.n, -1, ctx.k).scatter_(2, best.unsqueeze(2), grad_classes.unsqueeze(2))
            ctx.ws.give("class_logits", grad_classes)
        # cos = x_hat · ŵᵀ with ŵ = sub / |sub|: first d/dŵ, then through the norm.
        grad_w_hat = torch.mm(grad.t(), x_hat, out=ctx.ws.take("grad_rows", sub.shape, sub))
        grad.mul_(inv_norm)
        grad_x_hat = torch.mm(grad, sub)
        ctx.ws.give("logits", grad)
        radial = _row_dot(grad_w_hat, sub).unsqueeze(1)
        radial.mul_(inv_norm.unsqueeze(1) ** 2)  # (d/dŵ · w) / |w|²
        grad_sub = grad_w_hat.addcmul_(sub, radial, value=-1.0).mul_(inv_norm.unsqueeze(1))
        return grad_x_hat, grad_sub, None, None, None, None, None, None
