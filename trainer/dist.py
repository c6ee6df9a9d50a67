"""Process-group setup: the one place that knows about launchers, backends and devices.

A training process calls `init_distributed()` once at start-up and `shutdown()` at the
end. In between, `torch.distributed` has a default process group, always, including
for a plain `python trainer/train.py` run (a group of size 1), so the rest of the code
calls collectives unconditionally.

Launchers and their environment variables: `trainer.launch_env` (`detect_env`).

Failed collectives: `init_distributed()` also installs a `sys.excepthook` that turns an
uncaught error from a collective (a timeout after `timeout_s`, or a peer that went
away) into one line naming this rank, the collective and the code that called it,
logged and printed before the usual traceback (`describe_collective_failure`). Gloo's
own message names neither ("Timed out waiting 1800000ms for recv operation to
complete"). With NCCL and TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (the launch scripts' default)
the watchdog thread aborts the process instead of raising; its log line
("[Rank R] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=.., OpType=..)")
already names both.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
import torch.distributed as dist

from trainer.launch_env import DistEnv, detect_env, first_host  # noqa: F401 (first_host: re-exported)

log = logging.getLogger(__name__)


_BACKENDS = ("auto", "nccl", "gloo")

def pick_device_and_backend(local_rank: int, backend: str = "auto") -> tuple[torch.device, str]:
    """The device this process computes on and the process-group backend.

    `backend="auto"`: `cuda:<local_rank>` with NCCL when CUDA is available, else CPU
    with gloo. `"gloo"` and `"nccl"` override only the backend; the device stays the
    GPU whenever CUDA is available. `"nccl"` without CUDA is a `ValueError`.

    When the launcher binds one GPU per task (`srun --gpus-per-task=1`, or
    CUDA_VISIBLE_DEVICES set per process) a task sees a single device whatever its
    local rank, so with exactly one visible GPU the device is `cuda:0`.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(_BACKENDS)}")
    if local_rank < 0:
        raise ValueError(f"local_rank {local_rank} must be >= 0")
    if not torch.cuda.is_available():
        if backend == "nccl":
            raise ValueError(
                "backend 'nccl' needs GPUs but CUDA is not available here; "
                "use backend=gloo (or auto) to run on CPU"
            )
        gpus = nvidia_gpus_present()
        if backend == "auto" and gpus:
            raise ValueError(
                f"this node has NVIDIA GPUs ({gpus}) but PyTorch {torch.__version__} cannot "
                f"use them ({_why_no_cuda()}): install a CUDA build of PyTorch that matches "
                "the driver, or set dist.backend=gloo to train on the CPU on purpose"
            )
        return torch.device("cpu"), "gloo"
    visible = torch.cuda.device_count()
    if local_rank < visible:
        index = local_rank
    elif visible == 1:
        index = 0
    else:
        raise ValueError(
            f"local rank {local_rank} has no GPU: {visible} visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); start at "
            f"most {visible} processes per node, or bind one GPU per process"
        )
    return torch.device("cuda", index), ("nccl" if backend == "auto" else backend)


def nvidia_gpus_present() -> str | None:
    """What shows that this node has NVIDIA GPUs (a /dev/nvidiaN device, else
    nvidia-smi on PATH), or None."""
    devices = sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*"))
    if devices:
        return "/dev/" + ", /dev/".join(devices)
    smi = shutil.which("nvidia-smi")
    return smi and f"{smi} is installed"


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return "it is a CPU-only build"
    return f"built for CUDA {torch.version.cuda}; the driver may be too old or not loaded"


