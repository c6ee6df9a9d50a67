import contextlib
import os
import pickle
import random
import re
import struct
import subprocess

import pytest

from data_tools.recordio import (
    MAGIC,
    IRHeader,
    RecordReader,
    RecordWriter,
    count_index,
    pack,
    parse_index_line,
    read_index,
    scan,
    unpack,
    walk,
)
from tests.data_tools import mxnet_env

M = struct.pack("<I", MAGIC)


def frame(cflag: int, data: bytes) -> bytes:
    """One frame as dmlc-core writes it: magic, lrecord, data, zero padding."""
    return struct.pack("<II", MAGIC, cflag << 29 | len(data)) + data + bytes(-len(data) % 4)


def write(tmp_path, payloads, keys=None):
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordWriter(rec, idx) as w:
        offsets = [w.write(p, None if keys is None else k) for p, k in zip(payloads, keys or payloads)]
    return rec, idx, offsets


# --- framing -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "payload, frames",
    [
        (b"", [frame(0, b"")]),
        (b"abcde", [frame(0, b"abcde")]),
        (M, [frame(1, b""), frame(3, b"")]),
        (M + M, [frame(1, b""), frame(2, b""), frame(3, b"")]),
        (b"abcd" + M, [frame(1, b"abcd"), frame(3, b"")]),
        (M + b"xy", [frame(1, b""), frame(3, b"xy")]),
        (b"abcd" + M + b"efgh" + M + b"i", [frame(1, b"abcd"), frame(2, b"efgh"), frame(3, b"i")]),
        # Unaligned occurrences are not split (dmlc-core checks 4-byte boundaries only).
        (b"x" + M + b"yyy", [frame(0, b"x" + M + b"yyy")]),
        (b"abcde" + M, [frame(0, b"abcde" + M)]),
        (b"ab" + M + M[:2], [frame(0, b"ab" + M + M[:2])]),
        (b"abc" + M + b"d", [frame(0, b"abc" + M + b"d")]),
    ],
    ids=["empty", "5-bytes", "magic", "magic-magic", "magic-at-end", "magic-at-start",
         "two-splits", "unaligned", "unaligned-at-end", "straddling", "unaligned-3"],
)
def test_writer_frames_like_dmlc_core(tmp_path, payload, frames):
    rec, idx, offsets = write(tmp_path, [payload, b"next"])
    assert rec.read_bytes() == b"".join(frames) + frame(0, b"next")
    assert offsets == [0, len(b"".join(frames))]
    assert idx.read_text() == f"0\t0\n1\t{offsets[1]}\n"
    with RecordReader(rec) as r:
        assert [bytes(r.read(k)) for k in r.keys] == [payload, b"next"]
        assert [(o, bytes(p)) for o, p in r] == [(offsets[0], payload), (offsets[1], b"next")]


def _payloads() -> list[bytes]:
    rng = random.Random(0)
    out = [bytes(rng.getrandbits(8) for _ in range(n)) for n in range(13)]  # every length mod 4
    big = bytearray(rng.randbytes(100_003))
    for pos in (0, 4000, 4004, 7001, 50_000, 100_003 - 4 - 3):  # aligned, consecutive, unaligned
        big[pos : pos + 4] = M
    out.append(bytes(big))
    return out


def test_round_trip_random_access_iteration_and_scan(tmp_path):
    payloads = _payloads()
    keys = [1000 - 7 * i for i in range(len(payloads))]
    rec, idx, offsets = write(tmp_path, payloads, keys)
    assert rec.stat().st_size % 4 == 0
    assert scan(rec) == offsets
    with RecordReader(rec, idx) as r:
        assert r.keys == tuple(keys) and len(r) == len(payloads)
        for key, payload in random.Random(1).sample(list(zip(keys, payloads)), len(keys)):
            assert r.read(key) == payload
        assert [(o, bytes(p)) for o, p in r] == list(zip(offsets, payloads))
        for offset, following, payload in zip(offsets, offsets[1:] + [rec.stat().st_size], payloads):
            data, next_offset = r.read_at(offset)
            assert (data, next_offset) == (payload, following)
        with pytest.raises(KeyError, match="t.idx: no key 5"):
            r.read(5)


