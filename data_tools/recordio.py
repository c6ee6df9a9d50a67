"""MXNet RecordIO (``.rec`` + ``.idx``), byte-compatible with MXNet, without mxnet.

A ``.rec`` file is a sequence of records. Each record is framed as::

    uint32 magic 0xced7230a | uint32 lrecord = cflag << 29 | length | payload | zero pad to 4

(little-endian). A payload that holds the magic word at a 4-byte-aligned position is
stored as several parts, split at each such occurrence with the magic word itself left
out: cflag 1 marks the first part, 2 a middle one, 3 the last, 0 a record in one part;
readers put the magic word back between the parts. This is dmlc-core's
``RecordIOWriter::WriteRecord``/``RecordIOReader::NextRecord``, which MXNet, DALI and
insightface use.

A ``.idx`` file has one ``key<TAB>offset`` line per record, the byte offset of the
record's first frame, as ``mx.recordio.MXIndexedRecordIO`` writes it.

A payload usually starts with an :class:`IRHeader` (:func:`pack`/:func:`unpack`, as
``mx.recordio.pack``/``unpack``): ``uint32 flag, float32 label, uint64 id, uint64 id2``;
when ``flag > 0``, ``flag`` float32 labels follow the header and its label field is 0.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")  # magic, lrecord
_LENGTH_MASK = (1 << 29) - 1
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3  # continuation flags
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2

PathLike = str | os.PathLike[str]
Buf = TypeVar("Buf", bytes, memoryview)


@dataclass(frozen=True)
class IRHeader:
    """Image-record header, as ``mx.recordio.IRHeader``.

    ``label`` is one float (``flag == 0``) or a tuple of ``flag`` floats; both are stored
    as float32. ``id``/``id2`` are uint64 (insightface keeps the image index in ``id``).
    """

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int

    def __post_init__(self) -> None:
        expected = len(self.label) if isinstance(self.label, tuple) else 0
        if self.flag != expected:
            raise ValueError(
                f"IRHeader flag {self.flag} does not match label {self.label!r}: flag is "
                f"the number of labels in a tuple label, 0 for a single float label"
            )


def pack(header: IRHeader, payload: bytes | memoryview) -> bytes:
    """Record bytes for ``header`` + ``payload``, identical to ``mx.recordio.pack``."""
    if isinstance(header.label, tuple):
        labels = struct.pack(f"<{len(header.label)}f", *header.label)
        return _IR_HEADER.pack(header.flag, 0.0, header.id, header.id2) + labels + payload
    return _IR_HEADER.pack(0, header.label, header.id, header.id2) + payload


def unpack(record: Buf) -> tuple[IRHeader, Buf]:
    """Split a record into its header and payload, as ``mx.recordio.unpack``.

    The payload is a slice of ``record`` (no copy for a memoryview). Multi-label headers
    come back with a tuple label.
    """
    if len(record) < _IR_HEADER.size:
        raise ValueError(
            f"record of {len(record)} bytes is shorter than an IRHeader ({_IR_HEADER.size} bytes)"
        )
    flag, label, id_, id2 = _IR_HEADER.unpack_from(record)
    start = _IR_HEADER.size + 4 * flag
    if flag:
        if len(record) < start:
            raise ValueError(
                f"record of {len(record)} bytes is too short for the {flag} labels its "
                f"IRHeader announces ({start} bytes needed)"
            )
        label = struct.unpack_from(f"<{flag}f", record, _IR_HEADER.size)
    return IRHeader(flag, label, id_, id2), record[start:]


class RecordWriter:
    """Writes a ``.rec`` file and, when ``idx_path`` is given, its ``.idx``.

    Output is byte-identical to ``mx.recordio.MXIndexedRecordIO(idx, rec, 'w')`` with
    ``write_idx(key, payload)`` (``mx.recordio.MXRecordIO`` without an index).
    """

    def __init__(self, rec_path: PathLike, idx_path: PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        self._rec = open(self.rec_path, "wb", buffering=1 << 20)
        self._idx = None if self.idx_path is None else open(self.idx_path, "w", encoding="ascii")
        self._keys: set[int] = set()
        self._offset = 0

    def write(self, payload: bytes | memoryview, key: int | None = None) -> int:
        """Append one record and return its byte offset.

        With an index, ``key`` defaults to the record's position (0, 1, 2, ...), as
        ``im2rec`` numbers records; keys must be unique. Without one, pass no key.
        """
        data = bytes(payload)
        if len(data) > _LENGTH_MASK:
            raise ValueError(
                f"{self.rec_path}: a record of {len(data)} bytes is too large "
                f"(RecordIO holds at most {_LENGTH_MASK} bytes per record)"
            )
        if self._idx is None:
            if key is not None:
                raise ValueError(f"{self.rec_path}: key {key} given, but the writer has no .idx")
        else:
            key = len(self._keys) if key is None else key
            if key in self._keys:
                raise ValueError(f"{self.idx_path}: duplicate key {key}")
            self._keys.add(key)
        offset = self._offset
        view = memoryview(data)
        start = 0
        found = data.find(_MAGIC_BYTES)
        while found >= 0:
            if found % 4:
                found = data.find(_MAGIC_BYTES, found + 1)
                continue
            self._write_part(_MIDDLE if start else _FIRST, view[start:found])
            start = found + 4
            found = data.find(_MAGIC_BYTES, start)
        self._write_part(_LAST if start else _WHOLE, view[start:])
        if pad := -len(data) % 4:
            self._rec.write(bytes(pad))
            self._offset += pad
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
        return offset

    def _write_part(self, cflag: int, part: memoryview) -> None:
        self._rec.write(_FRAME.pack(MAGIC, cflag << 29 | len(part)))
        self._rec.write(part)
        self._offset += _FRAME.size + len(part)

    def flush(self) -> None:
        """Flush both files to the operating system."""
        self._rec.flush()
        if self._idx is not None:
            self._idx.flush()

    def close(self) -> None:
        """Flush and close both files; closing twice is harmless."""
        self._rec.close()
        if self._idx is not None:
            self._idx.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RecordReader:
    """Memory-mapped reader of a ``.rec`` file with its ``.idx``.

    ``idx_path`` defaults to the ``.rec`` path with suffix ``.idx``; ``keys`` holds the
    index's keys in file order. Payloads are read-only memoryviews into the mapping (a
    record stored in several parts is joined into a new buffer); they stay valid after
    :meth:`close`, which then frees the mapping once the last of them is dropped.
    """

    def __init__(self, rec_path: PathLike, idx_path: PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = self.rec_path.with_suffix(".idx") if idx_path is None else Path(idx_path)
        if not self.idx_path.exists():
            raise FileNotFoundError(
                f"{self.idx_path}: index of {self.rec_path} not found: the dataset is "
                f"incomplete, or rebuild the index from data_tools.recordio.scan() offsets"
            )
        self._buf = _map(self.rec_path)
        self._view = memoryview(self._buf)
        self._offsets = self._load_index()
        self.keys: tuple[int, ...] = tuple(self._offsets)

    def _load_index(self) -> dict[int, int]:
        offsets: dict[int, int] = {}
        size = len(self._view)
        for lineno, (key, offset) in enumerate(read_index(self.idx_path), 1):
            if not 0 <= offset < size:
                raise ValueError(
                    f"{self.idx_path}: line {lineno}: key {key} at byte {offset} is beyond "
                    f"the end of {self.rec_path} ({size} bytes; truncated .rec or stale .idx?)"
                )
            offsets[key] = offset
        return offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def read(self, key: int) -> memoryview:
        """Payload of the record with ``key``."""
        try:
            offset = self._offsets[key]
        except KeyError:
            raise KeyError(f"{self.idx_path}: no key {key}") from None
        return _read_record(self._view, offset, self.rec_path)[0]

    def read_at(self, offset: int) -> tuple[memoryview, int]:
        """Payload of the record starting at byte ``offset`` and the next record's offset."""
        if offset < 0:
            raise ValueError(f"{self.rec_path}: negative offset {offset}")
        return _read_record(self._view, offset, self.rec_path)

    def __iter__(self) -> Iterator[tuple[int, memoryview]]:
        """``(offset, payload)`` of every record in file order, from the framing alone."""
        return _records(self._view, self.rec_path)

    def close(self) -> None:
        """Release the mapping (see the class docstring for payloads still held)."""
        self._view.release()
        _close(self._buf)

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def parse_index_line(line: bytes, name: PathLike, lineno: int) -> tuple[int, int]:
    """``(key, offset)`` of one ``.idx`` line; ValueError naming ``name`` and the line.

    The one definition of the line format, so every reader (and ``verify``, which goes
    on past a bad line to list them all) agrees on what a valid index is.
    """
    fields = line.split(b"\t")
    try:
        if len(fields) != 2:
            raise ValueError
        return int(fields[0]), int(fields[1])
    except ValueError:
        raise ValueError(
            f"{name}: line {lineno} is malformed: {line[:80].decode(errors='replace')!r} "
            "(expected '<integer key>\\t<byte offset>')"
        ) from None


