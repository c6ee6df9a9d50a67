"""`arcshard-data build`: image folder / list file -> shards + manifest."""

from __future__ import annotations

import errno
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main
from data_tools.manifest import load_manifest, sha256_file
from data_tools.recordio import RecordReader, RecordWriter, unpack
from data_tools.shards import DRILL_ENV

REPO = Path(__file__).resolve().parents[2]
YALEFACES = Path(__file__).resolve().parents[3] / "shared" / "data" / "yalefaces"
SIZE = 16


def _pixels(seed: int, w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, seed: int, kind: str) -> None:
    """One small image of ``kind``: jpeg at SIZE (pass-through), big jpeg, png, gif, pgm, gray jpeg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jpeg":
        Image.fromarray(_pixels(seed, SIZE, SIZE)).save(path, "JPEG", quality=90)
    elif kind == "bigjpeg":
        Image.fromarray(_pixels(seed, 40, 24)).save(path, "JPEG", quality=90)
    elif kind == "png":
        Image.fromarray(_pixels(seed, 20, 30)).convert("RGBA").save(path, "PNG")
    elif kind == "gif":
        Image.fromarray(_pixels(seed, 17, 17)).convert("P").save(path, "GIF")
    elif kind == "pgm":
        Image.fromarray(_pixels(seed, SIZE, SIZE)[..., 0]).save(path, "PPM")
    elif kind == "grayjpeg":
        Image.fromarray(_pixels(seed, SIZE, SIZE)[..., 0]).save(path, "JPEG")
    else:
        raise AssertionError(kind)


KINDS = {"jpeg": ".jpg", "bigjpeg": ".jpg", "png": ".png", "gif": ".gif", "pgm": ".pgm", "grayjpeg": ".jpeg"}


def _folder(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    kinds = list(KINDS)
    for c in range(classes):
        for i in range(per_class):
            kind = kinds[(c * per_class + i) % len(kinds)]
            _save(root / f"person_{chr(ord('c') - c)}" / f"{i:02d}{KINDS[kind]}", c * 100 + i, kind)
    return root


def _build(src: Path, out: Path, *extra: str) -> int:
    return main(["build", str(src), str(out), "--size", str(SIZE), "--quiet", *extra])


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _records(out: Path) -> list[tuple[int, object, bytes]]:
    """(key, header, payload) of every record, shard by shard."""
    found = []
    for shard in load_manifest(out).shards:
        with RecordReader(out / shard.rec, out / shard.idx) as r:
            for key in r.keys:
                header, payload = unpack(r.read(key))
                found.append((key, header, bytes(payload)))
    return found


def test_workers_do_not_change_the_bytes_and_records_are_right(tmp_path):
    src = _folder(tmp_path / "src")
    assert _build(src, tmp_path / "w1", "--workers", "1", "--shard-size", "5") == 0
    assert _build(src, tmp_path / "w2", "--workers", "2", "--shard-size", "5") == 0
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")

    out = tmp_path / "w1"
    m = load_manifest(out)
    assert (m.num_images, m.num_classes, m.image_size) == (18, 3, (SIZE, SIZE))
    assert m.class_names == ["person_a", "person_b", "person_c"]  # sorted folder names
    assert [s.num_records for s in m.shards] == [5, 5, 5, 3]
    assert (out / "property").read_text() == f"3,{SIZE},{SIZE}\n"
    for s in m.shards:
        assert sha256_file(out / s.rec) == s.rec_sha256 and (out / s.idx).stat().st_size == s.idx_bytes
    assert not (out / "rejected.tsv").exists() and not (tmp_path / "w1.partial").exists()

    sources = {}  # decoded source pixels -> class id, to match records back to files
    for path in sorted(src.rglob("*")):
        if path.is_file():
            sources[path.read_bytes()] = m.class_names.index(path.parent.name)
    records = _records(out)
    keys = [key for key, _, _ in records]
    assert keys == [*range(5), *range(5), *range(5), *range(3)]
    assert [h.id for _, h, _ in records] == list(range(18))
    passed_through = 0
    for _, header, payload in records:
        assert header.flag == 0 and header.id2 == 0
        image = Image.open(io.BytesIO(payload))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))
        if payload in sources:  # the SIZE x SIZE RGB JPEGs are copied unchanged
            passed_through += 1
            assert header.label == sources[payload]
    assert passed_through == 3
    labels = [int(h.label) for _, h, _ in records]
    assert sorted(labels) == [0] * 6 + [1] * 6 + [2] * 6
    assert labels != sorted(labels)  # shuffled


def test_seed_changes_order_only(tmp_path):
    src = _folder(tmp_path / "src", classes=2, per_class=5)
    _build(src, tmp_path / "a", "--workers", "1", "--seed", "1")
    _build(src, tmp_path / "b", "--workers", "1", "--seed", "2")
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [p for _, _, p in a] != [p for _, _, p in b]
    assert sorted((h.label, p) for _, h, p in a) == sorted((h.label, p) for _, h, p in b)


def _with_bad_files(src: Path) -> list[Path]:
    bad = [src / "person_a" / "empty.jpg", src / "person_b" / "notes.txt",
           src / "person_c" / "truncated.jpg", src / "person_a" / "garbage.png"]
    bad[0].write_bytes(b"")
    bad[1].write_text("not an image\n")
    good = io.BytesIO()
    Image.fromarray(_pixels(7, 40, 40)).save(good, "JPEG")
    bad[2].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    bad[3].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    return bad


def test_bad_files_are_rejected_and_listed(tmp_path):
    src = _folder(tmp_path / "src", classes=3, per_class=6)
    bad = _with_bad_files(src)
    assert _build(src, tmp_path / "out", "--workers", "2", "--shard-size", "4", "--max-reject", "20%") == 0
    lines = (tmp_path / "out" / "rejected.tsv").read_text().splitlines()
    assert lines[0] == "path\treason"
    reasons = dict(line.split("\t") for line in lines[1:])
    assert sorted(reasons) == sorted(map(str, bad))
    assert reasons[str(bad[0])] == "empty file"
    assert "truncated" in reasons[str(bad[2])]
    assert all(r.startswith("not a readable image") for p, r in reasons.items() if p != str(bad[0]))
    assert load_manifest(tmp_path / "out").num_images == 18


def test_too_many_rejects_fail_without_output(tmp_path, capsys):
    src = _folder(tmp_path / "src", classes=3, per_class=6)
    _with_bad_files(src)
    assert _build(src, tmp_path / "out", "--workers", "1") == 2  # default --max-reject 1%
    err = capsys.readouterr().err
    assert "more than 0 of 22 images rejected" in err and "rejected.tsv" in err
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "out.partial" / "rejected.tsv").is_file()


def test_interrupted_build_resumes_to_identical_bytes(tmp_path, monkeypatch, capsys):
    src = _folder(tmp_path / "src", classes=3, per_class=7)
    _with_bad_files(src)
    args = ("--workers", "2", "--shard-size", "4", "--max-reject", "0.3")
    assert _build(src, tmp_path / "whole", *args) == 0

    out = tmp_path / "out"
    monkeypatch.setenv(DRILL_ENV, "9")  # crash in the middle of the third shard
    assert _build(src, out, *args) == 75
    assert not out.exists()
    partial = tmp_path / "out.partial"
    assert {"train-00000.rec", "train-00001.rec", "train-00002.rec", "progress.json"} <= set(_files(partial))
    monkeypatch.delenv(DRILL_ENV)
    capsys.readouterr()

    assert _build(src, out, *args) == 2
    assert "--resume" in capsys.readouterr().err
    assert _build(src, out, *args, "--resume", "--seed", "5") == 2
    assert "other inputs or options" in capsys.readouterr().err
    assert _build(src, out, *args, "--resume", "--fit", "pad") == 2  # other geometry: not these shards
    assert "other inputs or options" in capsys.readouterr().err
    assert _build(src, out, *args, "--resume") == 0
    assert _files(out) == _files(tmp_path / "whole")
    assert not partial.exists()


def test_refuses_to_overwrite_unless_forced(tmp_path, capsys):
    src = _folder(tmp_path / "src", classes=2, per_class=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _build(src, out) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert _build(src, out, "--force") == 0
    assert not (out / "keep.txt").exists() and load_manifest(out).num_images == 6


def test_list_file_source(tmp_path, capsys):
    src = _folder(tmp_path / "images", classes=2, per_class=3)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    lst = tmp_path / "train.lst"
    lst.write_text("".join(f"{p.relative_to(tmp_path)}\t{4 if 'person_c' in str(p) else 1}\n" for p in files) + "\n")
    assert _build(lst, tmp_path / "out", "--workers", "1") == 0
    m = load_manifest(tmp_path / "out")
    assert (m.num_images, m.num_classes, m.class_names) == (6, 5, ["0", "1", "2", "3", "4"])
    assert sorted(int(h.label) for _, h, _ in _records(tmp_path / "out")) == [1, 1, 1, 4, 4, 4]

    lst.write_text(f"{files[0]}\t1\n{files[1]} 2\n")
    assert _build(lst, tmp_path / "bad") == 2
    assert f"{lst}: line 2 is malformed" in capsys.readouterr().err


def test_user_errors_are_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_tools", "build", str(tmp_path / "nope"), str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"arcshard-data build: error: {tmp_path / 'nope'}: no such image folder or list file"]


@pytest.mark.skipif(not YALEFACES.is_dir(), reason=f"{YALEFACES} not present")
def test_yalefaces_photos_convert(tmp_path):
    assert main(["build", str(YALEFACES), str(tmp_path / "yale"), "--workers", "2", "--quiet"]) == 0
    m = load_manifest(tmp_path / "yale")
    assert (m.num_classes, m.image_size) == (15, (112, 112))
    assert m.num_images == sum(1 for p in YALEFACES.glob("*/*") if p.is_file())
    assert m.class_names[0] == "subject01"
    for _, header, payload in _records(tmp_path / "yale"):
        image = Image.open(io.BytesIO(payload))
        image.load()
        assert (image.mode, image.size) == ("RGB", (112, 112))
        assert 0 <= header.label < 15


def test_cli_imports_only_the_command_it_runs():
    code = ("import sys; from data_tools.cli import build_parser; build_parser('build'); "
            "print(sorted(m for m in sys.modules if m in ('data_tools.build', 'data_tools.insightface', "
            "'data_tools.inspect', 'data_tools.verify', 'data_tools.pairs')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "['data_tools.build']", proc.stderr


def _jpeg(pixels: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", **options)
    return out.getvalue()


def test_jpeg_fast_path_keeps_pillows_verdicts():
    """simplejpeg validates and decodes JPEGs; whatever it refuses goes to Pillow, as before."""
    import simplejpeg

    from data_tools.build import encode_image
    from data_tools.shards import Rejected

    data = _jpeg(_pixels(1, SIZE, SIZE), quality=90)
    assert encode_image(data, SIZE, 95) == data  # copied unchanged after a validating decode
    with pytest.raises(Rejected, match="(?i)truncated"):  # the 1/8-scale decode still reads the whole stream
        encode_image(data[: len(data) * 2 // 3], SIZE, 95)
    # a damaged entropy-coded byte: libjpeg-turbo only warns; simplejpeg (strict) refuses, Pillow accepts
    start = data.index(b"\xff\xda") + 20
    damaged = []
    for pos in range(start, len(data) - 2):
        candidate = bytearray(data)
        candidate[pos] ^= 0x55
        if 0xFF in candidate[pos - 1:pos + 2]:
            continue
        try:
            simplejpeg.decode_jpeg(bytes(candidate), min_height=1, min_width=1, strict=True)
        except ValueError:
            damaged.append(bytes(candidate))
    assert damaged
    assert encode_image(damaged[0], SIZE, 95) == damaged[0]


def test_resized_jpegs_use_dct_scaling_close_to_bilinear():
    from data_tools.build import encode_image

    yy, xx = np.mgrid[0:4 * SIZE, 0:2 * SIZE].astype(np.float32)  # 32 wide, 64 high
    smooth = np.stack([xx * 7, yy * 3, 255 - xx * 3 - yy], axis=-1).clip(0, 255).astype(np.uint8)
    data = _jpeg(smooth, quality=95)
    out = encode_image(data, SIZE, 95)
    assert encode_image(data, SIZE, 95) == out  # deterministic
    image = Image.open(io.BytesIO(out))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))
    assert image.layer[0][1:3] == (2, 2)  # 4:2:0 chroma subsampling, as Pillow writes at q95
    full = Image.open(io.BytesIO(data)).convert("RGB")  # full decode, centre crop, bilinear
    reference = full.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(0, SIZE, 2 * SIZE, 3 * SIZE))
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.mean() < 4, diff.mean()

    small = Image.open(io.BytesIO(encode_image(_jpeg(smooth[:10, :7]), SIZE, 95)))  # upscaled, no DCT scaling
    assert (small.mode, small.size) == ("RGB", (SIZE, SIZE))

    cmyk = io.BytesIO()  # CMYK (and grayscale) JPEGs take Pillow's way
    Image.fromarray(smooth).convert("CMYK").save(cmyk, "JPEG")
    converted = Image.open(io.BytesIO(encode_image(cmyk.getvalue(), SIZE, 95)))
    assert (converted.mode, converted.size) == ("RGB", (SIZE, SIZE))


@pytest.mark.timeout(180)
def test_only_regular_files_are_read_the_rest_is_rejected(tmp_path):
    """A FIFO (which a plain open waits on forever), a socket and a broken symlink in the
    image folder are listed in rejected.tsv, not read; the build finishes."""
    src = _folder(tmp_path / "src", classes=2, per_class=5)
    fifo, sock, link = src / "person_b" / "pipe.jpg", src / "person_b" / "sock.jpg", src / "person_c" / "gone.jpg"
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    os.symlink(tmp_path / "nowhere.jpg", link)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "data_tools", "build", str(src), str(tmp_path / "out"), "--size", str(SIZE),
             "--quiet", "--workers", "2", "--max-reject", "50%"],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        )
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "out" / "rejected.tsv").read_text().splitlines()[1:]
    assert dict(line.split("\t") for line in lines) == {
        str(fifo): "not a regular file (a FIFO)",
        str(sock): "not a regular file (a socket)",
        str(link): "not a regular file (a broken symbolic link)",
    }
    assert load_manifest(tmp_path / "out").num_images == 10


def test_class_folders_differing_only_in_case_are_warned_about(tmp_path, caplog):
    src = _folder(tmp_path / "src", classes=1, per_class=2)  # person_c
    _save(src / "Person_C" / "00.jpg", 5, "jpeg")
    _save(src / "PERSON_C" / "00.jpg", 6, "jpeg")
    with caplog.at_level("WARNING", logger="data_tools.build"):
        assert _build(src, tmp_path / "out", "--workers", "1") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "differ only in case" in r.getMessage()]
    assert len(warnings) == 1 and "'PERSON_C', 'Person_C', 'person_c'" in warnings[0], warnings
    assert load_manifest(tmp_path / "out").num_classes == 3  # still three identities


def test_disk_full_is_one_line_naming_the_output_and_free_space(tmp_path, monkeypatch, capsys):
    src = _folder(tmp_path / "src", classes=2, per_class=3)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RecordWriter, "write", full)
    assert _build(src, tmp_path / "out", "--workers", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"arcshard-data build: error: {tmp_path / 'out.partial'}: disk full while writing")
    assert "MiB free on its file system" in err[0] and "--resume" in err[0]