def test_payload_views_outlive_close(tmp_path):
    rec, _, _ = write(tmp_path, [b"single part", b"ab" + M + b"cd" + M])
    r = RecordReader(rec)
    single, multi = r.read(0), r.read(1)
    r.close()
    assert bytes(single) == b"single part" and bytes(multi) == b"ab" + M + b"cd" + M


def test_empty_file(tmp_path):
    rec, idx, _ = write(tmp_path, [])
    assert rec.read_bytes() == b"" and idx.read_text() == "" and scan(rec) == []
    with RecordReader(rec) as r:
        assert len(r) == 0 and list(r) == []


def test_writer_keys(tmp_path):
    rec, idx = tmp_path / "k.rec", tmp_path / "k.idx"
    with RecordWriter(rec, idx) as w:
        w.write(b"a")  # key 0
        w.write(b"b", key=-3)
        with pytest.raises(ValueError, match="k.idx: duplicate key -3"):
            w.write(b"c", key=-3)
    assert idx.read_text() == "0\t0\n-3\t12\n"
    with RecordWriter(tmp_path / "n.rec") as w:
        assert w.write(b"abc") == 0 and w.write(b"d") == 12
        with pytest.raises(ValueError, match="no .idx"):
            w.write(b"e", key=1)
    assert (tmp_path / "n.rec").read_bytes() == frame(0, b"abc") + frame(0, b"d")


# --- IRHeader --------------------------------------------------------------------------

def test_pack_layout():
    single = pack(IRHeader(0, 3.5, 7, 2**64 - 1), b"img")
    assert single == struct.pack("<IfQQ", 0, 3.5, 7, 2**64 - 1) + b"img"
    multi = pack(IRHeader(3, (1.0, -2.5, 1e6), 9, 0), b"img")
    assert multi == struct.pack("<IfQQ3f", 3, 0.0, 9, 0, 1.0, -2.5, 1e6) + b"img"
    assert pack(IRHeader(0, (), 1, 2), b"") == struct.pack("<IfQQ", 0, 0.0, 1, 2)


@pytest.mark.parametrize(
    "header",
    [IRHeader(0, 17.0, 123, 0), IRHeader(1, (5.0,), 0, 1), IRHeader(2, (0.0, 42.0), 2**63, 7)],
)
@pytest.mark.parametrize("as_view", [False, True])
def test_unpack_inverts_pack(header, as_view):
    record = pack(header, b"payload" + M)
    got_header, payload = unpack(memoryview(record) if as_view else record)
    assert got_header == header and payload == b"payload" + M
    assert isinstance(payload, memoryview if as_view else bytes)


def test_labels_are_float32():
    header, _ = unpack(pack(IRHeader(2, (0.1, 16777217.0), 0, 0), b""))
    assert header.label == (struct.unpack("<f", struct.pack("<f", 0.1))[0], 16777216.0)
    assert unpack(pack(IRHeader(0, (), 0, 0), b"x")) == (IRHeader(0, 0.0, 0, 0), b"x")


def test_header_errors():
    with pytest.raises(ValueError, match="flag 0 does not match label"):
        IRHeader(0, (1.0, 2.0), 0, 0)
    with pytest.raises(ValueError, match="flag 1 does not match label"):
        IRHeader(1, 1.0, 0, 0)
    with pytest.raises(ValueError, match="shorter than an IRHeader"):
        unpack(b"\0" * 23)
    with pytest.raises(ValueError, match="too short for the 3 labels"):
        unpack(struct.pack("<IfQQ2f", 3, 0.0, 0, 0, 1.0, 2.0))


# --- errors name the file, the byte offset and what is wrong --------------------------

def _damaged(tmp_path, data: bytes, idx_text: str | None = None):
    rec = tmp_path / "train-00003.rec"
    rec.write_bytes(data)
    (tmp_path / "train-00003.idx").write_text(idx_text if idx_text is not None else "")
    return rec


GOOD = frame(0, b"first...") + frame(0, b"second")  # records at bytes 0 and 16


