"""`arcshard-data verify DIR`: check every byte of a training set against its manifest.

Per shard: both files exist with the manifest's sizes and sha256; the ``.rec`` framing
walks cleanly to the end of the file; every record has a single-label IRHeader (flag 0)
whose label is an integer in ``[0, num_classes)``, and an image of the manifest's
``image_size`` that decodes (:func:`data_tools.shards.validate` decodes the whole
stream, so it catches truncated JPEGs that Pillow's ``verify()`` lets through); the
``.idx`` lists exactly the framing's record offsets, in order, with unique integer keys;
the record count equals the manifest's. Also checks insightface's ``property`` file
against the manifest.

Each problem names the file, the record and its byte offset where there is one::

    train-00003.rec: record 17 at byte 81920: label 93431 outside [0, 93431)

Exit status 0 with a one-line summary when all is well, 1 with the first
``--max-errors`` problems otherwise. ``--workers N`` checks N shards at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.manifest import (
    MANIFEST,
    PROPERTY,
    Manifest,
    ShardInfo,
    load_manifest,
    sha256_file,
)
from data_tools.recordio import parse_index_line, unpack, walk
from data_tools.shards import Rejected, open_encoded, validate

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
Problem = Callable[[str], None]  # records one problem; raises _Full past max_errors


@dataclass
class ShardReport:
    """What checking one shard found: its problems (at most ``max_errors``) and records read."""

    rec: str
    records: int = 0
    problems: list[str] = field(default_factory=list)
    truncated: bool = False  # more problems than max_errors; the rest were not listed


@dataclass
class Report:
    directory: Path
    num_shards: int
    num_records: int
    problems: list[str]
    more: bool  # problems beyond the listed ones exist


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="dataset directory (with manifest.json)")
    parser.add_argument(
        "--max-errors", type=int, default=20, help="list at most this many problems (default 20)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="check this many shards in parallel (default 1)"
    )


def run(args: argparse.Namespace) -> int:
    if args.max_errors < 1:
        raise ValueError(f"--max-errors {args.max_errors}: must be at least 1")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be at least 1")
    start = time.monotonic()
    report = verify_dataset(args.path, max_errors=args.max_errors, workers=args.workers)
    elapsed = time.monotonic() - start
    if not report.problems:
        print(
            f"OK {report.directory}: {report.num_shards} shards, {report.num_records} records "
            f"verified in {elapsed:.1f} s"
        )
        return 0
    print(f"FAILED {report.directory}: {len(report.problems)}{'+' if report.more else ''} problem(s)")
    for problem in report.problems:
        print(f"  {problem}")
    if report.more:
        print("  ... more problems not listed (raise --max-errors to see them)")
    print(
        "Fix: re-copy the damaged files from the source, or rebuild the dataset with "
        "`arcshard-data build`."
    )
    return 1


def verify_dataset(directory: str | Path, max_errors: int = 20, workers: int = 1) -> Report:
    """Check every shard of the dataset in ``directory``; ValueError if its manifest is unusable."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems = _check_property(directory, manifest)
    total = manifest.num_images
    jobs = [(directory, s, manifest.num_classes, tuple(manifest.image_size), max_errors) for s in manifest.shards]
    reports: list[ShardReport] = []
    done_records = 0

    def progress(r: ShardReport) -> None:
        nonlocal done_records
        done_records += r.records
        log.info(
            "verify: %d/%d shards, %d/%d records checked (%s: %s)",
            len(reports), len(jobs), done_records, total, r.rec,
            "ok" if not r.problems else f"{len(r.problems)} problem(s)",
        )

    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            reports.append(check_shard(*job))
            progress(reports[-1])
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            for r in pool.map(check_shard, *zip(*jobs)):  # in shard order, as they finish
                reports.append(r)
                progress(r)
    more = False
    for r in reports:
        problems.extend(r.problems)
        more = more or r.truncated
    if len(problems) > max_errors:
        problems, more = problems[:max_errors], True
    return Report(directory, len(jobs), sum(r.records for r in reports), problems, more)


def _check_property(directory: Path, manifest: Manifest) -> list[str]:
    path = directory / PROPERTY
    h, w = manifest.image_size
    expected = f"{manifest.num_classes},{h},{w}"
    if not path.is_file():
        return [f"{PROPERTY}: missing (insightface readers need it; it should hold '{expected}')"]
    actual = path.read_text(encoding="ascii", errors="replace").strip()
    if actual != expected:
        return [f"{PROPERTY}: holds {actual!r}, but {MANIFEST} implies {expected!r}"]
    return []


class _Full(Exception):
    """Raised inside a shard check once max_errors problems are collected."""


def check_shard(
    directory: Path, shard: ShardInfo, num_classes: int, image_size: tuple[int, int], max_errors: int
) -> ShardReport:
    """Check one shard's ``.rec`` and ``.idx`` (see the module docstring)."""
    report = ShardReport(shard.rec)

    def problem(text: str) -> None:
        if len(report.problems) >= max_errors:
            report.truncated = True
            raise _Full
        report.problems.append(text)

    try:
        _check_shard(directory, shard, num_classes, image_size, report, problem)
    except _Full:
        pass
    return report


