"""Typed training config: a YAML file plus `section.key=value` overrides, validated up front.

`load_config(path, overrides)` reads the file (every section and key is optional; missing
ones keep the defaults below), applies the overrides in order and validates the result
before anything else runs. Every problem raises `ConfigError` with a one-line message that
names the full key and what is allowed, e.g. `optim.lr: must be > 0, got -0.1`.

Types are checked against the dataclass field annotations: an int is accepted (and
converted) where a float is expected, a bool is never accepted as a number, `X | None`
also accepts null, `Literal[...]` lists the allowed values and `list[str]` needs a list of
strings. Numeric ranges are declared next to each field (`_bounded`, `_range` for a
`[low, high]` interval); the few checks that involve more than one field live in
`_check_consistency`.

A key can itself be a group of keys (a nested dataclass: `data.augment`): YAML `data:
{augment: {brightness: 0.2}}`, override `data.augment.brightness=0.2` (merged with the
group's other keys) or `data.augment={brightness: 0.2}` (the whole group); its keys are
checked by name and type like a section's.

YAML is read with `yaml.SafeLoader` plus two fixes: `1e-3` is a float (PyYAML would read
the string '1e-3') and a key repeated in one mapping is an error instead of silently
keeping the last value. Relative paths are relative to the working directory.

`save_config` writes the resolved config (`Config.to_yaml()`); loading that file again
gives an equal `Config`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from data_tools.atomic import write_atomic
from data_tools.face import INPUT_SIZE

__all__ = [
    "AugmentConfig",
    "BackboneConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "EvalConfig",
    "MarginConfig",
    "MetricsConfig",
    "OptimConfig",
    "PartialFCConfig",
    "RunConfig",
    "load_config",
    "save_config",
]

# Every backbone in trainer.backbones takes 112x112 faces (their `input_size`).
_BACKBONE_INPUT_SIZE = INPUT_SIZE  # data_tools.face: the contract every layer shares


class ConfigError(ValueError):
    """An invalid config: the message is one line naming the key (or file) and the fix."""


@dataclass(frozen=True)
class _Bounds:
    """A numeric interval; `None` ends are unbounded."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, x: float) -> bool:
        return not (
            (self.ge is not None and not x >= self.ge)
            or (self.gt is not None and not x > self.gt)
            or (self.le is not None and not x <= self.le)
            or (self.lt is not None and not x < self.lt)
        )

    def __str__(self) -> str:
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if high is None:
            return f"{'>=' if self.ge is not None else '>'} {low}"
        if low is None:
            return f"{'<=' if self.le is not None else '<'} {high}"
        left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
        return f"in {left}{low}, {high}{right}"


def _bounded(default: float, **bounds: float) -> Any:
    """A dataclass field whose value must lie in `_Bounds(**bounds)`."""
    return field(default=default, metadata={"bounds": _Bounds(**bounds)})


def _range(low: float, high: float, **bounds: float) -> Any:
    """A dataclass field holding a `[low, high]` interval (low <= high) inside `_Bounds(**bounds)`."""
    return field(default_factory=lambda: [low, high], metadata={"bounds": _Bounds(**bounds), "range": True})


@dataclass
class RunConfig:
    output_dir: str = "output/run"
    name: str = "arcshard"  # run name used in logs and metrics
    seed: int = _bounded(0, ge=0)
    epochs: int = _bounded(1, ge=0)
    max_steps: int = _bounded(0, ge=0)  # >0: stop after this many optimizer steps, overriding epochs
    log_every: int = _bounded(10, ge=1)  # steps
    max_nonfinite: int = _bounded(5, ge=1)  # stop after this many non-finite losses in a row
    # Fault injection for tests and drills: 1-based steps whose loss is replaced by NaN.
    inject_nonfinite: list[int] = field(default_factory=list)


