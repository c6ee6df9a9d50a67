"""Images per second of the RecordIO data path on this machine's CPUs.

    python benchmarks/data_throughput.py [--images 8000] [--batch 256] [--threads 2]

Writes `--images` 112x112 JPEGs (quality 95, renders of synthetic identities, so the
content is smooth like aligned faces) into a temporary 4-shard dataset, then times
one epoch of:

  (a) raw decode: Pillow decoding every payload in this process (no transform);
  (b) the DALI CPU pipeline (`trainer.data.dali`) with `--threads` threads, flip and
      normalise included (skipped when DALI is not installed);
  (c) the PyTorch fallback (`trainer.data.torch_loader`) with `--threads` workers.

Each loader first runs one warm-up epoch (pipeline build, worker start-up, page cache).
Targets on 2 cores: DALI >= 5,000 img/s, fallback >= 3,000 img/s.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from data_tools.manifest import Manifest, describe_shard, write_manifest
from data_tools.recordio import IRHeader, RecordReader, RecordWriter, pack, unpack
from trainer.data.recordio_source import dali_available
from trainer.data.synthetic import SyntheticIdentities
from trainer.data.torch_loader import TorchRecordIO

_CLASSES, _SHARDS, _CHUNK = 100, 4, 500


def write_dataset(directory: Path, num_images: int) -> tuple[list[Path], list[Path]]:
    """A `_SHARDS`-shard dataset of `num_images` JPEG renders in `directory`."""
    source = SyntheticIdentities(_CLASSES, _CHUNK, _CHUNK, 0, 1, seed=0)
    per_shard = -(-num_images // _SHARDS)
    writers = [RecordWriter(directory / f"train-{s:05d}.rec", directory / f"train-{s:05d}.idx")
               for s in range(_SHARDS)]
    counts = [0] * _SHARDS
    for start in range(0, num_images, _CHUNK):
        images, labels = source.batch(start // _CHUNK, 0)
        pixels = (images.permute(0, 2, 3, 1) * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
        for i in range(min(_CHUNK, num_images - start)):
            buf = io.BytesIO()
            Image.fromarray(pixels[i].numpy()).save(buf, format="JPEG", quality=95)
            shard = (start + i) // per_shard
            writers[shard].write(pack(IRHeader(0, float(labels[i]), start + i, 0), buf.getvalue()))
            counts[shard] += 1
    for w in writers:
        w.close()
    recs = [w.rec_path for w in writers]
    idxs = [w.idx_path for w in writers]
    shards = [describe_shard(directory, r.name, x.name, n) for r, x, n in zip(recs, idxs, counts)]
    write_manifest(directory, Manifest(num_images, _CLASSES, (112, 112), shards))
    return recs, idxs


def raw_decode(recs: list[Path], idxs: list[Path]) -> int:
    n = 0
    for rec, idx in zip(recs, idxs):
        with RecordReader(rec, idx) as reader:
            for key in reader.keys:
                with Image.open(io.BytesIO(unpack(reader.read(key))[1])) as image:
                    np.asarray(image.convert("RGB"))
                n += 1
    return n


def epoch(loader, number: int) -> int:
    return sum(len(labels) for _, labels in loader.epoch_batches(number))


def timed(name: str, run) -> None:
    start = time.perf_counter()
    n = run()
    seconds = time.perf_counter() - start
    print(f"{name:<34} {n:>6} images  {seconds:6.2f} s  {n / seconds:8.0f} img/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="arcshard-bench-") as tmp:
        recs, idxs = write_dataset(Path(tmp), args.images)
        raw_decode(recs, idxs)  # page cache
        timed("(a) raw Pillow decode, 1 process", lambda: raw_decode(recs, idxs))
        if dali_available():
            from trainer.data.dali import DaliRecordIO

            dali = DaliRecordIO(recs, idxs, args.images, _CLASSES, args.batch, 0, 1, 0,
                                torch.device("cpu"), threads=args.threads)
            epoch(dali, 0)
            timed(f"(b) DALI CPU, {args.threads} threads", lambda: epoch(dali, 1))
        else:
            print("(b) DALI: not installed (pip install -e '.[dali]')")
        fallback = TorchRecordIO(recs, idxs, _CLASSES, args.batch, 0, 1, 0, workers=args.threads)
        epoch(fallback, 0)
        timed(f"(c) PyTorch fallback, {args.threads} workers", lambda: epoch(fallback, 1))


if __name__ == "__main__":
    main()