@dataclass
class DistContext:
    """What `init_distributed` set up: the launcher's view, the device, the backend."""

    env: DistEnv
    device: torch.device
    backend: str

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes user-facing progress and files."""
        return self.env.rank == 0


def init_distributed(backend: str = "auto", timeout_s: float = 1800) -> DistContext:
    """Detect the launcher, pick device and backend, and create the default process group.

    Always creates a group, of size 1 for a single process. Uses env:// rendezvous:
    `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK` and
    `LOCAL_WORLD_SIZE` are written to `os.environ` from the detected values (for
    torchrun they are already there), so libraries that read them agree with us.
    `timeout_s` bounds every collective and the rendezvous itself. Calls
    `torch.cuda.set_device` when the device is a GPU. Call `shutdown()` at the end.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s {timeout_s} must be > 0 seconds")
    if dist.is_initialized():
        raise RuntimeError(
            "init_distributed() called while a default process group already exists; "
            "call shutdown() first"
        )
    env = detect_env(os.environ)
    device, chosen = pick_device_and_backend(env.local_rank, backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Every batch has the same 112x112 shape: let cuDNN pick its kernels once.
        torch.backends.cudnn.benchmark = True
    os.environ.update(
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
    )
    log.info(
        "rank %d/%d: joining process group (launcher %s, backend %s, device %s, "
        "rendezvous %s:%d)",
        env.rank,
        env.world_size,
        env.launcher,
        chosen,
        device,
        env.master_addr,
        env.master_port,
    )
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _restart_safe_store(env, timeout)
    dist.init_process_group(
        chosen,
        init_method=None if store is not None else "env://",
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    global _joined
    _joined = (env, timeout_s)
    if sys.excepthook is not _report_collective_failure:
        global _previous_excepthook
        _previous_excepthook = sys.excepthook
        sys.excepthook = _report_collective_failure
    return DistContext(env=env, device=device, backend=chosen)


def _restart_safe_store(env: DistEnv, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun (which hosts the store: TORCHELASTIC_USE_AGENT_STORE=True), the
    agent's TCPStore with a prefix per restart round; None otherwise (plain env://).

    torchrun keeps one store across the restarts of `--max-restarts`, and env:// in torch
    2.13 does not prefix the keys per attempt: a restarted worker can then read the gloo
    address a dead worker of the previous round published and fail with "Connection
    refused" (seen on every elastic restart here). TORCHELASTIC_RESTART_COUNT names the
    round, the same on every worker of it.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"/arcshard/attempt_{attempt}", store)


# Set by init_distributed (and kept after shutdown: a failure is reported after the
# `finally: shutdown()` of the caller has run).
_joined: tuple[DistEnv, float] | None = None
_previous_excepthook = sys.excepthook
_TIMEOUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)
_C10D_FILE = os.path.join("torch", "distributed", "distributed_c10d.py")
_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep


def describe_collective_failure(exc: BaseException) -> str | None:
    """One line naming this rank, the collective and its caller for an error raised by
    a collective (or by waiting on one), or None for any other exception.

    Recognised: a `RuntimeError`/`TimeoutError` (torch's `DistBackendError` is one)
    raised inside `torch.distributed.distributed_c10d` (the innermost such function is
    the collective), or whose message says it timed out (an async collective's
    `wait()`). Looks through `__cause__`/`__context__` chains.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        message = _describe_one(exc)
        if message is not None:
            return message
        exc = exc.__cause__ or exc.__context__
    return None


def _describe_one(exc: BaseException) -> str | None:
    if not isinstance(exc, (RuntimeError, TimeoutError)):
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    c10d = [i for i, f in enumerate(frames) if f.filename.endswith(_C10D_FILE)]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    timed_out = _TIMEOUT.search(text) is not None
    if not c10d and not timed_out:
        return None
    upto = c10d[-1] if c10d else len(frames)
    callers = [f for f in frames[:upto] if not os.path.abspath(f.filename).startswith(_TORCH_DIR)]
    collective = f"collective {frames[c10d[-1]].name}" if c10d else "a collective"
    where = f", called from {_short(callers[-1].filename)}:{callers[-1].lineno} ({callers[-1].name})" if callers else ""
    if _joined is None:
        who = f"rank {os.environ.get('RANK', '?')}"
        limit = "the process group's timeout"
    else:
        env, timeout_s = _joined
        who = f"rank {env.rank}/{env.world_size} (local rank {env.local_rank} on {socket.gethostname()})"
        limit = f"{timeout_s:g} s (dist.timeout_s)"
    if timed_out:
        return (
            f"{who}: {collective} timed out after {limit}{where}. Another rank did not join "
            f"it: it failed (its log has the first error), is stuck (data, I/O), or runs a "
            f"different number of steps. [{text}]"
        )
    return (
        f"{who}: {collective} failed{where}: another rank probably exited or lost its "
        f"connection; its log has the first error. [{text}]"
    )


def _short(filename: str) -> str:
    try:
        return os.path.relpath(filename)
    except ValueError:  # another drive (Windows)
        return filename


def _report_collective_failure(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """sys.excepthook: name the rank and collective of a failed collective, then the
    usual traceback."""
    try:
        message = describe_collective_failure(exc)
        if message is not None:
            handlers = logging.getLogger().handlers
            if handlers:  # the rank's log file (trainer.metrics.setup_logging)
                log.error("%s", message)
            if not any(getattr(h, "stream", None) is sys.stderr for h in handlers):
                print(f"arcshard: {message}", file=sys.stderr, flush=True)
    finally:
        _previous_excepthook(exc_type, exc, tb)


def shutdown() -> None:
    """Destroy the default process group if there is one (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()
