"""The backbone's EMA (`backbone.ema_decay`, trainer/ema.py): the update formula with its
warm-up, skipped steps, identity over ranks, checkpoint round trip and exact resume, no
host read, old checkpoints, and the consumers (in-training verification, `best`,
arcshard-ckpt/-eval/-export/-embed) taking the EMA by default and the trained weights with
--raw-weights."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.distributed import run_world
from tests.evaluation.conftest import make_bin, random_faces
from tests.trainer.test_loop import REPO, TINY, _ctx
from trainer.config import load_config
from trainer.ema import BackboneEMA, effective_decay

DECAY = 0.9
STEPS = 8
SKIPPED = 3  # the step whose loss is made NaN


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=0, msg=key)


def test_update_is_the_warm_up_formula_in_float64():
    """15 updates of a Linear + BatchNorm in float64 against d_t·e + (1 − d_t)·w with
    d_t = min(0.5, (1 + t)/(10 + t)): warm-up for t < 8, then the plain decay."""
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    ema = BackboneEMA(source, 0.5)
    assert list(ema.module.state_dict()) == list(source.state_dict())
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    expected = _clone(source.state_dict())
    for t in range(15):
        with torch.no_grad():
            for p in source.parameters():
                p.add_(torch.randn_like(p))
        source(torch.randn(8, 4, dtype=torch.float64))  # train mode: BatchNorm statistics move
        d = min(0.5, (1 + t) / (10 + t))
        assert effective_decay(0.5, t) == d
        for key, value in source.state_dict().items():
            if value.is_floating_point():
                expected[key] = d * expected[key] + (1 - d) * value.detach()
            else:
                expected[key] = value.clone()  # num_batches_tracked: copied
        ema.update()
    assert ema.updates == 15 and effective_decay(0.5, 0) == pytest.approx(0.1)
    got = ema.module.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-14, msg=key)
    assert not torch.equal(got["0.weight"], source.state_dict()["0.weight"])  # an average, not a copy
    restored = BackboneEMA(source, 0.5)
    restored.load_state_dict(ema.state_dict())
    _assert_same(restored.module.state_dict(), got)
    assert restored.updates == 15
    restored.reset()
    _assert_same(restored.module.state_dict(), source.state_dict())
    assert restored.updates == 0


def _cfg(base: str, name: str, bin_path: str, *extra: str):
    return load_config(REPO / "trainer/configs/cpu_demo.yaml", [
        *TINY, f"run.output_dir={base}/{name}", f"run.max_steps={STEPS}", "checkpoint.every=4",
        f"backbone.ema_decay={DECAY}", f"run.inject_nonfinite=[{SKIPPED}]",
        f"eval.targets=[{bin_path}]", "eval.every=4", "eval.batch_size=8", *extra,
    ])


class _Stop(Exception):
    pass


def _ema_worker(rank: int, world: int, base: str, bin_path: str) -> dict:
    """8 steps straight (NaN at step 3, verification at 4 and 8) vs 4, stop, resume, 4."""
    from trainer import checkpoint
    from trainer.checkpoint import resume_point
    from trainer.loop import train
    from trainer.run import build

    ctx = _ctx(rank, world)
    updates, around_skip = {}, {}

    def record(run, state):
        updates[state.step] = run.ema.updates
        if state.step in (SKIPPED - 1, SKIPPED):
            around_skip[state.step] = _clone(run.ema.module.state_dict())

    straight = build(_cfg(base, "straight", bin_path), ctx)
    train(straight, on_step=record)

    def stop_at_4(run, state):
        if state.step == 4:
            raise _Stop

    cfg = _cfg(base, "resumed", bin_path)
    try:
        train(build(cfg, ctx), on_step=stop_at_4)
    except _Stop:
        pass
    start = resume_point(cfg, ctx.is_main)
    run = build(cfg, ctx, checkpoint.read_index(start)["train_state"]["epoch"])
    state = checkpoint.load(start, run.parts, config=cfg)
    loaded_updates = run.ema.updates
    train(run, state)
    return {
        "updates": updates, "around_skip": around_skip, "loaded_updates": loaded_updates,
        "ema": _clone(straight.ema.module.state_dict()), "raw": _clone(straight.module.state_dict()),
        "resumed_ema": _clone(run.ema.module.state_dict()), "resumed_updates": run.ema.updates,
    }


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """The world-2 runs of `_ema_worker`: (base dir, .bin, per-rank results)."""
    base = tmp_path_factory.mktemp("ema")
    make_bin(base / "small.bin", num_images=6, num_pairs=10)
    results = run_world(_ema_worker, 2, str(base), str(base / "small.bin"), timeout=900)
    return base, base / "small.bin", results


def _module(state: dict[str, torch.Tensor]) -> nn.Module:
    from trainer.backbones import get_backbone

    module = get_backbone("mobilefacenet", embedding_size=32)
    module.load_state_dict(state)
    return module.eval()


def test_skipped_steps_do_not_update_and_every_rank_holds_the_same_average(ema_runs):
    _, _, (r0, r1) = ema_runs
    applied = [s for s in range(1, STEPS + 1) if s != SKIPPED]
    assert r0["updates"] == {s: len([a for a in applied if a <= s]) for s in range(1, STEPS + 1)}
    _assert_same(r0["around_skip"][SKIPPED], r0["around_skip"][SKIPPED - 1])
    _assert_same(r0["ema"], r1["ema"])  # parameters and BatchNorm statistics, bit for bit
    # ... which needs the broadcast: each rank's own statistics differ after its forward
    floats = [k for k, v in r0["raw"].items() if "running" in k]
    assert any(not torch.equal(r0["raw"][k], r1["raw"][k]) for k in floats)
    assert not torch.equal(r0["ema"]["features.layers.3.weight"], r0["raw"]["features.layers.3.weight"])


def test_resume_ends_with_bit_identical_average(ema_runs):
    base, _, results = ema_runs
    for r in results:
        assert r["loaded_updates"] == 3  # steps 1, 2, 4
        assert r["resumed_updates"] == r["updates"][STEPS] == STEPS - 1
        _assert_same(r["resumed_ema"], r["ema"])
    from trainer.checkpoint import read_index, read_replicated

    ckpt = base / "straight" / "checkpoints" / "step-000000008"
    index = read_index(ckpt)
    assert index["backbone_ema"] == {"decay": DECAY, "updates": STEPS - 1}
    saved = read_replicated(ckpt, index)["backbone_ema"]
    _assert_same(saved["weights"], results[0]["ema"])
    _assert_same(read_replicated(ckpt, index)["backbone"], results[0]["raw"])


def test_verification_and_best_use_the_average(ema_runs):
    from trainer.checkpoint import load_backbone

    base, _, _ = ema_runs
    out = base / "straight"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "eval" in r][-1]
    assert last["step"] == STEPS and last["eval_weights"] == "ema"
    # Not compared by value with a re-evaluation of the saved average: on these 10 pairs of
    # random faces after 8 steps every score is nearly the same, and a re-evaluation in this
    # process reorders pairs (AUC 0.56 vs 0.60-0.72 seen, also with one thread and
    # channels_last) - see the session note. The CLI tests below compare embeddings.
    assert 0.0 <= last["eval"]["small"]["accuracy"] <= 1.0
    best = out / "checkpoints" / (out / "checkpoints" / "best").read_text().strip()
    assert load_backbone(best).weights == "ema"  # `best` was scored with, and loads, the EMA


def test_export_backbone_and_info(ema_runs, tmp_path, capsys):
    from trainer.cli.ckpt import main

    base, _, (r0, _) = ema_runs
    run = str(base / "straight")
    assert main(["export-backbone", run, str(tmp_path / "ema.pt")]) == 0
    assert "EMA weights" in capsys.readouterr().out
    assert main(["export-backbone", run, str(tmp_path / "raw.pt"), "--raw-weights"]) == 0
    assert "raw (trained) weights" in capsys.readouterr().out
    _assert_same(torch.load(tmp_path / "ema.pt", weights_only=True), r0["ema"])
    _assert_same(torch.load(tmp_path / "raw.pt", weights_only=True), r0["raw"])
    assert main(["info", run, "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["backbone_ema"] == {"decay": DECAY, "updates": STEPS - 1} and facts["integrity"] == "ok"
    assert main(["info", run]) == 0
    assert f"backbone EMA    decay {DECAY}, {STEPS - 1} updates" in capsys.readouterr().out


def test_eval_cli_uses_the_average_unless_raw_weights(ema_runs, tmp_path, capsys):
    from trainer.cli.eval import main
    from trainer.evaluation.verification import evaluate_targets, load_bin

    base, bin_path, (r0, _) = ema_runs
    sets = [load_bin(bin_path)]
    for flag, key, said in (([], "ema", "EMA weights"), (["--raw-weights"], "raw", "raw (trained) weights")):
        out = tmp_path / f"{key}.json"
        assert main(["verify", "--checkpoint", str(base / "straight"), "--bin", str(bin_path), "--json",
                     str(out), "--device", "cpu", "--batch-size", "8", *flag]) == 0
        assert said in capsys.readouterr().err
        (result,) = json.loads(out.read_text())
        expected = evaluate_targets(_module(r0[key]), sets, "cpu", batch_size=8, flip=True)["small"]
        assert result["accuracy"] == pytest.approx(expected.accuracy)
        assert result["auc"] == pytest.approx(expected.auc, abs=1e-6)
        assert result["best_threshold"] == pytest.approx(expected.best_threshold, abs=1e-5)


def test_embed_cli_uses_the_average_unless_raw_weights(ema_runs, tmp_path, capsys):
    from deploy.embed import main
    from trainer.evaluation.embedder import TorchEmbedder, embed, preprocess

    base, _, (r0, _) = ema_runs
    faces = random_faces(3, seed=5)
    (tmp_path / "faces").mkdir()
    for i, face in enumerate(faces):
        Image.fromarray(face).save(tmp_path / "faces" / f"{i}.png")
    got = {}
    for flag, key, said in (([], "ema", "EMA weights"), (["--raw-weights"], "raw", "raw (trained) weights")):
        out = tmp_path / f"{key}.npy"
        assert main([str(tmp_path / "faces"), "--model", str(base / "straight"), "--out", str(out), *flag]) == 0
        assert said in capsys.readouterr().err
        got[key] = np.load(out)
        expected = embed(TorchEmbedder(_module(r0[key])), preprocess(np.stack(faces)), flip=False)
        np.testing.assert_allclose(got[key], expected, rtol=0, atol=1e-5)
    assert np.abs(got["ema"] - got["raw"]).max() > 1e-3  # the two really are different weights


def test_export_onnx_uses_the_average_unless_raw_weights(ema_runs, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    from deploy.export import main
    from trainer.evaluation.embedder import OnnxEmbedder, TorchEmbedder

    base, _, (r0, _) = ema_runs
    batch = np.random.default_rng(0).uniform(-1, 1, (4, 3, 112, 112)).astype(np.float32)
    for flag, key in (([], "ema"), (["--raw-weights"], "raw")):
        out = tmp_path / f"{key}.onnx"
        assert main(["onnx", "--checkpoint", str(base / "straight"), "--out", str(out), "--parity-samples", "4",
                     *flag]) == 0
        assert f"{key} weights" in capsys.readouterr().out.splitlines()[0]
        metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert metadata["weights"] == key
        expected = TorchEmbedder(_module(r0[key]))(batch)
        np.testing.assert_allclose(OnnxEmbedder(out)(batch), expected, rtol=0, atol=1e-4)


def _old_checkpoint_worker(rank: int, world: int, base: str) -> dict:
    """2 steps without an average, then a resume of the same run with one; a new run from
    init weights; a compiled backbone's average."""
    from trainer import checkpoint
    from trainer.checkpoint import resume_point
    from trainer.loop import train
    from trainer.run import build

    ctx = _ctx(rank, world)

    def cfg(*extra: str):
        return load_config(REPO / "trainer/configs/cpu_demo.yaml",
                           [*TINY, f"run.output_dir={base}/run", "checkpoint.every=2", *extra])

    plain = build(cfg("run.max_steps=2"), ctx)
    assert plain.ema is None
    train(plain)
    later = cfg("run.max_steps=4", f"backbone.ema_decay={DECAY}")
    start = resume_point(later, ctx.is_main)
    run = build(later, ctx, checkpoint.read_index(start)["train_state"]["epoch"])
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("trainer.checkpoint").addHandler(handler)
    logging.getLogger("trainer.checkpoint").setLevel(logging.INFO)
    state = checkpoint.load(start, run.parts, config=later)
    started = (run.ema.updates, _clone(run.ema.module.state_dict()), _clone(run.module.state_dict()))
    train(run, state)
    fine = build(cfg("run.max_steps=1", f"backbone.ema_decay={DECAY}", f"run.output_dir={base}/fine"), ctx)
    init = {k: v + 0.5 if v.is_floating_point() else v for k, v in fine.module.state_dict().items()}
    fine.module.load_state_dict(init)  # what train.py does with backbone.init
    after = {}
    train(fine, on_step=lambda r, s: after.update(_clone(r.module.state_dict())))
    # the first update from the init weights: 0.1·init + 0.9·w1 (d_0 = 0.1)
    init_error = max(float(((fine.ema.module.state_dict()[k] - want).abs() / (1 + want.abs())).max())
                     for k, v in init.items() if v.is_floating_point() for want in [0.1 * v + 0.9 * after[k]])
    compiled = build(cfg("backbone.compile=true", f"backbone.ema_decay={DECAY}"), ctx)
    in_module = {t.data_ptr() for t in compiled.backbone.module.state_dict().values()}
    return {
        "messages": messages, "started": started, "init_error": init_error,
        "compiled": (compiled.ema.source is compiled.module,
                     list(compiled.ema.module.state_dict()) == list(compiled.module.state_dict()),
                     all(t.data_ptr() in in_module for t in compiled.ema._src),
                     compiled.module._compiled_call_impl is not None,
                     compiled.ema.module._compiled_call_impl is None),
    }


