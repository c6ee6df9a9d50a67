"""`arcshard-embed`: embeddings of image folders and lists, and `compare`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from tests.deploy.conftest import face_files, run_cli

pytest.importorskip("onnxruntime")

from deploy.embed import main  # noqa: E402
from trainer.evaluation.embedder import TorchEmbedder, embed  # noqa: E402


@pytest.fixture()
def folder(tmp_path):
    """A folder of faces: yalefaces GIFs (grayscale, 320x243) when available, else generated
    images (RGB PNG at 112x112, grayscale JPEG at another size), plus one broken file."""
    d = tmp_path / "faces"
    (d / "sub").mkdir(parents=True)
    files = face_files(11)
    if files:
        for i, f in enumerate(files):
            shutil.copyfile(f, (d / "sub" if i % 2 else d) / f"{f.parent.name}_{f.name}")
    else:
        rng = np.random.default_rng(0)
        for i in range(11):
            if i % 2:
                Image.fromarray(rng.integers(0, 256, (112, 112, 3), np.uint8)).save(d / "sub" / f"{i:02d}.png")
            else:
                Image.fromarray(rng.integers(0, 256, (150, 130), np.uint8), "L").save(d / f"{i:02d}.jpg")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff this is no JPEG")
    return d


def _reference(module, paths, flip: bool) -> np.ndarray:
    """What the PyTorch backbone gives for `paths`, decoded here independently of deploy."""
    images = []
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        if rgb.size != (112, 112):  # shorter side to 112, centre crop: the training geometry
            w, h = rgb.size
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            rgb = rgb.resize((112, 112), Image.Resampling.BILINEAR, box=box)
        images.append(np.asarray(rgb, np.float32).transpose(2, 0, 1))
    batch = (np.stack(images) - 127.5) / 127.5
    return embed(TorchEmbedder(module), batch.astype(np.float32), flip=flip)


def test_folder_embeddings_match_pytorch(mbf_export, mbf_module, folder, tmp_path):
    out = tmp_path / "emb" / "embeddings.npy"
    result = run_cli(main, [folder, "--model", mbf_export.model, "--out", out, "--batch-size", 4])
    assert result.code == 0, result.err
    assert result.err.count("skipped") == 1 and f"{folder / 'broken.jpg'}: not a readable image" in result.err
    listed = out.with_suffix(".txt").read_text().splitlines()
    expected_paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "broken.jpg")
    assert listed == [str(p) for p in expected_paths]
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (len(expected_paths), 512)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    want = _reference(mbf_module, expected_paths, flip=False)
    np.testing.assert_allclose(got, want, atol=2e-5)
    # Rows are told apart far beyond that tolerance, so order and content are both checked.
    distances = np.abs(want[:, None] - want[None]).max(-1)
    assert distances[~np.eye(len(want), dtype=bool)].min() > 100 * 2e-5


def test_list_with_flip_matches_pytorch(mbf_export, mbf_module, folder, tmp_path):
    paths = sorted(p for p in folder.rglob("*.*") if p.name != "broken.jpg")[:5][::-1]
    listing = tmp_path / "list.txt"
    listing.write_text("# faces to embed\n" + "".join(f"{p}\n\n" for p in paths))
    out = tmp_path / "flip.npy"
    result = run_cli(main, ["--list", listing, "--model", mbf_export.model, "--out", out, "--flip"])
    assert result.code == 0, result.err
    assert out.with_suffix(".txt").read_text().splitlines() == [str(p) for p in paths]
    got = np.load(out)
    np.testing.assert_allclose(got, _reference(mbf_module, paths, flip=True), atol=2e-5)
    unflipped = _reference(mbf_module, paths, flip=False)
    assert np.abs(got - unflipped).max() > 1e-3  # flip-TTA changed the vectors


def test_strict_fails_on_an_unreadable_image_and_writes_nothing(mbf_export, folder, tmp_path):
    out = tmp_path / "strict.npy"
    result = run_cli(main, [folder, "--model", mbf_export.model, "--out", out, "--strict"])
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and str(folder / "broken.jpg") in lines[0] and "--strict" in lines[0]
    assert not out.exists() and not out.with_suffix(".txt").exists()


def test_compare_prints_cosine_and_verdict_at_the_card_threshold(mbf_export, mbf_module, folder):
    a, b = sorted(p for p in folder.rglob("*.*") if p.name != "broken.jpg")[:2]
    same = run_cli(main, ["compare", a, a, "--model", mbf_export.model])
    assert same.code == 0, same.err
    assert same.out.startswith("cosine 1.0000: same (threshold 0.3000 from default; flip TTA on)")
    pair = run_cli(main, ["compare", a, b, "--model", mbf_export.model])
    assert pair.code == 0, pair.err
    want = _reference(mbf_module, [a, b], flip=True)
    cosine = float(want[0] @ want[1])
    verdict = "same" if cosine >= 0.3 else "different"
    assert pair.out.startswith(f"cosine {cosine:.4f}: {verdict} (threshold 0.3000 from default")
    other = "different" if verdict == "same" else "same"
    override = f"{cosine + 0.01:.6f}" if other == "different" else f"{cosine - 0.01:.6f}"
    flipped = run_cli(main, ["compare", a, b, "--model", mbf_export.model, "--threshold", override])
    expected = f"cosine {cosine:.4f}: {other} (threshold {float(override):.4f} from --threshold"
    assert flipped.out.startswith(expected)


def test_compare_with_an_unreadable_image_is_an_error(mbf_export, folder):
    result = run_cli(main, ["compare", folder / "broken.jpg", folder / "broken.jpg", "--model", mbf_export.model])
    assert result.code == 2
    assert result.err.startswith(f"arcshard-embed: error: {folder / 'broken.jpg'}: not a readable image")
    assert len(result.err.strip().splitlines()) == 1
