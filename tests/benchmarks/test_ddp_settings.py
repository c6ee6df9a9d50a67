"""benchmarks/ddp_settings.py: its helpers, --help, and a tiny real 2-rank gloo run whose
table and JSON rows are checked (shape and the settings each row reports, not speed)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import ddp_settings

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "ddp_settings.py"
TINY_ROWS = ["baseline", "no_broadcast", "view_fill", "baseline"]


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


def test_ddp_kwargs_uses_the_name_the_installed_torch_accepts():
    kwargs = ddp_settings.ddp_kwargs(False, True)
    assert kwargs["gradient_as_bucket_view"] is True
    (name,) = set(kwargs) - {"gradient_as_bucket_view"}
    assert kwargs[name] is False
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 13):
        assert name == "forward_sync_buffers"


def test_traffic_bytes_counts_every_buffer_and_every_trainable_parameter():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    model[1].weight.requires_grad_(False)
    # running_mean + running_var (4 fp32 each) + num_batches_tracked (int64)
    assert ddp_settings.traffic_bytes(model, True) == (4 * 4 * 2 + 8, (4 * 3 * 3 * 3 + 4) * 4)
    assert ddp_settings.traffic_bytes(model, False)[0] == 0


def test_grad_storages_tells_views_of_one_buffer_from_separate_gradients():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    assert ddp_settings.grad_storages([a, b]) == (2, 20)
    bucket = torch.zeros(5)
    a.grad, b.grad = bucket[:3], bucket[3:]
    assert ddp_settings.grad_storages([a, b]) == (1, 20)


def test_help_exits_0_and_lists_every_setting():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for name in ddp_settings.SETTINGS:
        assert name in proc.stdout


def test_unknown_setting_is_a_usage_error():
    proc = _run("--settings", "baseline,fast")
    assert proc.returncode == 2
    assert "--settings: 'fast' is not one of baseline" in proc.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny real run (mobilefacenet, D=64, batch 2, 1 warmup + 1 timed step per row)."""
    out = tmp_path_factory.mktemp("ddp") / "rows.json"
    proc = _run("--backbones", "mobilefacenet", "--dim", "64", "--batch-size", "2", "--warmup",
                "1", "--steps", "1", "--settings", ",".join(TINY_ROWS), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_tiny_run_prints_one_table_row_per_setting_and_the_machine_line(tiny):
    stdout, _ = tiny
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("backbone "))
    assert re.split(r"\s{2,}", lines[head].strip()) == list(ddp_settings.COLUMNS)
    assert set(lines[head + 1]) == {"-"}
    body = lines[head + 2:head + 2 + len(TINY_ROWS)]
    cells = [re.split(r"\s{2,}", line.strip()) for line in body]
    assert all(len(c) == len(ddp_settings.COLUMNS) for c in cells), body
    assert [c[:2] for c in cells] == [["mobilefacenet", s] for s in TINY_ROWS]
    assert lines[head + 2 + len(TINY_ROWS)].startswith("bcast: ")
    assert any(line.startswith("noise floor, mobilefacenet: the 2 baseline rows took ")
               for line in lines)
    assert lines[0].startswith("machine: ") and lines[0] in lines[head:]


def test_tiny_run_rows_report_the_settings_they_ran_with(tiny):
    _, saved = tiny
    rows = saved["rows"]
    assert [r["setting"] for r in rows] == TINY_ROWS
    for r in rows:
        assert "error" not in r
        assert "worker_output" not in r, r["worker_output"]  # no warning (deprecated names)
    from trainer.backbones import get_backbone

    model = get_backbone("mobilefacenet", embedding_size=64)
    grad_bytes = sum(p.numel() * 4 for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    for r in rows:
        s = ddp_settings.SETTINGS[r["setting"]]
        assert r["grad_bytes_per_step"] == grad_bytes
        assert r["buffer_bytes_per_forward"] == (buffer_bytes if s.broadcast_buffers else 0)
        assert r["num_params"] == len(list(model.parameters()))
        assert (r["grad_storages"] < r["num_params"]) == s.bucket_view
        assert r["grad_storage_bytes"] >= grad_bytes
        assert len(r["peak_rss_gib"]) == 2 and len(r["step_s"]) == 1
