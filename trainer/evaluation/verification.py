"""Pair verification on insightface `.bin` sets (LFW, CFP-FP, AgeDB-30, ...).

A `.bin` is a pickle of `(bins, issame_list)`: `2 * N` encoded images, the two images of
pair `i` at `bins[2*i]` and `bins[2*i+1]`, and `N` booleans (same person or not). The
files that circulate were pickled by Python 2 (read with `encoding="bytes"`, their
images are `bytes`) or Python 3; some hold numpy arrays (of encoded bytes, of labels).
`load_bin` reads all of them with an unpickler that refuses anything but lists, tuples,
bytes, numbers and numpy arrays, so a downloaded file cannot run code.

Metrics (`evaluate_embeddings`), on the cosine similarity of L2-normalised (flip-TTA)
embeddings:

* **accuracy**: insightface's 10-fold protocol. Pairs are split into 10 contiguous folds
  (no shuffling, the first `N % 10` folds one pair larger, as sklearn's `KFold`); for
  each fold the threshold with the best accuracy on the other nine is applied to it;
  reported as mean and (population) standard deviation over the folds. "Same" means
  a cosine above the threshold. The candidate thresholds are the midpoints between
  consecutive distinct training scores (plus accept-all and reject-all), so the training
  optimum is exact. insightface scans a fixed grid (squared distance step 0.01, cosine
  step 0.005) instead, which cannot separate anything when all cosines lie within 0.005
  of each other, as they do for a network early in training (measured here: AUC 0.91
  at 50% grid accuracy). On a tie the middle one of the equally good thresholds is taken
  (insightface takes the strictest, at the edge of the training genuine scores).
* **best_threshold**: the threshold, chosen the same way, that is best over all pairs.
* **auc**: area under the ROC curve (probability that a genuine pair scores above an
  impostor pair, ties counting one half).
* **tar_at_far**: true accept rate at a false accept rate, for each FAR in `fars` for
  which there are at least `1 / FAR` impostor pairs: the largest TAR of any threshold
  whose FAR is at most the target (`tar_at_far`).

`evaluate_targets` is what training calls: every rank embeds a contiguous share of each
set's images, the shares are all-gathered, and every rank computes the same results.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_tools import face
from trainer.evaluation.embedder import INPUT_SIZE, Embedder, TorchEmbedder, embed, preprocess

if TYPE_CHECKING:
    import torch
    from torch import nn

NUM_FOLDS = 10
VERIFICATION_FARS = (1e-2, 1e-3)


@dataclass
class VerificationSet:
    """One verification target: pair `i` compares `images[pairs[i, 0]]` with `images[pairs[i, 1]]`.

    `images` is RGB uint8 `[M, S, S, 3]` (S = the `image_size` it was loaded at), each
    distinct encoded image of the file once (sets reuse images across pairs: embedding
    each once is exact and cheaper), `pairs` int64 `[N, 2]` and `issame` bool `[N]`.
    `name` is the file's stem (`lfw` for `lfw.bin`).
    """

    name: str
    path: Path
    images: np.ndarray
    pairs: np.ndarray
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


@dataclass
class VerificationResult:
    """The numbers one target scored (see the module docstring for each)."""

    name: str
    accuracy: float
    accuracy_std: float
    best_threshold: float
    auc: float
    num_pairs: int
    tar_at_far: dict[float, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: FAR keys as strings like `"1e-03"`."""
        return {
            "name": self.name,
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "best_threshold": self.best_threshold,
            "auc": self.auc,
            "tar_at_far": {far_key(far): tar for far, tar in self.tar_at_far.items()},
            "num_pairs": self.num_pairs,
        }

    def summary(self) -> str:
        """One line for logs and the CLI."""
        tars = "".join(f", TAR@FAR={far_key(far)} {tar:.4f}" for far, tar in self.tar_at_far.items())
        return (
            f"{self.name}: accuracy {self.accuracy:.4f} ± {self.accuracy_std:.4f} "
            f"({NUM_FOLDS}-fold, {self.num_pairs} pairs), best threshold {self.best_threshold:.3f}, "
            f"AUC {self.auc:.4f}{tars}"
        )