def read_index(idx_path: PathLike) -> list[tuple[int, int]]:
    """``(key, offset)`` of every line of a ``.idx`` file, in file order.

    ValueError names the file and line of a malformed line or a duplicate key.
    """
    entries: list[tuple[int, int]] = []
    seen: dict[int, int] = {}
    for lineno, line in enumerate(Path(idx_path).read_bytes().splitlines(), 1):
        key, offset = parse_index_line(line, idx_path, lineno)
        if key in seen:
            raise ValueError(
                f"{idx_path}: line {lineno}: duplicate key {key} (already at byte {seen[key]})"
            )
        seen[key] = offset
        entries.append((key, offset))
    return entries


def count_index(idx_path: PathLike) -> int:
    """Records a ``.idx`` file lists (its lines), without parsing them: a cheap start-up
    check that a shard holds what its manifest says."""
    return len(Path(idx_path).read_bytes().splitlines())


def walk(path: PathLike) -> Iterator[tuple[int, memoryview]]:
    """``(offset, payload)`` of every record of a ``.rec`` file, from its framing alone.

    A framing error is a ValueError naming the file and byte. The file is mapped while
    the walk runs; close the generator (``contextlib.closing``) to stop early.
    """
    path = Path(path)
    buf = _map(path)
    try:
        with memoryview(buf) as view:
            yield from _records(view, path)
    finally:
        _close(buf)


