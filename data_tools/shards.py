"""Writing a training set: a shuffled list of source items -> shards + manifest.

One writer for every converter (`build` from images, `import-insightface` from a
``.rec``). A converter supplies the items in source order and a *processor*, a picklable
callable turning one item into ``(jpeg_bytes, class_id)`` or raising
:class:`Rejected`. :func:`write_dataset` then

* shuffles the items with ``random.Random(seed)`` (the order is a pure function of the
  seed and the item list), and cuts the shuffled list into shards of ``shard_size``
  *items*: shard ``i`` holds the accepted items among positions
  ``[i * shard_size, (i + 1) * shard_size)``, so a rejected image never moves another
  image to a different shard;
* runs the processor over the items, in-process (``workers == 1``) or in a
  ``multiprocessing.Pool`` with ``imap`` in chunks; results are consumed in input order,
  so the output bytes do not depend on the number of workers;
* writes image records only: ``IRHeader(flag=0, label=float(class_id), id=<running
  record index over the whole dataset>, id2=0)``, ``.idx`` key = index within the shard;
* writes into ``OUT.partial`` and renames it to ``OUT`` at the very end, so ``OUT`` is
  either absent (or the previous dataset, with ``force``) or complete. After every shard,
  ``OUT.partial/progress.json`` records the finished shards (sizes, hashes, rejects) with
  a fingerprint of the inputs and options; ``resume`` keeps those shards and redoes the
  rest, giving the same bytes as an uninterrupted run;
* lists rejected items in ``rejected.tsv`` (``name<TAB>reason``, in write order) and fails
  once more than ``max_reject`` (a fraction) of the items are rejected.

Test/drill hook: with the environment variable ``ARCSHARD_DRILL_STOP_AFTER=<n>`` set, the
writer stops with :class:`DrillStop` right after writing its ``n``-th record of the run
(normally in the middle of a shard), as a crash would, leaving ``OUT.partial`` behind.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from data_tools.atomic import write_atomic
from data_tools.manifest import Manifest, ShardInfo, describe_shard, write_manifest
from data_tools.recordio import IRHeader, RecordWriter, pack

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
REJECTED = "rejected.tsv"
DRILL_ENV = "ARCSHARD_DRILL_STOP_AFTER"
TOOL_VERSION = "0.1.0"

Processor = Callable[[Any], tuple[bytes, int]]


class Rejected(Exception):
    """An item that cannot go into the dataset; the message is the reason."""


class DrillStop(RuntimeError):
    """Raised by the ``ARCSHARD_DRILL_STOP_AFTER`` test/drill hook."""


def shard_name(index: int) -> tuple[str, str]:
    return f"train-{index:05d}.rec", f"train-{index:05d}.idx"


def shuffled(n: int, seed: int) -> list[int]:
    """Write order of ``n`` source items: a pure function of ``(n, seed)``."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def open_encoded(data: bytes | memoryview) -> Image.Image:
    """Opened (not yet decoded) image; :class:`Rejected` says why it cannot be."""
    if len(data) == 0:
        raise Rejected("empty file")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Rejected("not a readable image (unknown format)") from None
    except Exception as exc:  # Pillow raises many types for bad data
        raise Rejected(f"not a readable image ({type(exc).__name__}: {exc})") from None
    if image.width == 0 or image.height == 0:
        raise Rejected(f"empty image ({image.width}x{image.height})")
    return image


def decode(image: Image.Image) -> None:
    """``image.load()``, with decoding errors (truncated, corrupt) as :class:`Rejected`."""
    try:
        image.load()
    except Exception as exc:  # Pillow raises many types for bad data
        raise Rejected(f"not a readable image ({type(exc).__name__}: {exc})") from None


def validate(image: Image.Image) -> tuple[int, int]:
    """Decode a just-opened image to validate it and return its ``(width, height)``.

    A JPEG's whole entropy-coded stream is decoded, at 1/8 scale (``draft``: the inverse
    DCT of the high frequencies is skipped), which finds truncated or corrupt files at
    about half the cost of a full-size decode.
    """
    width, height = image.size
    if image.format == "JPEG":
        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
    decode(image)
    return width, height


@dataclass(frozen=True)
class DatasetSpec:
    """What to write and how; ``items`` are in source order, ``describe(item)`` names one
    in ``rejected.tsv``, ``fingerprint`` identifies the inputs and options for ``resume``."""

    out: Path
    items: Sequence[Any]
    describe: Callable[[Any], str]
    processor: Processor
    num_classes: int
    class_names: list[str]
    image_size: tuple[int, int]
    source: str
    fingerprint: str
    fit: str = "crop"  # recorded in the manifest: how the processor made photos square
    seed: int = 0
    shard_size: int = 10_000
    workers: int = 1
    max_reject: float = 0.01
    resume: bool = False
    force: bool = False
    progress: bool = True


