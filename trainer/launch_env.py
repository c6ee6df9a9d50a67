"""Where this process sits in the job, from its launcher's environment variables.

Launcher detection (`detect_env`), in this order:

1. **torchrun** (also any launcher that sets the same variables): present when any of
   `RANK`, `WORLD_SIZE`, `LOCAL_RANK` is set; then all of them and `MASTER_ADDR`,
   `MASTER_PORT` are required. `LOCAL_WORLD_SIZE` is optional (torchrun sets it).
   `MASTER_ADDR`/`MASTER_PORT` alone do not mean torchrun: sbatch scripts commonly
   export them before `srun`.
2. **SLURM `srun`, one task per GPU**: present when `SLURM_STEP_ID` holds a real job
   step number (see below). Rank, world size and local rank come from
   `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`), `SLURM_LOCALID`;
   the rendezvous host is `MASTER_ADDR` if set, else the first host of
   `SLURM_STEP_NODELIST` (else `SLURM_JOB_NODELIST`), where task 0 of the step runs;
   the port is `MASTER_PORT` if set, else derived from `SLURM_JOB_ID`.
3. **single process** otherwise: rank 0 of 1 on 127.0.0.1 and a free port.

Why `SLURM_STEP_ID` decides whether this is an srun task: Slurm also runs the batch
script itself as a "task" of the special batch step, so inside an sbatch script (not
under srun) `SLURM_PROCID=0`, `SLURM_LOCALID=0` and `SLURM_NTASKS=<--ntasks>` are all
set. Treating that as rank 0 of N would make the process wait forever for N-1 peers
that never start. slurmstepd exports `SLURM_STEP_ID` only for a non-negative step id
(`if (env->stepid >= 0)` in `setup_env`, src/common/env.c, with `int stepid` in
`env_t`), and the batch, extern and interactive steps have special ids (0xFFFFFFFB,
0xFFFFFFFC, 0xFFFFFFFA) that are negative as an int, so their processes never see it;
every task started by `srun` does (`SLURM_STEP_ID` is listed under srun's OUTPUT
ENVIRONMENT VARIABLES, not sbatch's). Hence: an srun task iff `SLURM_STEP_ID` is a
decimal number below 0xFFFFFFFA. The names some tools print for special steps
('batch', 'extern', 'interactive') and the special numbers themselves count as "not an
srun task". A batch script that runs the trainer without srun gets a warning and a
single process.

The step-scoped variables (`SLURM_STEP_NUM_TASKS`, `SLURM_STEP_NODELIST`,
`SLURM_STEP_TASKS_PER_NODE`) are preferred over the job-scoped ones because a step may
use a subset of the allocation (`sbatch -N 4` then `srun -N 2 ...`), and `srun
--preserve-env` leaves `SLURM_NTASKS` at the job's value.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Literal, Mapping

log = logging.getLogger("trainer.dist")  # its warnings belong to process-group setup


Launcher = Literal["torchrun", "slurm", "single"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# A value of SLURM_STEP_ID at or above this is one of Slurm's special steps
# (SLURM_INTERACTIVE_STEP 0xFFFFFFFA, batch, extern, pending), never an srun step.
_FIRST_SPECIAL_STEP_ID = 0xFFFFFFFA
_SLURM_PORT_BASE = 20000
_SLURM_PORT_SPAN = 40000  # derived ports fall in 20000..59999


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as its launcher described it.

    `local_world_size` is the number of processes on this node; 1 when the launcher
    does not say. `master_addr:master_port` is where rank 0 hosts the rendezvous store.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: Launcher


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Describe this process's place in the job from its environment variables.

    Pure apart from choosing a free port for a single process. The launcher rules,
    and why an sbatch batch script counts as a single process, are in the module
    docstring. Raises `ValueError` naming the variables for a partially set launcher
    environment, and naming variable and value for non-integer or out-of-range values.
    """
    if any(name in environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return _torchrun_env(environ)
    if _is_srun_task(environ):
        return _slurm_env(environ)
    ntasks = environ.get("SLURM_NTASKS")
    if "SLURM_PROCID" in environ and ntasks not in (None, "1"):
        log.warning(
            "SLURM_NTASKS=%s but this process was not started by srun (SLURM_STEP_ID=%r): "
            "running as a single process. Start the trainer with `srun` inside the "
            "batch script to run %s ranks.",
            ntasks,
            environ.get("SLURM_STEP_ID"),
            ntasks,
        )
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        master_addr="127.0.0.1",
        master_port=_free_port(),
        launcher="single",
    )


