"""`arcshard-data make-pairs SRC OUT.bin --pairs N`: a verification set in insightface's format.

SRC is an image folder, one sub-folder per identity (any image Pillow reads: JPEG, PNG,
grayscale GIF, ...). Every identity there is treated as held out from training: pass a
folder of identities the model never saw, narrow it with ``--identities a,b,c``, or
drop those a training set holds with ``--exclude-from DATASET_DIR`` (its manifest's
``class_names``, which are the source folder names).

The output is what insightface's ``lfw.bin``/``cfp_fp.bin``/``agedb_30.bin`` hold: a
pickle of ``(bins, issame_list)``. ``bins`` is a list of ``2 * N`` JPEG-encoded images
(``bytes``), the two images of pair ``i`` at ``bins[2*i]`` and ``bins[2*i+1]``;
``issame_list`` is a list of ``N`` bools. insightface's ``eval/verification.py`` loads
it with ``pickle.load(f, encoding='bytes')`` (their files were pickled by Python 2, whose
``str`` becomes ``bytes`` that way) and decodes each image; we write pickle protocol 4
(Python >= 3.4) with ``bytes`` objects, which that call and a plain ``pickle.load(f)``
read alike. Identities and their images are listed, and images converted to
``--size`` x ``--size`` RGB JPEGs, exactly as ``arcshard-data build`` does for training
(:func:`data_tools.build.list_image_folder`, :func:`data_tools.build.encode_image`),
with the same ``--fit`` geometry. A model should be verified on faces shaped as it was
trained, so with ``--exclude-from`` and no ``--fit`` the training set's manifest ``fit``
is used (and printed); without either, ``crop``. A ``--fit`` that differs from the
training set's is used, with a warning.

The pairs are N/2 genuine (two images of one identity) and N/2 impostor (images of two
identities), all distinct, spread as evenly as possible over identities, seeded
(``--seed``), and interleaved genuine/impostor so that every contiguous fold of the
10-fold evaluation (insightface splits without shuffling) is balanced.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import random
from pathlib import Path

from data_tools.atomic import write_atomic_with
from data_tools.build import (
    add_fit_argument,
    encode_image,
    list_image_folder,
    read_regular_file,
)
from data_tools.face import check_fit
from data_tools.manifest import MANIFEST, load_manifest
from data_tools.shards import Rejected

log = logging.getLogger(__name__)

PICKLE_PROTOCOL = 4
Pair = tuple[Path, Path]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="image folder: one sub-folder of images per identity")
    parser.add_argument("out", type=Path, help="output .bin file")
    parser.add_argument("--pairs", type=int, required=True, help="number of pairs N (even)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=112, help="square image side in pixels (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default 95)")
    parser.add_argument(
        "--identities", default=None,
        help="comma-separated sub-folder names to use (default: all of SRC's sub-folders)",
    )
    parser.add_argument(
        "--exclude-from", type=Path, default=None, metavar="DATASET_DIR",
        help="skip identities that appear in this training set's manifest class_names "
        "(and take its fit unless --fit is given)",
    )
    add_fit_argument(parser, default=None, default_text="the fit of the --exclude-from training set, else crop")


def run(args: argparse.Namespace) -> int:
    identities = None if args.identities is None else [n for n in args.identities.split(",") if n]
    fit, fit_source = pairs_fit(args.fit, args.exclude_from)
    bins, issame = make_pairs(
        args.src, args.pairs, seed=args.seed, size=args.size, quality=args.quality,
        identities=identities, exclude_from=args.exclude_from, fit=fit,
    )
    write_bin(args.out, bins, issame)
    print(
        f"{args.out}: {len(issame)} pairs ({sum(issame)} genuine, {len(issame) - sum(issame)} "
        f"impostor), {args.size}x{args.size} JPEG, fit {fit} ({fit_source})"
    )
    return 0


def pairs_fit(fit: str | None, exclude_from: Path | None) -> tuple[str, str]:
    """(fit, where it came from): ``--fit``, else the ``--exclude-from`` training set's
    manifest, else crop (see the module docstring)."""
    trained = None if exclude_from is None else load_manifest(exclude_from).fit
    if fit is None:
        if trained is None:
            return "crop", "default"
        return trained, f"from {exclude_from / MANIFEST}"
    if trained is not None and trained != fit:
        log.warning("make-pairs: --fit %s, but the training set %s was built with fit %s; "
                    "the model will see faces shaped unlike its training images", fit, exclude_from, trained)
    return fit, "--fit"


def make_pairs(
    src: Path,
    num_pairs: int,
    *,
    seed: int = 0,
    size: int = 112,
    quality: int = 95,
    identities: list[str] | None = None,
    exclude_from: Path | None = None,
    fit: str = "crop",
) -> tuple[list[bytes], list[bool]]:
    """``(bins, issame_list)`` for ``num_pairs`` pairs drawn from the image folder ``src``,
    images made square by ``fit`` (``data_tools.face.FIT_MODES``)."""
    if num_pairs < 2 or num_pairs % 2:
        raise ValueError(f"--pairs {num_pairs}: must be a positive even number (half genuine, half impostor)")
    if size < 1:
        raise ValueError(f"--size {size}: must be a positive number of pixels")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality {quality}: must be in 1..100")
    check_fit(fit)
    folders = list_identities(src, identities, exclude_from)
    rng = random.Random(seed)
    half = num_pairs // 2
    genuine = genuine_pairs(folders, half, rng, src)
    impostor = impostor_pairs(folders, half, rng, src)
    pairs: list[tuple[Pair, bool]] = []
    for g, i in zip(genuine, impostor):
        pairs += [(g, True), (i, False)]
    cache: dict[Path, bytes] = {}
    bins: list[bytes] = []
    for (a, b), _ in pairs:
        for path in (a, b):
            if path not in cache:
                cache[path] = encode(path, size, quality, fit)
            bins.append(cache[path])
    return bins, [same for _, same in pairs]


def write_bin(out: Path, bins: list[bytes], issame: list[bool]) -> None:
    """Pickle ``(bins, issame_list)`` as insightface's verification sets are stored."""
    write_atomic_with(out, lambda f: pickle.dump((bins, issame), f, protocol=PICKLE_PROTOCOL))


