"""Run a function on every rank of a real multi-process gloo group.

`run_world(fn, world_size, *args)` spawns `world_size` fresh processes, joins them into
one gloo process group over TCP on 127.0.0.1 and returns `[fn(rank, world_size, *args)
for each rank]`. `fn` must be a module-level function (it is pickled by name). An
exception on any rank is re-raised here with that rank's traceback; a rank that neither
returns nor fails within `timeout` seconds fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


class RankFailed(AssertionError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results, collective_timeout) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle copies tensors by value (torch's queue pickler would share their
        # memory, which dies with this process).
        results.put((rank, True, pickle.dumps(out)))
    except BaseException as exc:  # report every failure, including SystemExit
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    collective_timeout: float = 60.0,
) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, r, world_size, port, args, results, collective_timeout),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise RankFailed(
                    f"ranks {sorted(set(range(world_size)) - set(out))} did not finish "
                    f"within {timeout}s (hang?)"
                ) from None
            if ok:
                out[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}: {value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RankFailed("\n".join(errors))
    return [out[r] for r in range(world_size)]
