"""IJB 1:1 protocol on a tiny synthetic IJB_release layout, against a direct computation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.evaluation.ijb import (
    ARCFACE_TEMPLATE, align_face, evaluate_ijb, image_features, pair_scores, read_meta, similarity_transform,
    template_features,
)


class ChannelMeans:
    """A stand-in embedder: the per-channel mean of the normalised input (D = 3).

    A solid-colour face gives exactly its normalised colour, mirrored or not, so the
    expected features follow from the colours alone.
    """

    embedding_size = 3

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return batch.astype(np.float64).mean(axis=(2, 3)).astype(np.float32)


def make_ijb(root: Path, name: str = "IJBC", seed: int = 0) -> dict:
    """A small IJB_release layout: 4 identities x 2 templates; templates of 1-3 images in 1-2
    media; solid-colour 160x160 PNG faces whose 5 landmarks sit inside the image."""
    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "loose_crop").mkdir(parents=True)
    (folder / "meta").mkdir()
    images, points, tid_mid = [], [], []
    identity_of = {}
    template = 100
    for identity in range(4):
        base = rng.uniform(40, 215, 3)
        for _ in range(2):
            template += 1
            identity_of[template] = identity
            for media in range(int(rng.integers(1, 3))):
                for _ in range(int(rng.integers(1, 3))):
                    colour = np.clip(base + rng.normal(0, 25, 3), 0, 255).round().astype(np.uint8)
                    file = f"{len(images) + 1}.png"
                    Image.fromarray(np.tile(colour, (160, 160, 1))).save(folder / "loose_crop" / file)
                    # the template's landmarks, scaled 0.8 and shifted: the crop stays inside
                    landmarks = ARCFACE_TEMPLATE * 0.8 + rng.uniform(20, 50, 2)
                    score = round(float(rng.uniform(0.5, 1.0)), 6)  # as written to the file
                    images.append((colour, score, template, 7000 + 10 * template + media))
                    points.append(f"{file} " + " ".join(f"{v:.4f}" for v in landmarks.ravel()) + f" {score}")
                    tid_mid.append(f"{file} {template} {7000 + 10 * template + media}")
    prefix = name.lower()
    (folder / "meta" / f"{prefix}_name_5pts_score.txt").write_text("\n".join(points) + "\n")
    (folder / "meta" / f"{prefix}_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    templates = sorted(identity_of)
    pairs = [(a, b, int(identity_of[a] == identity_of[b])) for i, a in enumerate(templates) for b in templates[i + 1:]]
    (folder / "meta" / f"{prefix}_template_pair_label.txt").write_text("".join(f"{a} {b} {l}\n" for a, b, l in pairs))
    return {"images": images, "pairs": pairs}


def direct_scores(layout: dict, detector_score: bool) -> tuple[np.ndarray, np.ndarray]:
    """Template-pair cosines written out with loops: feature = 2 x normalised colour (image +
    mirror) x score; mean per media; sum per template; L2-normalise."""
    by_media: dict[tuple[int, int], list[np.ndarray]] = {}
    for colour, score, template, media in layout["images"]:
        feature = 2 * (colour.astype(np.float64) - 127.5) / 127.5 * (score if detector_score else 1.0)
        by_media.setdefault((template, media), []).append(feature)
    by_template: dict[int, np.ndarray] = {}
    for (template, _), features in by_media.items():
        by_template[template] = by_template.get(template, 0) + np.mean(features, axis=0)
    unit = {t: f / np.linalg.norm(f) for t, f in by_template.items()}
    scores = np.array([unit[a] @ unit[b] for a, b, _ in layout["pairs"]])
    return scores, np.array([l == 1 for _, _, l in layout["pairs"]])


def brute_force_tar(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    genuine, impostor = scores[labels], scores[~labels]
    return max(
        (genuine >= t).mean()
        for t in np.concatenate([np.unique(scores), [np.inf]])
        if (impostor >= t).mean() <= far + 1e-12
    )


def test_similarity_transform_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.4, 1.7, np.array([5.0, -3.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rotation).T + shift
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix[:, :2], scale * rotation, atol=1e-12)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-10)


def test_align_face_uses_pixel_centre_coordinates():
    """Landmarks at twice the template on a horizontal ramp (value = x): output pixel x must
    sample input pixel 2x exactly, as OpenCV's warpAffine would (no half-pixel shift)."""
    ramp = Image.fromarray(np.tile(np.arange(224, dtype=np.float32), (224, 1)), mode="F")
    aligned = align_face(ramp, ARCFACE_TEMPLATE * 2)
    np.testing.assert_allclose(aligned[40:80, :100], np.tile(2.0 * np.arange(100), (40, 1)), atol=1e-3)


