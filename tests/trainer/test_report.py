"""arcshard-report: the picture and summary of a run, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.distributed import free_port
from tests.trainer.test_train import REPO, TINY, TORCHRUN
from trainer.cli.report import DPI, FIGSIZE, PANELS, ReportError, plot, read_records

SIZE = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli.report", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_of_a_finished_two_rank_run(tmp_path):
    out = tmp_path / "run"
    train = subprocess.run(
        [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
         "trainer/train.py", "--config", "trainer/configs/cpu_demo.yaml",
         f"run.output_dir={out}", *TINY, "data.batch_size=4", "run.max_steps=4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    png = tmp_path / "pictures" / "report.png"
    proc = _report(str(out), "--out", str(png))
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == SIZE
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{out / 'metrics.jsonl'}: 2 records, steps 2..4")
    assert any(line.startswith("samples/s") and "rank 0" in line and "rank 1" in line
               for line in lines), proc.stdout
    assert "verification  none logged" in proc.stdout and lines[-1] == f"wrote {png}"
    # One panel per quantity; the per-rank panels have a line for each rank.
    fig = plot(read_records(out / "metrics.jsonl"), "run")
    assert [ax.get_title(loc="left") for ax in fig.axes] == list(PANELS)
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1, 2, 2, 0]


def test_default_output_and_verification_panel(tmp_path):
    _write(tmp_path / "metrics.jsonl", [
        {"step": 10, "loss": 9.0, "lr": 0.1, "samples_per_sec": 100.0, "data_wait_frac": 0.5},
        {"step": 20, "loss": 7.0, "lr": 0.05, "samples_per_sec": 120.0, "data_wait_frac": 0.25,
         "verification": {"lfw": 0.9, "cfp_fp": 0.8}},
    ])
    proc = _report(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "report.png") as image:
        assert image.format == "PNG" and image.size == SIZE
    assert "data wait     mean all ranks 37.5%" in proc.stdout
    assert "verification  lfw 0.9000 (best 0.9000), cfp_fp 0.8000" in proc.stdout
    fig = plot(read_records(tmp_path / "metrics.jsonl"), "run")
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1, 1, 1, 2]


@pytest.mark.parametrize("content, needle", [
    (None, "metrics.jsonl: no such file; RUN_DIR must be a training output directory"),
    ("", "metrics.jsonl: no records yet"),
    ("\n\n", "metrics.jsonl: no records yet"),
])
def test_missing_or_empty_metrics_fail_clearly(tmp_path, content, needle):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    proc = _report(str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("arcshard-report: error: ") and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "report.png").exists()


def test_records_of_restarted_runs_and_bad_lines(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    # A run to step 6, then one resumed at step 4 (re-logs 4), then killed mid-line.
    path.write_text("".join(json.dumps({"step": s, "attempt": a}) + "\n"
                            for s, a in [(2, 1), (4, 1), (6, 1), (4, 2), (6, 2)]) + '{"step": 8, "lo')
    assert [(r["step"], r["attempt"]) for r in read_records(path)] == [(2, 1), (4, 2), (6, 2)]
    # A line damaged by a kill mid-write that an older trainer appended to (issue 20):
    # skipped with a warning naming it, the rest of the file still counts.
    path.write_text('{"step": 2}\n{"step": 4, "loss": 1.0{"step": 4}\n{"step": 6}\n')
    assert [r["step"] for r in read_records(path)] == [2, 6]
    assert "line 2 is not JSON" in capsys.readouterr().err
    path.write_text('{"loss": 2}\n{"step": 2}\n')
    assert [r["step"] for r in read_records(path)] == [2]
    assert "line 1 has no integer 'step'" in capsys.readouterr().err
    path.write_text('{"loss": 2}\n')
    with pytest.raises(ReportError, match="no records yet"):
        read_records(path)


def test_evaluation_records_from_the_trainer(tmp_path):
    """The trainer appends {"step", "eval": {...}} after the step record of that step:
    both are kept, and the accuracy panel reads them."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 2, "loss": 5.0, "lr": 0.1, "samples_per_sec": 10.0, "data_wait_frac": 0.0},
        {"step": 2, "eval": {"lfw": {"accuracy": 0.7, "num_pairs": 20}}},
        {"step": 4, "loss": 4.0, "lr": 0.1, "samples_per_sec": 10.0, "data_wait_frac": 0.0},
        {"step": 4, "eval": {"lfw": {"accuracy": 0.8, "num_pairs": 20}}},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from trainer.cli.report import read_records, summary

    records = read_records(run / "metrics.jsonl")
    assert len(records) == 4
    text = summary(records, run / "metrics.jsonl")
    assert "loss          5 -> 4" in text and "steps 2..4" in text
    assert "verification  lfw 0.8000 (best 0.8000)" in text
