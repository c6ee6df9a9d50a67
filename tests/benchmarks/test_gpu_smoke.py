"""benchmarks/gpu_smoke.sh on a machine without a GPU: one line and exit 0 at once, nothing
installed; a GPU its torch cannot see is exit 1; and (with a stand-in python that claims a
GPU) the parts, the time budget, WHEELS and the report."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = ["bash", "benchmarks/gpu_smoke.sh"]
PARTS = ["env", "nccl_w1", "bf16", "sync_per_step", "fp16_nonfinite", "offload_host",
         "offload_rows", "resume", "gpu_bench", "compile", "bf16_storage_offload", "dali"]

pytestmark = pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None or any(Path("/dev").glob("nvidia[0-9]*")),
    reason="this machine has an NVIDIA GPU",
)


def _executable(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH entry whose pip and pip3 record that they were called and fail loudly."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("pip", "pip3"):
        _executable(bin_dir / name, f"""\
            #!/bin/sh
            echo called > {tmp_path / 'pip_was_called'}
            echo "fake {name}: gpu_smoke.sh must not install anything here" >&2
            exit 99
            """)
    return bin_dir


def _smoke(env_extra: dict, bin_dir: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **env_extra)
    return subprocess.run(SMOKE, cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=timeout)


def test_no_gpu_is_one_line_exit_0_and_installs_nothing(fake_bin, tmp_path):
    started = time.monotonic()
    proc = _smoke({"PYTHON": sys.executable, "WHEELS": str(tmp_path)}, fake_bin)
    assert time.monotonic() - started < 5
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "gpu_smoke: no NVIDIA GPU visible (nvidia-smi / torch.cuda): nothing run\n"
    assert proc.stderr == ""
    assert not (tmp_path / "pip_was_called").exists()


def test_a_gpu_the_python_cannot_see_is_exit_1(fake_bin):
    _executable(fake_bin / "nvidia-smi", """\
        #!/bin/sh
        echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
        """)
    proc = _smoke({"PYTHON": sys.executable}, fake_bin)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("gpu_smoke: an NVIDIA GPU is present but ")
    assert "sees none: set PYTHON to a python with a CUDA build of PyTorch" in proc.stderr


def _wheel(directory: Path) -> None:
    """A minimal pure-Python wheel holding one module, gs_probe."""
    directory.mkdir()
    info = "gs_probe-0.1.dist-info"
    with zipfile.ZipFile(directory / "gs_probe-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("gs_probe.py", "VALUE = 1\n")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gs_probe\nVersion: 0.1\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                      "Tag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def test_parts_budget_wheels_and_report(fake_bin, tmp_path):
    """A stand-in python that claims one GPU (and is the real one otherwise): env fails
    (no CUDA here), the budget of 21 s is spent after at most two parts, every later part
    is skipped with one line, and the table, JSON and logs come out."""
    _executable(fake_bin / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    python = _executable(fake_bin / "python_claiming_a_gpu", f"""\
        #!/bin/sh
        case "$*" in *device_count*) echo 1; exit 0 ;; esac
        exec {sys.executable} "$@"
        """)
    _wheel(tmp_path / "wheels")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {"PYTHON": str(python), "SMOKE_BUDGET_S": "21", "OUT": str(out),
           "SMOKE_WORK": str(work), "WHEELS": str(tmp_path / "wheels")}
    proc = _smoke(env, fake_bin)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # env failed
    assert (work / "site" / "gs_probe.py").is_file()  # WHEELS: pip --no-index --target
    parts = json.loads((out / "gpu_smoke.json").read_text())["parts"]
    assert [p["part"] for p in parts] == PARTS
    assert parts[0]["status"] == "FAIL" and parts[0]["detail"].startswith("exit 1: ")
    ran = [p for p in parts if p["status"] != "skipped"]
    assert 1 <= len(ran) <= 2 and all(p["status"] == "FAIL" for p in ran)
    skipped = {p["part"]: p["detail"] for p in parts if p["status"] == "skipped"}
    assert skipped["sync_per_step"] == "skipped: needs bf16, which did not pass"
    assert skipped["compile"] == "skipped: the 21 s budget is spent (SMOKE_BUDGET_S)"
    assert (out / "gpu_smoke_logs" / "env.log").is_file()
    table = proc.stdout[proc.stdout.index("\ngpu_smoke: 12 parts"):]
    assert all(f"\n{name:<22} " in table for name in PARTS)
    assert f"written to {out / 'gpu_smoke.json'}" in table