@dataclass
class BackboneConfig:
    name: str = "iresnet50"  # one of trainer.backbones.available_backbones()
    embedding_size: int = _bounded(512, ge=1)
    dropout: float = _bounded(0.0, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    channels_last: bool = True
    # torch.compile the backbone's forward (nn.Module.compile, in place: state_dict keys,
    # checkpoints and ONNX export stay the eager module's); the classifier stays eager
    compile: bool = False
    # weights to start a new run from (ignored when resuming): an arcface_torch backbone.pth /
    # model.pt / checkpoint_gpu_0.pt, or an arcshard run, checkpoint dir or backbone.pt
    init: str | None = None
    # ViT only (null: the backbone's own default, arcface_torch's): stochastic-depth rate
    # of the last block (linear from 0) and the share of patches masked in training
    drop_path_rate: float | None = _bounded(None, ge=0, lt=1)
    mask_ratio: float | None = _bounded(None, ge=0, lt=1)
    # blocks: recompute each residual / transformer block in backward instead of saving
    # its activations (torch.utils.checkpoint, non-reentrant): less memory, ~1/3 more compute
    activation_checkpointing: Literal["none", "blocks"] = "none"
    # >0: keep an exponential moving average of the backbone (trainer/ema.py); evaluation,
    # `best`, export and embedding use it by default (--raw-weights: the trained weights)
    ema_decay: float = _bounded(0.0, ge=0, lt=1)


@dataclass
class MarginConfig:
    """combined: target logit s*(cos(m1*theta + m2) - m3), ArcFace (1, 0.5, 0), CosFace
    (1, 0, 0.4); curricular: CurricularFace (s, m2, t_momentum); adaface: AdaFace (s, m,
    h, t_alpha). Formulas: trainer/margins.py."""

    type: Literal["combined", "curricular", "adaface"] = "combined"
    s: float = _bounded(64.0, gt=0)
    m1: float = _bounded(1.0, ge=1)
    m2: float = _bounded(0.5, ge=0)
    m3: float = _bounded(0.0, ge=0)
    interclass_filter: float = _bounded(0.0, ge=0, lt=1)  # 0 disables; otherwise a cosine threshold
    t_momentum: float = _bounded(0.01, ge=0, le=1)  # curricular: running mean of the target cosine
    m: float = _bounded(0.4, ge=0, lt=1.5)  # adaface: margin
    h: float = _bounded(0.333, gt=0)  # adaface: scale of the standardised norm
    t_alpha: float = _bounded(0.01, ge=0, le=1)  # adaface: momentum of the norm mean/std


# The margin keys each margin.type reads (besides type): any other must stay at its default.
MARGIN_KEYS = {
    "combined": ("s", "m1", "m2", "m3", "interclass_filter"),
    "curricular": ("s", "m2", "t_momentum"),
    "adaface": ("s", "m", "h", "t_alpha"),
}


@dataclass
class PartialFCConfig:
    sample_rate: float = _bounded(1.0, gt=0, le=1)  # share of each rank's class centres used per step
    # dtype the class centres and their momentum are stored in; math is fp32 on the sampled
    # rows, 16-bit updates are written back with stochastic rounding
    storage: Literal["fp32", "bf16", "fp16"] = "fp32"
    # host: centres and momentum live in host memory, sampled rows are copied to the device
    offload: Literal["none", "host"] = "none"
    subcenters: int = _bounded(1, ge=1)  # sub-center ArcFace: centres per class (1: off)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = _bounded(0.1, gt=0)  # peak learning rate, reached after warmup
    momentum: float = _bounded(0.9, ge=0, lt=1)
    weight_decay: float = _bounded(5e-4, ge=0)
    clip_grad_norm: float = _bounded(5.0, ge=0)  # 0 disables
    warmup_steps: int = _bounded(0, ge=0)
    schedule: Literal["polynomial", "cosine"] = "polynomial"
    power: float = _bounded(2.0, gt=0)  # polynomial exponent
    min_lr: float = _bounded(0.0, ge=0)  # must not exceed lr
    grad_accum_steps: int = _bounded(1, ge=1)
    # train only the classifier for the first N steps (backbone and its BatchNorm statistics frozen)
    freeze_backbone_steps: int = _bounded(0, ge=0)
    # learning rate of each part as a multiple of the scheduled one (fine-tuning a
    # pretrained backbone: backbone_lr_scale < 1)
    backbone_lr_scale: float = _bounded(1.0, ge=0)
    classifier_lr_scale: float = _bounded(1.0, ge=0)
    # weight decay of each part; null: optim.weight_decay
    backbone_weight_decay: float | None = _bounded(None, ge=0)
    classifier_weight_decay: float | None = _bounded(None, ge=0)


@dataclass
class AugmentConfig:
    """Training-time augmentation of RecordIO data, `data.augment.KEY` (YAML `data: {augment:
    {KEY: value}}`). Only the flip is on by default; every other operation is off until its
    strength or probability is > 0. Each operation's distributions and order: trainer/data/augment.py."""

    flip: bool = True  # horizontal mirror with probability 0.5
    crop: float = _bounded(0.0, ge=0, le=1)  # probability of a random resized crop (back to 112x112)
    # (a `_range` is a field with a default_factory: each config gets its own list)
    crop_area: list[float] = _range(0.8, 1.0, gt=0, le=1)  # noqa: RUF009  # crop's area fraction, uniform
    crop_aspect: list[float] = _range(3 / 4, 4 / 3, gt=0)  # noqa: RUF009  # crop's width/height, log-uniform
    brightness: float = _bounded(0.0, ge=0, le=1)  # factor uniform in [1 - b, 1 + b]
    contrast: float = _bounded(0.0, ge=0, le=1)  # factor uniform in [1 - c, 1 + c], about the mean grey
    saturation: float = _bounded(0.0, ge=0, le=1)  # factor uniform in [1 - s, 1 + s], about each pixel's grey
    grayscale: float = _bounded(0.0, ge=0, le=1)  # probability of a grey image
    blur: float = _bounded(0.0, ge=0, le=1)  # probability of a Gaussian blur
    blur_sigma: list[float] = _range(0.1, 2.0, gt=0, le=10)  # noqa: RUF009  # pixels, uniform
    erase: float = _bounded(0.0, ge=0, le=1)  # probability of erasing a box (filled with grey 128)
    erase_area: list[float] = _range(0.02, 0.2, gt=0, le=1)  # noqa: RUF009  # box's area fraction, uniform
    erase_aspect: list[float] = _range(0.3, 3.3, gt=0)  # noqa: RUF009  # box's width/height, log-uniform


# The data.augment keys that only shape an operation, and the key that switches it on.
AUGMENT_SWITCHES = {
    "crop_area": "crop", "crop_aspect": "crop", "blur_sigma": "blur",
    "erase_area": "erase", "erase_aspect": "erase",
}


@dataclass
class DataConfig:
    source: Literal["synthetic", "recordio"] = "synthetic"
    path: str | None = None  # dataset directory; required (and must exist) for recordio
    batch_size: int = _bounded(128, ge=1)  # per rank
    workers: int = _bounded(2, ge=0)  # loader processes (torch) or threads (DALI)
    # synthetic: the class count; recordio: the manifest's unless set (then checked against it)
    num_classes: int | None = _bounded(1000, ge=1)
    num_samples: int = _bounded(10000, ge=1)  # synthetic: images per epoch
    image_size: int = 112  # side of the square input faces; the backbones need 112
    synthetic_mode: Literal["identities", "noise"] = "identities"
    loader: Literal["auto", "dali", "torch"] = "auto"  # recordio; auto: DALI when installed
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # recordio only


@dataclass
class CheckpointConfig:
    every: int = _bounded(0, ge=0)  # steps; 0: only at the end (and on preemption)
    keep: int = _bounded(3, ge=1)  # newest complete checkpoints kept (plus `best`)
    # auto: resume from run.output_dir/checkpoints/latest when it exists; never: start fresh
    # (refused if checkpoints exist); otherwise the path of a checkpoint directory to start from
    resume: str = "auto"
    verify: bool = True  # check every file's size and checksum when loading
    # Fault injection for tests and drills: at this 1-based step the last rank kills itself
    # (SIGKILL) in the middle of writing its checkpoint files. 0 disables.
    inject_kill_during_save: int = _bounded(0, ge=0)


@dataclass
class EvalConfig:
    targets: list[str] = field(default_factory=list)  # verification .bin files; each must exist
    every: int = _bounded(0, ge=0)  # steps; 0: only at the end of training
    batch_size: int = _bounded(64, ge=1)  # images per rank per forward during evaluation
    flip: bool = True  # test-time augmentation: embedding of image + its mirror
    # keep checkpoints/best by this target's accuracy (a file name from targets, or its stem);
    # null: the first target
    best_target: str | None = None


@dataclass
class MetricsConfig:
    port: int = _bounded(0, ge=0, le=65535)  # Prometheus /metrics on port + LOCAL_RANK; 0 disables
    address: str = "0.0.0.0"  # interface the exporter listens on (127.0.0.1: this host only)
    pushgateway: str | None = None  # Pushgateway URL to push to (short jobs); null disables
    push_every_s: float = _bounded(15.0, gt=0)  # seconds between pushes (and one at the end)
    # TensorBoard event files in run.output_dir/tensorboard (rank 0); null: when installed
    tensorboard: bool | None = None


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: float = _bounded(1800.0, gt=0)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    margin: MarginConfig = field(default_factory=MarginConfig)
    partial_fc: PartialFCConfig = field(default_factory=PartialFCConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)


_SECTIONS: dict[str, type] = get_type_hints(Config)
_FIELD_TYPES: dict[str, dict[str, Any]] = {name: get_type_hints(cls) for name, cls in _SECTIONS.items()}


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float and rejects a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings `_Loader` would read as something else (e.g. '1e3')."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
    )


