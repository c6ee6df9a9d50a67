"""ShardAdamW against torch.optim.AdamW (rate 1, float64, worlds 1/2/4), its lazy
per-row semantics at rate < 1, 16-bit / offloaded storage, and the lr scales."""

import pytest
import torch

from tests.distributed import run_world
from tests.trainer.partial_fc.test_module import ARCFACE, _global_batch, reference
from trainer.margins import CombinedMargin
from trainer.optim import LRSchedule, ShardAdamW, ShardSGD, TrainingOptimizer, make_shard_optimizer
from trainer.partial_fc import PartialFC
from trainer.partial_fc.sharding import init_class_centres

LR, WD = 0.05, 0.1


def _dense_adamw_worker(rank, world, num_classes, dim, batch, steps):
    pfc = PartialFC(num_classes, dim, sample_rate=1.0, margin=CombinedMargin(*ARCFACE),
                    dtype=torch.float64, seed=7)
    opt = ShardAdamW(pfc, lr=LR, weight_decay=WD)
    start, count = pfc.class_start, pfc.num_local
    ref_w = init_class_centres(num_classes, 0, num_classes, dim, 7, torch.float64).requires_grad_()
    ref_opt = torch.optim.AdamW([ref_w], lr=LR, weight_decay=WD, foreach=False)
    for step in range(steps):
        x, labels = _global_batch(world * batch, dim, num_classes, seed=step)
        local = slice(rank * batch, (rank + 1) * batch)
        pfc(x[local].clone().requires_grad_(), labels[local]).backward()
        opt.step()
        opt.zero_grad()
        reference(x, labels, ref_w, torch.arange(num_classes), ARCFACE).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        expected = ref_w.detach()[start : start + count]
        torch.testing.assert_close(pfc.weight.detach(), expected, rtol=1e-10, atol=1e-13)
        state = ref_opt.state[ref_w]
        torch.testing.assert_close(opt.row_states()["exp_avg"], state["exp_avg"][start : start + count],
                                   rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(opt.row_states()["exp_avg_sq"],
                                   state["exp_avg_sq"][start : start + count], rtol=1e-10, atol=1e-18)
    assert torch.equal(opt.row_steps, torch.full((count,), steps, dtype=torch.int32))
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rate_one_equals_torch_adamw(world):
    run_world(_dense_adamw_worker, world, 37, 16, 5, 4)


def _lazy_worker(rank, world, storage, offload):
    """At rate 0.2 every sampled row follows torch.optim.AdamW of its own (its k-th step
    when sampled k times); unsampled rows, moments and counts do not change."""
    num_classes, dim, batch = 203, 8, 6
    fp64 = storage == "fp64"
    pfc = PartialFC(num_classes, dim, sample_rate=0.2, dtype=torch.float64 if fp64 else torch.float32,
                    storage="fp32" if fp64 else storage, offload=offload, seed=3)
    opt = ShardAdamW(pfc, lr=LR, weight_decay=WD)
    rows_ref = [pfc.weight.detach()[i].clone().double().requires_grad_() for i in range(pfc.num_local)]
    row_opts = [torch.optim.AdamW([w], lr=LR, weight_decay=WD, foreach=False) for w in rows_ref]
    counts = torch.zeros(pfc.num_local, dtype=torch.int32)
    for step in range(5):
        x, labels = _global_batch(world * batch, dim, num_classes, seed=step)
        local = slice(rank * batch, (rank + 1) * batch)
        pfc(x[local].to(pfc.dtype).clone().requires_grad_(), labels[local]).backward()
        sampled = pfc.sampled_grad()
        for row, grad in zip(sampled.rows.tolist(), sampled.grad.double().clone()):
            rows_ref[row].grad = grad
            row_opts[row].step()
            counts[row] += 1
        before = pfc.weight.detach().clone()
        opt.step()
        opt.zero_grad()
        pfc.flush()
        untouched = torch.ones(pfc.num_local, dtype=torch.bool)
        untouched[sampled.rows] = False
        assert torch.equal(pfc.weight.detach()[untouched], before[untouched])
    assert torch.equal(opt.row_steps, counts) and counts.max() > 1 and (counts == 0).any()
    expected = torch.stack([w.detach() for w in rows_ref])
    tol = {"fp64": 1e-12, "fp32": 2e-6, "bf16": 2e-2}[storage]
    torch.testing.assert_close(pfc.weight.detach().double(), expected, rtol=tol, atol=tol)
    return True


@pytest.mark.parametrize(
    "storage, offload", [("fp64", "none"), ("bf16", "host")], ids=["fp64", "bf16-offload"],
)
def test_lazy_semantics_per_row_step_counts(storage, offload):
    run_world(_lazy_worker, 2, storage, offload)


def _scales_worker(rank, world):
    pfc = PartialFC(50, 4, sample_rate=1.0)
    backbone = torch.nn.Linear(4, 4)
    opt = TrainingOptimizer(
        torch.optim.AdamW(backbone.parameters(), lr=1.0), make_shard_optimizer(pfc, "adamw", 1.0),
        LRSchedule(0.2, 10), backbone_lr_scale=0.1, classifier_lr_scale=2.0,
    )
    assert opt.set_lr(0) == pytest.approx(0.2)
    assert opt.backbone.param_groups[0]["lr"] == pytest.approx(0.02)
    assert opt.shard.lr == pytest.approx(0.4)
    assert isinstance(make_shard_optimizer(pfc, "sgd", 0.1), ShardSGD)
    return True


def test_lr_scales_apply_to_their_part():
    run_world(_scales_worker, 1)


def _bad_args_worker(rank, world):
    pfc = PartialFC(10, 4)
    for kw in ({"lr": -1.0}, {"lr": 1.0, "betas": (0.9, 1.0)}, {"lr": 1.0, "eps": 0.0}):
        with pytest.raises(ValueError, match="ShardAdamW"):
            ShardAdamW(pfc, **kw)
    return True


def test_bad_adamw_arguments():
    assert run_world(_bad_args_worker, 1) == [True]


def _build_worker(rank, world, cases):
    from pathlib import Path

    from trainer.config import load_config
    from trainer.dist import DistContext, DistEnv
    from trainer.run import build

    repo = Path(__file__).resolve().parents[2]
    env = DistEnv(rank, world, rank, world, "127.0.0.1", 0, "single")
    ctx = DistContext(env, torch.device("cpu"), "gloo")
    got = []
    for overrides in cases:
        cfg = load_config(repo / "trainer/configs/cpu_demo.yaml", [
            "backbone.name=mobilefacenet", "backbone.embedding_size=32", "data.num_classes=40",
            "data.batch_size=4", "data.num_samples=16", "data.workers=0", *overrides,
        ])
        opt = build(cfg, ctx).optimizer
        opt.set_lr(0)
        lr = opt.schedule(0)
        got.append((type(opt.backbone).__name__, type(opt.shard).__name__,
                    opt.backbone.param_groups[0]["weight_decay"], opt.shard.weight_decay,
                    opt.backbone.param_groups[0]["lr"] / lr, opt.shard.lr / lr))
    return got


BUILD_CASES = [
    ([], ("SGD", "ShardSGD", 5e-4, 5e-4, 1.0, 1.0)),  # today's behaviour
    (["optim.name=adamw", "optim.weight_decay=0.1", "optim.backbone_lr_scale=0.25",
      "optim.classifier_lr_scale=2", "optim.classifier_weight_decay=0.01"],
     ("AdamW", "ShardAdamW", 0.1, 0.01, 0.25, 2.0)),
    (["optim.backbone_weight_decay=0"], ("SGD", "ShardSGD", 0.0, 5e-4, 1.0, 1.0)),
]


def test_build_applies_optimizer_settings_per_part():
    results = run_world(_build_worker, 1, [overrides for overrides, _ in BUILD_CASES])[0]
    for got, (overrides, expected) in zip(results, BUILD_CASES):
        assert got[:2] == expected[:2] and got[2:] == pytest.approx(expected[2:]), overrides
