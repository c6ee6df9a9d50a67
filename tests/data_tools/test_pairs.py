"""`arcshard-data make-pairs`: insightface-format verification sets from an image folder."""

from __future__ import annotations

import argparse
import io
import pickle
import random
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageStat

from data_tools import pairs
from data_tools.manifest import Manifest, write_manifest

YALE = Path(__file__).resolve().parents[3] / "shared" / "data" / "yalefaces"

# identity -> (gray level that identifies it, number of images); 10 images in all
IDENTITIES = {"id_a": (30, 4), "id_b": (90, 3), "id_c": (150, 1), "id_d": (210, 2)}
FORMATS = [("jpg", "RGB"), ("png", "RGB"), ("gif", "L"), ("png", "L")]


def gray_level(img: Image.Image) -> float:
    return ImageStat.Stat(img.convert("L")).mean[0]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """An image folder in mixed formats and sizes; each identity has its own gray level."""
    root = tmp_path / "faces"
    for name, (level, count) in IDENTITIES.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            ext, mode = FORMATS[i % len(FORMATS)]
            img = Image.new(mode, (40 + 3 * i, 30 + 2 * i), level if mode == "L" else (level,) * 3)
            mark = level + 20 if mode == "L" else (level + 20,) * 3  # makes each image distinct
            ImageDraw.Draw(img).rectangle((12 + 3 * i, 8, 15 + 3 * i, 20), fill=mark)
            img.save(root / name / f"{i}.{ext}")
    (root / "id_a" / ".DS_Store").write_bytes(b"\0junk")  # hidden: ignored, as build does
    return root