def _check_shard(
    directory: Path, shard: ShardInfo, num_classes: int, image_size: tuple[int, int],
    report: ShardReport, problem: Problem,
) -> None:
    rec_path, idx_path = directory / shard.rec, directory / shard.idx
    rec_ok = _check_file(rec_path, shard.rec, shard.rec_bytes, shard.rec_sha256, problem)
    idx_ok = _check_file(idx_path, shard.idx, shard.idx_bytes, shard.idx_sha256, problem)
    if rec_ok is None:
        return  # .rec missing: nothing more to check
    offsets, framing_ok = _check_records(rec_path, shard.rec, num_classes, image_size, report, problem)
    if framing_ok and len(offsets) != shard.num_records:
        problem(
            f"{shard.rec}: {len(offsets)} records, {MANIFEST} says {shard.num_records} "
            "(truncated or modified file)"
        )
    if idx_ok is not None:
        _check_index(idx_path, shard.idx, shard.rec, offsets, framing_ok, problem)


def _check_file(path: Path, name: str, size: int, sha256: str, problem: Problem) -> bool | None:
    """Existence, size and sha256 of one shard file; None when it is missing."""
    if not path.is_file():
        problem(f"{name}: listed in {MANIFEST} but missing (incomplete copy?)")
        return None
    actual = path.stat().st_size
    if actual != size:
        problem(f"{name}: {actual} bytes, {MANIFEST} says {size} (truncated or modified file)")
        return False
    digest = sha256_file(path)
    if digest != sha256:
        problem(
            f"{name}: sha256 {digest[:16]}... differs from {MANIFEST}'s {sha256[:16]}... "
            "(same size: bytes were modified in place, e.g. a bit flip on disk or in transfer)"
        )
        return False
    return True


def _check_records(
    rec_path: Path, name: str, num_classes: int, image_size: tuple[int, int],
    report: ShardReport, problem: Problem,
) -> tuple[list[int], bool]:
    """Walk the framing and check each record; returns offsets and whether framing was clean."""
    offsets: list[int] = []
    last_log = time.monotonic()
    with contextlib.closing(walk(rec_path)) as records:
        while True:
            index = len(offsets)
            try:
                offset, payload = next(records)
            except StopIteration:
                return offsets, True
            except ValueError as exc:
                text = str(exc).removeprefix(f"{rec_path}: ").replace(
                    "record at byte", f"record {index} at byte", 1
                )
                more = "" if index == 0 else f"; records 0-{index - 1} were read"
                problem(f"{name}: {text} (framing stops here{more})")
                return offsets, False
            offsets.append(offset)
            report.records += 1
            what = check_record(payload, num_classes, image_size)
            del payload
            if what:
                problem(f"{name}: record {index} at byte {offset}: {what}")
            if time.monotonic() - last_log > PROGRESS_EVERY_S:
                last_log = time.monotonic()
                log.info("verify: %s: %d records checked", name, len(offsets))


def check_record(payload: bytes | memoryview, num_classes: int, image_size: tuple[int, int]) -> str | None:
    """What is wrong with one record's payload (header, label, image), or None; the
    DALI loader asks this to name the record its pipeline failed on."""
    try:
        header, image = unpack(payload)
    except ValueError as exc:
        return str(exc)
    if header.flag != 0:
        return (
            f"IRHeader flag {header.flag} (a {header.flag}-label header): arcshard records "
            "carry one class label with flag 0 (an insightface header/identity record?)"
        )
    label = header.label
    if not (math.isfinite(label) and label == int(label)):
        return f"label {label!r} is not an integer class id"
    if not 0 <= label < num_classes:
        return f"label {int(label)} outside [0, {num_classes})"
    try:
        # decodes the whole stream (Image.verify() would pass truncated JPEGs)
        width, height = validate(open_encoded(image))
    except Rejected as exc:
        return f"image ({len(image)} bytes): {exc}"
    size = (height, width)
    if size != image_size:
        return f"image is {size[0]}x{size[1]} (HxW), {MANIFEST} says {image_size[0]}x{image_size[1]}"
    return None


def _check_index(
    idx_path: Path, name: str, rec_name: str, offsets: list[int], framing_ok: bool, problem: Problem
) -> None:
    """The .idx lists the framing's offsets in order with unique integer keys."""
    keys: set[int] = set()
    lines = idx_path.read_bytes().splitlines()
    for lineno, line in enumerate(lines, 1):
        try:
            key, offset = parse_index_line(line, name, lineno)
        except ValueError as exc:
            problem(str(exc))
            continue
        if key in keys:
            problem(f"{name}: line {lineno}: duplicate key {key}")
        keys.add(key)
        record = lineno - 1
        if record < len(offsets):
            if offset != offsets[record]:
                problem(
                    f"{name}: line {lineno}: key {key} at byte {offset}, but record {record} of "
                    f"{rec_name} starts at byte {offsets[record]} (stale or corrupt index)"
                )
        elif framing_ok:
            problem(
                f"{name}: line {lineno}: key {key} at byte {offset}, but {rec_name} has only "
                f"{len(offsets)} records (stale index?)"
            )
    if len(lines) < len(offsets):
        missing = len(lines)
        problem(
            f"{name}: {len(lines)} lines for {len(offsets)} records: record {missing} at byte "
            f"{offsets[missing]} of {rec_name} and later ones are not indexed (truncated index; "
            "rebuild it from data_tools.recordio.scan() offsets)"
        )
