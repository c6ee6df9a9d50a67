"""`model.json`: what a client needs to use an exported model, and where it came from.

It lies beside the model with the same stem (`model.onnx` -> `model.json`) and holds:

* `input` / `output`: tensor names, dtype, shape (`"N"` is the batch axis), layout,
  colour order, the pixel normalisation `(pixel - 127.5) / 127.5` and `input.fit`, how
  a photo that is not 112x112 is made square (crop, squash or pad: the training set's,
  `deploy.fit`);
* `backbone`, `embedding_size`, `precision`, `opset`, `batch`;
* `training`: sha256 of the run's resolved config YAML (`Config.to_yaml()`), run name,
  the training step of the exported weights when known, and the verification accuracy
  per target recorded by training at or before that step (absent when none was run);
* `threshold`: the cosine similarity at and above which two faces are called the same
  person, with the flip-TTA setting it assumes and where it came from: the
  verification's best threshold on `eval.best_target` (or the first target) when
  training recorded one (flip-TTA as `eval.flip`), else `DEFAULT_THRESHOLD` (flip-TTA on);
* `parity`: the PyTorch-vs-onnxruntime numbers the export measured;
* `sha256` of the model file.

The default threshold 0.3 is a typical operating point of ArcFace models on LFW-like
pairs (insightface's logged best thresholds are squared L2 distances around 1.4 between
unit vectors, cosine = 1 - d/2 = 0.3); replace it by running verification on your own
pairs, since the right value depends on the model and the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.atomic import write_atomic

__all__ = [
    "DEFAULT_THRESHOLD",
    "FORMAT",
    "Provenance",
    "Threshold",
    "card_path",
    "config_digest",
    "metrics_records",
    "read_card",
    "recorded_verification",
    "sha256_file",
    "threshold_of",
    "threshold_target",
    "training_provenance",
    "write_card",
]

FORMAT = "arcshard-model/1"
DEFAULT_THRESHOLD = 0.3
_HASH_CHUNK = 16 << 20


@dataclass
class Provenance:
    """Where exported weights came from."""

    backbone: str
    embedding_size: int
    config_sha256: str
    run_name: str
    step: int | None = None
    verification: dict[str, dict[str, Any]] = field(default_factory=dict)  # target -> numbers
    threshold_target: str | None = None  # the target whose best threshold the card uses
    verification_flip: bool = True  # eval.flip: whether verification embedded with flip-TTA


@dataclass(frozen=True)
class Threshold:
    """Cosine similarity >= `cosine` means "same person"; `flip`: computed on flip-TTA
    embeddings; `source`: "default" or "verification:<target>"."""

    cosine: float
    flip: bool
    source: str


def card_path(model_path: str | os.PathLike[str]) -> Path:
    """`model.onnx` -> `model.json` (same directory, same stem)."""
    return Path(model_path).with_suffix(".json")


def config_digest(config_yaml: str) -> str:
    """sha256 (hex) of a resolved config's YAML text."""
    return hashlib.sha256(config_yaml.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def training_provenance(source: str | os.PathLike[str], cfg: Any) -> Provenance:
    """Provenance of the backbone `trainer.checkpoint.backbone.load_backbone(source)` returned
    with config `cfg`: the step from the checkpoint's index (or the last logged step of
    a finished run without checkpoints), verification numbers from the run's
    `metrics.jsonl` up to that step."""
    from trainer.checkpoint import CheckpointError, read_index, resolve

    source = Path(source)
    step: int | None = None
    run_dir = source
    try:
        ckpt = resolve(source)
        step = int(read_index(ckpt)["step"])
        run_dir = ckpt.parent.parent  # <output_dir>/checkpoints/step-N
    except (CheckpointError, KeyError, TypeError, ValueError):
        pass  # a finished run's backbone.pt: its last logged step is the step
    records = metrics_records(run_dir / "metrics.jsonl")
    if step is None and records:
        step = int(records[-1]["step"])
    verification = recorded_verification(records, step)
    return Provenance(
        backbone=cfg.backbone.name,
        embedding_size=cfg.backbone.embedding_size,
        config_sha256=config_digest(cfg.to_yaml()),
        run_name=cfg.run.name,
        step=step,
        verification=verification,
        threshold_target=threshold_target(cfg, verification),
        verification_flip=cfg.eval.flip,
    )


def recorded_verification(records: list[dict[str, Any]], step: int | None) -> dict[str, dict[str, Any]]:
    """The latest verification numbers per target among metrics records at or before
    `step` (all when None). Training records them under `eval` (target ->
    `VerificationResult.as_dict()`: accuracy, accuracy_std, best_threshold, auc, ...);
    a `verification` object (target -> accuracy) is read too."""
    verification: dict[str, dict[str, Any]] = {}
    for record in records:
        if step is not None and record["step"] > step:
            break
        for key in ("eval", "verification"):
            for target, value in (record.get(key) or {}).items():
                if isinstance(value, dict):
                    numbers = {k: v for k, v in value.items() if k != "name"}
                else:
                    numbers = {"accuracy": value}
                verification[target] = {"step": record["step"], **numbers}
    return verification


def threshold_target(cfg: Any, verification: dict[str, Any]) -> str | None:
    """The target whose threshold the card uses: `eval.best_target` (or the first of
    `eval.targets`), by file stem, when it was verified; else the first verified one."""
    preferred = cfg.eval.best_target or (cfg.eval.targets[0] if cfg.eval.targets else None)
    if preferred is not None and Path(preferred).stem in verification:
        return Path(preferred).stem
    return next(iter(verification), None)


def metrics_records(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl that carry a step (a torn last line is ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def write_card(
    model_path: Path,
    provenance: Provenance,
    *,
    precision: str,
    opset: int,
    batch: int | None,
    input_name: str,
    output_name: str,
    input_size: int,
    parity: list[dict[str, Any]],
    cosine_bound: float,
    fit: str = "crop",
) -> Path:
    """Write `card_path(model_path)` atomically; returns its path. `fit`: the geometry of
    the training set (`deploy.fit.model_fit`)."""
    target = provenance.threshold_target
    verified = provenance.verification.get(target or "", {})
    if "best_threshold" in verified:
        threshold = Threshold(
            float(verified["best_threshold"]), provenance.verification_flip, f"verification:{target}"
        )
    else:
        threshold = Threshold(DEFAULT_THRESHOLD, True, "default")
    n: int | str = batch if batch else "N"
    card = {
        "format": FORMAT,
        "model_file": model_path.name,
        "sha256": sha256_file(model_path),
        "backbone": provenance.backbone,
        "embedding_size": provenance.embedding_size,
        "precision": precision,
        "opset": opset,
        "batch": batch if batch else "dynamic",
        "input": {
            "name": input_name,
            "dtype": "float32",
            "shape": [n, 3, input_size, input_size],
            "layout": "NCHW",
            "color": "RGB",
            "normalisation": "(pixel - 127.5) / 127.5",
            "mean": 127.5,
            "std": 127.5,
            "fit": fit,
        },
        "output": {
            "name": output_name,
            "dtype": "float32",
            "shape": [n, provenance.embedding_size],
            "l2_normalised": False,
        },
        "training": {
            "config_sha256": provenance.config_sha256,
            "run_name": provenance.run_name,
            "step": provenance.step,
            **({"verification": provenance.verification} if provenance.verification else {}),
        },
        "threshold": {"cosine": threshold.cosine, "flip": threshold.flip, "source": threshold.source},
        "parity": {"cosine_bound": cosine_bound, "results": parity},
    }
    path = card_path(model_path)
    write_atomic(path, (json.dumps(card, indent=2) + "\n").encode("utf-8"))
    return path


def read_card(model_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The `model.json` beside `model_path`, or None when there is none; ValueError names
    the file when it is not valid JSON."""
    path = card_path(model_path)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); re-export the model to rewrite it") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ValueError(f"{path}: not an arcshard model card (format {FORMAT!r}); re-export the model")
    return card


def threshold_of(card: dict[str, Any] | None) -> Threshold:
    """The card's same/different threshold (the default when there is no card)."""
    if card is None:
        return Threshold(DEFAULT_THRESHOLD, True, "default (no model.json)")
    t = card["threshold"]
    return Threshold(float(t["cosine"]), bool(t["flip"]), str(t["source"]))
