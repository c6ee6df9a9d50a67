"""`arcshard-embed`: face images -> L2-normalised embeddings, and one-pair comparison.

    arcshard-embed faces/ more.jpg --model model.onnx --out embeddings.npy [--flip]
    arcshard-embed --list images.txt --model model.onnx --out embeddings.npy
    arcshard-embed compare a.jpg b.jpg --model model.onnx

Embedding writes `embeddings.npy` (float32 `[N, D]`, rows L2-normalised) and
`embeddings.txt` (row i's image path on line i). Images are decoded with Pillow on
`--workers` threads, converted to RGB, made 112x112 when they are not by the fit the
model's training set was built with (`--fit` overrides; `deploy.fit`), normalised
as in training and embedded `--batch-size` at a time (`trainer.evaluation.embedder`:
the same code verification uses). Unreadable images are skipped and listed on stderr;
with `--strict` the first one is an error (exit 2) and nothing is written.

`compare` prints the cosine similarity of two faces and "same" or "different" at the
threshold stored in the model's `model.json` (flip-TTA as that threshold assumes).
`--model` is an ONNX file, or a training run / checkpoint directory (then PyTorch
embeds, with the default threshold, the checkpoint's EMA weights when the run kept an
average, its trained weights with `--raw-weights`; which is printed on stderr);
`--weights FILE --backbone NAME` a bare state_dict such as arcface_torch's released
`backbone.pth` (PyTorch, default threshold).
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from deploy.cli_common import (
    EXIT_OK, add_weights_arguments, checkpoint_model, positive_int, run_reporting_errors, weights_model,
)
from deploy.fit import add_fit_argument, model_fit

PROG = "arcshard-embed"
DEFAULT_BATCH_SIZE = 32
DEFAULT_WORKERS = 4


def _model_argument(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, metavar="MODEL.onnx",
                        help="ONNX model from `arcshard-export onnx` (or a run / checkpoint dir, "
                        "embedded with PyTorch)")
    add_weights_arguments(parser, source)
    add_fit_argument(parser)


def embed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [-h] (IMAGES... | --list FILE) (--model MODEL.onnx | --weights FILE --backbone NAME) "
        "--out OUT.npy [options]\n"
        f"       {PROG} compare A B (--model MODEL.onnx | --weights FILE --backbone NAME) [--flip | --no-flip]",
        description="Embed face images (aligned crops; resized to 112x112 when needed) with an "
        "exported model. Writes OUT.npy (float32 [N, D], L2-normalised rows) and OUT.txt (the "
        "image path of each row, in order). Directories are searched recursively for images. "
        f"`{PROG} compare A B --model M` compares two faces instead (see `{PROG} compare -h`).",
        epilog="Unreadable images are skipped and listed on stderr (exit 0), or with --strict "
        "reported as an error (exit 2, nothing written). Exit codes: 0 done, 2 error.",
    )
    parser.add_argument("images", nargs="*", type=Path, metavar="IMAGES",
                        help="image files and/or directories of images")
    parser.add_argument("--list", type=Path, metavar="FILE",
                        help="text file of image paths, one per line (# comments allowed)")
    _model_argument(parser)
    parser.add_argument("--out", required=True, type=Path, metavar="OUT.npy", help="embeddings file to write")
    parser.add_argument("--flip", action="store_true",
                        help="flip test-time augmentation: embed each image and its mirror, sum")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS, metavar="N",
                        help=f"image decoding threads (default {DEFAULT_WORKERS})")
    parser.add_argument("--strict", action="store_true", help="fail on the first unreadable image")
    return parser


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} compare",
        description="Print the cosine similarity of two face images and whether they are the "
        "same person at the threshold in the model's model.json (the default 0.3 when there "
        "is none).",
    )
    parser.add_argument("a", type=Path, metavar="A", help="first face image")
    parser.add_argument("b", type=Path, metavar="B", help="second face image")
    _model_argument(parser)
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="flip test-time augmentation (default: as model.json's threshold assumes)")
    parser.add_argument("--threshold", type=float, metavar="COSINE",
                        help="cosine threshold overriding model.json's")
    return parser


def _load_embedder(args: argparse.Namespace, batch_size: int):
    """The `--weights` backbone, the run / checkpoint directory `--model` names (its EMA
    unless --raw-weights), else `trainer.evaluation.embedder.load_embedder` of the
    `--model` file, refusing a file that is not `.onnx`."""
    from trainer.evaluation.embedder import TorchEmbedder, load_embedder

    if args.weights is not None:
        return TorchEmbedder(weights_model(args)[0], batch_size=batch_size)
    model = args.model
    if model.is_dir():
        return TorchEmbedder(checkpoint_model(model, args, PROG).module, batch_size=batch_size)
    if model.is_file() and model.suffix.lower() != ".onnx":
        raise ValueError(
            f"{model}: not an ONNX model; give the .onnx file `arcshard-export onnx` wrote "
            "(or a run / checkpoint directory)"
        )
    return load_embedder(model, batch_size=batch_size)


def _decoded(paths: list[Path], workers: int, ahead: int, fit: str) -> Iterator[tuple[Path, np.ndarray | None, str]]:
    """(path, RGB uint8 face or None, why not) for each path, in order, decoded on
    `workers` threads (Pillow releases the GIL while decoding) at most `ahead` images
    ahead of the consumer, so memory stays bounded for any number of images."""
    from deploy.images import UnreadableImage, load_face

    def load(path: Path) -> tuple[Path, np.ndarray | None, str]:
        try:
            return path, load_face(path, fit), ""
        except UnreadableImage as exc:
            return path, None, str(exc)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        remaining = iter(paths)
        queue = deque(pool.submit(load, p) for p in itertools.islice(remaining, ahead))
        while queue:
            result = queue.popleft().result()
            for path in itertools.islice(remaining, 1):
                queue.append(pool.submit(load, path))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def embed_command(args: argparse.Namespace) -> int:
    """`arcshard-embed IMAGES... --out OUT.npy`."""
    from tqdm import tqdm

    from deploy.images import expand_paths, read_list
    from data_tools.atomic import write_atomic
    from trainer.evaluation.embedder import embed, preprocess

    if args.out.suffix.lower() != ".npy":
        raise ValueError(f"--out {args.out}: the embeddings file must end in .npy (the path list goes beside it)")
    if not args.images and args.list is None:
        raise ValueError("no images given: pass image files or directories, or --list FILE")
    paths = expand_paths(args.images) + (read_list(args.list) if args.list is not None else [])
    if not paths:
        raise ValueError(f"no image files found in {' '.join(map(str, args.images)) or args.list}")
    embedder = _load_embedder(args, args.batch_size)
    fit, fit_source = model_fit(args.fit, model=args.model)
    rows: list[np.ndarray] = []
    kept: list[Path] = []
    skipped: list[str] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            rows.append(embed(embedder, preprocess(np.stack(pending)), flip=args.flip))
            pending.clear()

    with tqdm(total=len(paths), unit="img", file=sys.stderr, desc="embedding", disable=None) as progress:
        for path, face, reason in _decoded(paths, args.workers, ahead=2 * args.batch_size, fit=fit):
            progress.update()
            if face is None:
                if args.strict:
                    raise ValueError(f"{reason} (--strict: nothing written; remove or fix it)")
                skipped.append(reason)
                continue
            kept.append(path)
            pending.append(face)
            if len(pending) == args.batch_size:
                flush()
        flush()
    for reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    if not rows:
        raise ValueError(f"none of the {len(paths)} images could be read; nothing written")
    embeddings = np.concatenate(rows).astype(np.float32, copy=False)
    buffer = io.BytesIO()
    np.save(buffer, embeddings)
    listing = args.out.with_suffix(".txt")
    write_atomic(listing, "".join(f"{p}\n" for p in kept).encode("utf-8"))
    write_atomic(args.out, buffer.getvalue())
    print(
        f"wrote {args.out} ({embeddings.shape[0]} x {embeddings.shape[1]} float32, L2-normalised"
        f"{', flip TTA' if args.flip else ''}) and {listing}; skipped {len(skipped)} unreadable image(s); "
        f"fit {fit} ({fit_source})"
    )
    return EXIT_OK


def compare_command(args: argparse.Namespace) -> int:
    """`arcshard-embed compare A B`."""
    from deploy.images import load_face
    from deploy.model_card import read_card, threshold_of
    from trainer.evaluation.embedder import embed, preprocess

    card = read_card(args.model) if args.model is not None and args.model.suffix.lower() == ".onnx" else None
    threshold = threshold_of(card)
    cosine_threshold = threshold.cosine if args.threshold is None else args.threshold
    flip = threshold.flip if args.flip is None else args.flip
    fit, fit_source = model_fit(args.fit, model=args.model)
    faces = np.stack([load_face(args.a, fit), load_face(args.b, fit)])
    embedder = _load_embedder(args, batch_size=2)
    a, b = embed(embedder, preprocess(faces), flip=flip)
    cosine = float(np.dot(a, b))
    verdict = "same" if cosine >= cosine_threshold else "different"
    source = "--threshold" if args.threshold is not None else threshold.source
    print(f"cosine {cosine:.4f}: {verdict} (threshold {cosine_threshold:.4f} from {source}; "
          f"flip TTA {'on' if flip else 'off'}); fit {fit} ({fit_source})")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        args = compare_parser().parse_args(argv[1:])
        return run_reporting_errors(PROG, lambda: compare_command(args))
    args = embed_parser().parse_args(argv)
    return run_reporting_errors(PROG, lambda: embed_command(args))


if __name__ == "__main__":
    sys.exit(main())
