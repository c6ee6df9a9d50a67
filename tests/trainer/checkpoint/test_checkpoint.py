"""Checkpoints: exact resume, re-sharding to other world sizes, integrity, config checks.

Real gloo groups (tests.distributed.run_world); the training runs here call the library
(`trainer.run.build` / `trainer.loop.train`) so a test can record what every step sampled.
"""

import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed import run_world
from tests.trainer.checkpoint.parts import DIM, NUM_CLASSES
from tests.trainer.checkpoint.parts import pfc_parts as _pfc_parts
from trainer import checkpoint
from trainer.checkpoint import CheckpointError, TrainState, loading
from trainer.config import load_config
from trainer.dist import DistContext, DistEnv

REPO = Path(__file__).resolve().parents[3]
TINY = [
    "backbone.name=mobilefacenet", "backbone.embedding_size=32", "backbone.channels_last=false",
    "data.num_classes=40", "data.batch_size=4", "data.num_samples=56",
    "margin.s=16", "margin.m2=0.2", "partial_fc.sample_rate=0.5",
    "optim.lr=0.1", "optim.warmup_steps=2", "run.log_every=5", "data.workers=0",
]


class _Stop(Exception):
    pass


def _ctx(rank: int, world: int) -> DistContext:
    return DistContext(DistEnv(rank, world, rank, world, "127.0.0.1", 0, "single"), torch.device("cpu"), "gloo")


def _final(run):
    momentum = run.optimizer.shard.momentum_buffer
    return (
        {k: v.clone() for k, v in run.module.state_dict().items()},
        run.pfc.weight.detach().clone(),
        momentum.clone(),
    )


def _resume_worker(rank, world, base: str, steps: int, stop_at: int):
    from trainer.checkpoint import resume_point
    from trainer.loop import train
    from trainer.run import build

    def cfg_for(name):
        return load_config(
            REPO / "trainer/configs/cpu_demo.yaml",
            [*TINY, f"run.output_dir={base}/{name}", f"run.max_steps={steps}",
             f"checkpoint.every={stop_at}"],
        )

    def recorder(log):
        def on_step(run, state):
            log.append((state.step, (run.pfc.last_sampled + run.pfc.class_start).tolist()))
            if state.step == stop_at and stop:
                raise _Stop
        return on_step

    ctx = _ctx(rank, world)
    stop = False
    straight: list = []
    run = build(cfg_for("straight"), ctx)
    train(run, on_step=recorder(straight))
    reference = _final(run)

    stop = True
    resumed: list = []
    cfg = cfg_for("resumed")
    run = build(cfg, ctx)
    with pytest.raises(_Stop):
        train(run, on_step=recorder(resumed))
    stop = False
    start = resume_point(cfg, ctx.is_main)
    run = build(cfg, ctx, checkpoint.read_index(start)["train_state"]["epoch"])  # a fresh process's objects
    state = checkpoint.load(start, run.parts, config=cfg)
    loaded_at = state.step
    train(run, state, on_step=recorder(resumed))
    return straight, resumed, reference, _final(run), loaded_at, start.name


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    """2 ranks: 20 steps straight == 10, stop, resume, 10 (3.5 epochs of 4 steps, so the
    stop falls mid-epoch): same sampled classes at every step, same weights."""
    results = run_world(_resume_worker, 2, str(tmp_path), 20, 10, timeout=600)
    for straight, resumed, reference, final, resumed_at, name in results:
        assert resumed_at == 10 and name == "step-000000010"
        assert [s for s, _ in straight] == list(range(1, 21)) == [s for s, _ in resumed]
        assert straight == resumed  # identical sampled classes at every step
        backbone_a, weight_a, momentum_a = reference
        backbone_b, weight_b, momentum_b = final
        torch.testing.assert_close(weight_b, weight_a, rtol=0, atol=1e-6)
        torch.testing.assert_close(momentum_b, momentum_a, rtol=0, atol=1e-6)
        for key in backbone_a:
            torch.testing.assert_close(backbone_b[key], backbone_a[key], rtol=0, atol=1e-6)
    # Exactly the two ranks' shards of one classifier.
    assert results[0][2][1].shape[0] + results[1][2][1].shape[0] == 40


# --------------------------------------------------------------------------- re-sharding


pytestmark = pytest.mark.usefixtures("world_of_one")


