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

from trainer.margins import CombinedMargin

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
