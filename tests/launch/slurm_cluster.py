"""A real single-node SLURM cluster in a temporary directory, for tests.

`SlurmCluster` writes a minimal `slurm.conf` (one node `localhost` with 2 CPUs, no
cgroups, no accounting database, `SlurmUser=root`, job completion log in a text file),
then starts `munged` (as the `munge` user, with its own key and socket), `slurmctld`
and `slurmd -N localhost` in the foreground as child processes of the test, so it
knows their PIDs. Every file (config, state, spool, logs, munge key and socket) lives
under one temporary directory; the daemons listen on free ports, so the cluster does
not touch or clash with a system SLURM. `stop()` cancels the jobs it submitted, stops
the daemons by PID (SIGTERM, then SIGKILL) and removes the directory; it runs also
when starting failed half way.

`ensure_installed()` installs Debian's `slurm-wlm` and `munge` with apt-get when the
binaries are missing (a few seconds from a Debian mirror) and skips the test with the
reason when that is impossible (no apt-get, not root).

Client commands (`sbatch`, `scontrol`, `scancel`) find the cluster through
`SLURM_CONF`: use `cluster.env()` as their environment, or `cluster.run(...)`.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun")
PACKAGES = ("slurm-wlm", "munge")
CPUS = 2


def ensure_installed() -> None:
    """Install slurm-wlm and munge when missing; `pytest.skip` when that cannot work."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip(f"SLURM is not installed and apt-get is unavailable to install {PACKAGES}")
    if os.geteuid() != 0:
        pytest.skip("SLURM is not installed and installing it with apt-get needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        [apt, "update", "-qq"],
        [apt, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"


def _which(name: str) -> str:
    path = shutil.which(name) or str(Path("/usr/sbin", name))
    assert Path(path).exists(), f"{name} not found after installing {PACKAGES}"
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One controller and one compute node (`localhost`, 2 CPUs) in `self.root`."""

    def __init__(self, cred_expire_s: int = 5, kill_wait_s: int = 10) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="arcshard-slurm-"))
        self.root.chmod(0o755)  # the munge user must reach its own sub-directory
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.txt"
        # AuthInfo cred_expire is also how long a requeued job waits before it may start
        # again (default 120 s); slurmctld 22.05 replaced values under 5 by the default.
        self.cred_expire_s = cred_expire_s
        self.kill_wait_s = kill_wait_s
        self.daemons: dict[str, subprocess.Popen] = {}
        self.jobs: list[int] = []

    # ------------------------------------------------------------ start / stop

    def start(self, timeout: float = 60) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            for d in ("state", "spool"):
                (self.root / d).mkdir()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait_for(lambda: self.run("scontrol", "ping").returncode == 0, timeout,
                           "slurmctld to answer `scontrol ping`")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
            self._wait_for(self._node_ready, timeout, "node localhost to become IDLE")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel our jobs, stop the daemons by PID (also after a failed start), clean up."""
        if self.jobs and "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--full", *map(str, self.jobs))
            try:
                self._wait_for(lambda: not any(self._is_active(j) for j in self.jobs), 30, "")
            except AssertionError:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_munge(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir()
        munge_dir.chmod(0o755)  # clients need to reach the socket; munged checks this
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        user = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        self.munge_socket = munge_dir / "munge.socket"
        self._spawn(
            "munged",
            [_which("munged"), "--foreground", f"--socket={self.munge_socket}",
             f"--key-file={key}", f"--pid-file={munge_dir / 'munged.pid'}",
             f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}"],
            user=user.pw_uid, group=user.pw_gid, extra_groups=[],
        )  # fmt: skip
        self._wait_for(self.munge_socket.exists, 20, "munged to create its socket")

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(
            f"""\
ClusterName=arcshardtest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait={self.kill_wait_s}
MinJobAge=600
InactiveLimit=0
NodeName=localhost CPUs={CPUS} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self.daemons[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env(), **kwargs,
        )  # fmt: skip
        log.close()

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    def _node_ready(self) -> bool:
        out = self.run("scontrol", "show", "node", "localhost").stdout
        return re.search(r"State=IDLE\b", out) is not None

    # ------------------------------------------------------------ clients

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v for k, v in (os.environ if base is None else base).items()
            if not k.startswith("SLURM_")
        }  # fmt: skip
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env())
        return subprocess.run(
            [_which(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=60, **kwargs
        )

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit a batch job; returns its id (remembered, cancelled by `stop()`)."""
        proc = self.run("sbatch", "--parsable", *args, cwd=cwd, env=self.env(env))
        assert proc.returncode == 0, f"sbatch {' '.join(args)} failed: {proc.stderr}"
        job = int(proc.stdout.strip().split(";")[0])
        self.jobs.append(job)
        return job

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the controller has forgotten the job)."""
        proc = self.run("scontrol", "show", "job", "--oneliner", str(job_id))
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\S+?)=(\S*)", proc.stdout))

    def _is_active(self, job_id: int) -> bool:
        return self.job(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING",
                                                     "COMPLETING", "REQUEUED", "SUSPENDED")

    def wait(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED",
             "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")) -> dict:
        """Poll until the job reaches one of `states`; returns its last `scontrol` record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id) or info
            if info.get("JobState") in states:
                return info
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} died (exit {proc.returncode}):\n{self.logs()}")
            time.sleep(0.5)
        raise AssertionError(
            f"job {job_id} not finished after {timeout}s (state {info.get('JobState')}):\n"
            f"{self.logs()}"
        )

    def completion_records(self) -> list[dict[str, str]]:
        """The job completion log (one record per finished run of a job)."""
        if not self.jobcomp.exists():
            return []
        return [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in self.jobcomp.read_text().splitlines()]

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log", "slurmctld.stdout",
                     "slurmd.stdout", "munged.stdout"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)