def far_key(far: float) -> str:
    """`1e-3` -> `"1e-03"`: how a FAR is written in JSON and logs."""
    return f"{far:.0e}"


# ---------------------------------------------------------------------------- loading


class _BinUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays/scalars; any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a verification set never holds (refusing to load it)"
            )
        return super().find_class(module, name)


def load_bin(path: str | Path, image_size: int = INPUT_SIZE) -> VerificationSet:
    """Read an insightface verification `.bin` (Python 2 or 3 pickle) and decode its images.

    Images are decoded to RGB and resized to `image_size` when they have another size.
    Raises `ValueError` naming the file for anything that is not such a set: unreadable
    pickle, an odd number of images, an `issame` list whose length is not half the
    image count, an undecodable image, no genuine or no impostor pair.
    """
    path = Path(path)
    fix = "re-download it, or make one with `arcshard-data make-pairs`"
    try:
        with open(path, "rb") as f:
            payload = _BinUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such verification set; check the path") from None
    except Exception as exc:  # a corrupt pickle raises many exception types
        raise ValueError(f"{path}: not an insightface verification .bin ({type(exc).__name__}: {exc}); {fix}") from None
    if not isinstance(payload, (tuple, list)) or len(payload) != 2:
        raise ValueError(f"{path}: expected a pickled (images, issame_list) pair, got {type(payload).__name__}; {fix}")
    bins, issame = payload
    try:
        bins, issame = list(bins), np.asarray(issame).astype(bool).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: images or issame_list is not a list ({exc}); {fix}") from None
    if len(bins) % 2:
        raise ValueError(f"{path}: {len(bins)} images, an odd count; a .bin holds two images per pair; {fix}")
    if len(issame) != len(bins) // 2:
        raise ValueError(
            f"{path}: {len(bins)} images make {len(bins) // 2} pairs but issame_list has "
            f"{len(issame)} labels; {fix}"
        )
    if issame.all() or not issame.any():
        raise ValueError(f"{path}: needs both genuine and impostor pairs, it has {int(issame.sum())} genuine of {len(issame)}; {fix}")
    slot_of: dict[bytes, int] = {}  # encoded bytes -> row in `images`
    first_index: list[int] = []
    slots = np.empty(len(bins), np.int64)
    for i, data in enumerate(bins):
        key = data.tobytes() if isinstance(data, np.ndarray) else bytes(data) if isinstance(data, (bytes, bytearray)) else None
        if key is None:
            raise ValueError(f"{path}: image {i} is a {type(data).__name__}, not encoded image bytes; {fix}")
        if key not in slot_of:
            slot_of[key] = len(first_index)
            first_index.append(i)
        slots[i] = slot_of[key]
    images = np.empty((len(first_index), image_size, image_size, 3), np.uint8)
    for row, i in enumerate(first_index):
        try:
            images[row] = decode_image(bins[i], image_size)
        except Exception as exc:  # Pillow raises many exception types for bad data
            raise ValueError(f"{path}: image {i} cannot be decoded ({type(exc).__name__}: {exc}); {fix}") from None
    return VerificationSet(path.stem, path, images, slots.reshape(-1, 2), issame)


def decode_image(data: Any, size: int = INPUT_SIZE) -> np.ndarray:
    """Encoded image (`bytes`, or a numpy uint8 array of its bytes) -> RGB uint8 `[size, size, 3]`."""
    import simplejpeg
    from PIL import Image

    if isinstance(data, np.ndarray):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"expected encoded image bytes, got {type(data).__name__}")
    pixels = None
    if data[:2] == b"\xff\xd8":
        try:
            pixels = simplejpeg.decode_jpeg(bytes(data), colorspace="RGB")
        except ValueError:
            pixels = None  # a variant libjpeg-turbo refuses: Pillow decides
    if pixels is None:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))
    return face.fit(pixels, size)  # a non-square image: cropped as training images are


