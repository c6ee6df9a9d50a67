"""`arcshard-data import-insightface`: insightface train.rec/.idx/property -> our layout."""

from __future__ import annotations

import io
import pickle
import subprocess

import numpy as np
from PIL import Image

from data_tools.cli import main
from data_tools.manifest import load_manifest
from data_tools.recordio import IRHeader, RecordReader, RecordWriter, pack, unpack

SIDE = 16
CLASSES = 4

# Writes an insightface-style dataset the way insightface's rec builders do: images as
# records 1..n (label = class id; some as a 2-float label whose first value is the class),
# one record per identity with its (start, end) image range, then header record 0 with
# (first identity record, end), all through mxnet's own writer and pack().
MXNET_SCRIPT = r"""
import pickle, sys
import mxnet as mx

rec, idx, data = sys.argv[1:]
with open(data, "rb") as f:
    images = pickle.load(f)  # [(label, payload)], grouped by class
writer = mx.recordio.MXIndexedRecordIO(idx, rec, "w")
ranges = {}
for i, (label, payload) in enumerate(images, 1):
    if i % 3 == 0:
        header = mx.recordio.IRHeader(0, [float(label), 0.0], i, 0)  # tuple label
    else:
        header = mx.recordio.IRHeader(0, float(label), i, 0)
    writer.write_idx(i, mx.recordio.pack(header, payload))
    start, end = ranges.get(label, (i, i))
    ranges[label] = (min(start, i), i + 1)
first = len(images) + 1
for k, label in enumerate(sorted(ranges)):
    writer.write_idx(first + k, mx.recordio.pack(mx.recordio.IRHeader(0, list(map(float, ranges[label])), 0, 0), b""))
writer.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [float(first), float(first + len(ranges))], 0, 0), b""))
writer.close()
"""


def _jpeg(seed: int, side: int = SIDE) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _images() -> list[tuple[int, bytes]]:
    images = [(c, _jpeg(10 * c + i)) for c in range(CLASSES) for i in range(4)]
    images[5] = (1, b"\xff\xd8\xff\xe0 not really a jpeg")  # undecodable
    images[9] = (2, _jpeg(99, side=SIDE + 4))  # not the property size
    return images


def test_import_of_an_mxnet_written_dataset(mxnet_python, tmp_path):
    images = _images()
    src = tmp_path / "ms1m"
    src.mkdir()
    (src / "property").write_text(f"{CLASSES},{SIDE},{SIDE}\n")
    script, data = tmp_path / "make_rec.py", tmp_path / "images.pkl"
    script.write_text(MXNET_SCRIPT)
    data.write_bytes(pickle.dumps(images))
    proc = subprocess.run([mxnet_python, script, src / "train.rec", src / "train.idx", data],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    out = tmp_path / "out"
    assert main(["import-insightface", str(src), str(out), "--workers", "2", "--shard-size", "5",
                 "--max-reject", "0.2", "--quiet"]) == 0
    m = load_manifest(out)
    assert (m.num_images, m.num_classes, m.image_size) == (14, CLASSES, (SIDE, SIDE))
    assert m.class_names == ["0", "1", "2", "3"]
    assert len(m.shards) == 4  # 16 records in shards of 5 positions; 2 rejected
    assert (out / "property").read_text() == f"{CLASSES},{SIDE},{SIDE}\n"

    got = []
    for shard in m.shards:
        with RecordReader(out / shard.rec, out / shard.idx) as r:
            assert list(r.keys) == list(range(shard.num_records))
            for key in r.keys:
                header, payload = unpack(r.read(key))
                assert header.flag == 0
                got.append((int(header.label), bytes(payload)))
    expected = [image for k, image in enumerate(images) if k not in (5, 9)]
    assert sorted(got) == sorted(expected)  # unchanged bytes, right class ids
    assert got != expected  # shuffled

    rejected = (out / "rejected.tsv").read_text().splitlines()[1:]
    assert sorted(line.split("\t")[0] for line in rejected) == [f"{src / 'train.rec'}#{k}" for k in (10, 6)]
    assert any("unknown format" in line or "not a readable image" in line for line in rejected)
    assert any(f"image is {SIDE + 4}x{SIDE + 4}, property says {SIDE}x{SIDE}" in line for line in rejected)


def _write_rec(src, header0, images, prop):
    src.mkdir()
    (src / "property").write_text(prop)
    with RecordWriter(src / "train.rec", src / "train.idx") as w:
        if header0 is not None:
            w.write(pack(header0, b""), 0)
        for i, (label, payload) in enumerate(images, 1 if header0 is not None else 0):
            w.write(pack(IRHeader(0, float(label), i, 0), payload), i)


def test_records_without_header_are_all_images(tmp_path):
    images = [(c, _jpeg(c)) for c in (0, 1, 2, 1)]
    _write_rec(tmp_path / "src", None, images, f"3,{SIDE},{SIDE}")
    assert main(["import-insightface", str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 0
    assert load_manifest(tmp_path / "out").num_images == 4


def test_layout_errors(tmp_path, capsys):
    images = [(0, _jpeg(0)), (1, _jpeg(1))]
    _write_rec(tmp_path / "a", IRHeader(2, (3.0, 5.0), 0, 0), images, f"3,{SIDE},{SIDE}\n")
    assert main(["import-insightface", str(tmp_path / "a"), str(tmp_path / "out")]) == 2
    assert f"2 identity records but {tmp_path / 'a' / 'property'} says 3 classes" in capsys.readouterr().err

    _write_rec(tmp_path / "b", None, images, "three,112,112")
    assert main(["import-insightface", str(tmp_path / "b"), str(tmp_path / "out")]) == 2
    assert "expected 'num_classes,height,width'" in capsys.readouterr().err

    (tmp_path / "b" / "train.idx").unlink()
    assert main(["import-insightface", str(tmp_path / "b"), str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'b' / 'train.idx'}: missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
