"""`arcshard-data build SRC OUT`: an image folder or a list file -> training set.

SRC is either

* an image folder: one sub-folder per identity, class ids assigned by sorted folder
  name (``class_names`` in the manifest keeps the folder names); every non-hidden file
  below an identity folder is an image of it (sorted by path; non-images are rejected,
  not guessed from their extension; so is anything that is not a regular file, such as
  a FIFO, socket, device or broken symbolic link, which is never opened for reading).
  Folders whose names differ only in case (``Alice``, ``alice``) stay two identities,
  with a warning naming both; or
* a list file: one ``path<TAB>label`` line per image, ``label`` an integer class id >= 0,
  relative paths relative to the list file's folder (blank lines ignored).
  ``num_classes`` = largest label + 1; class names are ``str(class_id)``.

Images become ``size x size`` RGB JPEGs. An image that already is a ``size x size``
3-channel (YCbCr/RGB) JPEG is copied unchanged, after its whole entropy-coded stream is
decoded once (at 1/8 scale) to validate it. Anything else Pillow reads (PNG, GIF, PGM,
grayscale, CMYK, ...) is converted to RGB and, when not ``size x size``, made square by
``--fit`` (recorded in the manifest as ``fit``; :func:`data_tools.face.fit_image`, the
geometry the embedder serves faces with too):

* ``crop`` (default): shorter side to ``size``, centre crop; a 92x112 portrait loses its
  top and bottom 10 rows, a 320x243 photo 38 columns at each side;
* ``squash``: resized to ``size x size``, aspect ratio ignored (nothing lost, stretched);
* ``pad``: longer side to ``size``, aspect kept, centred between grey (128) bars; a
  320x243 photo becomes 112x85 with 13 grey rows above and 14 below.

It is then encoded with ``--quality``
(4:2:0 chroma subsampling, as Pillow does). A larger 3-channel JPEG is first decoded with
libjpeg-turbo DCT scaling by the smallest factor ``M/8`` (M = 1..8) that keeps both sides
``>= size`` (a 128x128 JPEG decodes straight to 112x112 at 7/8), and only what remains
is resized bilinearly; so resized JPEGs differ slightly from a full-size decode + bilinear
resize. JPEG decoding and encoding use simplejpeg (libjpeg-turbo); a JPEG it refuses
(corrupt or truncated, or a variant it cannot read) is handed to Pillow, which decides
whether to reject it, so the accepted set is Pillow's. Every step depends only on the
image, so the output does not depend on ``--workers``. EXIF orientation is not applied
(face datasets are aligned crops). See :mod:`data_tools.shards` for shuffling, sharding,
resume and rejects.
"""

from __future__ import annotations

import argparse
import logging
import operator
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from data_tools.face import FIT_MODES, fit_image
from data_tools.shards import (
    TOOL_VERSION,
    DatasetSpec,
    Rejected,
    add_writer_arguments,
    decode,
    fingerprint,
    open_encoded,
    shard_size_for,
    validate,
    write_dataset,
)

log = logging.getLogger(__name__)


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
    _warn_case_collisions(root, names)
    return Source(paths, labels, names)


def _warn_case_collisions(root: Path, names: list[str]) -> None:
    """Warn about identity folders that differ only in case: two identities, or one typed twice?"""
    by_folded: dict[str, list[str]] = {}
    for name in names:
        by_folded.setdefault(name.casefold(), []).append(name)
    for same in by_folded.values():
        if len(same) > 1:
            log.warning(
                "%s: identity folders %s differ only in case and become %d identities; "
                "merge them if they are one person", root, ", ".join(repr(n) for n in same), len(same),
            )


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


_SOI = b"\xff\xd8\xff"  # how Pillow recognises a JPEG


def encode_image(data: bytes, size: int, quality: int, fit: str = "crop") -> bytes:
    """``size x size`` RGB JPEG bytes for an encoded image, made square by ``fit`` (see the
    module docstring)."""
    if data[:3] == _SOI:
        encoded = _encode_jpeg(data, size, quality, fit)
        if encoded is not None:
            return encoded
    return _encode_with_pillow(data, size, quality, fit)


