"""The memory planner: its formulae against measured peak RSS of real runs, and the CLI."""

import resource
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from tests.distributed import run_world
from trainer.optim import make_shard_optimizer
from trainer.partial_fc import PartialFC
from trainer.cli.plan import main
from trainer.backbones import get_backbone
from trainer.config import load_config
from trainer.plan import GIB, PlanInputs, make_plan, plan_for_config

DIM, BATCH, RATE = 512, 16, 0.1


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_worker(rank, world, num_classes, storage, offload, steps, optimizer="sgd"):
    """Peak RSS growth of this rank over a PartialFC + shard optimiser run (classifier only)."""
    _run(1000, storage, offload, rank, world, 2, optimizer)  # warm-up: first use of torch's code pages
    base = psutil.Process().memory_info().rss
    # Reset the peak to the current RSS (Linux: "5" to clear_refs), so that what the
    # process held while starting up (unpickling, imports) cannot count as the run's peak.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    _run(num_classes, storage, offload, rank, world, steps, optimizer)
    return _peak_rss() - base


def _run(num_classes, storage, offload, rank, world, steps, optimizer):
    pfc = PartialFC(num_classes, DIM, sample_rate=RATE, seed=0, storage=storage, offload=offload)
    opt = make_shard_optimizer(pfc, optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(steps):
        g = torch.Generator().manual_seed(step * world + rank)
        emb = torch.randn(BATCH, DIM, generator=g).requires_grad_(True)
        pfc(emb, torch.randint(0, num_classes, (BATCH,), generator=g)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(
    "num_classes, storage, offload, optimizer",
    [(200_000, "fp32", "none", "sgd"), (1_000_000, "fp32", "host", "sgd"),
     (2_000_000, "bf16", "none", "sgd"), (300_000, "bf16", "none", "adamw")],
    ids=["200k-fp32", "1M-fp32-offload", "2M-bf16", "300k-bf16-adamw"],
)
def test_plan_matches_measured_peak_rss(num_classes, storage, offload, optimizer):
    plan = make_plan(PlanInputs(
        num_classes=num_classes, world_size=2, device_memory=64 * GIB, embedding_size=DIM,
        batch_size=BATCH, sample_rate=RATE, backbone=None, storage=storage, offload=offload,
        device="cpu", optimizer=optimizer,
    ))
    planned = plan.classifier_bytes
    if psutil.virtual_memory().available < 2 * planned + GIB:
        pytest.skip(f"needs about {2 * planned / GIB + 1:.1f} GiB free memory")
    measured = run_world(_measure_worker, 2, num_classes, storage, offload, 3, optimizer, timeout=300)
    for rank, grew in enumerate(measured):
        assert abs(grew - planned) <= 0.10 * planned, (
            f"rank {rank}: measured {grew / GIB:.3f} GiB, planned {planned / GIB:.3f} GiB\n"
            + plan.table()
        )


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().out.strip().splitlines()


def test_cli_exit_codes_and_last_line(capsys):
    base = ("--world-size", 8, "--device-memory", 80, "--storage", "bf16")
    code, lines = _cli(capsys, "--num-classes", 100_000_000, *base)
    assert code == 0
    assert lines[-1].startswith("max_num_classes: ")
    top = int(lines[-1].removeprefix("max_num_classes: "))
    assert top > 100_000_000
    assert any(line.startswith("class centres") for line in lines)
    # The reported maximum is exact: it fits, one more class does not.
    assert _cli(capsys, "--num-classes", top, *base)[0] == 0
    code, lines = _cli(capsys, "--num-classes", top + 1, *base)
    assert code == 3 and lines[-1] == f"max_num_classes: {top}"
    assert "fits: NO" in lines
    # 16-bit storage holds more classes than fp32; offload to a big host more still.
    fp32 = _cli(capsys, "--num-classes", 8, "--world-size", 8, "--device-memory", 80)[1][-1]
    offload = _cli(capsys, "--num-classes", 8, *base, "--offload", "host",
                   "--host-memory", 256)[1][-1]
    assert int(fp32.split()[-1]) < top < int(offload.split()[-1])


@pytest.mark.parametrize("bad", [
    ["--num-classes", "10", "--world-size", "2"],  # --device-memory missing
    ["--num-classes", "10", "--world-size", "2", "--device-memory", "8", "--storage", "fp8"],
    ["--num-classes", "10", "--world-size", "2", "--device-memory", "8", "--sample-rate", "0"],
    ["--num-classes", "1", "--world-size", "2", "--device-memory", "8"],
    ["--num-classes", "10", "--world-size", "2", "--device-memory", "8", "--backbone", "vit"],
])
def test_cli_bad_arguments_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(bad)
    assert exc.value.code == 2
    assert "arcshard-plan: error" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "eighty"])