def _torchrun_env(environ: Mapping[str, str]) -> DistEnv:
    missing = [name for name in _TORCHRUN_VARS if name not in environ]
    if missing:
        present = [name for name in _TORCHRUN_VARS if name in environ]
        raise ValueError(
            f"partial torchrun environment: {', '.join(present)} set but "
            f"{', '.join(missing)} missing; launch with torchrun (which sets all of "
            f"{', '.join(_TORCHRUN_VARS)}) or unset them for a single-process run"
        )
    world_size = _int_var(environ, "WORLD_SIZE", minimum=1)
    rank = _int_var(environ, "RANK", minimum=0)
    _check_below(environ, "RANK", rank, "WORLD_SIZE", world_size)
    local_rank = _int_var(environ, "LOCAL_RANK", minimum=0)
    if "LOCAL_WORLD_SIZE" in environ:
        local_world_size = _int_var(environ, "LOCAL_WORLD_SIZE", minimum=1)
        _check_below(environ, "LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world_size)
    else:
        local_world_size = 1
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=_nonempty_var(environ, "MASTER_ADDR"),
        master_port=_port_var(environ, "MASTER_PORT"),
        launcher="torchrun",
    )


def _is_srun_task(environ: Mapping[str, str]) -> bool:
    step = environ.get("SLURM_STEP_ID", "").strip()
    return step.isdigit() and int(step) < _FIRST_SPECIAL_STEP_ID


