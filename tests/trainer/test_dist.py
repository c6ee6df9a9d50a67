"""Launcher detection (pure, dict environments) and real 2-process groups.

The multi-process tests start real processes the way the launchers do: `torchrun`,
and two plain processes carrying the variables `srun` gives its tasks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import free_port
from trainer.dist import DistEnv, detect_env, first_host, pick_device_and_backend

REPO = Path(__file__).resolve().parents[2]

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "node01",
    "MASTER_PORT": "29500",
}

# What an `srun --ntasks-per-node=4` task on the second of two nodes sees.
SRUN = {
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_TASKS_PER_NODE": "4(x2)",
}


# ---------------------------------------------------------------- torchrun


def test_torchrun_env():
    assert detect_env(TORCHRUN) == DistEnv(3, 8, 1, 2, "node01", 29500, "torchrun")


def test_torchrun_takes_precedence_over_slurm():
    env = detect_env({**SRUN, **TORCHRUN})
    assert env.launcher == "torchrun" and env.rank == 3 and env.master_addr == "node01"


def test_torchrun_without_local_world_size_defaults_to_one():
    env = {k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"}
    assert detect_env(env).local_world_size == 1


@pytest.mark.parametrize("drop", [("MASTER_PORT",), ("WORLD_SIZE", "MASTER_ADDR")])
def test_partial_torchrun_env_names_missing(drop):
    env = {k: v for k, v in TORCHRUN.items() if k not in drop}
    with pytest.raises(ValueError, match="partial torchrun") as info:
        detect_env(env)
    for name in drop:
        assert name in str(info.value)


def test_master_vars_alone_are_not_torchrun():
    env = detect_env({"MASTER_ADDR": "node01", "MASTER_PORT": "29500"})
    assert env.launcher == "single" and env.world_size == 1


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("RANK", "two", "RANK='two' is not an integer"),
        ("WORLD_SIZE", "0", "WORLD_SIZE='0' must be >= 1"),
        ("RANK", "8", "RANK='8' must be < WORLD_SIZE"),
        ("RANK", "-1", "RANK='-1' must be >= 0"),
        ("LOCAL_RANK", "2", "LOCAL_RANK='2' must be < LOCAL_WORLD_SIZE"),
        ("MASTER_PORT", "70000", "MASTER_PORT='70000' is not a TCP port"),
        ("MASTER_PORT", "", "MASTER_PORT='' is not an integer"),
        ("MASTER_ADDR", " ", "MASTER_ADDR is set but empty"),
    ],
)
def test_bad_torchrun_values(name, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        detect_env({**TORCHRUN, name: value})


# ---------------------------------------------------------------- SLURM


def test_srun_env():
    env = detect_env(SRUN)
    assert env == DistEnv(5, 8, 1, 4, "gpu07", 20000 + 123456 % 40000, "slurm")


def test_srun_derived_port_range():
    ports = {detect_env({**SRUN, "SLURM_JOB_ID": str(j)}).master_port for j in range(0, 10**6, 997)}
    assert min(ports) >= 20000 and max(ports) <= 59999 and len(ports) > 100


def test_srun_master_from_environment_wins():
    env = detect_env({**SRUN, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "31000"})
    assert (env.master_addr, env.master_port, env.launcher) == ("10.0.0.1", 31000, "slurm")


def test_srun_prefers_step_scoped_variables():
    # sbatch -N 4 --ntasks-per-node 4, then `srun -N 2 -n 4`: the step is smaller and
    # lives on the allocation's last two nodes.
    env = detect_env(
        {
            **SRUN,
            "SLURM_PROCID": "3",
            "SLURM_NTASKS": "16",
            "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_JOB_NODELIST": "gpu[01-04]",
            "SLURM_STEP_NODELIST": "gpu[03-04]",
            "SLURM_TASKS_PER_NODE": "4(x4)",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        }
    )
    assert (env.world_size, env.local_world_size, env.master_addr) == (4, 2, "gpu03")


@pytest.mark.parametrize(
    "extra, local_world_size",
    [
        ({"SLURM_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "0"}, 2),
        ({"SLURM_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1", "SLURM_LOCALID": "0"}, 1),
        ({"SLURM_TASKS_PER_NODE": "3(x2),2", "SLURM_NODEID": "2"}, 2),
        ({"SLURM_NTASKS_PER_NODE": "4"}, 4),
        ({}, 1),
    ],
)
def test_srun_local_world_size(extra, local_world_size):
    env = {k: v for k, v in SRUN.items() if k not in ("SLURM_TASKS_PER_NODE", "SLURM_NODEID")}
    assert detect_env({**env, **extra}).local_world_size == local_world_size


@pytest.mark.parametrize("drop", [("SLURM_PROCID",), ("SLURM_NTASKS", "SLURM_LOCALID")])
def test_partial_srun_env_names_missing(drop):
    env = {k: v for k, v in SRUN.items() if k not in drop}
    with pytest.raises(ValueError, match="partial SLURM srun environment") as info:
        detect_env(env)
    for name in drop:
        assert name in str(info.value)


def test_srun_without_nodelist_or_job_id_needs_master_vars():
    env = {k: v for k, v in SRUN.items() if k not in ("SLURM_JOB_NODELIST", "SLURM_JOB_ID")}
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST or SLURM_JOB_NODELIST") as info:
        detect_env(env)
    assert "SLURM_JOB_ID" in str(info.value)
    ok = detect_env({**env, "MASTER_ADDR": "h", "MASTER_PORT": "2222"})
    assert (ok.master_addr, ok.master_port) == ("h", 2222)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("SLURM_PROCID", "x", "SLURM_PROCID='x' is not an integer"),
        ("SLURM_PROCID", "8", "SLURM_PROCID='8' must be < SLURM_NTASKS"),
        ("SLURM_LOCALID", "4", "SLURM_LOCALID='4' must be < tasks on this node"),
        ("SLURM_JOB_ID", "12a", "SLURM_JOB_ID='12a' is not an integer"),
        ("SLURM_TASKS_PER_NODE", "4(2)", "SLURM_TASKS_PER_NODE='4\\(2\\)' is not a SLURM"),
        ("SLURM_JOB_NODELIST", "gpu[07-", "SLURM_JOB_NODELIST: node list 'gpu\\[07-' has an"),
    ],
)
def test_bad_srun_values(name, value, message):
    with pytest.raises(ValueError, match=message):
        detect_env({**SRUN, name: value})


def test_non_uniform_tasks_per_node_needs_node_id():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_NODEID"}
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        detect_env({**env, "SLURM_TASKS_PER_NODE": "2,1"})


# Inside an sbatch script (no srun) Slurm sets SLURM_PROCID/SLURM_NTASKS for the batch
# step but no SLURM_STEP_ID; tools that name special steps say 'batch'/'extern', and
# the special step ids are >= 0xFFFFFFFA.
@pytest.mark.parametrize("step", [None, "batch", "extern", "interactive", "4294967291", "-5", ""])
def test_batch_script_is_single_process(step, caplog):
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    env["SLURM_PROCID"] = "0"
    env["SLURM_LOCALID"] = "0"
    if step is not None:
        env["SLURM_STEP_ID"] = step
    with caplog.at_level("WARNING", logger="trainer.dist"):
        got = detect_env(env)
    assert (got.launcher, got.rank, got.world_size, got.master_addr) == (
        "single",
        0,
        1,
        "127.0.0.1",
    )
    assert "not started by srun" in caplog.text and "SLURM_NTASKS=8" in caplog.text


def test_single_process():
    env = detect_env({"PATH": "/usr/bin"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert (env.launcher, env.master_addr) == ("single", "127.0.0.1")
    assert 0 < env.master_port < 65536


# ---------------------------------------------------------------- node lists


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node01", "node01"),
        ("node[01-04,07]", "node01"),
        ("node[07,01-04]", "node07"),
        ("gpu-a[3-5],gpu-b1", "gpu-a3"),
        ("gpu-b1,gpu-a[3-5]", "gpu-b1"),
        ("n[001-002]-ib", "n001-ib"),
        ("rack[2-3]-gpu[08-09]", "rack2-gpu08"),
        ("localhost", "localhost"),
        ("  node9  ", "node9"),
    ],
)
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", ",node1", "node[01-", "node]1", "node[a-b]", "node[]"])
def test_first_host_rejects_malformed(nodelist):
    with pytest.raises(ValueError, match="node list"):
        first_host(nodelist)


# ---------------------------------------------------------------- device / backend


def test_backend_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device_and_backend(3) == (torch.device("cpu"), "gloo")
    assert pick_device_and_backend(0, "gloo") == (torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match="'nccl' needs GPUs.*backend=gloo"):
        pick_device_and_backend(0, "nccl")
    with pytest.raises(ValueError, match="'mpi' is not one of"):
        pick_device_and_backend(0, "mpi")


def test_gpus_without_usable_cuda_stop_unless_gloo_is_asked_for(monkeypatch):
    """A GPU node with a CPU-only torch (or a too-old driver) must not silently train 8
    gloo processes on the CPU (issue 15 #8)."""
    import trainer.dist as dist_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist_mod, "nvidia_gpus_present", lambda: "/dev/nvidia0")
    with pytest.raises(ValueError, match=r"NVIDIA GPUs \(/dev/nvidia0\).*CUDA build.*dist.backend=gloo"):
        pick_device_and_backend(0)
    assert pick_device_and_backend(0, "gloo") == (torch.device("cpu"), "gloo")


