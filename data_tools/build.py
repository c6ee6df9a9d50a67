"""`arcshard-data build SRC OUT`: an image folder or a list file -> training set.

SRC is either

* an image folder: one sub-folder per identity, class ids assigned by sorted folder
  name (``class_names`` in the manifest keeps the folder names); every non-hidden file
  below an identity folder is an image of it (sorted by path; non-images are rejected,
  not guessed from their extension); or
* a list file: one ``path<TAB>label`` line per image, ``label`` an integer class id >= 0,
  relative paths relative to the list file's folder (blank lines ignored).
  ``num_classes`` = largest label + 1; class names are ``str(class_id)``.

Images become ``size x size`` RGB JPEGs. An image that already is a ``size x size`` RGB
JPEG is copied unchanged (decoded once to validate). Anything else Pillow reads (PNG,
GIF, PGM, grayscale, CMYK, ...) is converted to RGB and, when not ``size x size``,
resized so that its *shorter side* is ``size`` and then centre-cropped to a square
(bilinear, antialiased; aspect ratio kept, as face crops should be), then encoded with
``--quality``. JPEGs are decoded with ``draft()`` (DCT scaling) when they are at least
twice as large as needed. EXIF orientation is not applied (face datasets are aligned
crops). See :mod:`data_tools.shards` for shuffling, sharding, resume and rejects.
"""

from __future__ import annotations

import argparse
import io
import operator
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from data_tools.shards import (
    DatasetSpec, Rejected, TOOL_VERSION, add_writer_arguments, decode, fingerprint, open_encoded,
    shard_size_for, validate, write_dataset,
)


@dataclass(frozen=True)
class Source:
    """Images in source order with their class ids, and the class names."""

    paths: list[str]
    labels: list[int]
    class_names: list[str]


def list_image_folder(root: Path) -> Source:
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    for folder in folders:
        files = _files_under(os.path.join(root, folder))
        if not files:
            continue
        names.append(folder)
        paths += files
        labels += [len(names) - 1] * len(files)
    if not paths:
        raise ValueError(
            f"{root}: no images found; an image folder needs one sub-folder of images per identity"
        )
    return Source(paths, labels, names)


def _files_under(folder: str) -> list[str]:
    """Every non-hidden file below ``folder`` (hidden folders skipped), sorted."""
    found: list[str] = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, f) for f in files if not f.startswith(".")]
    return sorted(found)


def read_list_file(path: Path) -> Source:
    base = path.parent
    paths: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            try:
                if len(fields) != 2:
                    raise ValueError
                label = int(fields[1])
                if label < 0:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"{path}: line {lineno} is malformed: {line[:80]!r} "
                    f"(expected '<image path>\\t<class id >= 0>')"
                ) from None
            paths.append(str(base / fields[0]))
            labels.append(label)
    if not paths:
        raise ValueError(f"{path}: the list file names no images")
    return Source(paths, labels, [str(c) for c in range(max(labels) + 1)])


def read_source(src: Path) -> Source:
    if src.is_dir():
        return list_image_folder(src)
    if src.is_file():
        return read_list_file(src)
    raise ValueError(f"{src}: no such image folder or list file")


def encode_image(data: bytes, size: int, quality: int) -> bytes:
    """``size x size`` RGB JPEG bytes for an encoded image (see the module docstring)."""
    image = open_encoded(data)
    if image.format == "JPEG" and image.mode == "RGB" and image.size == (size, size):
        validate(image)
        return data
    if image.format == "JPEG":
        image.draft("RGB", (size, size))  # keeps both sides >= size
    decode(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@dataclass(frozen=True)
class ImageEncoder:
    """Processor for :func:`data_tools.shards.write_dataset`: ``(path, label)`` -> JPEG."""

    size: int
    quality: int

    def __call__(self, item: tuple[str, int]) -> tuple[bytes, int]:
        path, label = item
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise Rejected(f"unreadable file ({exc.strerror or exc})") from None
        return encode_image(data, self.size, self.quality), label


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("src", type=Path, help="image folder (one sub-folder per identity) or list file")
    parser.add_argument("out", type=Path, help="output dataset directory (must not exist, see --force)")
    add_writer_arguments(parser)
    parser.add_argument("--size", type=int, default=112, help="output side in pixels (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.size <= 4096:
        raise ValueError(f"--size {args.size}: must be between 1 and 4096")
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality {args.quality}: must be between 1 and 100")
    source = read_source(args.src)
    items = list(zip(source.paths, source.labels))
    shard_size = shard_size_for(len(items), args.shard_size, args.shards)
    options = {"tool": TOOL_VERSION, "seed": args.seed, "shard_size": shard_size,
               "size": args.size, "quality": args.quality}
    write_dataset(DatasetSpec(
        out=args.out, items=items, describe=operator.itemgetter(0), processor=ImageEncoder(args.size, args.quality),
        num_classes=len(source.class_names), class_names=source.class_names,
        image_size=(args.size, args.size), source=str(args.src.resolve()),
        fingerprint=fingerprint(options, [f"{p}\t{c}" for p, c in items]), seed=args.seed, shard_size=shard_size,
        workers=args.workers, max_reject=args.max_reject, resume=args.resume, force=args.force,
        progress=not args.quiet,
    ))
    return 0
