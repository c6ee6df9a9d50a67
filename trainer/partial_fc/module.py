"""PartialFC: a classifier sharded by class across ranks, with a distributed softmax.

Every rank owns a contiguous block of class centres (`shard_range`). One step:

1. all-gather the batch's embeddings and labels from every rank (one collective; its
   backward is one reduce-scatter that returns each rank the gradient of its own rows);
2. pick the shard rows to score (`sample_rows`): all classes of the global batch that
   this rank owns plus uniformly drawn negatives, `ceil(sample_rate · num_local)` rows
   in total, drawn as a pure function of (seed, step, rank) on the compute device;
3. cosines between normalised embeddings and normalised sampled centres (with K
   sub-centres per class, the best of the class's K), the margin (`trainer.margins`:
   CombinedMargin, CurricularFace, AdaFace), and softmax cross-entropy over the union
   of all ranks' sampled rows without materialising them on one rank
   (`ShardMarginSoftmax`).

Sub-center ArcFace (`subcenters=K`): a class's K centres live on its owner rank, are
sampled together and are K consecutive rows of `weight` (local class i: rows
i·K … i·K + K − 1), so checkpoints and re-sharding move them as a unit.

The sampled rows are copied out of the shard into a leaf tensor, so backward produces a
gradient of shape [num_sampled, D] only; `ShardSGD` (trainer/optim.py) writes the update
back into those rows through `storage` (a `ShardStorage`: 16-bit formats, host offload).
No dense gradient of the shard is ever allocated and nothing in forward/backward reads a
value back to the host, except the optional input validation (`check_inputs`, one tiny
all-gather and host read per step), the rare case where a rank owns more distinct
classes of the batch than it samples rows, and, with host offload on CUDA, moving the
sampled row indices to the host (known only once the labels are all-gathered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.margins import CombinedMargin, Margin
from trainer.partial_fc.functional import AllGather, ShardMarginSoftmax, Workspace
from trainer.partial_fc.sampling import sample_rows, subcenter_rows
from trainer.partial_fc.sharding import init_class_centres, shard_range
from trainer.partial_fc.storage import ShardStorage


@dataclass
class SampledGrad:
    """Gradient of the loss w.r.t. some rows of the shard: rows (sorted local indices
    into `PartialFC.weight`, on its device) and grad [len(rows), D]. `values`, when not
    None, holds the rows' current weights, taken in forward: a private copy (the
    optimiser may update it in place and write it back), or the shard itself when every
    row was sampled."""

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
    [class_start, class_start + num_local)), `subcenters` (K), `weight` ([num_local·K,
    D], not trained by autograd; its storage dtype, on the host when offloaded),
    `last_sampled` (sorted local row indices of `weight` used by the last forward, on
    its device), `last_logit_stats` (the last forward's [largest logit over every
    rank's scored columns, mean target cosine], detached, on the device: logged, never
    synced per step), `storage` (the `ShardStorage` every read and write of `weight` and its
    optimiser state goes through), `margin` (a `trainer.margins.Margin`; AdaFace reads
    the norms of the embeddings given to forward, so do not normalise them upstream).

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
        margin: Margin | None = None,
        subcenters: int = 1,
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
        if subcenters < 1:
            raise ValueError(f"subcenters must be >= 1 (1: plain ArcFace), got {subcenters}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.dtype = dtype  # compute dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.storage = ShardStorage(
            compute_dtype=dtype, compute_device=self.device, kind=storage, offload=offload,
            rounding=rounding, seed=seed, rank=self.rank,
        )
        if num_classes < self.world_size:
            raise ValueError(
                f"num_classes={num_classes} is smaller than the world size {self.world_size}: "
                "every rank must own at least one class"
            )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.sample_rate = float(sample_rate)
        self.margin = margin if margin is not None else CombinedMargin(64.0, 1.0, 0.5, 0.0)
        self.margin.to(self.device)  # its running statistics live where the math runs
        self.subcenters = subcenters
        self.seed = seed
        self.check_inputs = check_inputs
        self.class_start, self.num_local = shard_range(num_classes, self.world_size, self.rank)
        self.num_sample = min(self.num_local, math.ceil(self.sample_rate * self.num_local))
        k = subcenters  # row c·K + j of the [C·K, D] matrix is sub-centre j of class c
        weight = init_class_centres(
            num_classes * k, self.class_start * k, self.num_local * k, embedding_size, seed, dtype,
            out_dtype=self.storage.dtype, pin_memory=self.storage.pin,
        )
        self.weight = nn.Parameter(weight.to(self.storage.device), requires_grad=False)
        self.sample_step = 0
        self.last_sampled: Tensor | None = None
        self.last_logit_stats: Tensor | None = None
        self._sampled: list[tuple[Tensor, Tensor]] = []  # (rows, leaf copy) since zero_grad
        self.workspace = Workspace()

    @property
    def samples_all(self) -> bool:
        return self.num_sample == self.num_local

    def extra_repr(self) -> str:
        s = self.storage
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"rank={self.rank}/{self.world_size}, classes=[{self.class_start}, "
            f"{self.class_start + self.num_local}), sample_rate={self.sample_rate}, "
            f"num_sample={self.num_sample}, subcenters={self.subcenters}, "
            f"storage={s.kind}, offload={s.offload}"
        )

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        """Mean margin-softmax cross-entropy over the global batch (see the class doc)."""
        if self.check_inputs:
            self._validate(local_embeddings, local_labels)
        dtype, dim = self.dtype, self.embedding_size
        with torch.autocast(local_embeddings.device.type, enabled=False):
            # 1. Everyone's embeddings and labels; the labels ride in the same all-gather,
            # bit-cast to the embedding dtype.
            emb = local_embeddings.to(dtype)
            labels = local_labels.to(torch.int64).reshape(-1, 1)
            gathered = AllGather.apply(torch.cat([emb, labels.view(dtype)], dim=1), self.group)
            x = gathered[:, :dim]
            norms = x.detach().norm(dim=1)  # AdaFace's image-quality signal (not differentiated)
            global_labels = gathered[:, dim:].contiguous().view(torch.int64).reshape(-1)

            # 2. The rows to score, drawn on the compute device; then their centres, as
            # a leaf of the compute dtype (last step's offloaded write-back lands first).
            rows = sample_rows(
                global_labels, self.class_start, self.num_local, self.num_sample,
                seed=self.seed, step=self.sample_step, rank=self.rank,
            )
            # offload on CUDA: one host sync
            store_rows = subcenter_rows(rows, self.subcenters).to(self.weight.device)
            self.last_sampled = store_rows
            self.flush()
            sub = self._scored_rows(store_rows)
            if self.training:
                self._sampled.append((store_rows, sub))

            # 3. Column of each sample's class among the scored rows (-1: another rank's).
            local = global_labels - self.class_start
            owned = (local >= 0) & (local < self.num_local)
            if not self.samples_all:
                local = torch.searchsorted(rows, local.clamp(0, self.num_local - 1))
            target_cols = torch.where(owned, local, -1)
            loss, self.last_logit_stats = ShardMarginSoftmax.apply(
                F.normalize(x, dim=1), sub, target_cols, norms, self.margin, self.group,
                self.workspace, self.subcenters,
            )
        if self.training:
            self.sample_step += 1
        return loss

    def flush(self) -> None:
        """Finish the pending host-offload write-backs (none without offload). Forward
        calls it first; call it before reading `weight` or the momentum buffer directly."""
        self.storage.flush()

    def _scored_rows(self, rows: Tensor) -> Tensor:
        """The centres to score, as a leaf whose gradient is the sparse gradient: a copy
        of the sampled rows in the compute dtype on the compute device (in a reused
        buffer), or the shard itself at rate 1 when it needs no conversion."""
        if self.samples_all and not self.storage.copies_rows:
            return self.weight.detach().requires_grad_(True)
        with torch.no_grad():
            like = torch.empty(0, dtype=self.dtype, device=self.device)
            out = self.workspace.take("rows", (rows.numel(), self.embedding_size), like)
            sub = self.storage.read_rows(self.weight, rows, out)
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
        grad.index_add_(0, inverse.to(grad.device), torch.cat([g for _, g in parts]))
        return SampledGrad(union, grad)

    def zero_grad(self, set_to_none: bool = True) -> None:  # set_to_none: nn.Module API
        """Drop the sampled rows' gradients; their buffers are kept for the next step."""
        for rows, sub in self._sampled:
            if self.storage.copies_rows or rows.numel() < self.weight.shape[0]:  # a copy
                self.workspace.give("rows", sub)
            self.workspace.give("grad_rows", sub.grad)
            sub.grad = None
        self._sampled.clear()

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
        table = AllGather.apply(meta.unsqueeze(0), self.group).tolist()
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