@pytest.mark.parametrize(
    "data, message",
    [
        (GOOD[:16] + bytes(4) + GOOD[20:], "record at byte 16 has bad magic 0x00000000 (truncated file?)"),
        (GOOD[:16] + b"JUNK" + GOOD[20:], "record at byte 16 has bad magic 0x4b4e554a"),
        (GOOD[:-1], "record at byte 16 claims 6 bytes from byte 24, past the end of the file at byte 31"),
        (GOOD[:20], "record at byte 16 runs past the end of the file at byte 20"),
        (GOOD + frame(1, b"part"), "record at byte 32 runs past the end of the file at byte 44"),
        (GOOD + frame(2, b"part") + frame(3, b""),
         "record at byte 32 has continuation flag 2, expected 0 or 1"),
        (GOOD + frame(3, b""), "record at byte 32 has continuation flag 3, expected 0 or 1"),
        (GOOD + frame(5, b""), "record at byte 32 has continuation flag 5, expected 0 or 1"),
        (GOOD + frame(1, b"part") + frame(0, b"x"),
         "part at byte 44 of the record at byte 32 has continuation flag 0, expected 2 or 3"),
        (GOOD + frame(1, b"part") + frame(1, b"x"),
         "part at byte 44 of the record at byte 32 has continuation flag 1, expected 2 or 3"),
        (GOOD + frame(1, b"part") + bytes(8), "part at byte 44 of the record at byte 32 has bad magic 0x00000000"),
    ],
    ids=["zeroed-magic", "bad-magic", "truncated-payload", "truncated-header", "truncated-parts",
         "starts-with-middle", "starts-with-last", "unknown-flag", "whole-inside", "first-inside",
         "bad-magic-inside"],
)
def test_framing_errors(tmp_path, data, message):
    rec = _damaged(tmp_path, data)
    with pytest.raises(ValueError, match=re.escape(f"train-00003.rec: {message}")):
        scan(rec)
    with RecordReader(rec) as r, pytest.raises(ValueError, match="train-00003.rec: "):
        list(r)


def test_read_by_key_checks_framing(tmp_path):
    data = GOOD + frame(1, b"part") + frame(3, b"tail")
    rec = _damaged(tmp_path, data, "0\t0\n1\t16\n2\t32\n3\t44\n4\t4\n")
    with RecordReader(rec) as r:
        assert bytes(r.read(2)) == b"part" + M + b"tail"
        with pytest.raises(ValueError, match="train-00003.rec: record at byte 44 has continuation flag 3"):
            r.read(3)  # an offset inside a multi-part record
        with pytest.raises(ValueError, match="train-00003.rec: record at byte 4 has bad magic"):
            r.read(4)


@pytest.mark.parametrize(
    "idx_text, message",
    [
        ("0\t0\n1\t16\n1\t0\n", r"line 3: duplicate key 1 \(already at byte 16\)"),
        ("0\t0\n1\t32\n", r"line 2: key 1 at byte 32 is beyond the end of .*train-00003.rec \(32 bytes"),
        ("0\t0\nx\t16\n", "line 2 is malformed: 'x\\\\t16'"),
        ("0\t0\n1 16\n", "line 2 is malformed"),
        ("0\t0\t0\n", "line 1 is malformed"),
        ("0\t0\n\n1\t16\n", "line 2 is malformed"),
    ],
    ids=["duplicate-key", "offset-beyond-file", "bad-key", "no-tab", "three-fields", "blank-line"],
)
def test_index_errors(tmp_path, idx_text, message):
    rec = _damaged(tmp_path, GOOD, idx_text)
    with pytest.raises(ValueError, match="train-00003.idx: " + message):
        RecordReader(rec)


def test_missing_index(tmp_path):
    rec = tmp_path / "train-00003.rec"
    rec.write_bytes(GOOD)
    with pytest.raises(FileNotFoundError, match="train-00003.idx: index of .*incomplete.*scan"):
        RecordReader(rec)


