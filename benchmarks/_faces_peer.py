"""The peer row of benchmarks/real_faces.py: arcface_torch's own modules, trained with its
recipe on the same photos for the same number of images.

What runs is arcface_torch's code from `../shared/anchors/arcface_torch` (never copied):
`backbones.get_model("mbf", num_features=512)`, `losses.CombinedMarginLoss(64, 1.0,
0.5, 0.0)` (ArcFace) and `partial_fc_v2.PartialFC_V2(sample_rate=1.0)` in a 1-process
gloo group. What train_v2.py and configs/base.py set around them is re-stated here,
because train_v2.py no longer starts on current PyTorch (its `PolynomialLRWarmup` passes
`verbose=`; see ../shared/anchors/README.md): SGD over backbone + classifier, lr 0.1,
momentum 0.9, weight decay 5e-4, polynomial decay of power 2 (warmup 0, base.py's
default), the backbone's gradient clipped to norm 5, a random horizontal flip as its
only augmentation, inputs `(x / 255 - 0.5) / 0.5`, each epoch a fresh permutation.
It is scored like arcface_torch's eval/verification.py scores: embedding of the image
plus its mirror.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

if __name__ == "__main__":  # `python benchmarks/_faces_peer.py --help`: say what it is
    print(__doc__.strip() + "\n(a module of real_faces.py; it has no command line)")
    sys.exit(0)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks._bench_classifiers import anchor_device  # noqa: E402
from benchmarks._launch import free_port  # noqa: E402
from data_tools.face import normalise  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY, POWER, CLIP = 0.1, 0.9, 5e-4, 2.0, 5.0
S, MARGINS, EMBEDDING = 64.0, (1.0, 0.5, 0.0), 512


def _anchor_modules(anchor_dir: Path):
    """(get_model, CombinedMarginLoss, PartialFC_V2) imported from `anchor_dir`."""
    if not (anchor_dir / "partial_fc_v2.py").is_file():
        raise FileNotFoundError(f"{anchor_dir}: arcface_torch not found (expected ../shared/anchors/arcface_torch)")
    sys.path.insert(0, str(anchor_dir))
    try:
        backbones = importlib.import_module("backbones")
        losses = importlib.import_module("losses")
        pfc = importlib.import_module("partial_fc_v2")
    finally:
        sys.path.remove(str(anchor_dir))
    return backbones.get_model, losses.CombinedMarginLoss, pfc.PartialFC_V2


@contextlib.contextmanager
def _one_process_group() -> Iterator[None]:
    """PartialFC_V2 refuses to exist outside a process group: a 1-rank gloo one."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _batches(n: int, batch: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """`steps` batches of row indices: epochs of fresh permutations, last partial batch dropped."""
    done = 0
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            if done == steps:
                return
            done += 1
            yield order[start : start + batch]


def train_peer(anchor_dir: Path, images: np.ndarray, labels: np.ndarray, steps: int, batch: int,
               seed: int) -> torch.nn.Module:
    """arcface_torch's mbf + PartialFC_V2 trained `steps` steps of `batch` photos (eval mode)."""
    get_model, combined_margin_loss, partial_fc_v2 = _anchor_modules(anchor_dir)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_all = torch.from_numpy(normalise(images)).permute(0, 3, 1, 2).contiguous()
    y_all = torch.from_numpy(labels).long()
    cpu = torch.device("cpu")
    with _one_process_group(), anchor_device(cpu):
        backbone = get_model("mbf", fp16=False, num_features=EMBEDDING).train()
        head = partial_fc_v2(combined_margin_loss(S, *MARGINS), EMBEDDING, int(labels.max()) + 1,
                             sample_rate=1.0, fp16=False).train()
        opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}],
                              lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        for step, rows in enumerate(_batches(len(images), batch, steps, rng)):
            for group in opt.param_groups:
                group["lr"] = LR * (1 - step / steps) ** POWER
            x = x_all[rows]
            flip = torch.from_numpy(rng.random(len(rows)) < 0.5)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = head(backbone(x), y_all[rows].clone())  # it rewrites its labels in place
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(backbone.parameters(), CLIP)
            opt.step()
    return backbone.eval()
