"""The checks gpu_smoke.sh runs (benchmarks/_smoke.py, benchmarks/_sync_count.py), on CPU
with tiny real training runs and a real 2-process gloo group."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from benchmarks import _smoke, _sync_count
from tests.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
TINY = ["backbone.name=mobilefacenet", "backbone.embedding_size=64", "data.num_classes=300",
        "data.batch_size=8", "data.num_samples=400", "partial_fc.sample_rate=0.1",
        "data.synthetic_mode=noise", "data.workers=0", "run.log_every=2"]


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=False, capture_output=True,
                          text=True, timeout=timeout)


def _train(out: Path, *overrides: str, script: tuple[str, ...] = ("-m", "trainer.train")) -> None:
    proc = _python(*script, f"run.output_dir={out}", *TINY, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny CPU runs: `plain` (through _sync_count.py, 9 steps), `offload` (the same with
    host offload), `other` (another batch size, a NaN injected at step 2)."""
    root = tmp_path_factory.mktemp("runs")
    _train(root / "plain", "run.max_steps=9", script=(
        "benchmarks/_sync_count.py", "--json", str(root / "sync.json"), "--"))
    _train(root / "offload", "run.max_steps=9", "partial_fc.offload=host")
    _train(root / "other", "run.max_steps=9", "data.batch_size=16", "run.inject_nonfinite=[2]")
    return root


def test_offload_compare_passes_when_the_same_rows_were_updated(runs):
    proc = _python("benchmarks/_smoke.py", "offload-compare", str(runs / "plain"), str(runs / "offload"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("rows updated in 9 steps: ") and "in one run only: 0;" in line
    assert "max |dw| where both updated 0.00e+00" in line  # CPU: bitwise the same


def test_offload_compare_fails_when_the_runs_sampled_different_rows(runs):
    proc = _python("benchmarks/_smoke.py", "offload-compare", str(runs / "plain"), str(runs / "other"))
    assert proc.returncode == 1
    assert proc.stdout.strip().endswith(": the runs sampled different rows")


def test_run_summary_of_a_resumed_run_reads_its_last_finished_line(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs / "offload", resumed)
    _train(resumed, "run.max_steps=11", "partial_fc.offload=host")
    proc = _python("benchmarks/_smoke.py", "run-summary", str(resumed))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("step 11/11: ")
    assert proc.stdout.strip().endswith("; resumed from step 9")


def test_run_summary_checks_steps_and_injected_nonfinite(runs, tmp_path):
    proc = _python("benchmarks/_smoke.py", "run-summary", str(runs / "other"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("step 9/9: loss ")
    assert "1 non-finite step(s) skipped; peak RSS " in proc.stdout
    broken = tmp_path / "broken"  # the same run without its non-finite warning
    (broken / "logs").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        (broken / name).write_bytes((runs / "other" / name).read_bytes())
    log = (runs / "other" / "logs" / "rank0.log").read_text()
    (broken / "logs" / "rank0.log").write_text(log.replace("step 2: non-finite", "step 2: nothing"))
    proc = _python("benchmarks/_smoke.py", "run-summary", str(broken))
    assert proc.returncode == 1
    assert proc.stdout.strip().endswith("no 'step 2: non-finite' warning in logs/rank0.log")


def test_sync_count_reports_each_step_of_a_real_run(runs):
    result = json.loads((runs / "sync.json").read_text())
    assert result["hook"] == "trainer.loop.train_step"
    assert result["steps"] == {str(i): 0 for i in range(3, 9)}  # CPU: nothing synchronises
    assert result["exit_code"] == 0
    proc = _python("benchmarks/_smoke.py", "sync-summary", str(runs / "sync.json"))
    assert proc.returncode == 0
    assert proc.stdout.startswith("steps 3-8: 0 0 0 0 0 0 synchronizing CUDA operation(s) per step")
    assert proc.stdout.strip().endswith("target 1 per step: FAIL")


def test_sync_counter_counts_every_warning_between_step_starts():
    started = []
    counter = _sync_count.SyncCounter(on_first_step=lambda: started.append(len(started)))
    with warnings.catch_warnings():
        counter.install()
        warnings.warn(_sync_count.SYNC_MESSAGE)  # before the first step: not counted in one

        @counter.wrap
        def step(syncs: int) -> None:
            for _ in range(syncs):
                warnings.warn(_sync_count.SYNC_MESSAGE)  # the same code location every time

        for syncs in (5, 1, 2, 0, 3):
            step(syncs)
    assert counter.per_step(1, 9) == {"1": 5, "2": 1, "3": 2, "4": 0}  # step 5 has no end
    assert started == [0]  # once, at the first step


def test_hook_replaces_the_step_function_wherever_the_trainer_holds_it():
    import trainer.loop

    original = trainer.loop.train_step
    hook = _sync_count.hook_step_function(_sync_count.SyncCounter())
    wrapped = trainer.loop.train_step
    try:
        assert hook == "trainer.loop.train_step"
        assert wrapped is not original
    finally:
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] == "trainer" and module is not None:
                for key, value in list(vars(module).items()):
                    if value is wrapped:
                        setattr(module, key, original)


def test_collectives_are_correct_in_a_two_process_gloo_group():
    proc = _python("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), "benchmarks/_smoke.py", "collectives", "--backend", "gloo")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.startswith("world 2 (gloo): all_reduce sum/max, ")
    assert "correct in fp32 and bf16; all_reduce 64 MiB " in proc.stdout


def test_faces_writes_identity_folders(tmp_path):
    assert _smoke.faces(tmp_path, identities=2, per_identity=3) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg")) == [
        f"id00{c}/{i}.jpg" for c in range(2) for i in range(3)]


def test_report_prints_the_table_writes_json_and_fails_on_a_failed_part(tmp_path, capsys):
    parts = tmp_path / "parts.tsv"
    parts.write_text("env\tok\t2\ttorch 2.11.0 CUDA 13.0\n"
                     "dali\tskipped\t0\tskipped: nvidia.dali not importable\n")
    bench = tmp_path / "gpu_bench.json"
    bench.write_text(json.dumps({"rows": [{"group": "dense", "impl": "DDP nn.Linear + CE",
                                           "classes": 10_000_000, "rate": 1.0, "status": "OOM"}],
                                 "targets": [{"verdict": "SKIP", "target": "t", "detail": "d"}]}))
    out = tmp_path / "out" / "gpu_smoke.json"
    assert _smoke.report(parts, [bench, tmp_path / "absent.json"], out) == 0
    text = capsys.readouterr().out
    assert "gpu_smoke: 2 parts (1 ok, 1 skipped) in 2 s" in text
    assert "\ndali                   skipped      0  skipped: nvidia.dali not importable\n" in text
    assert "\nSKIP: t (d)\n" in text and " 10M " in text
    payload = json.loads(out.read_text())
    assert [p["part"] for p in payload["parts"]] == ["env", "dali"]
    assert payload["parts"][0] == {"part": "env", "status": "ok", "seconds": 2.0,
                                   "detail": "torch 2.11.0 CUDA 13.0"}
    assert payload["gpu_bench"][0]["rows"][0]["status"] == "OOM"
    parts.write_text(parts.read_text() + "bf16\ttimeout\t120\tkilled after 120 s\n")
    assert _smoke.report(parts, [], None) == 1
