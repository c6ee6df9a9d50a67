"""`--fit crop|squash|pad`: each mode's geometry, and build / make-pairs recording and following it."""

from __future__ import annotations

import argparse
import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from data_tools import face, pairs
from data_tools.cli import main
from data_tools.manifest import Manifest, load_manifest, write_manifest
from data_tools.recordio import RecordReader, unpack

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (face.PAD_VALUE,) * 3


def portrait() -> np.ndarray:
    """92x112 (W x H): green, with an 8-row red band at the top and a blue one at the bottom."""
    pixels = np.empty((112, 92, 3), np.uint8)
    pixels[:] = GREEN
    pixels[:8], pixels[-8:] = RED, BLUE
    return pixels


def landscape() -> np.ndarray:
    """320x243 (yalefaces' size): grey-blue, with 30-column red bands at the left and right."""
    pixels = np.empty((243, 320, 3), np.uint8)
    pixels[:] = (60, 90, 200)
    pixels[:, :30], pixels[:, -30:] = RED, RED
    return pixels


def _old_square_crop(image: Image.Image, size: int) -> Image.Image:
    """`data_tools.face.square_crop` as it was before --fit existed, verbatim."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def test_crop_loses_the_bands_squash_and_pad_keep_them():
    out = {mode: face.fit(portrait(), 112, mode) for mode in face.FIT_MODES}
    assert all(o.shape == (112, 112, 3) and o.dtype == np.uint8 for o in out.values())
    assert out["crop"][..., 0].max() < 30 and out["crop"][..., 2].max() < 30  # no red, no blue left
    assert (out["squash"][:8] == RED).all() and (out["squash"][-8:] == BLUE).all()  # stretched sideways only
    assert (out["squash"][8:-8] == GREEN).all()
    # pad: the photo is already 112 high, so it sits unchanged between two 10-column grey bars
    np.testing.assert_array_equal(out["pad"][:, 10:102], portrait())
    assert (out["pad"][:, :10] == GREY).all() and (out["pad"][:, 102:] == GREY).all()


def test_landscape_pad_has_13_grey_rows_above_and_14_below():
    out = {mode: face.fit(landscape(), 112, mode) for mode in face.FIT_MODES}
    padded = out["pad"]
    assert (padded[:13] == GREY).all() and (padded[-14:] == GREY).all()  # 243 * 112/320 = 85 rows of photo
    assert (padded[13:98] != GREY).any(axis=-1).all()
    assert (padded[13:98, 0] == RED).all()  # the side bands survive
    assert (out["squash"][:, 0] == RED).all()
    assert out["crop"][..., 1].min() > 80  # the red bands (green 0) were cut away


def test_pad_bars_are_grey_in_a_grayscale_image_too():
    gray = Image.fromarray(np.full((40, 100), 7, np.uint8), "L")
    out = np.asarray(face.fit_image(gray, 112, "pad"))
    assert out.shape == (112, 112)
    assert (out[:33] == face.PAD_VALUE).all() and (out[-34:] == face.PAD_VALUE).all() and (out[33:78] == 7).all()


@pytest.mark.parametrize("side", [112, 200, 50])
def test_a_square_image_is_shaped_alike_by_every_mode(side):
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), np.uint8)
    out = [face.fit(pixels, 112, mode) for mode in face.FIT_MODES]
    for o in out[1:]:
        np.testing.assert_array_equal(o, out[0])
    if side == 112:
        assert all(o is pixels for o in out)  # already network-sized: untouched


@pytest.mark.parametrize("shape", [(112, 92), (243, 320), (112, 113), (30, 50), (500, 130)])
def test_crop_is_bit_identical_to_the_old_square_crop(shape):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), np.uint8)
    old = np.asarray(_old_square_crop(Image.fromarray(pixels), 112))
    np.testing.assert_array_equal(face.fit(pixels), old)  # the default is crop
    np.testing.assert_array_equal(face.fit(pixels, 112, "crop"), old)
    np.testing.assert_array_equal(np.asarray(face.fit_image(Image.fromarray(pixels), 112, "crop")), old)


def test_an_unknown_mode_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"fit 'zoom': not one of crop, squash, pad"):
        face.fit(portrait(), 112, "zoom")
    with pytest.raises(ValueError, match=r"fit 'zoom': not one of crop, squash, pad"):
        face.fit(np.zeros((112, 112, 3), np.uint8), 112, "zoom")  # checked even when nothing is resized
    with pytest.raises(SystemExit) as exit_:
        main(["build", str(tmp_path), str(tmp_path / "out"), "--fit", "zoom"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --fit: invalid choice: 'zoom'" in err and all(m in err for m in face.FIT_MODES)


# ------------------------------------------------------------------------ build


def _source(root: Path) -> dict[int, np.ndarray]:
    """Two identities, one photo each: a portrait PNG (class 0) and a landscape JPEG
    (class 1, through build's libjpeg-turbo DCT-scaling path)."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(portrait()).save(root / "a" / "portrait.png")
    (root / "b" / "landscape.jpg").write_bytes(simplejpeg.encode_jpeg(landscape(), quality=98))
    decoded = simplejpeg.decode_jpeg((root / "b" / "landscape.jpg").read_bytes())
    return {0: portrait(), 1: decoded}


def _shard_images(out: Path) -> dict[int, np.ndarray]:
    """Class id -> the decoded image of the record with that label."""
    found = {}
    for shard in load_manifest(out).shards:
        with RecordReader(out / shard.rec, out / shard.idx) as reader:
            for key in reader.keys:
                header, payload = unpack(reader.read(key))
                found[int(header.label)] = simplejpeg.decode_jpeg(bytes(payload))
    return found


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b).mean())