def test_backend_with_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device_and_backend(3) == (torch.device("cuda", 3), "nccl")
    assert pick_device_and_backend(2, "gloo") == (torch.device("cuda", 2), "gloo")
    with pytest.raises(ValueError, match="local rank 4 has no GPU: 4 visible"):
        pick_device_and_backend(4)
    # One GPU bound per task (srun --gpus-per-task=1): every local rank uses cuda:0.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device_and_backend(3, "nccl") == (torch.device("cuda", 0), "nccl")


# ---------------------------------------------------------------- real process groups

# Joins the group with init_distributed(), all-reduces rank+1, prints one JSON line.
WORKER = """
import json, os, sys
import torch, torch.distributed as dist
from trainer.dist import init_distributed, shutdown

ctx = init_distributed()
value = torch.tensor([float(ctx.rank + 1)], device=ctx.device)
dist.all_reduce(value)
sys.stdout.write(json.dumps({
    "rank": ctx.rank, "world": ctx.world_size, "local_rank": ctx.local_rank,
    "backend": ctx.backend, "launcher": ctx.env.launcher, "sum": value.item(),
    "group_world": dist.get_world_size(), "env_rank": os.environ["RANK"],
    "is_main": ctx.is_main,
}) + "\\n")
sys.stdout.flush()
shutdown()
assert not dist.is_initialized()
shutdown()
"""

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _clean_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _results(stdout: str) -> list[dict]:
    """The JSON objects the ranks printed. Ranks share torchrun's stdout, so one rank's
    object can land before the other's newline: find objects, not lines."""
    decoder, rows, i = json.JSONDecoder(), [], 0
    while (i := stdout.find('{"rank"', i)) != -1:
        row, i = decoder.raw_decode(stdout, i)
        rows.append(row)
    return sorted(rows, key=lambda row: row["rank"])