@pytest.mark.parametrize("detector_score", [True, False])
def test_protocol_matches_direct_computation(tmp_path: Path, detector_score: bool):
    layout = make_ijb(tmp_path)
    meta = read_meta(tmp_path, "IJBC")
    result = evaluate_ijb(ChannelMeans(), meta, batch_size=3, flip=True, detector_score=detector_score, workers=2)
    scores, labels = direct_scores(layout, detector_score)
    features = image_features(ChannelMeans(), meta, batch_size=3, flip=True, workers=2)
    weighted = features * meta.scores[:, None] if detector_score else features
    np.testing.assert_allclose(pair_scores(*template_features(weighted, meta.templates, meta.medias), meta.pairs),
                               scores, atol=1e-6)  # aligned crops keep their exact colour
    assert result.num_pairs == 28 and result.num_genuine == 4 and result.num_templates == 8
    assert result.num_images == len(layout["images"])
    assert set(result.tar_at_far) == {1e-1}  # 24 impostor pairs resolve only FAR 0.1
    assert result.tar_at_far[1e-1] == pytest.approx(brute_force_tar(scores, labels, 1e-1))
    genuine, impostor = scores[labels], scores[~labels]
    auc = np.mean([(g > i) + 0.5 * (g == i) for g in genuine for i in impostor])
    assert result.auc == pytest.approx(auc)


def test_template_features_average_media_then_sum():
    features = np.array([[1.0, 0], [3, 0], [0, 2], [5, 5]])
    templates, medias = np.array([7, 7, 7, 9]), np.array([1, 1, 2, 3])
    unique, feats = template_features(features, templates, medias)
    np.testing.assert_array_equal(unique, [7, 9])
    np.testing.assert_allclose(feats[0], np.array([2.0, 2.0]) / np.sqrt(8))  # mean(1,3)=2 in media 1, + (0, 2)
    np.testing.assert_allclose(feats[1], np.array([1, 1]) / np.sqrt(2))


@pytest.mark.parametrize("missing", ["name_5pts_score", "face_tid_mid", "template_pair_label"])
def test_missing_meta_file_is_named(tmp_path: Path, missing: str):
    make_ijb(tmp_path, "IJBB")
    path = tmp_path / "IJBB" / "meta" / f"ijbb_{missing}.txt"
    path.unlink()
    with pytest.raises(ValueError, match=re.escape(f"{path}: missing IJB meta file")):
        read_meta(tmp_path, "IJBB")


def test_inconsistent_meta_and_missing_image_are_named(tmp_path: Path):
    make_ijb(tmp_path)
    meta_dir = tmp_path / "IJBC" / "meta"
    pairs = meta_dir / "ijbc_template_pair_label.txt"
    pairs.write_text(pairs.read_text() + "101 999 0\n")
    with pytest.raises(ValueError, match=re.escape(f"{pairs}: template 999 has no image")):
        read_meta(tmp_path, "IJBC")
    pairs.write_text(pairs.read_text().replace("101 999 0\n", "101 x 0\n"))
    with pytest.raises(ValueError, match=re.escape(f"{pairs}: expected 3 integers on every line")):
        read_meta(tmp_path, "IJBC")
    pairs.write_text(pairs.read_text().replace("101 x 0\n", ""))
    (tmp_path / "IJBC" / "loose_crop" / "2.png").unlink()
    meta = read_meta(tmp_path, "IJBC")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'IJBC' / 'loose_crop' / '2.png'}: missing image")):
        evaluate_ijb(ChannelMeans(), meta, batch_size=4, workers=1)
    with pytest.raises(ValueError, match="neither .* nor .* exists"):
        read_meta(tmp_path / "nowhere", "IJBC")
