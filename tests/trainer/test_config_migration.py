"""Config keys for users coming from arcface_torch: the manifest's class count is the
default for recordio data, fine-tuning keys validate up front."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, load_config


def test_recordio_takes_num_classes_from_the_manifest_unless_set(tmp_path):
    recordio = ["data.source=recordio", f"data.path={tmp_path}"]
    assert load_config(None, recordio).data.num_classes is None  # resolved from manifest.json
    assert load_config(None, [*recordio, "data.num_classes=7"]).data.num_classes == 7  # checked against it
    assert load_config(None).data.num_classes == 1000  # synthetic keeps its default
    (tmp_path / "c.yaml").write_text(f"data:\n  source: recordio\n  path: {tmp_path}\n")
    assert load_config(tmp_path / "c.yaml").data.num_classes is None


def test_fine_tuning_keys_validate(tmp_path):
    cfg = load_config(None, ["optim.freeze_backbone_steps=3", f"backbone.init={tmp_path}"])
    assert (cfg.optim.freeze_backbone_steps, cfg.backbone.init) == (3, str(tmp_path))
    with pytest.raises(ConfigError, match="optim.freeze_backbone_steps: must be >= 0"):
        load_config(None, ["optim.freeze_backbone_steps=-1"])
    with pytest.raises(ConfigError, match="not supported with backbone.precision=fp16"):
        load_config(None, ["optim.freeze_backbone_steps=1", "backbone.precision=fp16"])