@pytest.mark.parametrize("mode", face.FIT_MODES)
def test_build_records_the_fit_and_its_shards_have_that_geometry(tmp_path, mode):
    photos = _source(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["build", str(tmp_path / "src"), str(out), "--fit", mode, "--workers", "1", "--quiet"]) == 0
    assert load_manifest(out).fit == mode
    assert json.loads((out / "manifest.json").read_text())["fit"] == mode
    images = _shard_images(out)
    for label, photo in photos.items():
        expected = {m: face.fit(photo, 112, m) for m in face.FIT_MODES}
        assert _mean_diff(images[label], expected[mode]) < 4  # JPEG (4:2:0 at colour edges), DCT scaling
        assert all(_mean_diff(images[label], expected[m]) > 15 for m in face.FIT_MODES if m != mode)
    if mode == "pad":
        # the bars stay grey through JPEG (within its 4:2:0 chroma bleed from the photo's colours)
        assert np.abs(images[0][:, :8].astype(int) - face.PAD_VALUE).max() <= 10
        assert np.abs(images[1][:8].astype(int) - face.PAD_VALUE).max() <= 10


def test_build_without_fit_crops_and_says_so(tmp_path):
    _source(tmp_path / "src")
    assert main(["build", str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["fit"] == "crop"


# ------------------------------------------------------------------------ make-pairs


@pytest.fixture
def heldout(tmp_path: Path) -> Path:
    """Three identities of two portrait photos each (shifted copies, so all differ)."""
    root = tmp_path / "heldout"
    for n, name in enumerate(("p", "q", "r")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.roll(portrait(), 3 * n + i, axis=0)).save(root / name / f"{i}.png")
    return root


def _train_set(directory: Path, fit: str) -> Path:
    directory.mkdir()
    write_manifest(directory, Manifest(num_images=0, num_classes=1, image_size=(112, 112), shards=[],
                                       class_names=["someone_else"], fit=fit))
    return directory


def _make_pairs(src: Path, out: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    pairs.add_arguments(parser)
    return pairs.run(parser.parse_args([str(src), str(out), "--pairs", "2", *argv]))


def _bars(out: Path) -> list[bool]:
    """For each image of the .bin: are its 8 leftmost columns pad's grey?"""
    with open(out, "rb") as f:
        bins, _ = pickle.load(f)
    columns = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))[:, :8].astype(int) for b in bins]
    return [bool(np.abs(c - face.PAD_VALUE).max() <= 10) for c in columns]  # JPEG chroma bleed


def test_make_pairs_takes_the_fit_from_the_training_manifest(heldout, tmp_path, capsys, caplog):
    train = _train_set(tmp_path / "train", "pad")
    out = tmp_path / "val.bin"
    assert _make_pairs(heldout, out, "--exclude-from", str(train)) == 0
    assert f"fit pad (from {train / 'manifest.json'})" in capsys.readouterr().out
    assert all(_bars(out))

    with caplog.at_level(logging.WARNING, logger="data_tools.pairs"):
        assert _make_pairs(heldout, out, "--exclude-from", str(train), "--fit", "crop") == 0
    assert "fit crop (--fit)" in capsys.readouterr().out
    assert not any(_bars(out))
    assert "built with fit pad" in caplog.text  # the model would see faces unlike its training images

    assert _make_pairs(heldout, out) == 0
    assert "fit crop (default)" in capsys.readouterr().out
    assert not any(_bars(out))
    assert _make_pairs(heldout, out, "--fit", "pad") == 0
    assert all(_bars(out))


def test_make_pairs_refuses_a_training_manifest_with_an_unknown_fit(heldout, tmp_path):
    train = _train_set(tmp_path / "train", "pad")
    manifest = train / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"fit": "pad"', '"fit": "stretch"'))
    with pytest.raises(ValueError, match=rf"{manifest}: fit 'stretch' is not one of crop, squash, pad"):
        _make_pairs(heldout, tmp_path / "val.bin", "--exclude-from", str(train))
