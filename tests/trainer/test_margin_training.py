"""Each margin trains on the synthetic identities task under torchrun (loss falls), and
the margin config keys are validated and counted by the planner."""

import pytest

from tests.trainer.test_train import _metrics, _torchrun
from trainer.config import ConfigError, load_config
from trainer.margins import AdaFace, CombinedMargin, CurricularFace, build_margin
from trainer.plan import PlanInputs, make_plan

# name -> (overrides, the running statistics it logs to metrics.jsonl)
RUNS = {
    "arcface_subcenters": (["partial_fc.subcenters=3"], set()),
    "curricular": (["margin.type=curricular"], {"margin_t"}),
    # m2 is not AdaFace's key: back to its default (TINY sets it)
    "adaface": (["margin.type=adaface", "margin.m2=0.5"], {"margin_norm_mean", "margin_norm_std"}),
}


@pytest.mark.integration
def test_every_margin_trains_under_torchrun(tmp_path):
    for name, (overrides, statistics) in RUNS.items():
        out = tmp_path / name
        proc = _torchrun(out, "run.max_steps=20", "data.synthetic_mode=identities", *overrides)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        rows = _metrics(out)
        first, last = rows[0]["loss"], rows[-1]["loss"]
        print(f"{name}: loss {first:.3f} -> {last:.3f}")
        assert last < 0.8 * first, f"{name}: loss did not fall: {first} -> {last}"
        logged = {k for k in rows[-1] if k.startswith("margin_")}
        assert logged == statistics
        assert all(rows[0][k] != rows[-1][k] for k in statistics)  # they move


def test_margin_type_builds_its_margin_with_the_issue_defaults():
    assert isinstance(build_margin(load_config(None).margin), CombinedMargin)
    curricular = build_margin(load_config(None, ["margin.type=curricular"]).margin)
    assert isinstance(curricular, CurricularFace)
    assert (curricular.m, curricular.t_momentum, float(curricular.t)) == (0.5, 0.01, 0.0)
    ada = build_margin(load_config(None, ["margin.type=adaface"]).margin)
    assert isinstance(ada, AdaFace)
    assert (ada.m, ada.h, ada.t_alpha) == (0.4, 0.333, 0.01)
    assert (float(ada.norm_mean), float(ada.norm_std)) == (20.0, 100.0)


@pytest.mark.parametrize("overrides,needle", [
    (["margin.type=adaface", "margin.m1=1.2"], "margin.m1: does not apply to margin.type adaface"),
    (["margin.type=curricular", "margin.interclass_filter=0.3"], "margin.interclass_filter"),
    (["margin.t_alpha=0.5"], "margin.t_alpha: does not apply to margin.type combined"),
    (["margin.type=sphere"], "margin.type"),
    (["partial_fc.subcenters=0"], "partial_fc.subcenters"),
])
def test_margin_keys_that_would_be_ignored_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_planner_counts_subcentres():
    one = make_plan(PlanInputs(num_classes=1_000_000, world_size=8, device_memory=80 << 30))
    three = make_plan(PlanInputs(num_classes=1_000_000, world_size=8, device_memory=80 << 30, subcenters=3))
    part = {p.name: p.device for p in one.parts}
    part3 = {p.name: p.device for p in three.parts}
    assert part3["class centres"] == 3 * part["class centres"]
    assert part3["momentum"] == 3 * part["momentum"]
    assert "sub-centre cosines + arg-max" in part3
    assert three.max_num_classes < one.max_num_classes


def test_plan_cli_takes_subcenters(capsys):
    from trainer.cli.plan import main

    main(["--num-classes", "100000", "--world-size", "2", "--device-memory", "80", "--subcenters", "3"])
    out = capsys.readouterr().out
    assert "3 sub-centres per class" in out and "sub-centre cosines + arg-max" in out