def _encode_jpeg(data: bytes, size: int, quality: int, fit: str) -> bytes | None:
    """The fast path for 3-channel JPEGs, or None to leave the image to Pillow."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "RGB") or width == 0 or height == 0:
        return None  # grayscale, CMYK, YCCK: Pillow converts them
    try:
        if (width, height) == (size, size):
            # strict: a truncated or corrupt stream raises instead of being patched up
            simplejpeg.decode_jpeg(data, min_height=1, min_width=1, strict=True)
            return data
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size, strict=True)
    except ValueError:
        return None  # Pillow decides: it rejects (with its reason) or accepts it
    h, w = pixels.shape[:2]
    if (w, h) != (size, size):
        pixels = np.asarray(fit_image(Image.fromarray(pixels, "RGB"), size, fit))
    return simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB", colorsubsampling="420")


def _encode_with_pillow(data: bytes, size: int, quality: int, fit: str) -> bytes:
    image = open_encoded(data)
    if image.format == "JPEG" and image.mode == "RGB" and image.size == (size, size):
        validate(image)
        return data
    if image.format == "JPEG":
        image.draft("RGB", (size, size))  # keeps both sides >= size
    decode(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = fit_image(image, size, fit)
    pixels = np.ascontiguousarray(np.asarray(image))
    return simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB", colorsubsampling="420")


@dataclass(frozen=True)
class ImageEncoder:
    """Processor for :func:`data_tools.shards.write_dataset`: ``(path, label)`` -> JPEG."""

    size: int
    quality: int
    fit: str = "crop"

    def __call__(self, item: tuple[str, int]) -> tuple[bytes, int]:
        path, label = item
        return encode_image(read_regular_file(path), self.size, self.quality, self.fit), label


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def read_regular_file(path: str) -> bytes:
    """The bytes of ``path`` if it is a regular file (after symlinks); else :class:`Rejected`.

    Opened non-blocking and checked with ``fstat`` before reading, so a FIFO (whose
    plain ``open`` waits forever for a writer) or a device is refused, not read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise Rejected(_unopenable(path, exc)) from None
    with os.fdopen(fd, "rb") as f:
        kind = _kind(os.fstat(f.fileno()).st_mode)
        if kind:
            raise Rejected(f"not a regular file ({kind})")
        try:
            return f.read()
        except OSError as exc:
            raise Rejected(f"unreadable file ({exc.strerror or exc})") from None


def _unopenable(path: str, exc: OSError) -> str:
    """Why ``path`` could not be opened: a broken link, a socket, or the OS's reason."""
    if os.path.islink(path) and not os.path.exists(path):
        return "not a regular file (a broken symbolic link)"
    try:
        kind = _kind(os.stat(path).st_mode)
    except OSError:
        kind = None
    return f"not a regular file ({kind})" if kind else f"unreadable file ({exc.strerror or exc})"


def _kind(mode: int) -> str | None:
    """What a non-regular file is ("a FIFO", ...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _NOT_REGULAR if test(mode)), "an unknown kind of file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("src", type=Path, help="image folder (one sub-folder per identity) or list file")
    parser.add_argument("out", type=Path, help="output dataset directory (must not exist, see --force)")
    add_writer_arguments(parser)
    parser.add_argument("--size", type=int, default=112, help="output side in pixels (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    add_fit_argument(parser, default="crop", default_text="crop; recorded in the manifest as fit")


def add_fit_argument(parser: argparse.ArgumentParser, default: str | None, default_text: str) -> None:
    """``--fit crop|squash|pad`` (shared with ``make-pairs``), each explained with an example;
    ``default_text`` says what the default is."""
    parser.add_argument(
        "--fit", choices=FIT_MODES, default=default,
        help="how a photo that is not SIZE x SIZE becomes square: crop = shorter side to SIZE, "
        "centre crop (a 320x243 photo loses 38 columns each side); "
        "squash = resized to SIZE x SIZE ignoring the aspect ratio (nothing lost, stretched); "
        "pad = longer side to SIZE, aspect kept, grey (128) bars (at SIZE 112 a 320x243 photo "
        f"becomes 112x85 between 13 and 14 grey rows); default: {default_text}",
    )


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.size <= 4096:
        raise ValueError(f"--size {args.size}: must be between 1 and 4096")
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality {args.quality}: must be between 1 and 100")
    source = read_source(args.src)
    items = list(zip(source.paths, source.labels))
    shard_size = shard_size_for(len(items), args.shard_size, args.shards)
    options = {"tool": TOOL_VERSION, "seed": args.seed, "shard_size": shard_size,
               "size": args.size, "quality": args.quality,
               "codec": "simplejpeg-dct-scale"}  # a .partial from the older Pillow-only code is not resumable
    if args.fit != "crop":
        options["fit"] = args.fit  # absent for crop: a .partial from before --fit (all crop) stays resumable
    write_dataset(DatasetSpec(
        out=args.out, items=items, describe=operator.itemgetter(0),
        processor=ImageEncoder(args.size, args.quality, args.fit), fit=args.fit,
        num_classes=len(source.class_names), class_names=source.class_names,
        image_size=(args.size, args.size), source=str(args.src.resolve()),
        fingerprint=fingerprint(options, [f"{p}\t{c}" for p, c in items]), seed=args.seed, shard_size=shard_size,
        workers=args.workers, max_reject=args.max_reject, resume=args.resume, force=args.force,
        progress=not args.quiet,
    ))
    return 0
