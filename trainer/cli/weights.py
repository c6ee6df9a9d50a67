"""`--weights FILE --backbone NAME [--embedding-size D]`: released weights (a bare state_dict,
e.g. arcface_torch's backbone.pth) for every front end that takes a model
(arcshard-eval, arcshard-export onnx, arcshard-embed), and `--raw-weights`: an arcshard
checkpoint's trained weights instead of its EMA (the default when it has one)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from trainer.checkpoint.backbone import TrainedBackbone
    from trainer.config import Config

__all__ = ["add_weights_arguments", "checkpoint_model", "weights_choice", "weights_model"]


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return int(value)


def add_weights_arguments(parser: argparse.ArgumentParser, group: argparse._ActionsContainer) -> None:
    """`--weights FILE` (in `group`, beside the other model sources), `--backbone NAME`
    and `--embedding-size D`: a bare state_dict, e.g. arcface_torch's backbone.pth."""
    group.add_argument("--weights", type=Path, metavar="FILE",
                       help="a bare backbone state_dict (arcface_torch backbone.pth / model.pt, an "
                       "arcshard backbone.pt); needs --backbone")
    parser.add_argument("--backbone", metavar="NAME",
                        help="with --weights: iresnet18..200 (arcface_torch r18..r200) or mobilefacenet (mbf)")
    parser.add_argument("--embedding-size", type=_positive, metavar="D",
                        help="with --weights (default: the file's own)")
    parser.add_argument("--raw-weights", action="store_true",
                        help="an arcshard checkpoint's trained weights instead of its EMA "
                        "(default: the EMA when the run kept one, backbone.ema_decay > 0)")


def weights_choice(args: argparse.Namespace) -> str:
    """`trainer.checkpoint.backbone.WEIGHTS` entry `--raw-weights` asks for."""
    return "raw" if args.raw_weights else "ema"


def checkpoint_model(path: Path, args: argparse.Namespace, prog: str) -> TrainedBackbone:
    """The eval-mode backbone of run / checkpoint dir `path` (CPU) with the weights
    `--raw-weights` chooses, its config and which weights it got (also said on stderr)."""
    import sys

    from trainer.checkpoint.backbone import load_backbone

    trained = load_backbone(path, map_location="cpu", weights=weights_choice(args))
    note = ("; the checkpoint has no EMA" if trained.weights == "raw" and not args.raw_weights else "")
    print(f"{prog}: {path}: {'EMA' if trained.weights == 'ema' else 'raw (trained)'} weights{note}",
          file=sys.stderr)
    return trained


def weights_model(args: argparse.Namespace) -> tuple[nn.Module, Config]:
    """The eval-mode backbone `--weights/--backbone/--embedding-size` name (CPU)."""
    from trainer.checkpoint.backbone import load_weights

    if args.backbone is None:
        raise ValueError(f"--weights {args.weights}: needs --backbone NAME (e.g. iresnet50 for arcface_torch r50)")
    return load_weights(args.weights, args.backbone, args.embedding_size, weights=weights_choice(args))