def test_writer_rejects_oversized_record(tmp_path):
    with RecordWriter(tmp_path / "big.rec") as w:
        with pytest.raises(ValueError, match="big.rec: a record of 536870912 bytes"):
            w.write(bytes(1 << 29))


# --- byte compatibility with real MXNet ---------------------------------------------------

MXNET_SCRIPT = r"""
import pickle, sys
import mxnet as mx

mode, rec, idx, data = sys.argv[1:]

def plain(record):
    h, payload = mx.recordio.unpack(record)
    return [[h.flag, h.label.tolist() if h.flag > 0 else h.label, h.id, h.id2], payload]

if mode == "write":
    with open(data, "rb") as f:
        records = pickle.load(f)
    writer = mx.recordio.MXIndexedRecordIO(idx, rec, "w")
    packed = []
    for key, header, payload in records:
        packed.append(mx.recordio.pack(mx.recordio.IRHeader(*header), payload))
        writer.write_idx(key, packed[-1])
    writer.close()
    with open(data, "wb") as f:
        pickle.dump(packed, f)
else:
    reader = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    by_key = [[key, *plain(reader.read_idx(key))] for key in reader.keys]
    reader.close()
    sequential = mx.recordio.MXRecordIO(rec, "r")
    in_order = []
    while (record := sequential.read()) is not None:
        in_order.append(plain(record))
    with open(data, "wb") as f:
        pickle.dump({"by_key": by_key, "in_order": in_order}, f)
"""


def _compat_records() -> list[tuple[int, IRHeader, bytes]]:
    """Headers and payloads covering the splitting rules, multi-labels and magic-valued fields."""
    magic_float = struct.unpack("<f", M)[0]  # puts the magic word in the header's label field
    magic_id = MAGIC | MAGIC << 32  # ... and in the id field (two aligned occurrences)
    payloads = [b"\xff\xd8\xff\xe0 jpeg", b"", M, M + M + M, b"abcd" + M, M + b"x", b"x" + M + b"yz",
                b"ab" + M + b"c", b"abc" + M, b"abcd" + M + b"1234" + M + b"56", *_payloads()]
    headers = [IRHeader(0, float(i), i, 0) for i in range(len(payloads))]
    headers[1:4] = [IRHeader(1, (7.0,), 1, 0), IRHeader(2, (3.0, -1.5), 2, 5),
                    IRHeader(3, (1.0, magic_float, 2.0), 3, 0)]
    headers[4:6] = [IRHeader(0, magic_float, 4, 0), IRHeader(0, 5.0, magic_id, magic_id)]
    keys = [10 + 7 * i for i in range(len(payloads))]
    keys[-1] = 2**40
    return list(zip(keys, headers, payloads))


