"""Import a half-finished arcface_torch run: its per-GPU files -> one arcshard checkpoint.

arcface_torch's `train_v2.py` (with `save_all_states=True`) writes one
`checkpoint_gpu_{rank}.pt` per GPU: `state_dict_backbone` (the same on every rank),
`state_dict_softmax_fc` (`weight`: that rank's `PartialFC_V2` class centres),
`state_optimizer` (one `torch.optim.SGD` over `[backbone params, the PFC weight]`, so the
PFC weight is the last parameter and its `momentum_buffer` the shard's momentum),
`state_lr_scheduler`, `epoch` and `global_step`. Rank r of W holds classes
`[C//W·r + min(r, C%W), … + C//W + (r < C%W))`: the same contiguous sharding as
`trainer.partial_fc.shard_range`, so rows map to global class ids by concatenating the
ranks in order.

`import_run` checks every file (ranks 0..W-1 all present, equal embedding sizes, each
rank's row count what C classes over W ranks give it, the backbone fitting the named
arcshard backbone), then writes `OUT/checkpoints/step-N` at world size 1 with
`trainer.checkpoint.save`: the classifier rows and momentum, the backbone and its SGD
momentum, step and epoch; loading it re-shards to any world size. Every file is
unpickled with `weights_only=True`.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from trainer.checkpoint.backbone import check_weights
from trainer.checkpoint.files import load_plain
from trainer.checkpoint.layout import CheckpointError, checkpoints_root, find_latest

log = logging.getLogger("trainer.checkpoint")

FILE = re.compile(r"^checkpoint_gpu_(\d+)\.pt$")


@dataclass
class ArcfaceRun:
    """What an arcface_torch run's files hold, classes in global order."""

    world_size: int
    step: int
    epoch: int
    backbone: dict[str, Tensor]
    weight: Tensor  # [C, D]
    momentum: Tensor | None  # [C, D], None when no rank's optimizer state has it
    backbone_momentum: dict[str, Tensor]  # parameter name -> momentum_buffer
    optim: dict[str, float]  # lr (the schedule's base), momentum, weight_decay
    schedule: dict[str, int]  # warmup_iters, total_iters when the scheduler state has them


def _rank_files(src: Path) -> list[Path]:
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (give the arcface_torch output dir with checkpoint_gpu_*.pt)")
    found = {int(m.group(1)): p for p in src.iterdir() if (m := FILE.match(p.name))}
    if not found:
        raise CheckpointError(
            f"{src}: no checkpoint_gpu_{{rank}}.pt files (arcface_torch writes them with save_all_states=True)"
        )
    world = max(found) + 1
    missing = [r for r in range(world) if r not in found]
    if missing:
        raise CheckpointError(
            f"{src / f'checkpoint_gpu_{missing[0]}.pt'}: missing (found ranks {sorted(found)}; a run "
            f"on {world} GPUs writes one file per rank): copy every rank's file"
        )
    return [found[r] for r in range(world)]


def _load(path: Path) -> dict[str, Any]:
    state = load_plain(path.read_bytes(), path)
    needed = ("state_dict_backbone", "state_dict_softmax_fc", "global_step", "epoch")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise CheckpointError(f"{path}: not an arcface_torch train_v2.py checkpoint (needs {', '.join(needed)})")
    fc = state["state_dict_softmax_fc"]
    weight = fc.get("weight") if isinstance(fc, dict) else None
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise CheckpointError(f"{path}: state_dict_softmax_fc has no 2-d weight (class centres)")
    return state


def _optimizer_parts(state: dict[str, Any]) -> tuple[dict[int, Tensor], list[int], dict[str, Any]]:
    """(param index -> momentum_buffer, the PFC weight's index list, the last group)."""
    opt = state.get("state_optimizer")
    if not isinstance(opt, dict) or not opt.get("param_groups"):
        return {}, [], {}
    buffers = {int(i): s["momentum_buffer"] for i, s in opt.get("state", {}).items()
               if isinstance(s, dict) and isinstance(s.get("momentum_buffer"), Tensor)}
    groups = opt["param_groups"]
    return buffers, list(groups[-1]["params"]), groups[-1]


def _shard_momentum(path: Path, state: dict[str, Any], weight: Tensor) -> Tensor | None:
    buffers, pfc_params, _ = _optimizer_parts(state)
    if not pfc_params or pfc_params[-1] not in buffers:
        return None
    buf = buffers[pfc_params[-1]]
    if buf.shape != weight.shape:
        raise CheckpointError(
            f"{path}: the classifier momentum is {tuple(buf.shape)}, its weight {tuple(weight.shape)}; "
            "the file is damaged"
        )
    return buf


def _backbone_momentum(state: dict[str, Any], param_names: list[str]) -> dict[str, Tensor]:
    """Backbone momentum by parameter name: SGD's state indexes the parameters in
    `backbone.parameters()` order, which is their order in the state_dict."""
    buffers, pfc_params, _ = _optimizer_parts(state)
    names = set(param_names)
    ordered = [k for k in state["state_dict_backbone"] if k in names]
    return {name: buffers[i] for i, name in enumerate(ordered) if i in buffers and i not in pfc_params}


