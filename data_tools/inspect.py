"""`arcshard-data inspect DIR`: what a training set holds, and a contact sheet of samples.

Prints the manifest's counts (images, classes, shards with record counts and sizes),
images per class (min / median / max, from every record's IRHeader; only the headers
are read, through the ``.idx``), the image size, and a few decoded sample records;
writes a PNG contact sheet of ``--samples`` random records with their labels drawn
(``--out``, default ``DIR/inspect.png``). Use ``arcshard-data verify`` to check the
data; inspect trusts the framing and index.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from data_tools.manifest import ShardInfo, load_manifest
from data_tools.recordio import RecordReader, unpack
from data_tools.shards import Rejected, decode, open_encoded

log = logging.getLogger(__name__)

PRINTED_SAMPLES = 5  # sample records described in text; all go on the contact sheet
CAPTION_HEIGHT = 14  # pixels under each tile for its label


@dataclass(frozen=True)
class Sample:
    shard: str
    index: int  # record position in the shard
    label: int
    class_name: str
    image: Image.Image  # decoded RGB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="dataset directory (with manifest.json)")
    parser.add_argument(
        "--samples", type=int, default=16, help="records on the contact sheet (default 16)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="contact sheet PNG (default PATH/inspect.png)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for picking samples (default 0)")


def run(args: argparse.Namespace) -> int:
    if args.samples < 1:
        raise ValueError(f"--samples {args.samples}: must be at least 1")
    directory: Path = args.path
    manifest = load_manifest(directory)
    out = args.out if args.out is not None else directory / "inspect.png"
    h, w = manifest.image_size

    print(f"dataset     {directory}")
    print(f"images      {manifest.num_images}")
    print(f"classes     {manifest.num_classes}")
    print(f"image size  {h}x{w} (HxW), fit {manifest.fit}")
    total_bytes = sum(s.rec_bytes + s.idx_bytes for s in manifest.shards)
    print(f"shards      {len(manifest.shards)}, {_size(total_bytes)} in all")
    for s in manifest.shards:
        print(f"  {s.rec:<24} {s.num_records:>10} records  {_size(s.rec_bytes):>10}  (+ {s.idx} {_size(s.idx_bytes)})")

    counts = class_counts(directory, manifest.shards, manifest.num_classes)
    present = [c for c in counts if c]
    if present:
        print(
            f"per class   min {min(present)}, median {statistics.median(present):g}, "
            f"max {max(present)} images ({len(present)} of {manifest.num_classes} classes present)"
        )
    if len(present) < manifest.num_classes:
        print(f"            {manifest.num_classes - len(present)} classes have no images")

    samples = pick_samples(directory, manifest.shards, manifest.class_names, args.samples, args.seed)
    print("samples")
    for s in samples[:PRINTED_SAMPLES]:
        print(
            f"  {s.shard} record {s.index}: label {s.label} ({s.class_name or '-'}), "
            f"decoded {s.image.height}x{s.image.width} {s.image.mode}"
        )
    contact_sheet(samples).save(out, format="PNG")
    print(f"contact sheet of {len(samples)} samples: {out}")
    return 0


def class_counts(directory: Path, shards: list[ShardInfo], num_classes: int) -> list[int]:
    """Images per class id, from every record's IRHeader (reads only the headers)."""
    counts = [0] * num_classes
    last_log = time.monotonic()
    seen = 0
    for shard in shards:
        with RecordReader(directory / shard.rec, directory / shard.idx) as reader:
            for key in reader.keys:
                label = int(unpack(reader.read(key))[0].label)
                if not 0 <= label < num_classes:
                    raise ValueError(
                        f"{directory / shard.rec}: record with key {key} has label {label} outside "
                        f"[0, {num_classes}); run `arcshard-data verify {directory}`"
                    )
                counts[label] += 1
                seen += 1
                if time.monotonic() - last_log > 10:
                    last_log = time.monotonic()
                    log.info("inspect: %d records counted", seen)
    return counts


def pick_samples(
    directory: Path, shards: list[ShardInfo], class_names: list[str], n: int, seed: int
) -> list[Sample]:
    """``n`` records chosen at random (seeded) over all shards, decoded to RGB."""
    total = sum(s.num_records for s in shards)
    chosen = sorted(random.Random(seed).sample(range(total), min(n, total)))
    samples: list[Sample] = []
    base = 0
    for shard in shards:
        mine = [i - base for i in chosen if base <= i < base + shard.num_records]
        base += shard.num_records
        if not mine:
            continue
        with RecordReader(directory / shard.rec, directory / shard.idx) as reader:
            for index in mine:
                header, payload = unpack(reader.read(reader.keys[index]))
                label = int(header.label)
                try:
                    image = open_encoded(payload)
                    decode(image)
                    image = image.convert("RGB")
                except Rejected as exc:
                    raise ValueError(
                        f"{directory / shard.rec}: record {index} does not decode ({exc}); "
                        f"run `arcshard-data verify {directory}`"
                    ) from None
                name = class_names[label] if 0 <= label < len(class_names) else ""
                samples.append(Sample(shard.rec, index, label, name, image))
    return samples


def contact_sheet(samples: list[Sample]) -> Image.Image:
    """A grid of the samples, each captioned with its label and class name."""
    tile_w = max(s.image.width for s in samples)
    tile_h = max(s.image.height for s in samples) + CAPTION_HEIGHT
    cols = math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / cols)
    sheet = Image.new("RGB", (cols * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, s in enumerate(samples):
        x, y = (i % cols) * tile_w, (i // cols) * tile_h
        sheet.paste(s.image, (x, y))
        caption = f"{s.label} {s.class_name}".strip()
        while len(caption) > 1 and draw.textlength(caption, font=font) > tile_w - 2:
            caption = caption[:-1]
        draw.text((x + 1, y + s.image.height + 1), caption, fill="black", font=font)
    return sheet


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