@pytest.fixture
def worker(tmp_path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


@pytest.mark.integration
def test_torchrun_two_processes(worker):
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(worker)],
        env=_clean_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = _results(proc.stdout)
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert (r["world"], r["group_world"], r["backend"], r["launcher"]) == (
            2, 2, "gloo", "torchrun",
        )  # fmt: skip
        assert r["sum"] == 3.0 and r["local_rank"] == r["rank"]
    assert [r["is_main"] for r in rows] == [True, False]


@pytest.mark.integration
def test_srun_style_two_processes(worker):
    port = free_port()
    procs = []
    for rank in range(2):
        env = _clean_env()
        env.update(
            SLURM_JOB_ID="4242",
            SLURM_STEP_ID="0",
            SLURM_PROCID=str(rank),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(rank),
            SLURM_NODEID="0",
            SLURM_TASKS_PER_NODE="2",
            SLURM_JOB_NODELIST="localhost",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker)], env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        )
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    rows = _results("".join(outputs))
    assert [(r["rank"], r["env_rank"]) for r in rows] == [(0, "0"), (1, "1")]
    for r in rows:
        assert (r["world"], r["group_world"], r["backend"], r["launcher"], r["sum"]) == (
            2, 2, "gloo", "slurm", 3.0,
        )  # fmt: skip


@pytest.mark.integration
def test_single_process_still_gets_a_group(worker):
    proc = subprocess.run(
        [sys.executable, str(worker)], env=_clean_env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [row] = _results(proc.stdout)
    assert (row["rank"], row["world"], row["group_world"], row["launcher"], row["sum"]) == (
        0, 1, 1, "single", 1.0,
    )  # fmt: skip


# ---------------------------------------------------------------- failed collectives

# Rank 1 never joins the all_reduce; rank 0's times out after 3 s. Nothing catches the
# error: the report comes from the excepthook init_distributed installs.
TIMEOUT_WORKER = """
import os, time
import torch, torch.distributed as dist
from trainer.dist import init_distributed, shutdown

ctx = init_distributed(timeout_s=3)
try:
    if ctx.rank == 0:
        dist.all_reduce(torch.ones(2))  # line 9
    else:
        time.sleep(6)
finally:
    shutdown()
"""


@pytest.mark.integration
def test_collective_timeout_names_rank_and_collective(tmp_path):
    worker = tmp_path / "timeout_worker.py"
    worker.write_text(TIMEOUT_WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = _clean_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(worker)], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[0].returncode == 1 and procs[1].returncode == 0, results
    err = results[0][1]
    line = next(l for l in err.splitlines() if l.startswith("arcshard: "))
    assert line.startswith("arcshard: rank 0/2 (local rank 0 on "), line
    assert "collective all_reduce timed out after 3 s (dist.timeout_s)" in line
    assert "called from timeout_worker.py:9 (<module>)" in line
    assert "Traceback" in err  # the usual traceback follows


def test_other_errors_are_not_reported_as_collective_failures():
    from trainer.dist import describe_collective_failure

    assert describe_collective_failure(ValueError("bad value")) is None
    assert describe_collective_failure(RuntimeError("CUDA out of memory")) is None
    try:
        raise RuntimeError("wrapper") from TimeoutError("Timed out waiting 5000ms for recv")
    except RuntimeError as exc:
        assert "a collective timed out after" in describe_collective_failure(exc)
