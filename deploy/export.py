"""`arcshard-export`: a trained backbone -> a checked ONNX model -> a Triton model repository.

    arcshard-export onnx --checkpoint output/run --out model.onnx [--opset 18] [--fp16]
                         [--batch dynamic|N] [--parity-images faces/]
    arcshard-export triton --model model.onnx --repo models/ --name arcshard [--max-batch-size 64]

`onnx` writes model.onnx and model.json (see deploy/onnx_export.py and
deploy/model_card.py); `triton` writes OUT/NAME/config.pbtxt and OUT/NAME/1/model.onnx
(deploy/triton.py). Errors are one line naming the file and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from deploy.cli_common import (
    EXIT_OK, add_weights_arguments, checkpoint_model, non_negative_int, positive_int,
    run_reporting_errors, weights_model,
)
from deploy.fit import add_fit_argument, model_fit

PROG = "arcshard-export"


def _batch(value: str) -> int | None:
    """argparse type: "dynamic" (None) or a fixed batch size >= 1."""
    return None if value == "dynamic" else positive_int(value)


def build_parser() -> argparse.ArgumentParser:
    from deploy.onnx_export import COSINE_BOUND, DEFAULT_OPSET, RANDOM_PARITY_IMAGES
    from deploy.triton import DEFAULT_MAX_BATCH_SIZE, DEFAULT_QUEUE_DELAY_US

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a trained arcshard backbone to ONNX (with parity checks against "
        "PyTorch) and package an ONNX model as a Triton Inference Server model repository.",
        epilog="Exit codes: 0 done, 2 error (one line naming the file and the fix).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{onnx,triton}")
    onnx_p = sub.add_parser(
        "onnx",
        help="export a checkpoint's backbone to ONNX and check it with onnxruntime",
        description="Export the backbone of a training run (its latest checkpoint, or the "
        "backbone.pt a finished run leaves) or of a checkpoint directory to ONNX (its EMA "
        "weights when the run kept an average, backbone.ema_decay > 0; --raw-weights: its "
        "trained weights; recorded as metadata 'weights'): single "
        "input 'input' float32 NCHW [N, 3, 112, 112], RGB, (pixel - 127.5) / 127.5; single "
        "output 'embedding' float32 [N, D] (not L2-normalised). The graph is checked with "
        "onnx.checker, then PyTorch and onnxruntime embed the same random inputs (and "
        "--parity-images): the export fails, writing nothing, if any cosine similarity is "
        f"below {COSINE_BOUND['fp32']} ({COSINE_BOUND['fp16']} with --fp16). Writes model.json "
        "beside the model (input spec, normalisation, embedding size, config digest, step, "
        "verification accuracies, same/different threshold).",
    )
    source = onnx_p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, metavar="PATH",
                        help="run output dir (its latest checkpoint) or checkpoint dir")
    add_weights_arguments(onnx_p, source)
    onnx_p.add_argument("--out", required=True, type=Path, metavar="MODEL.onnx",
                        help="ONNX file to write; model card goes to the same name with .json")
    onnx_p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, metavar="N",
                        help=f"ONNX opset (default {DEFAULT_OPSET})")
    onnx_p.add_argument("--fp16", action="store_true",
                        help="float16 weights and arithmetic behind a float32 input/output (half "
                        "the size; looser parity bound)")
    onnx_p.add_argument("--batch", type=_batch, default=None, metavar="dynamic|N",
                        help="dynamic batch axis (default) or a fixed batch size N")
    onnx_p.add_argument("--parity-images", type=Path, metavar="DIR",
                        help="also compare on real images: the first --parity-samples images found "
                        "below DIR (aligned face crops; resized to 112x112 when needed)")
    add_fit_argument(onnx_p, "; used for --parity-images and recorded in model.json (input.fit), "
                     "which arcshard-embed follows")
    onnx_p.add_argument("--parity-samples", type=positive_int, default=RANDOM_PARITY_IMAGES, metavar="K",
                        help=f"random inputs compared, and most images taken from --parity-images "
                        f"(default {RANDOM_PARITY_IMAGES})")
    triton_p = sub.add_parser(
        "triton",
        help="write a Triton model repository for an ONNX model",
        description="Write REPO/NAME/config.pbtxt (onnxruntime backend, dynamic batching, "
        "input/output names, types and dims read from the ONNX graph) and "
        "REPO/NAME/1/model.onnx (plus model.json when it lies beside the model). The config "
        "is re-parsed against Triton's ModelConfig schema and checked against the graph; no "
        "Triton server is contacted.",
    )
    triton_p.add_argument("--model", required=True, type=Path, metavar="MODEL.onnx",
                          help="ONNX model from `arcshard-export onnx` (dynamic batch axis)")
    triton_p.add_argument("--repo", required=True, type=Path, metavar="REPO",
                          help="model repository directory (created if needed)")
    triton_p.add_argument("--name", default="arcshard", help="model name (default arcshard)")
    triton_p.add_argument("--max-batch-size", type=positive_int, default=DEFAULT_MAX_BATCH_SIZE, metavar="N",
                          help=f"largest batch Triton forms (default {DEFAULT_MAX_BATCH_SIZE})")
    triton_p.add_argument("--max-queue-delay-us", type=non_negative_int, default=DEFAULT_QUEUE_DELAY_US,
                          metavar="US",
                          help="longest a request waits for others to batch with, in microseconds "
                          f"(default {DEFAULT_QUEUE_DELAY_US})")
    triton_p.add_argument("--overwrite", action="store_true", help="replace an existing REPO/NAME")
    return parser


def export_command(args: argparse.Namespace) -> int:
    """`arcshard-export onnx`."""
    from deploy.images import UnreadableImage, expand_paths, load_face
    from deploy.model_card import Provenance, config_digest, training_provenance, write_card
    from deploy.onnx_export import COSINE_BOUND, INPUT_NAME, OUTPUT_NAME, export_onnx
    from trainer.cli.extras import require
    from trainer.evaluation.embedder import INPUT_SIZE, preprocess

    require("onnx", "onnxruntime", "onnxscript")
    if args.out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {args.out}: the model file must end in .onnx (model.json goes beside it)")
    if args.weights is not None:  # released weights: no run, no recorded verification
        module, cfg = weights_model(args)
        provenance = Provenance(cfg.backbone.name, cfg.backbone.embedding_size,
                                config_digest(cfg.to_yaml()), run_name=args.weights.stem)
        weights = "file"
    else:
        module, cfg, weights = checkpoint_model(args.checkpoint, args, PROG)
        provenance = training_provenance(args.checkpoint, cfg)
    step = f" at step {provenance.step}" if provenance.step is not None else ""
    print(f"loaded {cfg.backbone.name} ({cfg.backbone.embedding_size}-d) from "
          f"{args.weights or args.checkpoint}{step}, {weights} weights")
    fit, fit_source = model_fit(args.fit, cfg=None if args.weights is not None else cfg)
    print(f"fit {fit} ({fit_source}), recorded in the model card")
    parity_inputs = {}
    if args.parity_images is not None:
        if not args.parity_images.is_dir():
            raise ValueError(f"--parity-images {args.parity_images}: not a directory of face images")
        faces = []
        for path in expand_paths([args.parity_images]):
            if len(faces) == args.parity_samples:
                break
            try:
                faces.append(load_face(path, fit))
            except UnreadableImage as exc:
                print(f"skipped {exc}", file=sys.stderr)
        if not faces:
            raise ValueError(f"--parity-images {args.parity_images}: no readable images found")
        parity_inputs[f"images from {args.parity_images}"] = preprocess(np.stack(faces))
    precision = "fp16" if args.fp16 else "fp32"
    results = export_onnx(
        module, args.out, opset=args.opset, fp16=args.fp16, batch=args.batch,
        random_count=args.parity_samples, parity_inputs=parity_inputs,
        metadata={
            "backbone": cfg.backbone.name,
            "embedding_size": str(cfg.backbone.embedding_size),
            "normalisation": "(pixel - 127.5) / 127.5, RGB, NCHW",
            "config_sha256": provenance.config_sha256,
            "weights": weights,  # ema / raw: which of the checkpoint's backbones; file: --weights
        },
    )
    size_mb = args.out.stat().st_size / 2**20
    print(f"exported {args.out} (opset {args.opset}, {precision}, batch {args.batch or 'dynamic'}, "
          f"{size_mb:.1f} MiB)")
    for result in results:
        print(result.line())
    card = write_card(
        args.out, provenance, precision=precision, opset=args.opset, batch=args.batch, input_name=INPUT_NAME,
        output_name=OUTPUT_NAME, input_size=INPUT_SIZE, fit=fit, parity=[r.as_dict() for r in results],
        cosine_bound=COSINE_BOUND[precision],
    )
    print(f"wrote {card}")
    return EXIT_OK


def triton_command(args: argparse.Namespace) -> int:
    """`arcshard-export triton`."""
    from deploy.triton import write_repository

    target = write_repository(
        args.model, args.repo, args.name, args.max_batch_size, args.max_queue_delay_us, args.overwrite
    )
    print(f"wrote {target / 'config.pbtxt'} and {target / '1' / 'model.onnx'} (max batch {args.max_batch_size}, "
          "dynamic batching); serve with: tritonserver --model-repository " + str(args.repo))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = export_command if args.command == "onnx" else triton_command
    return run_reporting_errors(PROG, lambda: command(args))


if __name__ == "__main__":
    sys.exit(main())