# ---------------------------------------------------------------------------- metrics


def fold_bounds(num_pairs: int, num_folds: int = NUM_FOLDS) -> list[tuple[int, int]]:
    """Contiguous `[start, stop)` folds, the first `num_pairs % num_folds` one longer (sklearn KFold)."""
    if num_pairs < num_folds:
        raise ValueError(f"{num_pairs} pairs cannot be split into {num_folds} folds")
    sizes = [num_pairs // num_folds + (k < num_pairs % num_folds) for k in range(num_folds)]
    stops = np.cumsum(sizes).tolist()
    return list(zip([0] + stops[:-1], stops))


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, num_folds: int = NUM_FOLDS) -> np.ndarray:
    """Per-fold test accuracy, each fold judged at the threshold best on the other folds.

    `scores` are similarities ("same" when above the threshold).
    """
    scores, issame = np.asarray(scores, np.float64), np.asarray(issame, bool)
    accuracies = np.empty(num_folds)
    for k, (a, b) in enumerate(fold_bounds(len(scores), num_folds)):
        train = np.ones(len(scores), bool)
        train[a:b] = False
        threshold = best_threshold(scores[train], issame[train])
        accuracies[k] = np.mean((scores[a:b] > threshold) == issame[a:b])
    return accuracies


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """The threshold with the most pairs right ("same" when the score is above it).

    Candidates are the midpoints between consecutive distinct scores, one just below the
    lowest (accept all) and the highest score itself (reject all); of equally good ones
    the middle is taken. O(N log N) via cumulative counts over the sorted scores.
    """
    scores, issame = np.asarray(scores, np.float64), np.asarray(issame, bool)
    order = np.argsort(scores, kind="stable")
    ordered, same = scores[order], issame[order]
    distinct = np.flatnonzero(np.diff(ordered) > 0)  # cut after position j: ordered[j] < ordered[j+1]
    impostors_below = np.cumsum(~same)  # rejected impostors when cutting after position j
    genuine_above = same.sum() - np.cumsum(same)  # accepted genuine pairs when cutting after j
    correct = np.concatenate([[same.sum()], (impostors_below + genuine_above)[distinct], [(~same).sum()]])
    thresholds = np.concatenate([
        [np.nextafter(ordered[0], -np.inf)],
        (ordered[distinct] + ordered[distinct + 1]) / 2,
        [ordered[-1]],
    ])
    best = np.flatnonzero(correct == correct.max())
    return float(thresholds[best[len(best) // 2]])


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(genuine score > impostor score) + P(tie) / 2 (Mann-Whitney)."""
    labels = np.asarray(labels, bool)
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError("ROC AUC needs both genuine and impostor pairs")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = mean_rank[inverse][labels].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def tar_at_far(scores: np.ndarray, labels: np.ndarray, far: float) -> float | None:
    """The largest true accept rate of any threshold whose false accept rate is <= `far`.

    Accepting scores above the `(k+1)`-th highest impostor score, `k = floor(far *
    impostors)`, admits at most `k` impostors, and no threshold with at most `k` false
    accepts accepts more genuine pairs. None when there are fewer than `1 / far`
    impostor pairs (the FAR cannot be resolved).
    """
    labels = np.asarray(labels, bool)
    genuine, impostor = scores[labels], scores[~labels]
    if len(genuine) == 0 or len(impostor) * far < 1 - 1e-9:
        return None
    allowed = math.floor(far * len(impostor) + 1e-9)
    if allowed >= len(impostor):
        return 1.0
    cut = np.partition(impostor, len(impostor) - 1 - allowed)[len(impostor) - 1 - allowed]
    return float((genuine > cut).mean())


def evaluate_scores(
    name: str, scores: np.ndarray, issame: np.ndarray, fars: tuple[float, ...] = VERIFICATION_FARS
) -> VerificationResult:
    """All verification metrics of pair similarities `scores` with labels `issame`."""
    scores = np.asarray(scores, np.float64)
    issame = np.asarray(issame, bool)
    folds = kfold_accuracy(scores, issame)
    tars = {far: tar for far in fars if (tar := tar_at_far(scores, issame, far)) is not None}
    return VerificationResult(
        name=name,
        accuracy=float(folds.mean()),
        accuracy_std=float(folds.std()),
        best_threshold=best_threshold(scores, issame),
        auc=roc_auc(scores, issame),
        num_pairs=len(issame),
        tar_at_far=tars,
    )


def evaluate_embeddings(
    name: str, embeddings: np.ndarray, pairs: np.ndarray, issame: np.ndarray
) -> VerificationResult:
    """Metrics of a set from L2-normalised embeddings; pair `i` is rows `pairs[i]`."""
    embeddings = np.asarray(embeddings, np.float64)
    scores = np.sum(embeddings[pairs[:, 0]] * embeddings[pairs[:, 1]], axis=1)
    return evaluate_scores(name, scores, issame)


# ---------------------------------------------------------------------------- embedding


def batch_ranges(num_images: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows `[start, stop)` rank `rank` embeds: a contiguous run of whole batches, about 1/W.

    Cutting at batch boundaries means every forward pass holds the same images whatever
    the world size, so the gathered embeddings equal a single process's bit for bit.
    """
    num_batches = -(-num_images // batch_size)
    first, last = num_batches * rank // world_size, num_batches * (rank + 1) // world_size
    return min(first * batch_size, num_images), min(last * batch_size, num_images)


def embed_images(embedder: Embedder, images: np.ndarray, flip: bool, batch_size: int) -> np.ndarray:
    """L2-normalised embeddings of RGB uint8 `[N, H, W, 3]` images, `batch_size` at a time."""
    out = np.empty((len(images), embedder.embedding_size), np.float32)
    for start in range(0, len(images), batch_size):
        out[start : start + batch_size] = embed(embedder, preprocess(images[start : start + batch_size]), flip)
    return out


def embed_distributed(
    embedder: Embedder, images: np.ndarray, flip: bool, batch_size: int, device: torch.device
) -> np.ndarray:
    """`embed_images` with the work split over the ranks of the default process group.

    Every rank embeds its `batch_ranges` share and receives everyone's through one
    all-gather (on `device` for NCCL, on the CPU otherwise). Without an initialised
    process group it is `embed_images`. Collective: call on every rank.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embed_images(embedder, images, flip, batch_size)
    rank, world = dist.get_rank(), dist.get_world_size()
    ranges = [batch_ranges(len(images), batch_size, r, world) for r in range(world)]
    start, stop = ranges[rank]
    rows = max(b - a for a, b in ranges)
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    local = torch.zeros(rows, embedder.embedding_size, dtype=torch.float32, device=comm_device)
    if stop > start:
        local[: stop - start] = torch.from_numpy(embed_images(embedder, images[start:stop], flip, batch_size))
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return np.concatenate([g[: b - a].cpu().numpy() for g, (a, b) in zip(gathered, ranges)])


def evaluate_targets(
    module: nn.Module, sets: list[VerificationSet], device: torch.device | str, batch_size: int, flip: bool
) -> dict[str, VerificationResult]:
    """Verification results of `module` on each set, keyed by set name.

    Collective when `torch.distributed` is initialised: every rank must call it with the
    same sets; each embeds a contiguous share, and all return identical results. The
    module runs in eval mode without autograd and gets its previous mode back.
    """
    import torch

    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"verification sets need distinct file names, got {', '.join(names)}")
    embedder = TorchEmbedder(module, device=device, batch_size=batch_size)
    device = torch.device(device)
    results = {}
    for target in sets:
        embeddings = embed_distributed(embedder, target.images, flip, batch_size, device)
        results[target.name] = evaluate_embeddings(target.name, embeddings, target.pairs, target.issame)
    return results