def _parse_yaml(text: str) -> Any:
    """`text` parsed with `_Loader`; a YAML error becomes a one-line ConfigError (no prefix)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"invalid YAML{where}: {problem}") from None


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _check_key(section: str, key: str | None = None, sub: str | None = None) -> None:
    """`section`, `section.key` or (a key that is itself a group, e.g. data.augment)
    `section.key.sub` names a config entry; ConfigError listing the allowed names otherwise."""
    if section not in _SECTIONS:
        raise ConfigError(f"unknown section {section!r} (allowed: {', '.join(_SECTIONS)})")
    if key is not None and key not in _FIELD_TYPES[section]:
        allowed = ", ".join(_FIELD_TYPES[section])
        raise ConfigError(f"unknown key '{section}.{key}' (allowed in {section}: {allowed})")
    if sub is not None:
        group = _FIELD_TYPES[section][key]
        if not is_dataclass(group):
            raise ConfigError(f"'{section}.{key}' has no keys of its own; use {section}.{key}=value")
        _check_group_key(f"{section}.{key}", group, sub)


def _check_group_key(name: str, group: type, key: str) -> None:
    allowed = get_type_hints(group)
    if key not in allowed:
        raise ConfigError(f"unknown key '{name}.{key}' (allowed in {name}: {', '.join(allowed)})")


def _read_file(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The file's sections as plain dicts; unknown sections and keys are errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    try:
        data = _parse_yaml(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of sections ({', '.join(_SECTIONS)}), "
            f"got {_describe(data)}"
        )
    sections: dict[str, dict[str, Any]] = {}
    for name, values in data.items():
        _check_key(str(name))
        values = {} if values is None else values  # a section with every key commented out
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {_describe(values)}")
        for key in values:
            _check_key(name, str(key))
        sections[name] = dict(values)
    return sections


def _apply_override(sections: dict[str, dict[str, Any]], override: str) -> None:
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) not in (2, 3):
        raise ConfigError(
            f"override {override!r}: expected section.key=value, e.g. optim.lr=0.05 "
            "(or data.augment.key=value)"
        )
    try:
        _check_key(*parts)
        value = _parse_yaml(text)
    except ConfigError as e:
        raise ConfigError(f"override {override!r}: {e}") from None
    target = sections.setdefault(parts[0], {})
    if len(parts) == 3:  # one key of a group: merged into the group's other keys
        group = target.get(parts[1])
        target[parts[1]] = dict(group) if isinstance(group, dict) else {}
        target = target[parts[1]]
    target[parts[-1]] = value


def _type_name(tp: Any) -> str:
    if is_dataclass(tp):
        return "a mapping of keys"
    return f"list of {_type_name(get_args(tp)[0])}" if get_origin(tp) is list else tp.__name__


def _group(key: str, values: dict[str, Any], cls: type) -> Any:
    """`cls(**values)` with every value checked against its annotation; ConfigError names `key.name`."""
    types = get_type_hints(cls)
    for name in values:
        _check_group_key(key, cls, str(name))
    return cls(**{name: _coerce(f"{key}.{name}", v, types[name]) for name, v in values.items()})


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """`value` checked against the annotation `tp` (converted where allowed); ConfigError names `key`."""
    nullable = get_origin(tp) in (Union, UnionType)  # only `X | None` is used
    if nullable:
        if value is None:
            return None
        (tp,) = [arg for arg in get_args(tp) if arg is not type(None)]
    if get_origin(tp) is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(get_args(tp))}")
    if is_dataclass(tp):
        if isinstance(value, dict):
            return _group(key, value, tp)
    elif get_origin(tp) is list:
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", item, get_args(tp)[0]) for i, item in enumerate(value)]
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value}")
            return float(value)
    elif isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
        return value
    expected = _type_name(tp) + (" or null" if nullable else "")
    raise ConfigError(f"{key}: expected {expected}, got {_describe(value)}")


def _build(sections: dict[str, dict[str, Any]]) -> Config:
    return Config(**{name: _group(name, sections.get(name, {}), cls) for name, cls in _SECTIONS.items()})


def _require_path(key: str, path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{key}: {path} does not exist")


def _check_bounds(cfg: Config) -> None:
    for name in _SECTIONS:
        _check_group_bounds(name, getattr(cfg, name))


def _check_group_bounds(name: str, group: Any) -> None:
    """Every field of `group` (a section or a group of keys in one) inside its `_bounded`/`_range`."""
    for f in fields(group):
        key, value, bounds = f"{name}.{f.name}", getattr(group, f.name), f.metadata.get("bounds")
        if is_dataclass(value):
            _check_group_bounds(key, value)
        elif f.metadata.get("range"):
            if len(value) != 2 or value[0] > value[1]:
                raise ConfigError(f"{key}: must be [low, high] with low <= high, got {value}")
            for end in value:
                if end not in bounds:
                    raise ConfigError(f"{key}: both ends must be {bounds}, got {value}")
        elif bounds is not None and value is not None and value not in bounds:
            raise ConfigError(f"{key}: must be {bounds}, got {value}")


def _check_margin(margin: MarginConfig) -> None:
    """Refuse a margin key the chosen margin.type would silently ignore."""
    defaults, used = MarginConfig(), MARGIN_KEYS[margin.type]
    for f in fields(margin):
        if f.name not in (*used, "type") and getattr(margin, f.name) != getattr(defaults, f.name):
            raise ConfigError(
                f"margin.{f.name}: does not apply to margin.type {margin.type} (it reads "
                f"{', '.join(used)}); remove it or choose another margin.type"
            )


def _check_augment(data: DataConfig) -> None:
    """Refuse a data.augment key that would be silently ignored: any, on the synthetic source
    (it draws its own flips and jitter), or one shaping an operation that is off."""
    defaults = AugmentConfig()
    for f in fields(data.augment):
        value = getattr(data.augment, f.name)
        if value == getattr(defaults, f.name):
            continue
        if data.source != "recordio":
            raise ConfigError(
                f"data.augment.{f.name}: applies to data.source=recordio only (the synthetic source "
                "draws its own flips and jitter); remove it"
            )
        switch = AUGMENT_SWITCHES.get(f.name)
        if switch is not None and getattr(data.augment, switch) == 0:
            raise ConfigError(
                f"data.augment.{f.name}: has no effect while data.augment.{switch} is 0; "
                f"set data.augment.{switch} > 0 or remove it"
            )


def _check_consistency(cfg: Config) -> None:
    from trainer.backbones import available_backbones  # imports torch: only when validating

    if cfg.run.epochs == 0 and cfg.run.max_steps == 0:
        raise ConfigError("run.epochs: run.epochs and run.max_steps are both 0; set one of them > 0")
    names = available_backbones()
    if cfg.backbone.name not in names:
        raise ConfigError(f"backbone.name: {cfg.backbone.name!r} is not one of {', '.join(names)}")
    if cfg.data.image_size != _BACKBONE_INPUT_SIZE:
        raise ConfigError(
            f"data.image_size: must be {_BACKBONE_INPUT_SIZE} (the backbones' input size), "
            f"got {cfg.data.image_size}"
        )
    from trainer.backbones import supports_activation_checkpointing

    checkpointing = cfg.backbone.activation_checkpointing
    if checkpointing != "none" and not supports_activation_checkpointing(cfg.backbone.name):
        raise ConfigError(
            f"backbone.activation_checkpointing: {checkpointing!r} is for iresnet* and vit_* "
            f"backbones, not {cfg.backbone.name}; set it to none"
        )
    vit_keys = [k for k in ("drop_path_rate", "mask_ratio") if getattr(cfg.backbone, k) is not None]
    if vit_keys and not cfg.backbone.name.startswith("vit_"):
        raise ConfigError(
            f"backbone.{vit_keys[0]}: applies to ViT backbones (vit_*) only, not "
            f"{cfg.backbone.name}; set it to null"
        )
    _check_margin(cfg.margin)
    _check_augment(cfg.data)
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr: must be <= optim.lr ({cfg.optim.lr}), got {cfg.optim.min_lr}")
    if cfg.data.source == "synthetic" and cfg.data.num_classes is None:
        raise ConfigError("data.num_classes: null (from the manifest) needs data.source recordio; set a number")
    if cfg.data.source == "recordio":
        if cfg.data.path is None:
            raise ConfigError("data.path: required when data.source is recordio")
        _require_path("data.path", cfg.data.path)
    for i, target in enumerate(cfg.eval.targets):
        _require_path(f"eval.targets[{i}]", target)
    if cfg.optim.freeze_backbone_steps and cfg.backbone.precision == "fp16":
        raise ConfigError(
            "optim.freeze_backbone_steps: not supported with backbone.precision=fp16 (the loss "
            "scaler needs backbone gradients); use bf16 or fp32"
        )
    if cfg.metrics.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "metrics.tensorboard: true needs the tensorboard package: install the extra "
            "(pip install 'arcshard[tensorboard]') or set metrics.tensorboard=false"
        )


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """The config from `path` (None: all defaults) with `section.key=value` overrides applied
    in order (values parsed as YAML: `optim.lr=0.05`, `eval.targets=[a.bin,b.bin]`,
    `data.path=null`), validated; raises ConfigError."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'section.key=value' strings, not one string")
    sections = {} if path is None else _read_file(path)
    for override in overrides:
        _apply_override(sections, override)
    if sections.get("data", {}).get("source") == "recordio" and "num_classes" not in sections["data"]:
        sections["data"]["num_classes"] = None  # the manifest's count (trainer.data.source)
    cfg = _build(sections)
    _check_bounds(cfg)
    _check_consistency(cfg)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write `cfg.to_yaml()` to `path` atomically, creating the directory if needed."""
    write_atomic(path, cfg.to_yaml())


# Config keys whose change makes a checkpoint unusable: they fix tensor shapes.
SHAPE_KEYS = ("data.num_classes", "backbone.embedding_size", "backbone.name", "partial_fc.subcenters")


def config_changes(saved: Config, current: Config) -> tuple[list[str], list[str]]:
    """(shape-changing differences, other differences) as 'key: old -> new' lines: a
    resume refuses the first kind (the tensors would not fit) and logs the second."""
    old, new = saved.to_dict(), current.to_dict()
    shape, other = [], []
    for section, values in new.items():
        for key, value in values.items():
            before = old.get(section, {}).get(key)
            if before != value:
                name = f"{section}.{key}"
                (shape if name in SHAPE_KEYS else other).append(f"{name}: {before!r} -> {value!r}")
    return shape, other
