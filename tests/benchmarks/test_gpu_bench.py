"""benchmarks/gpu_bench.py (with _bench_classifiers.py and _bench_table.py) on CPU: --help,
every row at --tiny sizes, the anchor rows, the targets' verdicts and the OOM row."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import _bench_classifiers, _bench_table, gpu_bench
from tests.distributed import run_world

REPO = Path(__file__).resolve().parents[2]
ANCHOR = REPO.parent / "shared" / "anchors" / "arcface_torch"
SCRIPT = [sys.executable, "benchmarks/gpu_bench.py"]


def _run(*args: str, anchor: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANCHOR_DIR=str(anchor), OMP_NUM_THREADS="1")
    return subprocess.run([*SCRIPT, *args], cwd=REPO, env=env, check=False, capture_output=True, text=True,
                          timeout=timeout)


def test_help_exits_0():
    proc = subprocess.run([*SCRIPT, "--help"], cwd=REPO, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--tiny" in proc.stdout and "PartialFC_V2" in proc.stdout


def test_without_a_gpu_cuda_mode_is_one_line_and_exit_2():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run(SCRIPT, cwd=REPO, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "no CUDA device visible" in proc.stderr and "--device cpu --tiny" in proc.stderr


def test_tiny_cpu_run_has_every_row_and_the_anchor(tmp_path):
    if not ANCHOR.is_dir():
        pytest.skip(f"{ANCHOR} absent (../shared is not mounted)")
    out = tmp_path / "bench.json"
    proc = _run("--device", "cpu", "--tiny", "--compile-backend", "eager", "--json", str(out),
                anchor=ANCHOR)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    got = [(r["group"], r["classes"], r["rate"]) for r in rows]
    small, large = gpu_bench.TINY.small, gpu_bench.TINY.large
    assert got == [("arcshard", small, 0.1), ("arcshard", small, 1.0), ("anchor", small, 0.1),
                   ("anchor", small, 1.0), ("dense", small, 1.0), ("arcshard", large, 0.1),
                   ("anchor", large, 0.1), ("dense", large, 1.0), ("compile", None, None)]
    assert all(r["status"] == "ok" for r in rows), [(r["impl"], r.get("note")) for r in rows]
    for r in rows[:-1]:
        assert r["samples_per_s"] > 0 and 0 < r["classifier_ms"] < r["step_ms"]
        assert 0 < r["classifier_share"] < 1
    assert all(r["plan_gib"] > 0 for r in rows if r["group"] == "arcshard")
    assert rows[-1]["speedup"] > 0 and rows[-1]["compile_s"] >= 0
    verdicts = {t["target"]: t["verdict"] for t in payload["targets"]}
    assert len(verdicts) == 6 and set(verdicts.values()) <= {"PASS", "FAIL", "SKIP"}
    # On CPU there are no CUDA memory statistics: the memory targets are skipped.
    assert [v for t, v in verdicts.items() if "memory" in t or "planner" in t] == ["SKIP"] * 4
    text = proc.stdout
    assert "arcface_torch PartialFC_V2" in text and "DDP nn.Linear + CE" in text
    assert text.strip().splitlines()[-1].startswith("gpu_bench: 9 rows (9 ok)")


def test_anchor_rows_are_skipped_with_one_line_when_absent(tmp_path):
    missing = tmp_path / "no_anchor"
    proc = _run("--device", "cpu", "--tiny", "--rows", "anchor", anchor=missing)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "arcface_torch not found" in line]
    assert len(lines) == 1 + 3  # the one line, then the three skipped rows of the table
    assert lines[0].startswith("anchor rows skipped:") and "ANCHOR_DIR" in lines[0]


def _row(group, classes, rate, **values):
    return {"group": group, "impl": _bench_classifiers.IMPLS[group], "classes": classes,
            "rate": rate, "status": "ok", **values}


def test_targets_judge_the_measured_values():
    s = gpu_bench.FULL
    rows = [
        _row("arcshard", s.small, 0.1, classifier_share=0.08, classifier_ms=8.0, step_ms=100.0,
             peak_gib=10.0, plan_gib=10.5),
        _row("arcshard", s.large, 0.1, classifier_share=0.2, classifier_ms=10.0, step_ms=50.0,
             peak_gib=40.0, plan_gib=30.0),
        _row("anchor", s.large, 0.1, classifier_ms=19.0, peak_gib=60.0),
    ]
    judged = _bench_table.targets(rows, s.small, s.large, s.backbone)
    verdicts = [(t["verdict"], t["target"]) for t in judged]
    assert verdicts == [
        ("PASS", "1M, r=0.1: classifier <= 10% of the iresnet50 step"),
        ("FAIL", "10M, r=0.1: arcshard classifier step >= 2x faster than PartialFC_V2"),  # 1.9x
        ("PASS", "10M, r=0.1: arcshard peak memory <= 0.7x PartialFC_V2's"),  # 0.67x
        ("PASS", "1M, r=0.1: planner within 10% of measured peak"),  # +5%
        ("FAIL", "10M, r=0.1: planner within 10% of measured peak"),  # -25%
    ]


def test_targets_skip_what_was_not_measured():
    s = gpu_bench.FULL
    rows = [_row("arcshard", s.large, 0.1, classifier_ms=5.0, peak_gib=None, plan_gib=1.0),
            {**_row("anchor", s.large, 0.1), "status": "OOM"}]
    judged = _bench_table.targets(rows, s.small, s.large, s.backbone)
    details = {t["target"]: (t["verdict"], t["detail"]) for t in judged}
    assert details["1M, r=0.1: classifier <= 10% of the iresnet50 step"] == (
        "SKIP", "not measured (see --rows)")
    assert details["10M, r=0.1: arcshard classifier step >= 2x faster than PartialFC_V2"] == (
        "SKIP", "arcface_torch PartialFC_V2 10M: OOM")
    assert details["10M, r=0.1: planner within 10% of measured peak"] == (
        "SKIP", "peak memory is measured on CUDA only")


def test_plan_parts_left_out_of_the_comparison_exist():
    """plan GiB drops the planner's parts PyTorch's allocator never sees, by name: a
    renamed part would silently count."""
    from trainer.plan import PlanInputs, make_plan

    plan = make_plan(PlanInputs(num_classes=1_000_000, world_size=1, device_memory=141 * 2**30,
                                backbone="iresnet50", sample_rate=0.1))
    left_out = [p.name for p in plan.parts if p.name.startswith(gpu_bench.NOT_IN_ALLOCATOR)]
    assert len(left_out) == 2, [p.name for p in plan.parts]


def _oom_row(rank, world):
    def out_of_memory(*_args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    _bench_classifiers.BUILDERS["dense"] = out_of_memory
    scale = gpu_bench.TINY
    bench = gpu_bench.Bench(torch.device("cpu"), rank, world, scale, None,
                            torch.zeros(scale.batch, 3, 112, 112))
    before = bench.backbone
    row = gpu_bench.run_row(bench, "dense", scale.large, 1.0, None)
    return row, bench.backbone is not before


def test_out_of_memory_is_a_row_not_a_crash(capsys):
    row, backbone_rebuilt = run_world(_oom_row, 1)[0]
    assert row["status"] == "OOM"
    assert row["note"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert backbone_rebuilt  # its DDP state after a failed step is unknown
    _bench_table.print_table([row], [])
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("DDP nn.Linear + CE") and line.endswith("OOM: " + row["note"])