def make(src: Path, out: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    pairs.add_arguments(parser)
    return pairs.run(parser.parse_args([str(src), str(out), *argv]))


def load(path: Path) -> tuple[list[bytes], list[bool]]:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")  # as insightface's verification.load_bin


def decode(b: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(b))
    img.load()
    return img


def identity_of(img: Image.Image) -> str:
    level = gray_level(img)
    return min(IDENTITIES, key=lambda n: abs(IDENTITIES[n][0] - level))


def test_bin_is_balanced_and_in_insightface_format(src, tmp_path, capsys):
    out = tmp_path / "val.bin"
    assert make(src, out, "--pairs", "16") == 0
    assert "16 pairs (8 genuine, 8 impostor)" in capsys.readouterr().out
    assert out.read_bytes()[:2] == b"\x80\x04"  # pickle protocol 4
    bins, issame = load(out)
    assert type(bins) is list and type(issame) is list
    assert len(bins) == 32 and len(issame) == 16
    assert all(type(b) is bytes for b in bins) and all(type(s) is bool for s in issame)
    assert issame == [True, False] * 8  # interleaved: every contiguous fold is balanced
    seen = set()
    for i, same in enumerate(issame):
        a, b = decode(bins[2 * i]), decode(bins[2 * i + 1])
        for img in (a, b):
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (112, 112)
        assert (identity_of(a) == identity_of(b)) == same
        assert bins[2 * i] != bins[2 * i + 1]  # never an image paired with itself
        key = frozenset((bins[2 * i], bins[2 * i + 1]))
        assert key not in seen  # all pairs distinct
        seen.add(key)


def test_genuine_pairs_are_spread_over_identities(src):
    folders = pairs.list_identities(src, None, None)
    got = pairs.genuine_pairs(folders, 5, random.Random(0), src)
    per_identity = {n: sum(a.parent.name == n for a, _ in got) for n in IDENTITIES}
    # capacities a:6 b:3 c:0 d:1 -> water-filling gives d 1, then b and a 2 each
    assert per_identity == {"id_a": 2, "id_b": 2, "id_c": 0, "id_d": 1}
    assert all(a.parent == b.parent and a != b for a, b in got)


def test_same_seed_same_bytes_other_seed_other_pairs(src, tmp_path):
    for name, seed in (("a.bin", "3"), ("b.bin", "3"), ("c.bin", "4")):
        make(src, tmp_path / name, "--pairs", "10", "--seed", seed)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.bin").read_bytes() != (tmp_path / "c.bin").read_bytes()


def test_size_and_quality(src, tmp_path):
    make(src, tmp_path / "small.bin", "--pairs", "2", "--size", "64", "--quality", "50")
    make(src, tmp_path / "big.bin", "--pairs", "2", "--size", "64", "--quality", "100")
    small, _ = load(tmp_path / "small.bin")
    big, _ = load(tmp_path / "big.bin")
    assert decode(small[0]).size == (64, 64)
    assert sum(map(len, small)) < sum(map(len, big))


def test_exclude_from_drops_training_identities(src, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    write_manifest(train, Manifest(
        num_images=0, num_classes=3, image_size=(112, 112), shards=[],
        class_names=["id_a", "id_b", "someone_else"],
    ))
    out = tmp_path / "held_out.bin"
    # left: id_c (1 image), id_d (2 images): 1 genuine pair, 2 impostor pairs possible
    assert make(src, out, "--pairs", "2", "--exclude-from", str(train)) == 0
    bins, issame = load(out)
    assert {identity_of(decode(b)) for b in bins} <= {"id_c", "id_d"}
    with pytest.raises(ValueError, match=r"asked for 2 genuine pairs but .* only 1 distinct"):
        make(src, out, "--pairs", "4", "--exclude-from", str(train))


def test_exclude_from_needs_class_names(src, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    write_manifest(train, Manifest(num_images=0, num_classes=3, image_size=(112, 112), shards=[]))
    with pytest.raises(ValueError, match="no class_names.*--identities"):
        make(src, tmp_path / "x.bin", "--pairs", "2", "--exclude-from", str(train))


def test_identities_option(src, tmp_path):
    out = tmp_path / "ab.bin"
    make(src, out, "--pairs", "6", "--identities", "id_a,id_b")
    bins, _ = load(out)
    assert {identity_of(decode(b)) for b in bins} == {"id_a", "id_b"}
    with pytest.raises(ValueError, match="no sub-folder with images for --identities nobody"):
        make(src, out, "--pairs", "2", "--identities", "id_a,nobody")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pairs", "3"], "must be a positive even number"),
        (["--pairs", "0"], "must be a positive even number"),
        (["--pairs", "22"], r"asked for 11 genuine pairs but the identities allow only 10"),
        (["--pairs", "2", "--identities", "id_c"], r"genuine pairs but the identities allow only 0 .*0 identities have 2\+"),
        (["--pairs", "2", "--identities", "id_a"], r"impostor pairs but 1 identities .* allow only 0"),
        (["--pairs", "2", "--quality", "0"], r"--quality 0"),
        (["--pairs", "2", "--identities", ","], r"no identity left"),
    ],
)
def test_impossible_requests_are_clear_errors(src, tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        make(src, tmp_path / "x.bin", *argv)
    assert not (tmp_path / "x.bin").exists()


def test_not_a_folder_and_unreadable_image(src, tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        make(tmp_path / "nowhere", tmp_path / "x.bin", "--pairs", "2")
    (src / "id_c" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ValueError, match=r"broken\.jpg: not a readable image .*remove or replace"):
        make(src, tmp_path / "x.bin", "--pairs", "4", "--identities", "id_c,id_d")


def test_impostor_pairs_dense_request_uses_every_pair(src):
    folders = pairs.list_identities(src, ["id_c", "id_d"], None)
    got = pairs.impostor_pairs(folders, 2, random.Random(0), src)
    assert {frozenset(p) for p in got} == {frozenset((folders["id_c"][0], d)) for d in folders["id_d"]}


@pytest.mark.skipif(not YALE.is_dir(), reason=f"{YALE} not present")
def test_yalefaces_make_a_bin(tmp_path):
    out = tmp_path / "yale.bin"
    assert make(YALE, out, "--pairs", "200", "--seed", "1") == 0
    bins, issame = load(out)
    assert len(bins) == 400 and sum(issame) == 100
    for b in bins[:4] + bins[-4:]:
        img = decode(b)
        assert img.mode == "RGB" and img.size == (112, 112)


# insightface's recognition/arcface_mxnet/eval/verification.py `load_bin`, trimmed.
INSIGHTFACE_LOAD_BIN = """
import pickle, sys
import mxnet as mx
from mxnet import nd

def load_bin(path, image_size):
    try:
        with open(path, 'rb') as f:
            bins, issame_list = pickle.load(f)  # py2
    except UnicodeDecodeError:
        with open(path, 'rb') as f:
            bins, issame_list = pickle.load(f, encoding='bytes')  # py3
    data = nd.empty((len(issame_list) * 2, 3, image_size[0], image_size[1]))
    for i in range(len(issame_list) * 2):
        img = mx.image.imdecode(bins[i])
        if img.shape[1] != image_size[0]:
            img = mx.image.resize_short(img, image_size[0])
        data[i][:] = nd.transpose(img, axes=(2, 0, 1))
    return data, issame_list

data, issame = load_bin(sys.argv[1], (112, 112))
print(data.shape, sum(issame), len(issame))
"""


def test_insightface_load_bin_reads_it(mxnet_python, src, tmp_path):
    out = tmp_path / "val.bin"
    make(src, out, "--pairs", "8")
    script = tmp_path / "load_bin.py"
    script.write_text(INSIGHTFACE_LOAD_BIN)
    proc = subprocess.run([mxnet_python, script, out], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "(16, 3, 112, 112) 4 8"