def scan(path: PathLike) -> list[int]:
    """Byte offsets of every record in a ``.rec`` file, found by walking its framing.

    Checks the whole file's framing (not the payloads); an index with keys 0..n-1 is
    ``f"{key}\\t{offset}\\n"`` for each ``key, offset in enumerate(scan(path))``.
    """
    return [offset for offset, _ in walk(path)]


def _map(path: Path) -> mmap.mmap | bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""  # mmap cannot map an empty file
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _close(buf: mmap.mmap | bytes) -> None:
    if isinstance(buf, mmap.mmap):
        try:
            buf.close()
        except BufferError:
            pass  # payload views still alive: the mapping goes with the last of them


def _records(view: memoryview, path: Path) -> Iterator[tuple[int, memoryview]]:
    offset = 0
    while offset < len(view):
        payload, next_offset = _read_record(view, offset, path)
        yield offset, payload
        offset = next_offset


def _read_record(view: memoryview, start: int, path: Path) -> tuple[memoryview, int]:
    """Payload of the record at byte ``start`` of ``view`` and the offset after it."""
    size = len(view)
    parts: list[memoryview] = []
    pos = start
    while True:
        if pos + _FRAME.size > size:
            raise ValueError(
                f"{path}: record at byte {start} runs past the end of the file at byte "
                f"{size} (truncated file?)"
            )
        magic, lrecord = _FRAME.unpack_from(view, pos)
        if magic != MAGIC:
            hint = "truncated file?" if magic == 0 else "corrupt file, or not a record start?"
            raise ValueError(f"{path}: {_where(pos, start)} has bad magic 0x{magic:08x} ({hint})")
        cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
        allowed = (_MIDDLE, _LAST) if parts else (_WHOLE, _FIRST)
        if cflag not in allowed:
            raise ValueError(
                f"{path}: {_where(pos, start)} has continuation flag {cflag}, expected {allowed[0]} or "
                f"{allowed[1]} (flags out of order: corrupt file, or an offset inside a record?)"
            )
        data = pos + _FRAME.size
        pos = data + length + (-length % 4)
        if pos > size:
            raise ValueError(
                f"{path}: record at byte {start} claims {length} bytes from byte {data}, past "
                f"the end of the file at byte {size} (truncated file?)"
            )
        part = view[data : data + length]
        if cflag == _WHOLE:
            return part, pos
        parts.append(part)
        if cflag == _LAST:
            return memoryview(_MAGIC_BYTES.join(parts)), pos


def _where(pos: int, start: int) -> str:
    return f"record at byte {start}" if pos == start else f"part at byte {pos} of the record at byte {start}"
