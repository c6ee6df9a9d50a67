"""`arcshard-data import-insightface REC_DIR OUT`: an insightface ``.rec`` -> training set.

REC_DIR holds insightface's ``train.rec``, ``train.idx`` and ``property``
(``num_classes,height,width``), as MS1MV3, Glint360K and WebFace42M ship. In that
layout (insightface ``recognition/common/rec_builder.py``, ``face2rec2.py``):

* record 0 is a header: ``flag > 0`` and ``label = (first_identity_record, end)``
  (``flag > 0`` is what arcface_torch's ``MXFaceDataset`` tests; ``end - first`` must be
  ``property``'s class count);
* records ``1 .. first_identity_record - 1`` are the images, label = class id (a float,
  or a tuple whose first element is the class id);
* records ``first_identity_record .. end - 1`` are one per identity, label = its
  ``(start, end)`` image record range.

Without such a header (record 0 is an image, ``flag == 0``), every record is an image.
Images are copied unchanged into our layout (shuffled, image records only, label =
class id; class names ``str(class_id)``), each decoded once to validate: undecodable
images, or images not of the ``property`` size, are rejected into ``rejected.tsv``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from data_tools.recordio import RecordReader, unpack
from data_tools.shards import (
    DatasetSpec, Rejected, TOOL_VERSION, add_writer_arguments, fingerprint, open_encoded,
    shard_size_for, validate, write_dataset,
)


@dataclass(frozen=True)
class InsightfaceDataset:
    rec: Path
    idx: Path
    image_keys: list[int]
    num_classes: int
    image_size: tuple[int, int]  # (height, width)


def read_layout(rec_dir: Path) -> InsightfaceDataset:
    rec, idx, prop = rec_dir / "train.rec", rec_dir / "train.idx", rec_dir / "property"
    for path in (rec, idx, prop):
        if not path.is_file():
            raise ValueError(f"{path}: missing; an insightface dataset folder has train.rec, train.idx and property")
    try:
        num_classes, height, width = (int(v) for v in prop.read_text(encoding="ascii").strip().split(","))
    except ValueError:
        raise ValueError(f"{prop}: expected 'num_classes,height,width', got {prop.read_text(errors='replace')[:80]!r}") from None
    with RecordReader(rec, idx) as reader:
        if 0 not in reader.keys:
            raise ValueError(f"{idx}: no record 0 (neither an insightface header nor an image)")
        header, _ = unpack(reader.read(0))
        if header.flag > 0:  # as arcface_torch's MXFaceDataset decides
            labels = tuple(int(v) for v in header.label)  # type: ignore[union-attr]
            first = labels[0]
            if first < 1:
                raise ValueError(f"{rec}: header record 0 has label {header.label}: the first identity "
                                 "record must be >= 1 (not an insightface dataset?)")
            if len(labels) > 1 and labels[1] - first not in (0, num_classes):
                raise ValueError(
                    f"{rec}: {labels[1] - first} identity records but {prop} says {num_classes} classes; "
                    "fix the property file"
                )
            present = set(reader.keys)
            missing = [k for k in range(1, first) if k not in present][:5]
            if missing:
                raise ValueError(f"{idx}: image records {missing} missing (header says 1..{first - 1}); stale .idx?")
            keys = list(range(1, first))
        else:
            keys = sorted(reader.keys)
    return InsightfaceDataset(rec, idx, keys, num_classes, (height, width))


_readers: dict[tuple[Path, Path], RecordReader] = {}


@dataclass(frozen=True)
class RecordValidator:
    """Processor for :func:`data_tools.shards.write_dataset`: record key -> (JPEG, class)."""

    rec: Path
    idx: Path
    image_size: tuple[int, int]  # (height, width)
    num_classes: int

    def __call__(self, key: int) -> tuple[bytes, int]:
        reader = _readers.get((self.rec, self.idx))
        if reader is None:  # one per process, opened on first use
            reader = _readers[(self.rec, self.idx)] = RecordReader(self.rec, self.idx)
        try:
            header, payload = unpack(reader.read(key))
        except ValueError as exc:
            raise Rejected(f"bad record ({exc})") from None
        label = header.label[0] if isinstance(header.label, tuple) else header.label
        if not (0 <= label < self.num_classes and label == int(label)):  # NaN fails the first test
            raise Rejected(f"label {label} is not a class id in [0, {self.num_classes})")
        width, height = validate(open_encoded(payload))
        if (height, width) != self.image_size:
            raise Rejected(f"image is {width}x{height}, property says "
                           f"{self.image_size[1]}x{self.image_size[0]}")
        return bytes(payload), int(label)


@dataclass(frozen=True)
class RecordName:
    """``train.rec#<key>``: how a record is named in ``rejected.tsv``."""

    rec: str

    def __call__(self, key: int) -> str:
        return f"{self.rec}#{key}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("rec_dir", type=Path, help="folder with train.rec, train.idx, property")
    parser.add_argument("out", type=Path, help="output dataset directory (must not exist, see --force)")
    add_writer_arguments(parser)


def run(args: argparse.Namespace) -> int:
    layout = read_layout(args.rec_dir)
    keys = layout.image_keys
    shard_size = shard_size_for(len(keys), args.shard_size, args.shards)
    options = {"tool": TOOL_VERSION, "seed": args.seed, "shard_size": shard_size, "source": [
        (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in (layout.rec, layout.idx)]}
    write_dataset(DatasetSpec(
        out=args.out, items=keys, describe=RecordName(str(layout.rec)),
        processor=RecordValidator(layout.rec, layout.idx, layout.image_size, layout.num_classes),
        num_classes=layout.num_classes, class_names=[str(c) for c in range(layout.num_classes)],
        image_size=layout.image_size, source=str(args.rec_dir.resolve()),
        fingerprint=fingerprint(options, []), seed=args.seed, shard_size=shard_size,
        workers=args.workers, max_reject=args.max_reject, resume=args.resume, force=args.force,
        progress=not args.quiet,
    ))
    return 0