def _slurm_env(environ: Mapping[str, str]) -> DistEnv:
    required = [("SLURM_PROCID",), ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), ("SLURM_LOCALID",)]
    if "MASTER_ADDR" not in environ:
        required.append(("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"))
    if "MASTER_PORT" not in environ:
        required.append(("SLURM_JOB_ID",))
    missing = [
        " or ".join(names) for names in required if not any(n in environ for n in names)
    ]
    if missing:
        raise ValueError(
            f"partial SLURM srun environment (SLURM_STEP_ID={environ['SLURM_STEP_ID']}): "
            f"missing {', '.join(missing)}; start the trainer with srun, one task per GPU, "
            f"or set MASTER_ADDR/MASTER_PORT where the node list or job id is unavailable"
        )
    ntasks_var = _first_set(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    world_size = _int_var(environ, ntasks_var, minimum=1)
    rank = _int_var(environ, "SLURM_PROCID", minimum=0)
    _check_below(environ, "SLURM_PROCID", rank, ntasks_var, world_size)
    local_rank = _int_var(environ, "SLURM_LOCALID", minimum=0)
    local_world_size = _slurm_local_world_size(environ)
    if local_world_size is None:
        local_world_size = 1
    else:
        _check_below(environ, "SLURM_LOCALID", local_rank, "tasks on this node", local_world_size)

    if "MASTER_ADDR" in environ:
        master_addr = _nonempty_var(environ, "MASTER_ADDR")
    else:
        nodelist_var = _first_set(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")
        try:
            master_addr = first_host(environ[nodelist_var])
        except ValueError as exc:
            raise ValueError(f"{nodelist_var}: {exc}; or set MASTER_ADDR") from None
    if "MASTER_PORT" in environ:
        master_port = _port_var(environ, "MASTER_PORT")
    else:
        job_id = _int_var(environ, "SLURM_JOB_ID", minimum=0)
        master_port = _SLURM_PORT_BASE + job_id % _SLURM_PORT_SPAN
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=master_addr,
        master_port=master_port,
        launcher="slurm",
    )


def _slurm_local_world_size(environ: Mapping[str, str]) -> int | None:
    """Number of tasks of this step on this node, or None when SLURM does not say.

    `SLURM_STEP_TASKS_PER_NODE` / `SLURM_TASKS_PER_NODE` are per-node lists in node
    order, compressed as `2(x3),1`; a non-uniform list needs `SLURM_NODEID` to pick
    this node's entry. `SLURM_NTASKS_PER_NODE` (the --ntasks-per-node request) is the
    fallback.
    """
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name not in environ:
            continue
        counts = _expand_tasks_per_node(name, environ[name])
        if len(set(counts)) == 1:
            return counts[0]
        if "SLURM_NODEID" not in environ:
            raise ValueError(
                f"{name}={environ[name]!r} differs between nodes and SLURM_NODEID is not "
                f"set to say which node this is; start the trainer with srun"
            )
        node = _int_var(environ, "SLURM_NODEID", minimum=0)
        _check_below(environ, "SLURM_NODEID", node, f"nodes in {name}", len(counts))
        return counts[node]
    if "SLURM_NTASKS_PER_NODE" in environ:
        return _int_var(environ, "SLURM_NTASKS_PER_NODE", minimum=1)
    return None


_TASKS_ITEM = re.compile(r"(\d+)(?:\(x(\d+)\))?")
_RANGES = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def _expand_tasks_per_node(name: str, value: str) -> list[int]:
    counts: list[int] = []
    for item in value.split(","):
        match = _TASKS_ITEM.fullmatch(item.strip())
        if match is None or int(match.group(1)) < 1:
            raise ValueError(
                f"{name}={value!r} is not a SLURM tasks-per-node list like '4(x2)' or '2,1'"
            )
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list expression, without calling `scontrol`.

    Handles lists (`a,b`), bracketed ranges anywhere in a name (`node[01-04,07]`,
    `n[001-002]-ib`, `rack[1-2]-gpu[3-4]`) and keeps zero padding: `node[01-04]` gives
    `node01`. Raises `ValueError` for an empty or malformed expression.
    """
    text = nodelist.strip()
    host: list[str] = []
    i = 0
    while i < len(text) and text[i] != ",":
        char = text[i]
        if char == "[":
            close = text.find("]", i)
            if close == -1:
                raise ValueError(f"node list {nodelist!r} has an unclosed '['")
            ranges = text[i + 1 : close]
            first = ranges.split(",", 1)[0].split("-", 1)[0]
            if not _RANGES.fullmatch(ranges):
                raise ValueError(f"node list {nodelist!r} has a bad range [{ranges}]")
            host.append(first)
            i = close + 1
        elif char == "]":
            raise ValueError(f"node list {nodelist!r} has an unmatched ']'")
        else:
            host.append(char)
            i += 1
    name = "".join(host)
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"node list {nodelist!r} does not start with a host name")
    return name


def _first_set(environ: Mapping[str, str], *names: str) -> str:
    return next(name for name in names if name in environ)


def _int_var(environ: Mapping[str, str], name: str, minimum: int) -> int:
    value = environ[name]
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    return number


def _check_below(
    environ: Mapping[str, str], name: str, value: int, limit_name: str, limit: int
) -> None:
    if value >= limit:
        raise ValueError(
            f"{name}={environ.get(name, value)!r} must be < {limit_name} ({limit}); "
            f"the launcher environment is inconsistent"
        )


def _nonempty_var(environ: Mapping[str, str], name: str) -> str:
    value = environ[name].strip()
    if not value:
        raise ValueError(f"{name} is set but empty; set it to rank 0's host name or address")
    return value


def _port_var(environ: Mapping[str, str], name: str) -> int:
    port = _int_var(environ, name, minimum=1)
    if port > 65535:
        raise ValueError(f"{name}={environ[name]!r} is not a TCP port (1..65535)")
    return port


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
