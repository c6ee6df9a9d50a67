"""`arcshard-data inspect` and `arcshard-data verify` on small hand-built datasets."""

from __future__ import annotations

import argparse
import io
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from data_tools import inspect, verify
from data_tools.manifest import MANIFEST, Manifest, describe_shard, load_manifest, write_manifest
from data_tools.recordio import IRHeader, RecordWriter, pack

NUM_CLASSES = 5
SIZE = (24, 24)  # H, W
LABELS = [[0, 1, 2, 3, 4, 0], [1, 2, 3, 1]]  # two shards


def jpeg(label: int, i: int, size: tuple[int, int] = SIZE) -> bytes:
    img = Image.new("RGB", (size[1], size[0]), (40 * label, 255 - 40 * label, 7 * i % 256))
    ImageDraw.Draw(img).rectangle((i % 10, 2, i % 10 + 8, 12), fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def record(label: float, i: int, image: bytes | None = None) -> bytes:
    return pack(IRHeader(0, float(label), i, 0), jpeg(int(label), i) if image is None else image)


def write_dataset(directory: Path, shards: list[list[bytes]], num_classes: int = NUM_CLASSES) -> list[list[int]]:
    """Write shards of ready-made records plus manifest; returns each shard's record offsets."""
    directory.mkdir(parents=True, exist_ok=True)
    infos, offsets = [], []
    for s, records in enumerate(shards):
        rec, idx = f"train-{s:05d}.rec", f"train-{s:05d}.idx"
        with RecordWriter(directory / rec, directory / idx) as w:
            offsets.append([w.write(r) for r in records])
        infos.append(describe_shard(directory, rec, idx, len(records)))
    write_manifest(directory, Manifest(
        num_images=sum(len(r) for r in shards), num_classes=num_classes, image_size=SIZE,
        shards=infos, class_names=[f"person_{c}" for c in range(num_classes)],
    ))
    return offsets


def good_records() -> list[list[bytes]]:
    n = 0
    shards = []
    for labels in LABELS:
        shards.append([record(label, n + i) for i, label in enumerate(labels)])
        n += len(labels)
    return shards


def rehash(directory: Path) -> None:
    """Rewrite the manifest's sizes/sha256 to the files as they are now (a damaged build)."""
    m = load_manifest(directory)
    m.shards = [describe_shard(directory, s.rec, s.idx, s.num_records) for s in m.shards]
    write_manifest(directory, m)


def run_command(module, argv: list[str]) -> int:  # noqa: ANN001
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, list[list[int]]]:
    d = tmp_path / "ds"
    return d, write_dataset(d, good_records())


# --- inspect -------------------------------------------------------------------------

