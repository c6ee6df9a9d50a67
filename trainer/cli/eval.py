"""`arcshard-eval`: judge a trained face model.

    arcshard-eval verify --checkpoint output/run1 --bin lfw.bin cfp_fp.bin agedb_30.bin
    arcshard-eval ijb --checkpoint output/run1 --root /data/IJB_release --set IJBC
    arcshard-eval verify --model model.onnx --bin lfw.bin        (an exported ONNX model)

A checkpoint's EMA weights are evaluated when the run kept an average
(backbone.ema_decay > 0); `--raw-weights` evaluates its trained weights instead. Which
were used is printed on stderr.

User errors (missing or corrupt files, a checkpoint that does not load) are one line on
stderr naming the file and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from trainer import exit_codes
from trainer.cli.extras import install_hint
from trainer.cli.weights import add_weights_arguments, checkpoint_model, weights_model

EXIT_OK, EXIT_USAGE = exit_codes.OK, exit_codes.USAGE

_VERIFY_NOTES = """\
verify: insightface .bin sets (lfw.bin, cfp_fp.bin, agedb_30.bin, or your own from
`arcshard-data make-pairs`). Each image's embedding is the model's embedding of the image
plus that of its mirror (--no-flip: the image alone), L2-normalised; pairs are scored
by cosine. accuracy is insightface's 10-fold cross-validated accuracy (threshold chosen
on 9 folds, applied to the 10th; mean ± std over folds), best threshold the cosine
threshold with the best accuracy on all pairs, AUC the area under the ROC curve,
TAR@FAR the share of genuine pairs accepted at a threshold that accepts at most that
share of impostor pairs (shown only when there are at least 1/FAR impostor pairs)."""

_IJB_NOTES = """\
ijb: IJB-B/C 1:1 template verification on insightface's IJB_release layout: ROOT/IJBC/
loose_crop/ and ROOT/IJBC/meta/ijbc_{name_5pts_score,face_tid_mid,template_pair_label}.txt.
Faces are aligned to the arcface 112x112 template from their 5 landmarks; image features
(with flip, weighted by detector score) are averaged per media and summed per template;
TAR at FAR 1e-6 ... 1e-1 from the template-pair cosine scores."""

_EXIT_CODES = "Exit codes: 0 done, 2 bad arguments or input (one line naming the file)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arcshard-eval",
        description="Evaluate a face-recognition model: .bin pair verification (LFW, CFP-FP, "
        "AgeDB-30) and the IJB-B/C 1:1 protocol.",
        epilog=f"{_VERIFY_NOTES}\n\n{_IJB_NOTES}\n\n{_EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        model = p.add_mutually_exclusive_group()  # one is required: checked in main
        model.add_argument(
            "--checkpoint", type=Path, metavar="PATH",
            help="training run output dir (latest checkpoint, else backbone.pt + config.yaml) or a checkpoint dir",
        )
        model.add_argument("--model", type=Path, metavar="MODEL.onnx", help="an exported ONNX model (onnxruntime, CPU)")
        add_weights_arguments(p, model)
        p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
        p.add_argument("--no-flip", dest="flip", action="store_false",
                       help="embed the image only (default: image + its mirror)")
        p.add_argument("--device", default=None,
                       help="torch device for --checkpoint, e.g. cpu or cuda:0 (default: cuda if available)")
        p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the results as JSON")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    verify = sub.add_parser(
        "verify", help="10-fold verification accuracy on insightface .bin pair sets",
        description="10-fold verification accuracy, AUC and TAR@FAR on insightface .bin pair sets.",
        epilog=f"{_VERIFY_NOTES}\n\n{_EXIT_CODES}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(verify)
    verify.add_argument("--bin", type=Path, nargs="+", required=True, metavar="SET.bin", help="verification sets")

    ijb = sub.add_parser(
        "ijb", help="IJB-B/C 1:1 template verification: TAR at FAR 1e-6 ... 1e-1",
        description="IJB-B/C 1:1 template verification (insightface protocol): TAR at FAR 1e-6 ... 1e-1.",
        epilog=f"{_IJB_NOTES}\n\n{_EXIT_CODES}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(ijb)
    ijb.add_argument("--root", type=Path, required=True, metavar="IJB_DIR",
                     help="folder holding IJBC/ (or IJBB/), or that set folder itself")
    ijb.add_argument("--set", dest="set_name", choices=("IJBB", "IJBC"), default="IJBC", help="which set (default IJBC)")
    ijb.add_argument("--no-detector-score", dest="detector_score", action="store_false",
                     help="do not weight image features by their detector score (default: weight, as insightface)")
    ijb.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                     help="threads reading and aligning images (default: min(8, CPUs))")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.model is None and args.weights is None:
        parser.error("one of the arguments --checkpoint --model is required (or --weights FILE --backbone NAME)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
        results = run_verify(args) if args.command == "verify" else run_ijb(args)
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        print(f"arcshard-eval {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        hint = install_hint(exc)
        if hint is None:
            raise
        print(f"arcshard-eval {args.command}: error: {hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"arcshard-eval {args.command}: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED
    return EXIT_OK


def _embedder(args: argparse.Namespace):
    """The model named by --checkpoint (its EMA unless --raw-weights), --model or --weights."""
    import torch

    from trainer.evaluation.embedder import TorchEmbedder, load_embedder

    if args.weights is not None:
        return TorchEmbedder(weights_model(args)[0], batch_size=args.batch_size)
    path = args.model if args.model is not None else args.checkpoint
    if not path.exists():
        flag = "--model" if args.model is not None else "--checkpoint"
        raise ValueError(f"{path}: no such file or directory ({flag}); check the path")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {args.device}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if args.model is not None:
        return load_embedder(path, batch_size=args.batch_size, device=device)
    module = checkpoint_model(path, args, f"arcshard-eval {args.command}").module
    return TorchEmbedder(module.to(device), device=device, batch_size=args.batch_size)


def run_verify(args: argparse.Namespace) -> list[dict]:
    from trainer.evaluation.verification import embed_images, evaluate_embeddings, load_bin

    sets = [load_bin(path) for path in args.bin]  # every file checked before the model loads
    embedder = _embedder(args)
    results = []
    for target in sets:
        started = time.perf_counter()
        embeddings = embed_images(embedder, target.images, args.flip, args.batch_size)
        result = evaluate_embeddings(target.name, embeddings, target.pairs, target.issame)
        print(f"{result.summary()}  [{time.perf_counter() - started:.1f}s]", flush=True)
        results.append({**result.as_dict(), "path": str(target.path), "flip": args.flip})
    return results


def run_ijb(args: argparse.Namespace) -> dict:
    from trainer.evaluation.ijb import evaluate_ijb, read_meta

    meta = read_meta(args.root, args.set_name)  # meta files checked before the model loads
    embedder = _embedder(args)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(f"\r{args.set_name}: {done}/{total} images, {rate:.0f} img/s", end="\n" if done == total else "",
                  file=sys.stderr, flush=True)

    result = evaluate_ijb(
        embedder, meta, batch_size=args.batch_size, flip=args.flip,
        detector_score=args.detector_score, workers=args.workers, progress=progress,
    )
    print(result.summary(), flush=True)
    return {**result.as_dict(), "root": str(args.root), "flip": args.flip, "detector_score": args.detector_score}


if __name__ == "__main__":
    sys.exit(main())