def shard_size_for(num_items: int, shard_size: int | None, shards: int | None) -> int:
    """Items per shard from ``--shard-size`` or ``--shards`` (one of them, or neither)."""
    if shard_size is not None and shards is not None:
        raise ValueError("give --shard-size or --shards, not both")
    if shards is not None:
        if shards < 1:
            raise ValueError(f"--shards {shards}: must be at least 1")
        return max(1, math.ceil(num_items / shards))
    size = 10_000 if shard_size is None else shard_size
    if size < 1:
        raise ValueError(f"--shard-size {size}: must be at least 1")
    return size


def add_writer_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that writes a dataset."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--shard-size", type=int, help="images per shard (default 10000)")
    group.add_argument("--shards", type=int, help="number of shards (instead of --shard-size)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="decode/encode processes (default: CPU count); output does not depend on it")
    parser.add_argument("--max-reject", type=_fraction, default=0.01,
                        help="fail when more than this fraction of images is rejected, e.g. 0.01 or 1%% (default 1%%)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT (or discard OUT.partial)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def _fraction(text: str) -> float:
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a fraction in [0, 1] or a percentage")
    return value


def fingerprint(options: dict[str, object], lines: list[str]) -> str:
    """Identifies a run's inputs (``lines``) and options for ``--resume``."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    digest.update("\n".join(lines).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def write_dataset(spec: DatasetSpec) -> Manifest:
    """Write the dataset described by ``spec`` to ``spec.out``; see the module docstring.

    A full disk is a ValueError naming the output and its free space (the bare
    ``OSError`` of a buffered write names no file).
    """
    partial = spec.out.with_name(spec.out.name + ".partial")
    try:
        return _write_dataset(spec, partial)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = partial if partial.exists() else partial.parent
        free = shutil.disk_usage(where).free
        raise ValueError(
            f"{partial}: disk full while writing the dataset ({free / 2**20:,.1f} MiB free on its "
            "file system); free space or choose another OUT, then rerun with --resume"
        ) from None


def _write_dataset(spec: DatasetSpec, partial: Path) -> Manifest:
    out = spec.out
    n = len(spec.items)
    if n == 0:
        raise ValueError(f"{spec.source}: no images found; check the path")
    if out.exists() and not spec.force:
        raise ValueError(f"{out}: already exists; pass --force to replace it, or choose another OUT")
    done = _prepare_partial(partial, spec)

    order = shuffled(n, spec.seed)
    num_shards = math.ceil(n / spec.shard_size)
    shards: list[ShardInfo] = [ShardInfo(**{k: v for k, v in s.items() if k != "rejected"}) for s in done]
    rejected: list[tuple[str, str]] = [tuple(r) for s in done for r in s["rejected"]]  # type: ignore[misc]
    allowed = math.floor(spec.max_reject * n)
    next_id = sum(s.num_records for s in shards)
    first = len(shards) * spec.shard_size
    drill = int(os.environ.get(DRILL_ENV, "0"))
    written = 0
    progress = _Progress(n, first, enabled=spec.progress)

    with _results(spec, [order[i] for i in range(first, n)]) as results:
        for shard in range(len(shards), num_shards):
            rec, idx = shard_name(shard)
            shard_rejected: list[tuple[str, str]] = []
            count = 0
            with RecordWriter(partial / rec, partial / idx) as writer:
                for pos in range(shard * spec.shard_size, min((shard + 1) * spec.shard_size, n)):
                    result = next(results)
                    if isinstance(result, str):
                        shard_rejected.append((spec.describe(spec.items[order[pos]]), result))
                        if len(rejected) + len(shard_rejected) > allowed:
                            _write_rejected(partial, rejected + shard_rejected)
                            raise ValueError(
                                f"{spec.source}: more than {allowed} of {n} images rejected "
                                f"(--max-reject {spec.max_reject:g}); the reasons are in "
                                f"{partial / REJECTED}: fix the source or raise --max-reject"
                            )
                    else:
                        data, label = result
                        writer.write(pack(IRHeader(0, float(label), next_id, 0), data), count)
                        next_id += 1
                        count += 1
                        written += 1
                        if written == drill:
                            writer.flush()
                            raise DrillStop(f"{DRILL_ENV}={drill}: stopped after {drill} records")
                    progress.step()
            shards.append(describe_shard(partial, rec, idx, count))
            rejected += shard_rejected
            done.append({**asdict(shards[-1]), "rejected": shard_rejected})
            _save_progress(partial, spec.fingerprint, done)
    progress.close()
    return _finish(spec, partial, shards, rejected)


def _finish(spec: DatasetSpec, partial: Path, shards: list[ShardInfo], rejected: list[tuple[str, str]]) -> Manifest:
    """Manifest and rejects into ``partial``, then publish it as ``spec.out``."""
    num_images = sum(s.num_records for s in shards)
    manifest = Manifest(
        num_images=num_images, num_classes=spec.num_classes, image_size=spec.image_size,
        shards=shards, class_names=spec.class_names, source=spec.source,
        tool_version=TOOL_VERSION, seed=spec.seed, fit=spec.fit,
    )
    _write_rejected(partial, rejected)
    write_manifest(partial, manifest)
    (partial / PROGRESS).unlink()
    _publish(partial, spec.out)
    if rejected:
        log.warning("%d of %d images rejected, listed in %s", len(rejected), len(spec.items), spec.out / REJECTED)
    log.info("wrote %d images of %d classes in %d shards to %s", num_images, spec.num_classes, len(shards), spec.out)
    return manifest


def _prepare_partial(partial: Path, spec: DatasetSpec) -> list[dict[str, Any]]:
    """Make ``partial`` ready and return the shards already finished there (resume)."""
    if partial.exists():
        if spec.resume:
            done = _load_progress(partial, spec.fingerprint)
            log.info("resuming %s: %d finished shards kept", partial, len(done))
            return done
        if not spec.force:
            raise ValueError(
                f"{partial}: left by an interrupted run; pass --resume to continue it "
                f"or --force to start over"
            )
        shutil.rmtree(partial)
    elif spec.resume:
        log.info("nothing to resume at %s; starting from scratch", partial)
    partial.mkdir(parents=True)
    _save_progress(partial, spec.fingerprint, [])
    return []


def _load_progress(partial: Path, fingerprint: str) -> list[dict[str, Any]]:
    path = partial / PROGRESS
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        done = state["shards"]
        same = state["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: cannot resume ({exc}); pass --force to start over") from None
    if not same:
        raise ValueError(
            f"{path}: the interrupted run had other inputs or options (source, seed, shard size, "
            f"image size, quality, fit); repeat its command line, or pass --force without --resume to start over"
        )
    for shard in done:
        for name, size in ((shard["rec"], shard["rec_bytes"]), (shard["idx"], shard["idx_bytes"])):
            if not (partial / name).is_file() or (partial / name).stat().st_size != size:
                raise ValueError(f"{partial / name}: finished shard is missing or changed; pass --force to start over")
    return done


def _save_progress(partial: Path, fingerprint: str, done: list[dict[str, Any]]) -> None:
    write_atomic(partial / PROGRESS, json.dumps({"fingerprint": fingerprint, "shards": done}))


def _write_rejected(directory: Path, rejected: list[tuple[str, str]]) -> None:
    path = directory / REJECTED
    if not rejected:
        path.unlink(missing_ok=True)
        return
    lines = [f"{name}\t{' '.join(reason.split())}\n" for name, reason in rejected]
    write_atomic(path, "path\treason\n" + "".join(lines))


def _publish(partial: Path, out: Path) -> None:
    """Rename ``partial`` to ``out``; an existing ``out`` (force) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.rename(out, old)
    os.rename(partial, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


# --- running the processor ------------------------------------------------------------

_worker_processor: Processor | None = None


def _init_worker(processor: Processor) -> None:
    global _worker_processor
    _worker_processor = processor


def _call(processor: Processor, item: Any) -> tuple[bytes, int] | str:
    try:
        return processor(item)
    except Rejected as exc:
        return str(exc)


def _call_in_worker(item: Any) -> tuple[bytes, int] | str:
    assert _worker_processor is not None
    return _call(_worker_processor, item)


class _results:
    """Context manager yielding an iterator of processor results for ``indices`` in order."""

    def __init__(self, spec: DatasetSpec, indices: list[int]) -> None:
        self._spec = spec
        self._items = [spec.items[i] for i in indices]
        self._pool: Any = None

    def __enter__(self) -> Iterator[tuple[bytes, int] | str]:
        workers = self._spec.workers
        if workers <= 1:
            processor = self._spec.processor
            return (_call(processor, item) for item in self._items)
        self._pool = multiprocessing.Pool(workers, _init_worker, (self._spec.processor,))
        chunk = max(1, min(256, len(self._items) // (workers * 16)))
        return self._pool.imap(_call_in_worker, self._items, chunksize=chunk)

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()


class _Progress:
    """images/s and ETA on stderr: tqdm when installed, else a plain line every ~2 s."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar: Any = None
        self._enabled = enabled
        self._total, self._n, self._start_n = total, initial, initial
        self._start = self._last = time.monotonic()
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, unit="img", smoothing=0.1, file=sys.stderr)

    def step(self) -> None:
        self._n += 1
        if self._bar is not None:
            self._bar.update()
        elif self._enabled and (now := time.monotonic()) - self._last >= 2.0:
            self._last = now
            self._print(now)

    def _print(self, now: float) -> None:
        rate = (self._n - self._start_n) / max(now - self._start, 1e-9)
        eta = (self._total - self._n) / rate if rate else float("inf")
        print(f"{self._n}/{self._total} images ({100 * self._n / self._total:.0f}%), "
              f"{rate:,.0f} images/s, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            self._print(time.monotonic())