def test_inspect_prints_counts_and_writes_contact_sheet(dataset, capsys):
    d, _ = dataset
    assert run_command(inspect, [str(d), "--samples", "5"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^images\s+10$", out, re.M)
    assert re.search(r"^classes\s+5$", out, re.M)
    assert re.search(r"^image size\s+24x24 \(HxW\), fit crop$", out, re.M)
    assert re.search(r"train-00000\.rec\s+6 records", out)
    assert re.search(r"train-00001\.rec\s+4 records", out)
    # class counts: 0:2, 1:3, 2:2, 3:2, 4:1
    assert "min 1, median 2, max 3 images (5 of 5 classes present)" in out
    samples = re.findall(r"record (\d+): label (\d) \(person_(\d)\), decoded 24x24 RGB", out)
    assert len(samples) == 5 and all(label == name for _, label, name in samples)
    with Image.open(d / "inspect.png") as sheet:
        assert sheet.format == "PNG" and sheet.mode == "RGB"
        # 5 samples -> 3 columns x 2 rows of 24-wide, (24 + caption)-high tiles
        assert sheet.size == (3 * 24, 2 * (24 + inspect.CAPTION_HEIGHT))


def test_inspect_out_and_more_samples_than_records(dataset, tmp_path, capsys):
    d, _ = dataset
    out = tmp_path / "sheet.png"
    assert run_command(inspect, [str(d), "--samples", "50", "--out", str(out)]) == 0
    assert "contact sheet of 10 samples" in capsys.readouterr().out
    with Image.open(out) as sheet:
        assert sheet.size == (4 * 24, 3 * (24 + inspect.CAPTION_HEIGHT))


# --- verify: a good dataset ----------------------------------------------------------

@pytest.mark.parametrize("workers", ["1", "2"])
def test_verify_ok(dataset, capsys, workers):
    d, _ = dataset
    assert run_command(verify, [str(d), "--workers", workers]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("OK ") and "2 shards, 10 records" in out[0]


def test_verify_accepts_records_split_around_magic(tmp_path, capsys):
    # A JPEG that holds the magic word at an aligned payload position is stored in parts.
    image = jpeg(1, 0)
    image = image[:-2] + b"\0" * (-(len(image) - 2) % 4) + bytes.fromhex("0a23d7ce") + image[-2:]
    rec = record(1, 0, image)
    assert (len(rec) - len(image) + image.index(bytes.fromhex("0a23d7ce"))) % 4 == 0
    write_dataset(tmp_path / "ds", [[record(0, 1), rec, record(2, 2)]])
    assert run_command(verify, [str(tmp_path / "ds")]) == 0, capsys.readouterr().out


# --- verify: each kind of damage -----------------------------------------------------

def failing(d: Path, capsys, *argv: str) -> str:
    assert run_command(verify, [str(d), *argv]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED ")
    return out


@pytest.mark.parametrize("rehashed", [False, True], ids=["as-copied", "manifest-rehashed"])
def test_verify_truncated_rec(dataset, capsys, rehashed):
    d, offsets = dataset
    rec = d / "train-00000.rec"
    os.truncate(rec, rec.stat().st_size - 10)
    if rehashed:
        rehash(d)
    out = failing(d, capsys)
    assert re.search(
        rf"train-00000\.rec: record 5 at byte {offsets[0][5]} claims \d+ bytes .* past the end "
        r"of the file .*truncated file", out,
    )
    assert ("train-00000.rec: " in out and "bytes, manifest.json says" in out) != rehashed


def test_verify_missing_idx(dataset, capsys):
    d, _ = dataset
    (d / "train-00001.idx").unlink()
    out = failing(d, capsys)
    assert "train-00001.idx: listed in manifest.json but missing" in out


@pytest.mark.parametrize("rehashed", [False, True], ids=["as-copied", "manifest-rehashed"])
def test_verify_short_idx(dataset, capsys, rehashed):
    d, offsets = dataset
    idx = d / "train-00000.idx"
    idx.write_text("".join(idx.read_text().splitlines(keepends=True)[:4]))
    if rehashed:
        rehash(d)
    out = failing(d, capsys)
    assert f"train-00000.idx: 4 lines for 6 records: record 4 at byte {offsets[0][4]} of train-00000.rec" in out
    assert ("train-00000.idx: " in out and "bytes, manifest.json says" in out) != rehashed


def test_verify_idx_with_wrong_offset(dataset, capsys):
    d, offsets = dataset
    idx = d / "train-00001.idx"
    lines = idx.read_text().splitlines(keepends=True)
    lines[2] = f"2\t{offsets[1][2] + 4}\n"
    idx.write_text("".join(lines))
    rehash(d)
    out = failing(d, capsys)
    assert (
        f"train-00001.idx: line 3: key 2 at byte {offsets[1][2] + 4}, but record 2 of "
        f"train-00001.rec starts at byte {offsets[1][2]}"
    ) in out


@pytest.mark.parametrize("rehashed", [False, True], ids=["as-copied", "manifest-rehashed"])
def test_verify_bad_magic(dataset, capsys, rehashed):
    d, offsets = dataset
    rec = d / "train-00001.rec"
    with open(rec, "r+b") as f:
        f.seek(offsets[1][3])
        f.write(b"\0\0\0\0")
    if rehashed:
        rehash(d)
    out = failing(d, capsys)
    assert re.search(
        rf"train-00001\.rec: record 3 at byte {offsets[1][3]} has bad magic 0x00000000 "
        r"\(truncated file\?\) \(framing stops here; records 0-2 were read\)", out,
    )
    assert ("sha256" in out) != rehashed
    assert "train-00001.idx" not in out  # the index is fine up to where framing stops


def test_verify_label_out_of_range(tmp_path, capsys):
    shards = good_records()
    shards[0][2] = record(NUM_CLASSES, 2)
    offsets = write_dataset(tmp_path / "ds", shards)
    out = failing(tmp_path / "ds", capsys)
    assert f"train-00000.rec: record 2 at byte {offsets[0][2]}: label 5 outside [0, 5)" in out


@pytest.mark.parametrize(
    "label, expected",
    [(1.5, "label 1.5 is not an integer class id"), (-1.0, "label -1 outside [0, 5)")],
)
def test_verify_label_not_a_class_id(tmp_path, capsys, label, expected):
    shards = good_records()
    shards[1][0] = pack(IRHeader(0, label, 0, 0), jpeg(1, 0))
    offsets = write_dataset(tmp_path / "ds", shards)
    assert f"train-00001.rec: record 0 at byte {offsets[1][0]}: {expected}" in failing(tmp_path / "ds", capsys)


def test_verify_multi_label_header(tmp_path, capsys):
    shards = good_records()
    shards[0][4] = pack(IRHeader(2, (1.0, 3.0), 0, 0), jpeg(1, 0))
    offsets = write_dataset(tmp_path / "ds", shards)
    out = failing(tmp_path / "ds", capsys)
    assert f"train-00000.rec: record 4 at byte {offsets[0][4]}: IRHeader flag 2" in out


@pytest.mark.parametrize(
    "image",
    [b"definitely not an image" * 5, jpeg(3, 3)[:300]],
    ids=["garbage", "truncated-jpeg"],
)
def test_verify_undecodable_image(tmp_path, capsys, image):
    shards = good_records()
    shards[1][1] = record(2, 1, image)
    offsets = write_dataset(tmp_path / "ds", shards)
    out = failing(tmp_path / "ds", capsys)
    assert f"train-00001.rec: record 1 at byte {offsets[1][1]}: image ({len(image)} bytes): not a readable image" in out
    assert out.count("train-0000") == 1  # nothing else is wrong


def test_verify_wrong_image_size(tmp_path, capsys):
    shards = good_records()
    shards[0][0] = record(0, 0, jpeg(0, 0, size=(20, 22)))
    offsets = write_dataset(tmp_path / "ds", shards)
    out = failing(tmp_path / "ds", capsys)
    assert f"train-00000.rec: record 0 at byte {offsets[0][0]}: image is 20x22 (HxW), manifest.json says 24x24" in out


def test_verify_sha256_mismatch_with_valid_framing(dataset, capsys):
    d, offsets = dataset
    rec = d / "train-00000.rec"
    start, end = offsets[0][3], offsets[0][4]
    middle = (start + 8 + 24 + end) // 2  # inside record 3's JPEG data
    data = bytearray(rec.read_bytes())
    data[middle] ^= 0x01
    rec.write_bytes(bytes(data))
    out = failing(d, capsys)
    assert re.search(r"train-00000\.rec: sha256 [0-9a-f]{16}\.\.\. differs from manifest\.json's", out)
    assert "framing" not in out and "idx" not in out


def test_verify_record_count_differs_from_manifest(dataset, capsys):
    d, _ = dataset
    m = load_manifest(d)
    m.shards[1] = replace(m.shards[1], num_records=5)
    m.num_images += 1
    write_manifest(d, m)
    assert "train-00001.rec: 4 records, manifest.json says 5" in failing(d, capsys)


def test_verify_lists_at_most_max_errors(tmp_path, capsys):
    shards = [[record(7, i) for i in range(8)]]
    write_dataset(tmp_path / "ds", shards)
    out = failing(tmp_path / "ds", capsys, "--max-errors", "3")
    assert out.count("label 7 outside") == 3
    assert "more problems not listed" in out


def test_verify_unusable_manifest(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable manifest"):
        run_command(verify, [str(tmp_path)])