def test_checkpoint_without_average_loads_as_before_and_resume_starts_one(tmp_path):
    from trainer.checkpoint import load_backbone, read_index, read_replicated

    (result,) = run_world(_old_checkpoint_worker, 1, str(tmp_path), timeout=600)
    old = tmp_path / "run" / "checkpoints" / "step-000000002"
    index = read_index(old)
    # backbone.ema_decay = 0 writes exactly what it wrote before the EMA existed
    assert "backbone_ema" not in index
    assert set(read_replicated(old, index)) == {
        "format", "version", "backbone", "backbone_optimizer", "scaler", "train_state", "partial_fc"}
    assert load_backbone(old).weights == "raw"  # "ema" asked for, none there: the trained weights
    updates, ema, raw = result["started"]
    assert updates == 0
    _assert_same(ema, raw)  # the average starts from the loaded weights ...
    assert any("no backbone EMA weights" in m and "starts from the loaded weights" in m
               for m in result["messages"])  # ... and says so
    assert read_index(tmp_path / "run" / "checkpoints" / "step-000000004")["backbone_ema"]["updates"] == 2
    assert result["compiled"] == (True, True, True, True, True)
    assert result["init_error"] < 1e-5  # a new run's average starts from backbone.init's weights


def _host_reads_worker(rank: int, world: int) -> tuple[list[str], int]:
    """Host reads of tensor values during three EMA updates (after one real step)."""
    from trainer.loop import train_step
    from trainer.run import build

    cfg = load_config(REPO / "trainer/configs/cpu_demo.yaml",
                      [*TINY, "run.max_steps=2", f"backbone.ema_decay={DECAY}"])
    run = build(cfg, _ctx(rank, world))
    train_step(run, [next(iter(run.source.epoch_batches(0, 0)))], 1, False)
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name)
                 for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")}
    for name, original in originals.items():
        def counted(self, *a, _name=name, _original=original, **kw):
            reads.append(_name)
            return _original(self, *a, **kw)

        setattr(torch.Tensor, name, counted)
    try:
        for _ in range(3):
            run.ema.update()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return reads, run.ema.updates