def list_identities(
    src: Path, identities: list[str] | None, exclude_from: Path | None
) -> dict[str, list[Path]]:
    """Identity name -> its image files, listed as ``arcshard-data build`` lists an image
    folder, after ``--identities`` and ``--exclude-from``."""
    if not src.is_dir():
        raise ValueError(f"{src}: not a directory (expected an image folder, one sub-folder per identity)")
    source = list_image_folder(src)
    folders: dict[str, list[Path]] = {name: [] for name in source.class_names}
    for path, label in zip(source.paths, source.labels):
        folders[source.class_names[label]].append(Path(path))
    if identities is not None:
        missing = [n for n in identities if n not in folders]
        if missing:
            raise ValueError(f"{src}: no sub-folder with images for --identities {', '.join(missing)}")
        folders = {n: folders[n] for n in identities}
    if exclude_from is not None:
        manifest = load_manifest(exclude_from)
        if not manifest.class_names:
            raise ValueError(
                f"{exclude_from}: its manifest has no class_names, so --exclude-from cannot tell "
                "which identities it holds; pass --identities instead"
            )
        trained = set(manifest.class_names)
        kept = {n: files for n, files in folders.items() if n not in trained}
        log.info("make-pairs: %d identities excluded as in %s", len(folders) - len(kept), exclude_from)
        folders = kept
    if not folders:
        raise ValueError(f"{src}: no identity left after --identities/--exclude-from; choose others")
    return folders


def genuine_pairs(folders: dict[str, list[Path]], count: int, rng: random.Random, src: Path) -> list[Pair]:
    """``count`` distinct same-identity pairs, spread evenly over identities (water-filling)."""
    names = list(folders)
    rng.shuffle(names)
    names.sort(key=lambda n: math.comb(len(folders[n]), 2))  # stable: ties stay shuffled
    capacity = sum(math.comb(len(folders[n]), 2) for n in names)
    if capacity < count:
        raise ValueError(
            f"{src}: asked for {count} genuine pairs but the identities allow only {capacity} "
            f"distinct ones ({sum(len(f) >= 2 for f in folders.values())} identities have 2+ "
            "images); use fewer --pairs or add images"
        )
    pairs: list[Pair] = []
    remaining = count
    for left, name in zip(range(len(names), 0, -1), names):
        files = folders[name]
        quota = min(math.comb(len(files), 2), -(-remaining // left))
        for k in rng.sample(range(math.comb(len(files), 2)), quota):
            j = (1 + math.isqrt(1 + 8 * k)) // 2  # k-th pair (i < j) in colex order
            i = k - j * (j - 1) // 2
            pairs.append((files[i], files[j]))
        remaining -= quota
    rng.shuffle(pairs)
    return pairs


def impostor_pairs(folders: dict[str, list[Path]], count: int, rng: random.Random, src: Path) -> list[Pair]:
    """``count`` distinct pairs of images of two different identities."""
    sizes = [len(f) for f in folders.values()]
    capacity = (sum(sizes) ** 2 - sum(n * n for n in sizes)) // 2
    if capacity < count:
        raise ValueError(
            f"{src}: asked for {count} impostor pairs but {len(folders)} identities with "
            f"{sum(sizes)} images allow only {capacity} distinct ones; use fewer --pairs or add identities"
        )
    names = list(folders)
    if 2 * count > capacity:  # dense: draw from all of them
        every = [
            (a, b)
            for x, na in enumerate(names) for nb in names[x + 1:]
            for a in folders[na] for b in folders[nb]
        ]
        return rng.sample(every, count)
    chosen: set[Pair] = set()
    pairs: list[Pair] = []
    while len(pairs) < count:  # sparse: rejection sampling (every pair has a nonzero chance)
        na, nb = rng.sample(names, 2)
        a, b = rng.choice(folders[na]), rng.choice(folders[nb])
        key = (a, b) if a < b else (b, a)
        if key not in chosen:
            chosen.add(key)
            pairs.append((a, b))
    return pairs


def encode(path: Path, size: int, quality: int, fit: str = "crop") -> bytes:
    """The image at ``path`` as ``arcshard-data build --fit fit`` stores it: a ``size x size`` RGB JPEG."""
    try:
        return encode_image(read_regular_file(str(path)), size, quality, fit)
    except Rejected as exc:
        raise ValueError(f"{path}: {exc}; remove or replace the file") from None
