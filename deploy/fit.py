"""Which geometry (`--fit`) the faces a model embeds get: the one it was trained with.

A non-square photo becomes 112x112 by crop, squash or pad (`data_tools.face`); a model
sees faces best shaped as its training images were, and the training set's manifest
records how they were made (`fit`). So the deploy commands take, in this order:

1. `--fit`, when given;
2. for an ONNX model, `input.fit` in its `model.json` (written by `arcshard-export onnx`
   from the run's training set);
3. for a run output / checkpoint directory (and at export), the `fit` in the manifest of
   the run's training set: its resolved config's `data.path` (a run on synthetic data
   made no photos square: crop);
4. else crop: bare `--weights` files, a model without `model.json`, or a card exported
   before `--fit` existed (every dataset then was cropped).

`model_fit` returns the mode with where it came from, which the commands print.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from data_tools.face import FIT_MODES
from data_tools.manifest import MANIFEST, load_manifest

__all__ = ["add_fit_argument", "model_fit", "training_fit"]

_RUN_CONFIG = "config.yaml"  # the resolved config a run dir and every checkpoint dir hold


def add_fit_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """`--fit crop|squash|pad`, default None: the model's own (see the module docstring);
    `note` ends the help text."""
    parser.add_argument(
        "--fit", choices=FIT_MODES, default=None,
        help="how a photo that is not 112x112 becomes square: crop (shorter side to 112, centre "
        "crop), squash (resize ignoring the aspect ratio) or pad (longer side to 112, grey bars); "
        "see `arcshard-data build --help`. Default: the fit the model's training set was built "
        f"with (model.json, or the run's data manifest), else crop{note}",
    )


def training_fit(cfg: Any) -> tuple[str, str]:
    """(fit, source) of the training set a run with resolved config `cfg` read."""
    if cfg.data.source != "recordio" or cfg.data.path is None:
        return "crop", f"default: the run trained on {cfg.data.source} data"
    try:
        return load_manifest(cfg.data.path).fit, f"from {Path(cfg.data.path) / MANIFEST}"
    except ValueError as exc:
        raise ValueError(f"{exc} (the run's data.path, read for its fit; or pass --fit)") from None


def model_fit(fit: str | None, *, model: Path | None = None, cfg: Any = None) -> tuple[str, str]:
    """(fit, source) for `--fit` value `fit` and the model: an ONNX file or a run /
    checkpoint directory (`model`), or a run's loaded config (`cfg`); neither: bare weights."""
    if fit is not None:
        return fit, "--fit"
    if cfg is not None:
        return training_fit(cfg)
    if model is None:
        return "crop", "default: bare weights record no training set"
    if model.suffix.lower() == ".onnx":
        return _card_fit(model)
    config = model / _RUN_CONFIG
    if not config.is_file():
        return "crop", f"default: {model} holds no {_RUN_CONFIG}"
    from trainer.config import load_config

    try:
        cfg = load_config(config)
    except ValueError as exc:  # ConfigError names the key, not the file
        raise ValueError(f"{config}: {exc}") from None
    return training_fit(cfg)


def _card_fit(model: Path) -> tuple[str, str]:
    from deploy.model_card import card_path, read_card

    card = read_card(model)
    path = card_path(model)
    if card is None:
        return "crop", f"default: no {path.name} beside the model"
    value = (card.get("input") or {}).get("fit")
    if value is None:
        return "crop", f"default: {path} records no fit (exported before --fit)"
    if value not in FIT_MODES:
        raise ValueError(f"{path}: input.fit {value!r} is not one of {', '.join(FIT_MODES)}; re-export the model")
    return value, f"from {path}"
