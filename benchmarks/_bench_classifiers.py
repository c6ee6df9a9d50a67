"""The three classifiers benchmarks/gpu_bench.py compares, each built as one training
step of the classifier alone: `BUILDERS[group](device, dim, classes, rate, anchor)`
returns `step(embeddings, labels)` that runs forward, backward and the optimiser update.

Every optimiser is momentum SGD (lr 0.1, momentum 0.9, weight decay 5e-4) and every
margin ArcFace (s = 64, m = 0.5):

  arcshard  trainer.partial_fc.PartialFC + trainer.optim.ShardSGD, fp32 storage, no
            offload, built as trainer/train.py builds it;
  anchor    arcface_torch's PartialFC_V2 + CombinedMarginLoss with torch.optim.SGD, as its
            train_v2.py trains them (imported from a copy of the oracle: `load_anchor`);
  dense     DDP(nn.Linear) + cross-entropy without margin, torch.optim.SGD: the plain
            data-parallel baseline, every class scored and updated every step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

IMPLS = {"arcshard": "arcshard PartialFC", "anchor": "arcface_torch PartialFC_V2",
         "dense": "DDP nn.Linear + CE"}
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
S, M = 64.0, 0.5  # ArcFace

ClassifierStep = Callable[[Tensor, Tensor], None]


class AnchorMissing(RuntimeError):
    """The arcface_torch copy is not where ANCHOR_DIR points (the message is the one line
    gpu_bench prints)."""


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def arcshard_step(device: torch.device, dim: int, classes: int, rate: float, _anchor) -> ClassifierStep:
    from trainer.optim import ShardSGD
    from trainer.partial_fc import PartialFC

    pfc = PartialFC(classes, dim, sample_rate=rate, seed=0, device=device,
                    check_inputs=device.type == "cpu")  # as trainer/train.py builds it
    optimizer = ShardSGD(pfc, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    pfc.train()

    def step(x: Tensor, labels: Tensor) -> None:
        pfc(x, labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


@contextlib.contextmanager
def anchor_device(device: torch.device) -> Iterator[None]:
    """Where arcface_torch's code runs: new tensors default to `device` (its 10M-row
    weight is drawn there, not on the host), and on a CPU run only, `Tensor.cuda` (which
    it hard-codes) is the identity while it runs."""
    saved = torch.Tensor.cuda
    if device.type == "cpu":
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        with torch.device(device), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.cuda.amp.autocast", category=FutureWarning)
            yield
    finally:
        torch.Tensor.cuda = saved


def anchor_step(device: torch.device, dim: int, classes: int, rate: float, anchor) -> ClassifierStep:
    partial_fc_v2, combined_margin_loss = anchor
    with anchor_device(device):
        module = partial_fc_v2(combined_margin_loss(S, 1.0, M, 0.0), dim, classes,
                               sample_rate=rate, fp16=False)
    optimizer = sgd(module.parameters())

    def step(x: Tensor, labels: Tensor) -> None:
        with anchor_device(device):
            module(x, labels.clone()).backward()  # it squeezes and rewrites its labels
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def dense_step(device: torch.device, dim: int, classes: int, _rate: float, _anchor) -> ClassifierStep:
    with torch.device(device):  # initialised on the device, not on the host
        linear = nn.Linear(dim, classes, bias=False)
    model = DistributedDataParallel(linear, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = sgd(model.parameters())

    def step(x: Tensor, labels: Tensor) -> None:
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


BUILDERS = {"arcshard": arcshard_step, "anchor": anchor_step, "dense": dense_step}


def load_anchor(anchor_dir: Path) -> tuple[type, type]:
    """(PartialFC_V2, CombinedMarginLoss) from the arcface_torch copy in `anchor_dir`;
    raises AnchorMissing when its files are not there."""
    files = [anchor_dir / "partial_fc_v2.py", anchor_dir / "losses.py"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise AnchorMissing(
            f"skipped: arcface_torch not found ({', '.join(missing)} missing): copy "
            "/work/shared/anchors/arcface_torch into the checkout (cp -r ../shared/anchors "
            ".anchors) or set ANCHOR_DIR")
    modules = []
    for path in files:  # by path, under private names: its `losses` is a generic name
        spec = importlib.util.spec_from_file_location(f"_arcface_torch_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0].PartialFC_V2, modules[1].CombinedMarginLoss