def test_update_reads_nothing_back_to_the_host():
    """The CPU stand-in for a GPU sync count (on CPU nothing synchronises): the update,
    broadcast included, calls no tensor-to-host read at world 2."""
    for reads, updates in run_world(_host_reads_worker, 2, timeout=300):
        assert reads == [] and updates == 4


def test_a_finished_runs_backbone_pt_is_the_average_and_backbone_raw_pt_the_trained(tmp_path):
    """The files a finished run leaves (no checkpoint): backbone.pt serves the average,
    backbone_raw.pt keeps the trained weights; without an average only backbone.pt."""
    from types import SimpleNamespace

    from trainer.backbones import get_backbone
    from trainer.checkpoint import load_backbone
    from trainer.train import save_backbone

    cfg = load_config(REPO / "trainer/configs/cpu_demo.yaml", [f"run.output_dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(0)
    trained = get_backbone(cfg.backbone.name, embedding_size=cfg.backbone.embedding_size)
    ema = BackboneEMA(trained, 0.9)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    ema.update()
    run = SimpleNamespace(ctx=SimpleNamespace(is_main=True), cfg=cfg, module=trained, ema=ema)
    save_backbone(run)
    served, raw = load_backbone(tmp_path), load_backbone(tmp_path, weights="raw")
    assert (served.weights, raw.weights) == ("ema", "raw")
    _assert_same(served.module.state_dict(), ema.module.state_dict())
    _assert_same(raw.module.state_dict(), trained.state_dict())
    (tmp_path / "backbone_raw.pt").unlink()
    run.ema = None
    save_backbone(run)
    assert not (tmp_path / "backbone_raw.pt").exists()
    only = load_backbone(tmp_path)
    assert only.weights == "raw"
    _assert_same(only.module.state_dict(), trained.state_dict())
