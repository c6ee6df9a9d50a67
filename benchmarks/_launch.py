"""Shared launcher and machine helpers for the benchmarks that run every row in a fresh
2-process gloo group (benchmarks/pfc_step.py, benchmarks/train_throughput.py).

A benchmark script re-runs itself as `script --_worker SPEC_JSON OUT_JSON` once per rank
(see `run_pair`); each worker writes its result dict to OUT_JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
GIB = 1024**3


def peak_rss_gib() -> float:
    """This process's peak RSS so far, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def add_launcher_args(p: argparse.ArgumentParser, mem_limit_note: str = "") -> None:
    """--mem-limit-gib, --row-timeout and the hidden --_worker SPEC OUT (see `run_pair`)."""
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="kill a row whose two workers together exceed this RSS (default: "
                        "memory available when the row starts minus 1.5 GiB)" + mem_limit_note)
    p.add_argument("--row-timeout", type=float, default=3600.0,
                   help="kill a row that runs longer than this many seconds (default 3600)")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_mem_limit_gib() -> float:
    """The default --mem-limit-gib: memory available now minus 1.5 GiB."""
    import psutil

    return psutil.virtual_memory().available / GIB - 1.5


@dataclass
class PairRun:
    """What `run_pair` saw: the per-rank results, or the error (with the workers' output
    tails appended); the workers' output tails of a successful run; the watchdog's peak
    of the workers' summed RSS."""

    results: list[dict] | None
    error: str | None
    worker_output: str | None
    watchdog_peak_gib: float


def run_pair(script: str | Path, spec: dict, mem_limit_gib: float | None, timeout: float,
             tmp_prefix: str, poll_s: float = 0.1) -> PairRun:
    """Run `script --_worker json(spec) OUT` as ranks 0 and 1 of a fresh process group.

    The workers get RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT (as
    torchrun sets them) and OMP/MKL_NUM_THREADS = spec["threads"]. A watchdog polling every
    `poll_s` seconds kills both when one fails, when their RSS together exceeds
    `mem_limit_gib` (None: `default_mem_limit_gib()`), or after `timeout` seconds.
    """
    import psutil

    if mem_limit_gib is None:
        mem_limit_gib = default_mem_limit_gib()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=tmp_prefix) as tmp:
        procs, logs, outs = [], [], []
        for rank in range(WORLD_SIZE):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                       LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD_SIZE),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=str(spec["threads"]),
                       MKL_NUM_THREADS=str(spec["threads"]))
            out = os.path.join(tmp, f"rank{rank}.json")
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
            procs.append(subprocess.Popen(
                [sys.executable, str(script), "--_worker", json.dumps(spec), out],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            ))
            logs.append(log)
            outs.append(out)
        handles = [psutil.Process(p.pid) for p in procs]
        error, watch_peak, t_start = None, 0.0, time.monotonic()
        while any(p.poll() is None for p in procs):
            rss = 0
            for h in handles:
                try:
                    rss += h.memory_info().rss
                except psutil.Error:
                    pass
            watch_peak = max(watch_peak, rss / GIB)
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                error = f"rank {failed[0]} exited with code {procs[failed[0]].returncode}"
            elif rss / GIB > mem_limit_gib:
                error = f"killed: workers' RSS {rss / GIB:.1f} GiB > limit {mem_limit_gib:.1f} GiB"
            elif time.monotonic() - t_start > timeout:
                error = f"killed: row took longer than {timeout:.0f} s"
            if error:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(poll_s)
        for p in procs:
            p.wait()
        if error is None and any(p.returncode != 0 for p in procs):
            error = "; ".join(f"rank {r} exited with code {p.returncode}"
                              for r, p in enumerate(procs) if p.returncode != 0)
        tails = []
        for rank, log in enumerate(logs):
            log.seek(0)
            text = log.read().strip()
            log.close()
            if text:
                tails.append(f"[rank {rank}] " + "\n".join(text.splitlines()[-15:]))
        worker_output = "\n".join(tails) if tails else None
        if error is not None:
            return PairRun(None, error + ("\n" + worker_output if worker_output else ""),
                           None, watch_peak)
        results = [json.loads(Path(o).read_text()) for o in outs]
    return PairRun(results, None, worker_output, watch_peak)


def finish_row(row: dict, run: PairRun) -> dict:
    """Add what every row records about its run: the error (if any), the workers' output,
    the watchdog's peak and the load average at the end."""
    if run.error is not None:
        row["error"] = run.error
    elif run.worker_output:
        row["worker_output"] = run.worker_output
    row["watchdog_peak_total_rss_gib"] = run.watchdog_peak_gib
    row["load1_at_end"] = os.getloadavg()[0]
    return row


def machine_info(threads: int) -> dict:
    import psutil
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "ram_gib": psutil.virtual_memory().total / GIB,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "world_size": WORLD_SIZE,
        "threads_per_rank": threads,
        "load_avg_at_start": os.getloadavg(),
    }


def machine_line(machine: dict) -> str:
    return (f"machine: {machine['cpu']}, {machine['logical_cores']} logical cores, "
            f"{machine['ram_gib']:.0f} GiB RAM; torch {machine['torch']}; "
            f"{machine['world_size']} ranks (gloo) x {machine['threads_per_rank']} torch "
            f"thread(s) per rank; load average at start {machine['load_avg_at_start'][0]:.2f}")


def fmt_classes(c: int) -> str:
    if c % 1_000_000 == 0:
        return f"{c // 1_000_000}M"
    if c % 1000 == 0:
        return f"{c // 1000}k"
    return str(c)


def ok(row: dict | None) -> bool:
    return row is not None and "error" not in row
