"""IJB-B / IJB-C 1:1 template verification (TAR at FAR 1e-6 ... 1e-1), insightface's protocol.

Layout (insightface's `IJB_release`; `root` is the folder holding `IJBC/`, or `IJBC/`
itself; IJB-B likewise with `IJBB` and `ijbb_` prefixes)::

    IJBC/loose_crop/1.jpg ...                 loosely cropped faces
    IJBC/meta/ijbc_name_5pts_score.txt        image x1 y1 ... x5 y5 detector_score
    IJBC/meta/ijbc_face_tid_mid.txt           image template_id media_id   (same order)
    IJBC/meta/ijbc_template_pair_label.txt    template_id template_id label(1 same, 0 not)

Per image: a similarity transform (Umeyama least squares) maps its 5 landmarks (eyes,
nose tip, mouth corners) onto arcface's 112x112 template and the face is warped with it
(bilinear, black outside). Its feature is the raw embedding of the crop plus that of the
mirrored crop (flip), scaled by the detector score (insightface's default "N1 D1 F2"
mode: embedding norm and detector score act as quality weights). Features of one media
(frames of one video, or one still) are averaged; a template's feature is the sum of its
media features, L2-normalised. A template pair's score is the cosine of the two; TAR at
each FAR (only those the impostor count resolves) and the ROC AUC come from the scores
(`verification.tar_at_far`, `verification.roc_auc`).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.evaluation.embedder import INPUT_SIZE, Embedder, preprocess
from trainer.evaluation.verification import far_key, roc_auc, tar_at_far

IJB_SETS = ("IJBB", "IJBC")
IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

# Five landmarks of arcface's aligned 112x112 face (insightface's 96x112 template, x + 8).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


@dataclass
class IJBMeta:
    """The meta files of one IJB set, row `i` of every per-image array being image `i`."""

    name: str
    images_dir: Path
    image_names: list[str]
    landmarks: np.ndarray  # float64 [M, 5, 2], pixel coordinates in the loose crop
    scores: np.ndarray  # float64 [M] detector (faceness) scores
    templates: np.ndarray  # int64 [M]
    medias: np.ndarray  # int64 [M]
    pairs: np.ndarray  # int64 [P, 2] template ids
    labels: np.ndarray  # bool [P]


@dataclass
class IJBResult:
    """TAR at each resolvable FAR, ROC AUC and the counts behind them."""

    name: str
    num_images: int
    num_templates: int
    num_pairs: int
    num_genuine: int
    auc: float
    tar_at_far: dict[float, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: FAR keys as strings like `"1e-04"`."""
        return {
            "name": self.name, "num_images": self.num_images, "num_templates": self.num_templates,
            "num_pairs": self.num_pairs, "num_genuine": self.num_genuine, "auc": self.auc,
            "tar_at_far": {far_key(far): tar for far, tar in self.tar_at_far.items()},
        }

    def summary(self) -> str:
        """A small table for the CLI."""
        lines = [
            f"{self.name}: {self.num_images} images, {self.num_templates} templates, "
            f"{self.num_pairs} pairs ({self.num_genuine} genuine), AUC {self.auc:.4f}",
            "  FAR     TAR",
        ]
        lines += [f"  {far_key(far)}  {tar:.4f}" for far, tar in self.tar_at_far.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- meta files


def set_dir(root: str | Path, name: str) -> Path:
    """The folder of set `name` (`IJBB`/`IJBC`): `root/name`, or `root` itself if it has `meta/`."""
    if name not in IJB_SETS:
        raise ValueError(f"--set {name}: choose one of {', '.join(IJB_SETS)}")
    root = Path(root)
    if (root / name / "meta").is_dir():
        return root / name
    if (root / "meta").is_dir():
        return root
    raise ValueError(
        f"{root}: neither {root / name / 'meta'} nor {root / 'meta'} exists; pass the folder "
        f"that holds {name}/ (insightface's IJB_release layout)"
    )


def read_meta(root: str | Path, name: str) -> IJBMeta:
    """Read and cross-check the three meta files of set `name` under `root`."""
    folder = set_dir(root, name)
    prefix = folder / "meta" / name.lower()
    points_file = Path(f"{prefix}_name_5pts_score.txt")
    tid_file = Path(f"{prefix}_face_tid_mid.txt")
    pair_file = Path(f"{prefix}_template_pair_label.txt")
    for path in (points_file, tid_file, pair_file):
        if not path.is_file():
            raise ValueError(f"{path}: missing IJB meta file; copy the {name} meta/ folder from the IJB release")
    names, landmarks, scores = _read_points(points_file)
    tid_names, templates, medias = _read_tid_mid(tid_file)
    if len(tid_names) != len(names):
        raise ValueError(
            f"{tid_file}: {len(tid_names)} images but {points_file.name} lists {len(names)}; "
            "use the meta files of one release"
        )
    mismatch = next((i for i, (a, b) in enumerate(zip(names, tid_names)) if a != b), None)
    if mismatch is not None:
        raise ValueError(
            f"{tid_file}: line {mismatch + 1} names {tid_names[mismatch]} but {points_file.name} "
            f"line {mismatch + 1} names {names[mismatch]}; the files must list images in the same order"
        )
    pairs = _read_int_table(pair_file, 3)
    known = np.unique(templates)
    unknown = np.setdiff1d(pairs[:, :2], known)
    if len(unknown):
        raise ValueError(
            f"{pair_file}: template {int(unknown[0])} has no image in {tid_file.name} "
            f"({len(unknown)} such templates); use the meta files of one release"
        )
    if not np.isin(pairs[:, 2], (0, 1)).all():
        raise ValueError(f"{pair_file}: the third column (label) must be 0 or 1")
    if pairs[:, 2].all() or not pairs[:, 2].any():
        raise ValueError(f"{pair_file}: needs both genuine (1) and impostor (0) pairs; use the release's pair list")
    return IJBMeta(
        name=name, images_dir=folder / "loose_crop", image_names=names, landmarks=landmarks,
        scores=scores, templates=templates, medias=medias, pairs=pairs[:, :2], labels=pairs[:, 2] == 1,
    )


def _read_points(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, values = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 12:
                raise ValueError(
                    f"{path}: line {number} has {len(fields)} fields, expected 12 "
                    "(image, 5 landmark x y pairs, detector score)"
                )
            try:
                values.append([float(v) for v in fields[1:]])
            except ValueError:
                raise ValueError(f"{path}: line {number} has a non-numeric landmark or score") from None
            names.append(fields[0])
    if not names:
        raise ValueError(f"{path}: no images listed")
    table = np.asarray(values, np.float64)
    return names, table[:, :10].reshape(-1, 5, 2), table[:, 10]


def _read_tid_mid(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, ids = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise ValueError(f"{path}: line {number} has {len(fields)} fields, expected 3 (image, template id, media id)")
            try:
                ids.append((int(fields[1]), int(fields[2])))
            except ValueError:
                raise ValueError(f"{path}: line {number} has a non-integer template or media id") from None
            names.append(fields[0])
    table = np.asarray(ids, np.int64).reshape(-1, 2)
    return names, table[:, 0], table[:, 1]


def _read_int_table(path: Path, columns: int) -> np.ndarray:
    """Whitespace-separated integers, `columns` per line (parsed in C: IJB-C has 15.7M pair lines)."""
    text = path.read_bytes().decode("ascii", errors="replace")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            values = np.fromstring(text, dtype=np.int64, sep=" ") if text.strip() else np.zeros(0, np.int64)
        except (ValueError, DeprecationWarning):  # numpy reports a non-integer token either way
            values = None
    if values is None or len(values) % columns:
        raise ValueError(f"{path}: expected {columns} integers on every line")
    if len(values) == 0:
        raise ValueError(f"{path}: no template pairs listed")
    return values.reshape(-1, columns)


# ---------------------------------------------------------------------------- alignment


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix of the similarity (rotation, uniform scale, translation) that maps the
    points `src` [K, 2] onto `dst` [K, 2] with least squared error (Umeyama 1991, the
    estimate skimage's `SimilarityTransform.estimate` makes)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0  # a reflection fits better: take the best proper rotation instead
    rotation = u @ np.diag(d) @ vt
    variance = (src_c**2).sum() / len(src)
    if variance == 0:
        raise ValueError("landmarks are all at one point; cannot align")
    scale = (s * d).sum() / variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def align_face(image: Any, landmarks: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Warp a PIL RGB image so its 5 landmarks land on arcface's template: uint8 `[size, size, 3]`.

    Coordinates are pixel indices (pixel `i`'s centre at `i`, as OpenCV's `warpAffine`,
    which insightface uses); Pillow's `Image.transform` takes the output-to-input map in
    pixel-edge coordinates, hence the half-pixel terms.
    """
    from PIL import Image

    forward = np.vstack([similarity_transform(landmarks, ARCFACE_TEMPLATE * size / INPUT_SIZE), [0, 0, 1]])
    inverse = np.linalg.inv(forward)
    a, b, c = inverse[0]
    d, e, f = inverse[1]
    data = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    warped = image.transform((size, size), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)
    return np.asarray(warped)


def load_aligned(meta: IJBMeta, index: int) -> np.ndarray:
    """Image `index` of the set, read from `loose_crop/` and aligned."""
    from PIL import Image

    path = meta.images_dir / meta.image_names[index]
    try:
        with Image.open(path) as image:
            return align_face(image.convert("RGB"), meta.landmarks[index])
    except FileNotFoundError:
        raise ValueError(f"{path}: missing image listed in the meta files; restore loose_crop/") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read or align ({exc})") from None


# ---------------------------------------------------------------------------- features


def image_features(
    embedder: Embedder, meta: IJBMeta, batch_size: int = 64, flip: bool = True, workers: int = 4,
    progress: Any = None,
) -> np.ndarray:
    """Raw (unnormalised) feature of every image: embedding of the aligned crop, plus that
    of its mirror with `flip`. Images are read and aligned by `workers` threads.
    `progress(done, total)` is called after each batch when given."""
    total = len(meta.image_names)
    out = np.empty((total, embedder.embedding_size), np.float32)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, total, batch_size):
            crops = np.stack(list(pool.map(lambda i: load_aligned(meta, i), range(start, min(start + batch_size, total)))))
            batch = preprocess(crops)
            features = embedder(batch)
            if flip:
                features = features + embedder(np.ascontiguousarray(batch[..., ::-1]))
            out[start : start + len(batch)] = features
            if progress is not None:
                progress(start + len(batch), total)
    return out


def template_features(
    features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`(unique_templates sorted, L2-normalised template features)`.

    Image features of one (template, media) are averaged; a template's feature is the
    sum of its media features, then L2-normalised.
    """
    features = np.asarray(features, np.float64)
    media_keys, media_of_image = np.unique(np.stack([templates, medias], axis=1), axis=0, return_inverse=True)
    media_of_image = media_of_image.reshape(-1)
    media_sum = np.zeros((len(media_keys), features.shape[1]))
    np.add.at(media_sum, media_of_image, features)
    media_mean = media_sum / np.bincount(media_of_image, minlength=len(media_keys))[:, None]
    unique_templates, template_of_media = np.unique(media_keys[:, 0], return_inverse=True)
    template_sum = np.zeros((len(unique_templates), features.shape[1]))
    np.add.at(template_sum, template_of_media.reshape(-1), media_mean)
    norms = np.linalg.norm(template_sum, axis=1, keepdims=True)
    return unique_templates, template_sum / np.maximum(norms, 1e-12)


def pair_scores(unique_templates: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each template pair (rows of `pairs` are template ids)."""
    rows = np.searchsorted(unique_templates, pairs)
    scores = np.empty(len(pairs))
    for start in range(0, len(pairs), 1 << 20):  # bounded memory for IJB-C's 15.7M pairs
        a, b = rows[start : start + (1 << 20)].T
        scores[start : start + len(a)] = np.einsum("ij,ij->i", template_feats[a], template_feats[b])
    return scores


def evaluate_ijb(
    embedder: Embedder, meta: IJBMeta, batch_size: int = 64, flip: bool = True,
    detector_score: bool = True, workers: int = 4, progress: Any = None,
) -> IJBResult:
    """The 1:1 verification protocol on a set read with `read_meta`."""
    features = image_features(embedder, meta, batch_size, flip, workers, progress)
    if detector_score:
        features = features * meta.scores[:, None].astype(np.float32)
    unique_templates, feats = template_features(features, meta.templates, meta.medias)
    scores = pair_scores(unique_templates, feats, meta.pairs)
    tars = {far: tar for far in IJB_FARS if (tar := tar_at_far(scores, meta.labels, far)) is not None}
    return IJBResult(
        name=meta.name, num_images=len(meta.image_names), num_templates=len(unique_templates),
        num_pairs=len(scores), num_genuine=int(meta.labels.sum()), auc=roc_auc(scores, meta.labels),
        tar_at_far=tars,
    )