def test_cli_memory_sizes_must_be_finite_and_positive(value, capsys):
    """Was an OverflowError traceback (inf), a garbled message (nan), bytes (-1)."""
    for flag in ("--device-memory", "--host-memory"):
        args = ["--num-classes", "10", "--world-size", "2", "--device-memory", "8", flag, value]
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err
        assert exc.value.code == 2
        assert f"argument {flag}: {value!r}" in err and "GiB" in err, err
        assert "Traceback" not in err and "bytes" not in err


def test_console_script_runs():
    script = Path(sys.executable).parent / "arcshard-plan"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "trainer.plan"]
    out = subprocess.run(
        [*command, "--num-classes", "1000000", "--world-size", "2",
         "--device-memory", "0.5", "--backbone", "none", "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 3, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("max_num_classes: ")


def test_train_startup_check_refuses_a_run_that_does_not_fit():
    from trainer.config import ConfigError, load_config
    from trainer.plan import check_fits, plan_for_config

    cfg = load_config(
        None, ["data.num_classes=20000", "data.batch_size=8", "partial_fc.storage=bf16"]
    )
    plan = plan_for_config(cfg, world_size=2, device="cpu")
    assert (plan.inputs.num_classes, plan.inputs.backbone, plan.inputs.storage) == (
        20_000, "iresnet50", "bf16")
    check_fits(plan)  # under 1.5 GiB per rank
    huge = plan_for_config(load_config(None, ["data.num_classes=1000000000000"]), 2, "cpu")
    needle = r"data.num_classes: 1,000,000,000,000 classes do not fit.*GiB"
    with pytest.raises(ConfigError, match=needle):
        check_fits(huge)


def test_cli_counts_adamw_state_and_checkpointed_activations(capsys):
    common = ["--num-classes", "2059906", "--world-size", "8", "--device-memory", "80",
              "--batch-size", "256", "--sample-rate", "0.3", "--backbone", "vit_b"]
    main([*common])
    sgd = capsys.readouterr().out
    main([*common, "--optimizer", "adamw", "--activation-checkpointing", "blocks"])
    adamw = capsys.readouterr().out
    assert "momentum" in sgd and "AdamW moments" in adamw and "AdamW per-row step counts" in adamw
    assert "(checkpointed blocks)" in adamw
    plain = make_plan(PlanInputs(num_classes=10**6, world_size=8, device_memory=80 * GIB,
                                 backbone="vit_b", optimizer="adamw"))
    ckpt = make_plan(PlanInputs(num_classes=10**6, world_size=8, device_memory=80 * GIB,
                                backbone="vit_b", optimizer="adamw", activation_checkpointing=True))
    sgd_plan = make_plan(PlanInputs(num_classes=10**6, world_size=8, device_memory=80 * GIB,
                                    backbone="vit_b"))
    assert ckpt.device_bytes < plain.device_bytes and ckpt.max_num_classes > plain.max_num_classes
    n, d = plain.num_local, 512  # AdamW: one more n·D·4 store and n int32 counts than SGD
    extra = plain.classifier_bytes - sgd_plan.classifier_bytes
    assert extra >= n * d * 4 + n * 4
    with pytest.raises(ValueError, match="activation_checkpointing"):
        PlanInputs(num_classes=10, world_size=1, device_memory=GIB, backbone="mobilefacenet",
                   activation_checkpointing=True)


def test_backbone_ema_counts_one_more_fp32_copy_of_the_backbone():
    common = dict(num_classes=10**5, world_size=2, device_memory=80 * GIB, backbone="iresnet50")
    plain, ema = make_plan(PlanInputs(**common)), make_plan(PlanInputs(**common, ema=True))
    params = sum(p.numel() for p in get_backbone("iresnet50", embedding_size=512).parameters())
    assert ema.device_bytes - plain.device_bytes == params * 4
    cfg = load_config("trainer/configs/cpu_demo.yaml", ["backbone.ema_decay=0.99"])
    assert plan_for_config(cfg, 2, torch.device("cpu")).inputs.ema