def _fixed_batch(rank, world, total=48):
    """Rank `rank`'s part of one global batch of `total` (divisible by 1, 2, 3 and 4)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(total, DIM, generator=gen)
    y = torch.randint(NUM_CLASSES, (total,), generator=gen)
    per = total // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def _gather_rows(t: torch.Tensor, world: int) -> torch.Tensor:
    parts = [None] * world
    torch.distributed.all_gather_object(parts, t)
    return torch.cat(parts)


def _save_worker(rank, world, root: str):
    torch.manual_seed(0)
    parts = _pfc_parts()
    for step in range(3):  # move weights and momentum away from their init
        x, y = _fixed_batch(rank, world)
        loss = parts.pfc(x + 0.1 * step, y)
        loss.backward()
        parts.shard_optimizer.step()
        parts.shard_optimizer.zero_grad()
    checkpoint.save(root, parts, TrainState(step=3), block_rows=100)  # several blocks per file
    x, y = _fixed_batch(rank, world)
    with torch.no_grad():
        loss = parts.pfc(x, y).item()
    return (_gather_rows(parts.pfc.weight.detach(), world),
            _gather_rows(parts.shard_optimizer.momentum_buffer, world), loss)


def _load_worker(rank, world, ckpt: str, verify: bool = True):
    parts = _pfc_parts()
    state = checkpoint.load(ckpt, parts, verify=verify)
    x, y = _fixed_batch(rank, world)
    with torch.no_grad():
        loss = parts.pfc(x, y).item()
    return (_gather_rows(parts.pfc.weight.detach(), world),
            _gather_rows(parts.shard_optimizer.momentum_buffer, world), loss, state.step,
            parts.pfc.num_local)


@pytest.fixture(scope="module")
def saved_at_world_2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    results = run_world(_save_worker, 2, str(root))
    return root, results[0]


@pytest.mark.parametrize("world,verify", [(1, True), (3, False), (4, True)])
def test_reshard_to_other_world_sizes(saved_at_world_2, world, verify):
    root, (weight, momentum, loss) = saved_at_world_2
    ckpt = checkpoint.find_latest(root)
    results = run_world(_load_worker, world, str(ckpt), verify)
    for w, m, l, step, _ in results:
        assert step == 3
        assert torch.equal(w, weight) and torch.equal(m, momentum)  # bit-identical rows
        assert l == pytest.approx(loss, rel=1e-6, abs=1e-6)
    assert sum(r[4] for r in results) == NUM_CLASSES


def test_each_rank_reads_only_its_rows(saved_at_world_2, monkeypatch):
    """A rank's load touches the saved files overlapping its range, and only those rows."""
    root, _ = saved_at_world_2
    ckpt = checkpoint.find_latest(root)
    read = []
    original = loading._load_rows

    def spy(ckpt_, index, kind, dst, start, verify):
        read.append((kind, start, start + dst.shape[0]))
        return original(ckpt_, index, kind, dst, start, verify)

    monkeypatch.setattr(loading, "_load_rows", spy)
    # world 1: the one rank reads all 1003 rows; world 4 rank 3 would read [753, 1003)
    parts = _pfc_parts()
    checkpoint.load(ckpt, parts)
    assert read == [("weight", 0, NUM_CLASSES), ("momentum", 0, NUM_CLASSES)]
    index = checkpoint.read_index(ckpt)
    assert [(s["start"], s["end"]) for s in index["classifier"]["weight"]] == [(0, 502), (502, 1003)]
    assert index["world_size"] == 2 and index["files"]["replicated.pt"]["sha256"]


# --------------------------------------------------------------------------- integrity


def _copy_ckpt(saved_at_world_2, tmp_path) -> Path:
    root, _ = saved_at_world_2
    dst = tmp_path / "checkpoints"
    shutil.copytree(root, dst)
    return checkpoint.find_latest(dst)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_shard_is_named_and_nothing_is_overwritten(saved_at_world_2, tmp_path, damage):
    ckpt = _copy_ckpt(saved_at_world_2, tmp_path)
    target = ckpt / "classifier" / "weight.0000000502-0000001003.bin"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[1000] ^= 0xFF
    else:
        data = data[:-64]
    target.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"weight\.0000000502-0000001003\.bin"):
        checkpoint.load(ckpt, _pfc_parts())
    if damage == "truncate":  # found from the size alone, also without checksums
        with pytest.raises(CheckpointError, match=r"weight\.0000000502-0000001003\.bin: \d+ bytes"):
            checkpoint.load(ckpt, _pfc_parts(), verify=False)
    after = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    assert before == after
    problems = checkpoint.verify_all(ckpt)
    assert len(problems) == 1 and "weight.0000000502-0000001003.bin" in problems[0]


def test_corruption_on_one_rank_fails_every_rank(saved_at_world_2, tmp_path):
    """Rank 1's rows are damaged: both ranks raise (no rank left waiting in a collective)."""
    ckpt = _copy_ckpt(saved_at_world_2, tmp_path)
    target = ckpt / "classifier" / "weight.0000000502-0000001003.bin"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0x01
    target.write_bytes(bytes(data))
    errors = run_world(_load_expecting_error, 2, str(ckpt))
    assert "weight.0000000502-0000001003.bin" in errors[1]
    assert "rank 1 failed to load the checkpoint" in errors[0] and "0000000502" in errors[0]


def _load_expecting_error(rank, world, ckpt):
    try:
        checkpoint.load(ckpt, _pfc_parts())
    except CheckpointError as e:
        return str(e)
    return "no error"