def _run_mxnet(python, tmp_path, mode, rec, idx, data):
    script = tmp_path / "mx_recordio.py"
    script.write_text(MXNET_SCRIPT)
    path = tmp_path / f"{mode}.pkl"
    path.write_bytes(pickle.dumps(data))
    proc = subprocess.run([python, script, mode, rec, idx, path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return pickle.loads(path.read_bytes())


def _mx_header(h: IRHeader) -> list:
    return [h.flag, list(h.label) if isinstance(h.label, tuple) else h.label, h.id, h.id2]


def test_reads_and_rewrites_mxnet_files_byte_for_byte(mxnet_python, tmp_path):
    records = _compat_records()
    mx_rec, mx_idx = tmp_path / "mx.rec", tmp_path / "mx.idx"
    mx_packed = _run_mxnet(mxnet_python, tmp_path, "write", mx_rec, mx_idx,
                           [(key, _mx_header(h), payload) for key, h, payload in records])
    assert [pack(h, payload) for _, h, payload in records] == mx_packed

    with RecordReader(mx_rec, mx_idx) as r:
        assert list(r.keys) == [key for key, _, _ in records]
        assert [unpack(r.read(key)) for key in r.keys] == [(h, payload) for _, h, payload in records]
        assert [bytes(record) for _, record in r] == mx_packed
    offsets = [int(line.split("\t")[1]) for line in mx_idx.read_text().splitlines()]
    assert scan(mx_rec) == offsets

    ours_rec, ours_idx = tmp_path / "ours.rec", tmp_path / "ours.idx"
    with RecordWriter(ours_rec, ours_idx) as w:
        assert [w.write(pack(h, payload), key) for key, h, payload in records] == offsets
    assert ours_rec.read_bytes() == mx_rec.read_bytes()
    assert ours_idx.read_bytes() == mx_idx.read_bytes()


def test_mxnet_reads_our_files(mxnet_python, tmp_path):
    records = _compat_records()
    rec, idx = tmp_path / "ours.rec", tmp_path / "ours.idx"
    with RecordWriter(rec, idx) as w:
        for key, h, payload in records:
            w.write(pack(h, payload), key)
    got = _run_mxnet(mxnet_python, tmp_path, "read", rec, idx, None)
    expected = [[_mx_header(h), payload] for _, h, payload in records]
    assert got["by_key"] == [[key, *e] for (key, _, _), e in zip(records, expected)]
    assert got["in_order"] == expected


def test_mxnet_env_reports_unreachable_registry(tmp_path):
    # Nothing listens on port 9; pip's config files and local wheel folders are left out.
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "1"}
    with pytest.raises(mxnet_env.RegistryUnreachable, match="registry is unreachable"):
        mxnet_env.create_venv(tmp_path / "venv", env)


def test_dali_reads_mxnet_written_files(mxnet_python, tmp_path):
    """Files written by MXNet itself stream through DALI's reader + decoder (CPU)."""
    dali = pytest.importorskip("nvidia.dali", reason="the dali extra is not installed")
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(6)]
    jpegs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    records = [(i, [0, float(i % 3), i, 0], jpeg) for i, jpeg in enumerate(jpegs)]
    rec, idx = tmp_path / "mx.rec", tmp_path / "mx.idx"
    _run_mxnet(mxnet_python, tmp_path, "write", rec, idx, records)

    @dali.pipeline_def(batch_size=len(jpegs), num_threads=1, device_id=None)
    def pipe():
        data, labels = dali.fn.readers.mxnet(
            path=[str(rec)], index_path=[str(idx)], random_shuffle=False
        )
        return dali.fn.decoders.image(data, device="cpu", output_type=dali.types.RGB), labels

    p = pipe()
    p.build()
    decoded, labels = p.run()
    assert [float(np.asarray(labels[i]).reshape(-1)[0]) for i in range(len(jpegs))] == [
        float(i % 3) for i in range(len(jpegs))
    ]
    for i, jpeg in enumerate(jpegs):
        expected = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int16)
        got = np.asarray(decoded[i], dtype=np.int16)
        assert got.shape == (112, 112, 3)
        assert np.abs(got - expected).max() <= 2  # libjpeg-turbo IDCT variants


def test_read_index_and_count_index(tmp_path):
    idx = tmp_path / "a.idx"
    idx.write_bytes(b"3\t0\n1\t16\n7\t40\n")
    assert read_index(idx) == [(3, 0), (1, 16), (7, 40)]  # file order, keys as written
    assert count_index(idx) == 3
    idx.write_bytes(b"3\t0\n3\t16\n")
    with pytest.raises(ValueError, match=r"a.idx: line 2: duplicate key 3 \(already at byte 0\)"):
        read_index(idx)
    with pytest.raises(ValueError, match=r"^x.idx: line 9 is malformed: '1 2' \(expected"):
        parse_index_line(b"1 2", "x.idx", 9)


def test_walk_yields_offsets_and_payloads_and_stops_early(tmp_path):
    rec = tmp_path / "w.rec"
    with RecordWriter(rec) as w:
        offsets = [w.write(p) for p in (b"one", b"two!", b"three")]
    assert [(o, bytes(p)) for o, p in walk(rec)] == list(zip(offsets, [b"one", b"two!", b"three"]))
    with contextlib.closing(walk(rec)) as records:
        assert bytes(next(records)[1]) == b"one"  # closing early releases the mapping
    rec.write_bytes(rec.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"w.rec: record at byte 24 .*truncated file"):
        list(walk(rec))
