"""`manifest.json`: what a training set directory holds, and the checks that it does.

A training set is a directory with shards `train-00000.rec` + `train-00000.idx`, ...,
`manifest.json` and insightface's `property` (`num_classes,height,width`). The
manifest records, per shard, its file names, record count and the sha256 and size of
both files, so a trainer or `arcshard-data verify` can tell a complete, unmodified
dataset from a partial or damaged one without reading every record.

    {
      "format": "arcshard-recordio", "format_version": 1,
      "num_images": 5179510, "num_classes": 93431, "image_size": [112, 112],
      "shards": [{"rec": "train-00000.rec", "idx": "train-00000.idx", "num_records": 40000,
                  "rec_bytes": ..., "rec_sha256": "...", "idx_bytes": ..., "idx_sha256": "..."}],
      "class_names": ["id_0001", ...],      # class id -> source folder / identity name
      "source": "...", "tool_version": "0.1.0", "seed": 0,
      "fit": "crop"                         # how non-square photos became square
    }

`fit` is the `data_tools.face.FIT_MODES` geometry `arcshard-data build --fit` gave
photos that were not `size x size` (crop, squash or pad); the commands that prepare
faces for a model trained on the set take it from here. A manifest without it (made
before `--fit` existed, all crop) reads as "crop"; a dataset with no non-square photo
(an insightface import) says "crop" too, the default every command uses.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_tools.atomic import write_atomic
from data_tools.face import FIT_MODES
from data_tools.recordio import count_index

MANIFEST = "manifest.json"
PROPERTY = "property"
FORMAT = "arcshard-recordio"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    rec: str
    idx: str
    num_records: int
    rec_bytes: int
    rec_sha256: str
    idx_bytes: int
    idx_sha256: str


@dataclass
class Manifest:
    num_images: int
    num_classes: int
    image_size: tuple[int, int]
    shards: list[ShardInfo]
    class_names: list[str] = field(default_factory=list)
    source: str = ""
    tool_version: str = ""
    seed: int = 0
    fit: str = "crop"  # data_tools.face.FIT_MODES; absent in older manifests, which all cropped
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["image_size"] = list(self.image_size)
        return json.dumps(data, indent=1) + "\n"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_shard(directory: str | os.PathLike[str], rec: str, idx: str, num_records: int) -> ShardInfo:
    """ShardInfo for files already written in `directory` (hashes both files)."""
    d = Path(directory)
    return ShardInfo(
        rec=rec, idx=idx, num_records=num_records,
        rec_bytes=(d / rec).stat().st_size, rec_sha256=sha256_file(d / rec),
        idx_bytes=(d / idx).stat().st_size, idx_sha256=sha256_file(d / idx),
    )


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write manifest.json and insightface's `property` into `directory` (atomically)."""
    d = Path(directory)
    h, w = manifest.image_size
    for name, text in (
        (MANIFEST, manifest.to_json()),
        (PROPERTY, f"{manifest.num_classes},{h},{w}\n"),
    ):
        write_atomic(d / name, text)


def load_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and sanity-check `directory/manifest.json`; ValueError names file and fix."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{path}: no manifest: is {directory} a dataset made by `arcshard-data build` "
            "or `arcshard-data import-insightface`?"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({exc}); rebuild the dataset") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not an {FORMAT} manifest (format={found!r}); rebuild the dataset")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {data.get('format_version')} is not supported "
            f"(this arcshard reads {FORMAT_VERSION}); rebuild with this version's arcshard-data"
        )
    try:
        shards = [ShardInfo(**s) for s in data.pop("shards")]
        data["image_size"] = tuple(data["image_size"])
        manifest = Manifest(shards=shards, **data)
        if len(manifest.image_size) != 2 or not all(isinstance(v, int) for v in (
                manifest.num_images, manifest.num_classes, *manifest.image_size,
                *(s.num_records for s in shards))):
            raise TypeError("counts and image_size must be integers, image_size [height, width]")
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed manifest ({exc}); rebuild the dataset") from None
    if manifest.fit not in FIT_MODES:
        raise ValueError(
            f"{path}: fit {manifest.fit!r} is not one of {', '.join(FIT_MODES)} (how the build "
            "made non-square photos square); correct the field or rebuild with `arcshard-data build --fit`"
        )
    counted = sum(s.num_records for s in manifest.shards)
    if counted != manifest.num_images:
        raise ValueError(
            f"{path}: shards hold {counted} records but num_images is {manifest.num_images}"
        )
    if manifest.class_names and len(manifest.class_names) != manifest.num_classes:
        raise ValueError(
            f"{path}: {len(manifest.class_names)} class names for {manifest.num_classes} classes"
        )
    return manifest


def check_shard_files(directory: str | os.PathLike[str], manifest: Manifest) -> None:
    """Cheap check (no hashing): every shard file exists with the recorded size, and
    each `.idx` lists the manifest's record count (a manifest claiming 100 images of a
    32-record shard would otherwise train on a wrong count without a word)."""
    d = Path(directory)
    for shard in manifest.shards:
        for name, size in ((shard.rec, shard.rec_bytes), (shard.idx, shard.idx_bytes)):
            path = d / name
            if not path.is_file():
                raise ValueError(f"{path}: listed in {MANIFEST} but missing (incomplete copy?)")
            actual = path.stat().st_size
            if actual != size:
                raise ValueError(
                    f"{path}: {actual} bytes, {MANIFEST} says {size} (truncated or modified; "
                    "run `arcshard-data verify` and re-copy or rebuild it)"
                )
        indexed = count_index(d / shard.idx)
        if indexed != shard.num_records:
            raise ValueError(
                f"{d / shard.idx}: indexes {indexed} records, {MANIFEST} says {shard.num_records} "
                f"for {shard.rec}; run `arcshard-data verify {d}` and rebuild the dataset"
            )