def test_incomplete_directory_is_never_loaded(saved_at_world_2, tmp_path):
    ckpt = _copy_ckpt(saved_at_world_2, tmp_path)
    (ckpt / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        checkpoint.resolve(ckpt)
    assert checkpoint.find_latest(ckpt.parent) is None
    assert checkpoint.remove_incomplete(ckpt.parent) == [ckpt] and not ckpt.exists()


def test_keep_newest_k_and_best(tmp_path):
    root = tmp_path / "checkpoints"
    parts = _pfc_parts(momentum=0.0)
    for step in (1, 2, 3, 4, 5):
        checkpoint.save(root, parts, TrainState(step=step), keep=2)
        if step == 2:
            checkpoint.mark_best(root, root / "step-000000002")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["step-000000002", "step-000000004", "step-000000005"]
    assert (root / "latest").read_text().strip() == "step-000000005"
    # Saved without momentum, loaded into a momentum optimizer: starts from zeros.
    loaded = _pfc_parts()
    checkpoint.load(root / "step-000000005", loaded)
    assert torch.equal(loaded.pfc.weight, parts.pfc.weight)
    assert not loaded.shard_optimizer.momentum_buffer.any()


def test_shape_changing_config_is_refused_and_others_logged(tmp_path, caplog):
    cfg = load_config(REPO / "trainer/configs/cpu_demo.yaml", ["data.num_classes=1003", "backbone.embedding_size=16"])
    parts = _pfc_parts()
    parts.config = cfg
    ckpt = checkpoint.save(tmp_path, parts, TrainState(step=1))
    changed = load_config(REPO / "trainer/configs/cpu_demo.yaml",
                          ["data.num_classes=1003", "backbone.embedding_size=16", "optim.lr=0.01"])
    with caplog.at_level("INFO", logger="trainer.checkpoint"):
        checkpoint.load(ckpt, _pfc_parts(), config=changed)
    assert "optim.lr: 0.1 -> 0.01" in caplog.text
    other = load_config(REPO / "trainer/configs/cpu_demo.yaml",
                        ["data.num_classes=1003", "backbone.embedding_size=16", "backbone.name=iresnet18"])
    with pytest.raises(CheckpointError, match=r"backbone.name: 'mobilefacenet' -> 'iresnet18'"):
        checkpoint.load(ckpt, _pfc_parts(), config=other)


# --------------------------------------------------------------------------- arcshard-ckpt


def test_ckpt_cli_info_verify_and_export(saved_at_world_2, tmp_path, capsys):
    from trainer.cli.ckpt import main

    ckpt = _copy_ckpt(saved_at_world_2, tmp_path)
    assert main(["info", str(tmp_path)]) == 0  # a run dir: follows checkpoints/latest
    out = capsys.readouterr().out
    assert "step            3" in out and "saved by        2 ranks" in out
    assert "1003 classes x 16" in out and "integrity       ok" in out
    assert main(["export-backbone", str(ckpt), str(tmp_path / "bb.pt")]) == 0
    exported = torch.load(tmp_path / "bb.pt", weights_only=True)
    assert set(exported) == {"weight", "bias"} and exported["weight"].shape == (2, 2)
    momentum = ckpt / "classifier" / "momentum.0000000000-0000000502.bin"
    momentum.write_bytes(momentum.read_bytes()[:-4])
    assert main(["info", str(ckpt)]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    assert main(["verify", str(ckpt)]) == 1
    assert "momentum.0000000000-0000000502.bin" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- 16-bit storage


def _bf16_save_worker(rank, world, root: str):
    parts = _pfc_parts(storage="bf16", offload="host")
    for step in range(2):
        x, y = _fixed_batch(rank, world)
        parts.pfc(x + 0.1 * step, y).backward()
        parts.shard_optimizer.step()
        parts.shard_optimizer.zero_grad()
    # the last step's write-back is still pending (offload): save must land it first
    checkpoint.save(root, parts, TrainState(step=2))
    parts.pfc.flush()
    return (_gather_rows(parts.pfc.weight.detach().clone(), world),
            _gather_rows(parts.shard_optimizer.momentum_buffer.clone(), world))


def _bf16_load_worker(rank, world, ckpt: str, storage: str):
    parts = _pfc_parts(storage=storage)
    checkpoint.load(ckpt, parts)
    return (_gather_rows(parts.pfc.weight.detach(), world),
            _gather_rows(parts.shard_optimizer.momentum_buffer, world))


def test_bf16_checkpoint_keeps_bits_and_reshards(tmp_path):
    """bf16 storage with host offload, saved at world 2: the files hold bf16 rows; loading
    at world 1 gives the same bits, and into fp32 storage the exact upcast."""
    root = tmp_path / "checkpoints"
    weight, momentum = run_world(_bf16_save_worker, 2, str(root))[0]
    assert weight.dtype == torch.bfloat16
    ckpt = checkpoint.find_latest(root)
    assert checkpoint.read_index(ckpt)["classifier_dtype"] == "bfloat16"
    ((w16, m16),) = run_world(_bf16_load_worker, 1, str(ckpt), "bf16")
    assert w16.dtype == torch.bfloat16
    assert torch.equal(w16.view(torch.int16), weight.view(torch.int16))
    assert torch.equal(m16.view(torch.int16), momentum.view(torch.int16))
    ((w32, _),) = run_world(_bf16_load_worker, 1, str(ckpt), "fp32")
    assert w32.dtype == torch.float32 and torch.equal(w32, weight.float())