def read_run(src: Path, num_classes: int, backbone: str, embedding_size: int | None) -> ArcfaceRun:
    """Every rank's file under `src`, checked against `num_classes` classes and backbone
    `backbone` (embedding size: `embedding_size`, else the classifier's)."""
    from trainer.backbones import get_backbone
    from trainer.partial_fc import shard_range

    paths = _rank_files(src)
    world = len(paths)
    if num_classes < world:
        raise CheckpointError(f"--num-classes {num_classes}: fewer classes than the {world} rank files in {src}")
    weights, momenta, first = [], [], None
    for rank, path in enumerate(paths):
        state = _load(path)
        weight = state["state_dict_softmax_fc"]["weight"]
        rows = shard_range(num_classes, world, rank)[1]
        if first is not None and weight.shape[1] != first["state_dict_softmax_fc"]["weight"].shape[1]:
            raise CheckpointError(
                f"{path}: class centres are {weight.shape[1]}-d, {paths[0].name}'s "
                f"{first['state_dict_softmax_fc']['weight'].shape[1]}-d: the files come from different runs"
            )
        if weight.shape[0] != rows:
            raise CheckpointError(
                f"{path}: holds {weight.shape[0]} class centres, but {num_classes} classes over {world} "
                f"ranks give rank {rank} {rows} (arcface_torch's sharding): check --num-classes"
            )
        weights.append(weight)
        momenta.append(_shard_momentum(path, state, weight))
        first = first or state
    size = embedding_size or int(weights[0].shape[1])
    if size != weights[0].shape[1]:
        raise CheckpointError(f"{paths[0]}: class centres are {weights[0].shape[1]}-d, --embedding-size is {size}")
    check_weights(first["state_dict_backbone"], paths[0], backbone, size)
    with torch.device("meta"):
        param_names = [n for n, _ in get_backbone(backbone, embedding_size=size).named_parameters()]
    _, _, group = _optimizer_parts(first)
    sched = first.get("state_lr_scheduler") or {}
    return ArcfaceRun(
        world_size=world, step=int(first["global_step"]), epoch=int(first["epoch"]),
        backbone=first["state_dict_backbone"], weight=torch.cat(weights),
        momentum=torch.cat(momenta) if all(m is not None for m in momenta) else None,
        backbone_momentum=_backbone_momentum(first, param_names),
        optim={k: float(group[k]) for k in ("momentum", "weight_decay") if k in group}
        | ({"lr": float(group.get("initial_lr", group["lr"]))} if "lr" in group else {}),
        schedule={k: int(sched[k]) for k in ("warmup_iters", "total_iters") if isinstance(sched.get(k), int)},
    )


def _config(run: ArcfaceRun, backbone: str, num_classes: int):
    from trainer.config import load_config

    o = run.optim
    overrides = [
        f"backbone.name={backbone}", f"backbone.embedding_size={run.weight.shape[1]}",
        f"data.num_classes={num_classes}",
        *(f"optim.{k}={v}" for k, v in o.items()),
    ]
    if "total_iters" in run.schedule:
        overrides += [f"run.max_steps={run.schedule['total_iters']}",
                      f"optim.warmup_steps={run.schedule.get('warmup_iters', 0)}",
                      "optim.power=1"]  # PolynomialLRWarmup's default
    return load_config(None, overrides)


def import_run(
    src: str | Path, out: str | Path, num_classes: int, backbone: str = "iresnet50",
    embedding_size: int | None = None,
) -> Path:
    """Write arcface_torch run `src` as an arcshard checkpoint under run dir `out`
    (refused if `out` has checkpoints); returns the checkpoint directory. Needs no
    process group of its own: it starts a one-process gloo group when none exists."""
    src, out = Path(src), Path(out)
    if find_latest(checkpoints_root(out)) is not None:
        raise CheckpointError(f"{out}: already holds checkpoints; import into a new run directory")
    run = read_run(src, num_classes, backbone, embedding_size)
    cfg = _config(run, backbone, num_classes)
    with _one_process_group():
        return _write(run, cfg, out)


def _write(run: ArcfaceRun, cfg, out: Path) -> Path:
    from trainer.backbones import get_backbone
    from trainer.checkpoint.parts import TrainingParts
    from trainer.checkpoint.saving import save
    from trainer.config import save_config
    from trainer.optim import ShardSGD, make_backbone_optimizer
    from trainer.partial_fc import PartialFC
    from trainer.state import TrainState

    o = cfg.optim
    module = get_backbone(cfg.backbone.name, embedding_size=cfg.backbone.embedding_size)
    module.load_state_dict(run.backbone)
    pfc = PartialFC(cfg.data.num_classes, cfg.backbone.embedding_size, seed=cfg.run.seed, check_inputs=False)
    shard = ShardSGD(pfc, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    with torch.no_grad():
        pfc.weight.copy_(run.weight)
        if shard.momentum_buffer is not None and run.momentum is not None:
            shard.momentum_buffer.copy_(run.momentum)
    pfc.sample_step = run.step
    opt = make_backbone_optimizer(module.parameters(), "sgd", o.lr, o.momentum, o.weight_decay)
    for name, param in module.named_parameters():
        if name in run.backbone_momentum:
            opt.state[param]["momentum_buffer"] = run.backbone_momentum[name].clone()
    parts = TrainingParts(module, pfc, shard, opt, None, cfg)
    ckpt = save(checkpoints_root(out), parts, TrainState(step=run.step, epoch=run.epoch))
    save_config(cfg, out / "config.yaml")
    return ckpt


@contextmanager
def _one_process_group() -> Iterator[None]:
    """A one-process gloo group for PartialFC and `save` (none is started if one exists)."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="arcshard-import-") as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
