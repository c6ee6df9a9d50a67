"""Real-face benchmark data and classical baselines (a module of benchmarks/real_faces.py).

* `Split`: which Yale subjects train and which are verified. `TEST` is the reported one
  (train 01-10, verify 11-15); `VAL` (train 01-07, verify 08-10) never sees 11-15 and is
  where every choice is made: the classical baselines' dimensions here, the recipe's
  hyper-parameters in trainer/configs/small_faces.yaml.
* `load_subjects`: the photos as network input, through `data_tools.face.fit` (the same
  geometry `arcshard-data build --fit` gives the training shards).
* `all_pairs`: every genuine pair of the verified subjects plus as many impostor pairs,
  drawn with a seed, interleaved and shuffled (10-fold accuracy cuts contiguous folds).
* `classical`: raw pixels, eigenfaces (PCA) and fisherfaces (PCA + LDA), fitted on the
  training subjects only, scored by cosine similarity like the networks.
"""

from __future__ import annotations

import functools
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # `python benchmarks/_faces.py --help`: say what it is
    print(__doc__.strip() + "\n(a module of real_faces.py; it has no command line)")
    sys.exit(0)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data_tools.face import fit  # noqa: E402
from trainer.evaluation.verification import VerificationResult, evaluate_scores  # noqa: E402

EIGEN_DIMS = (10, 20, 50, 100)
FISHER_PCA_DIMS = (20, 30, 45, 60)


@dataclass(frozen=True)
class Split:
    name: str
    train: tuple[str, ...]
    verify: tuple[str, ...]


def _subjects(first: int, last: int) -> tuple[str, ...]:
    return tuple(f"subject{i:02d}" for i in range(first, last + 1))


TEST = Split("test", _subjects(1, 10), _subjects(11, 15))
VAL = Split("val", _subjects(1, 7), _subjects(8, 10))
SPLITS = {s.name: s for s in (TEST, VAL)}


@functools.lru_cache(maxsize=8)
def load_subjects(root: Path, subjects: tuple[str, ...], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [N, 112, 112, 3] as the network sees them, labels [N] = subject index)."""
    images, labels = [], []
    for label, subject in enumerate(subjects):
        files = sorted(p for p in (root / subject).iterdir() if p.is_file())
        if not files:
            raise SystemExit(f"{root / subject}: no photos (expected the Yale Face Database layout)")
        for path in files:
            with Image.open(path) as image:
                images.append(fit(np.asarray(image.convert("RGB")), mode=mode))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def all_pairs(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pairs [2G, 2] of image rows, issame [2G]): all G genuine pairs, G seeded impostors."""
    both = list(itertools.combinations(range(len(labels)), 2))
    genuine = [p for p in both if labels[p[0]] == labels[p[1]]]
    impostors = [p for p in both if labels[p[0]] != labels[p[1]]]
    rng = np.random.default_rng(seed)
    chosen = [impostors[i] for i in rng.choice(len(impostors), len(genuine), replace=False)]
    pairs = np.asarray([p for g, i in zip(genuine, chosen) for p in (g, i)])
    issame = np.tile([True, False], len(genuine))
    order = rng.permutation(len(pairs))
    return pairs[order], issame[order]


def score(name: str, features: np.ndarray, pairs: np.ndarray, issame: np.ndarray) -> VerificationResult:
    """Verification metrics of `features` by the cosine similarity of each pair."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    return evaluate_scores(name, np.sum(unit[pairs[:, 0]] * unit[pairs[:, 1]], axis=1), issame)


def _gray(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64).mean(axis=-1).reshape(len(images), -1)


def _pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, principal axes as rows, by decreasing variance)."""
    mean = x.mean(axis=0)
    return mean, np.linalg.svd(x - mean, full_matrices=False)[2]


def _lda(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Fisher's discriminant directions [dims, classes - 1] of `z` (Sw regularised by a
    1e-6 share of its trace, so a singular within-class scatter still has an inverse)."""
    classes = np.unique(labels)
    centre = z.mean(axis=0)
    within = sum(np.cov(z[labels == c].T, bias=True) * np.sum(labels == c) for c in classes)
    between = sum(np.sum(labels == c) * np.outer(z[labels == c].mean(0) - centre, z[labels == c].mean(0) - centre)
                  for c in classes)
    within = within + 1e-6 * np.trace(within) / len(within) * np.eye(len(within))
    values, vectors = np.linalg.eigh(within)
    whiten = vectors / np.sqrt(values)
    _, directions = np.linalg.eigh(whiten.T @ between @ whiten)
    return whiten @ directions[:, ::-1][:, : len(classes) - 1]


def _features(method: str, dims: int, train: np.ndarray, labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    x, y = _gray(train), _gray(test)
    if method == "raw":
        return y - x.mean(axis=0)
    mean, axes = _pca(x)
    axes = axes[: min(dims, len(x) - len(np.unique(labels)) if method == "fisher" else dims)]
    if method == "eigen":
        return (y - mean) @ axes.T
    return (y - mean) @ axes.T @ _lda((x - mean) @ axes.T, labels)


@dataclass
class Classical:
    name: str  # e.g. "fisherfaces (PCA 30 + LDA)"
    method: str
    dims: int
    result: VerificationResult


def classical(root: Path, split: Split, mode: str, pairs_seed: int) -> list[Classical]:
    """The three baselines on `split`, each method's dimensions chosen on `VAL` (by
    accuracy, ties to the smaller) unless `split` is VAL itself, where all are shown."""
    def run(s: Split, method: str, dims: int) -> VerificationResult:
        train, labels = load_subjects(root, s.train, mode)
        test, test_labels = load_subjects(root, s.verify, mode)
        pairs, issame = all_pairs(test_labels, pairs_seed)
        return score(method, _features(method, dims, train, labels, test), pairs, issame)

    out = [Classical("raw pixels", "raw", 0, run(split, "raw", 0))]
    for method, label, grid in (("eigen", "eigenfaces (PCA {})", EIGEN_DIMS),
                                ("fisher", "fisherfaces (PCA {} + LDA)", FISHER_PCA_DIMS)):
        on_val = {d: run(VAL, method, d).accuracy for d in grid}
        dims = max(grid, key=lambda d: (on_val[d], -d))
        out.append(Classical(label.format(dims), method, dims, run(split, method, dims)))
    return out
