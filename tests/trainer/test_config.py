from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from trainer.config import (
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    OptimConfig,
    load_config,
    save_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "trainer" / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_error(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> str:
    """The message of the ConfigError that loading raises; asserts it is one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_load():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.optim == OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert cfg.data.path is None and cfg.eval.targets == []


def test_yaml_and_overrides_merge(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "optim:\n  lr: 1\n  momentum: 0.8\ndata:\n  batch_size: 64\neval:\n",
    )
    cfg = load_config(path, ["optim.lr=0.05", "data.num_classes=7", "optim.lr=0.02"])
    assert cfg.optim == OptimConfig(lr=0.02, momentum=0.8)  # the last override wins
    assert cfg.data == DataConfig(batch_size=64, num_classes=7)
    assert cfg.backbone == Config().backbone  # untouched sections keep their defaults


def test_int_is_converted_for_float_fields(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "optim:\n  lr: 1\n"))
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path / "c.yaml", "# nothing set\n")) == Config()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path, tmp_path):
    cfg = load_config(path, [f"data.path={tmp_path}"])
    assert cfg.data.path == str(tmp_path)
    assert cfg.run.name == path.stem


def test_all_expected_configs_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"cpu_demo", "ms1mv3_r50", "glint360k_r100", "wf42m_pfc02_r100", "wf42m_pfc03_vit_b",
            "wf42m_pfc03_vit_l"} <= names


def test_cpu_demo_needs_no_override():
    cfg = load_config(CONFIG_DIR / "cpu_demo.yaml")
    assert cfg.data.source == "synthetic" and cfg.run.max_steps > 0


def test_recordio_config_needs_existing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped relative data.path does not exist here
    message = config_error(CONFIG_DIR / "ms1mv3_r50.yaml")
    assert message == "data.path: data/ms1mv3 does not exist"


def test_overrides_parse_lists_null_and_floats(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.bin", "")
    write(tmp_path / "b.bin", "")
    cfg = load_config(
        None,
        ["eval.targets=[a.bin, b.bin]", "data.path=null", "optim.lr=1e-3", "optim.weight_decay=5.0e-4"],
    )
    assert cfg.eval.targets == ["a.bin", "b.bin"]
    assert cfg.data.path is None
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 5e-4
    assert load_config(None, ["data.path="]).data.path is None  # an empty value is null


def test_half_precision_is_allowed_in_the_config():
    assert load_config(None, ["backbone.precision=fp16"]).backbone.precision == "fp16"
    assert load_config(None, ["backbone.precision=bf16"]).backbone.precision == "bf16"


def test_save_config_round_trip(tmp_path):
    write(tmp_path / "lfw.bin", "")
    cfg = load_config(
        None,
        [
            "data.source=recordio",
            f"data.path={tmp_path}",
            f"eval.targets=[{tmp_path / 'lfw.bin'}]",
            "optim.lr=1e-5",
            "optim.name=adamw",
            "margin.m2=0",
            "margin.m3=0.4",
            "run.name='1e3'",  # a string that plain YAML 1.2 would read as a number
            "backbone.channels_last=false",
        ],
    )
    out = tmp_path / "run" / "config.yaml"  # the directory is created
    save_config(cfg, out)
    assert out.read_text() == cfg.to_yaml()
    assert load_config(out) == cfg
    assert load_config(out).run.name == "1e3"
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left


def test_save_config_keeps_old_file_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "config.yaml"
    save_config(Config(), out)
    before = out.read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        save_config(load_config(None, ["optim.lr=0.5"]), out)
    assert out.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# (overrides, exact message) for errors in values; each names the full key.
VALUE_ERRORS = [
    (["optim.name=adam"], "optim.name: 'adam' is not one of sgd, adamw"),
    (["partial_fc.sample_rate=0"], "partial_fc.sample_rate: must be in (0, 1], got 0.0"),
    (["partial_fc.sample_rate=1.5"], "partial_fc.sample_rate: must be in (0, 1], got 1.5"),
    (["data.batch_size=0"], "data.batch_size: must be >= 1, got 0"),
    (["data.batch_size=abc"], "data.batch_size: expected int, got str 'abc'"),
    (["data.batch_size=true"], "data.batch_size: expected int, got bool True"),
    (["data.batch_size=32.0"], "data.batch_size: expected int, got float 32.0"),
    (["optim.lr=true"], "optim.lr: expected float, got bool True"),
    (["optim.lr=.inf"], "optim.lr: must be a finite number, got inf"),
    (["run.name=5"], "run.name: expected str, got int 5"),
    (["run.output_dir=null"], "run.output_dir: expected str, got null"),
    (["backbone.channels_last=1"], "backbone.channels_last: expected bool, got int 1"),
    (["data.path=3"], "data.path: expected str or null, got int 3"),
    (["eval.targets=a.bin"], "eval.targets: expected list of str, got str 'a.bin'"),
    (["eval.targets=[a.bin, 3]"], "eval.targets[1]: expected str, got int 3"),
    (["eval.targets=[/no/such.bin]"], "eval.targets[0]: /no/such.bin does not exist"),
    (["backbone.precision=fp8"], "backbone.precision: 'fp8' is not one of auto, fp32, bf16, fp16"),
    (["backbone.name=resnet9"], "backbone.name: 'resnet9' is not one of "),
    (["backbone.dropout=1"], "backbone.dropout: must be in [0, 1), got 1.0"),
    (["data.image_size=96"], "data.image_size: must be 112 (the backbones' input size), got 96"),
    (["data.source=recordio"], "data.path: required when data.source is recordio"),
    (["data.source=recordio", "data.path=/x/y"], "data.path: /x/y does not exist"),
    (["run.epochs=0"], "run.epochs: run.epochs and run.max_steps are both 0; set one of them > 0"),
    (["margin.m1=0.5"], "margin.m1: must be >= 1, got 0.5"),
    (["margin.s=0"], "margin.s: must be > 0, got 0.0"),
    (["margin.interclass_filter=1"], "margin.interclass_filter: must be in [0, 1), got 1.0"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps: must be >= 0, got -1"),
    (["optim.grad_accum_steps=0"], "optim.grad_accum_steps: must be >= 1, got 0"),
    (["optim.lr=0"], "optim.lr: must be > 0, got 0.0"),
    (["optim.momentum=1"], "optim.momentum: must be in [0, 1), got 1.0"),
    (["optim.weight_decay=-1e-4"], "optim.weight_decay: must be >= 0, got -0.0001"),
    (["optim.min_lr=0.2"], "optim.min_lr: must be <= optim.lr (0.1), got 0.2"),
    (["optim.schedule=step"], "optim.schedule: 'step' is not one of polynomial, cosine"),
    (["checkpoint.keep=0"], "checkpoint.keep: must be >= 1, got 0"),
    (["eval.every=-1"], "eval.every: must be >= 0, got -1"),
    (["metrics.port=70000"], "metrics.port: must be in [0, 65535], got 70000"),
    (["dist.timeout_s=0"], "dist.timeout_s: must be > 0, got 0.0"),
    (["optim.backbone_lr_scale=-1"], "optim.backbone_lr_scale: must be >= 0, got -1.0"),
    (["optim.classifier_weight_decay=-1"], "optim.classifier_weight_decay: must be >= 0, got -1.0"),
    (["backbone.mask_ratio=0.1"], "backbone.mask_ratio: applies to ViT backbones (vit_*) only"),
    (["backbone.name=vit_t", "backbone.drop_path_rate=1"], "backbone.drop_path_rate: must be in [0, 1)"),
    (["backbone.name=mobilefacenet", "backbone.activation_checkpointing=blocks"],
     "backbone.activation_checkpointing: 'blocks' is for iresnet* and vit_* backbones"),
]


@pytest.mark.parametrize("overrides, expected", VALUE_ERRORS, ids=[e[0][-1] for e in VALUE_ERRORS])
def test_invalid_value(overrides, expected):
    assert config_error(None, overrides).startswith(expected)


def test_value_errors_from_the_file_name_the_key(tmp_path):
    path = write(tmp_path / "c.yaml", "data:\n  batch_size: abc\n")
    assert config_error(path) == "data.batch_size: expected int, got str 'abc'"


OVERRIDE_ERRORS = [
    ("optim.lr", "override 'optim.lr': expected section.key=value"),
    ("lr=0.1", "override 'lr=0.1': expected section.key=value"),
    ("optim.lrr=0.1", "override 'optim.lrr=0.1': unknown key 'optim.lrr' (allowed in optim: name, lr, "),
    ("foo.bar=1", "override 'foo.bar=1': unknown section 'foo' (allowed: run, backbone, "),
    ("eval.targets=[a.bin", "override 'eval.targets=[a.bin': invalid YAML (line 1, column "),
]


@pytest.mark.parametrize("override, expected", OVERRIDE_ERRORS, ids=[e[0] for e in OVERRIDE_ERRORS])
def test_invalid_override(override, expected):
    assert config_error(None, [override]).startswith(expected)


def test_overrides_must_be_a_sequence_of_strings():
    with pytest.raises(TypeError):
        load_config(None, "optim.lr=0.1")


FILE_ERRORS = [
    ("optim:\n  lrr: 0.1\n", "unknown key 'optim.lrr' (allowed in optim: name, lr, momentum, "),
    ("foo:\n  bar: 1\n", "unknown section 'foo' (allowed: run, backbone, margin, "),
    ("optim: 3\n", "optim: expected a mapping of keys, got int 3"),
]


@pytest.mark.parametrize("text, expected", FILE_ERRORS, ids=["unknown-key", "unknown-section", "not-mapping"])
def test_invalid_file_structure(tmp_path, text, expected):
    assert config_error(write(tmp_path / "c.yaml", text)).startswith(expected)


NAMED_FILE_ERRORS = [
    ("optim:\n  lr: [0.1\n", "invalid YAML (line 3, column 1): expected ',' or ']'"),
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", "invalid YAML (line 3, column 3): duplicate key 'lr'"),
    ("- optim\n- data\n", "top level must be a mapping of sections (run, backbone, "),
]


@pytest.mark.parametrize("text, expected", NAMED_FILE_ERRORS, ids=["syntax", "duplicate-key", "top-level-list"])
def test_file_errors_name_the_file(tmp_path, text, expected):
    path = write(tmp_path / "c.yaml", text)
    assert config_error(path).startswith(f"{path}: {expected}")


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "missing.yaml"
    assert config_error(path) == f"{path}: cannot read config file: No such file or directory"


def test_augment_group_from_yaml_and_overrides_round_trips(tmp_path):
    path = write(tmp_path / "c.yaml", f"data:\n  source: recordio\n  path: {tmp_path}\n"
                 "  augment:\n    brightness: 0.2\n    crop: 1\n    crop_area: [0.5, 1]\n")
    cfg = load_config(path, ["data.augment.erase=0.25", "data.augment.crop_aspect=[1, 1]"])
    augment = cfg.data.augment
    assert (augment.brightness, augment.crop, augment.crop_area, augment.erase) == (0.2, 1.0, [0.5, 1.0], 0.25)
    assert augment.crop_aspect == [1.0, 1.0] and augment.flip and augment.contrast == 0  # the rest: defaults
    replaced = load_config(path, ["data.augment={contrast: 0.1}"]).data.augment  # the whole group
    assert replaced.contrast == 0.1 and replaced.brightness == 0
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert load_config(None).data.augment == AugmentConfig()  # flip only


AUGMENT_ERRORS = [
    (["data.augment.brightnes=0.2"], ("override 'data.augment.brightnes=0.2': unknown key "
                                       "'data.augment.brightnes' (allowed in data.augment: flip, crop, ")),
    (["data.batch_size.x=1"], "override 'data.batch_size.x=1': 'data.batch_size' has no keys of its own"),
    (["data.augment.a.b=1"], "override 'data.augment.a.b=1': expected section.key=value"),
    (["data.augment=3"], "data.augment: expected a mapping of keys, got int 3"),
    (["data.augment.brightness=1.5"], "data.augment.brightness: must be in [0, 1], got 1.5"),
    (["data.augment.crop=1", "data.augment.crop_area=0.5"], "data.augment.crop_area: expected list of float"),
    (["data.augment.crop=1", "data.augment.crop_area=[1, 0.5]"],
     "data.augment.crop_area: must be [low, high] with low <= high, got [1.0, 0.5]"),
    (["data.augment.blur=1", "data.augment.blur_sigma=[1]"], "data.augment.blur_sigma: must be [low, high]"),
    (["data.augment.crop=1", "data.augment.crop_area=[0, 1]"],
     "data.augment.crop_area: both ends must be in (0, 1], got [0.0, 1.0]"),
    (["data.augment.erase_area=[0.1, 0.3]"],
     "data.augment.erase_area: has no effect while data.augment.erase is 0; set data.augment.erase > 0"),
]


@pytest.mark.parametrize("overrides, expected", AUGMENT_ERRORS, ids=[e[0][-1] for e in AUGMENT_ERRORS])
def test_invalid_augment_key(tmp_path, overrides, expected):
    assert config_error(None, ["data.source=recordio", f"data.path={tmp_path}", *overrides]).startswith(expected)


def test_augment_file_keys_are_checked_by_name(tmp_path):
    path = write(tmp_path / "c.yaml", "data:\n  augment:\n    blurr: 0.5\n")
    assert config_error(path).startswith("unknown key 'data.augment.blurr' (allowed in data.augment: flip, ")


def test_augment_is_refused_on_the_synthetic_source():
    assert config_error(None, ["data.augment.flip=false"]).startswith(
        "data.augment.flip: applies to data.source=recordio only")
