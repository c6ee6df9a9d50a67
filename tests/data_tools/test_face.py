"""The face input contract: one normalisation and one geometry, on the build and serving sides."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from data_tools import face
from data_tools.cli import main
from deploy.images import load_face
from trainer.evaluation.embedder import preprocess


def test_normalise_numpy_and_torch_agree_bit_for_bit():
    pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    a = face.normalise(pixels)
    b = face.normalise(torch.from_numpy(pixels))
    assert a.dtype == np.float32 and b.dtype == torch.float32
    assert np.array_equal(a, b.numpy())
    assert (a.min(), a.max(), a.flat[127], a.flat[128]) == (-1.0, 1.0, np.float32(-0.5 / 127.5), np.float32(0.5 / 127.5))
    assert pixels.dtype == np.uint8 and pixels.flat[255] == 255  # the input is left alone


def _photo(width: int, height: int) -> np.ndarray:
    """A smooth non-square "photo" whose left and right edges differ from its centre."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    rgb = np.concatenate([255 * x * np.ones_like(y), 255 * y * np.ones_like(x), 128 + 100 * np.sin(8 * x + 3 * y)], -1)
    return rgb.round().clip(0, 255).astype(np.uint8)


def test_fit_crops_the_shorter_side_and_keeps_square_faces():
    square = _photo(112, 112)
    assert face.fit(square) is square
    wide = _photo(300, 150)
    out = face.fit(wide)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    centre = np.asarray(Image.fromarray(wide[:, 75:225]).resize((112, 112), Image.Resampling.BILINEAR))
    # the centre 150x150 square, not squashed (resampling the box in place rounds a little
    # differently from cropping first)
    assert np.abs(out.astype(int) - centre).max() <= 1


@pytest.mark.parametrize("mode", face.FIT_MODES)
@pytest.mark.parametrize("size", [(300, 150), (130, 170)])
def test_build_and_embedder_give_the_same_pixels_for_a_non_square_photo(tmp_path, monkeypatch, size, mode):
    """`arcshard-data build --fit` and the embedder behind arcshard-eval/-embed shape a face alike."""
    photo = _photo(*size)
    path = tmp_path / "src" / "person" / "photo.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(photo).save(path)
    built: list[np.ndarray] = []
    encode = simplejpeg.encode_jpeg
    monkeypatch.setattr(simplejpeg, "encode_jpeg", lambda pixels, **kw: built.append(pixels.copy()) or encode(pixels, **kw))
    argv = ["build", str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1", "--quiet", "--fit", mode]
    assert main(argv) == 0
    assert len(built) == 1 and built[0].shape == (112, 112, 3)

    served = load_face(path, mode)  # arcshard-embed / arcshard-export's parity images
    np.testing.assert_array_equal(served, built[0])
    expected = face.normalise(built[0].transpose(2, 0, 1))
    np.testing.assert_array_equal(preprocess(photo[None], mode)[0], expected)  # arcshard-eval's preprocess
    for other in face.FIT_MODES:
        if other != mode:  # another --fit would have served other pixels
            assert np.abs(load_face(path, other).astype(int) - built[0]).max() > 20


def test_serving_refuses_an_unknown_fit(tmp_path):
    path = tmp_path / "face.png"
    Image.fromarray(_photo(112, 112)).save(path)
    with pytest.raises(ValueError, match="fit 'zoom': not one of crop, squash, pad"):
        load_face(path, "zoom")
    with pytest.raises(ValueError, match="fit 'zoom': not one of crop, squash, pad"):
        preprocess(_photo(112, 112)[None], "zoom")
