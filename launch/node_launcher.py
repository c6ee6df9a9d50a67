"""torchrun for one node, with the signal handling and exit code that requeueing needs.

    python launch/node_launcher.py [torchrun options] trainer/train.py [trainer args]

Takes torchrun's options (`--nnodes`, `--nproc_per_node`, `--rdzv_backend c10d`,
`--rdzv_endpoint`, ...) and runs torchrun's own code for the rendezvous, the workers
and their monitoring (`torch.distributed.run`). `launch/train.sh` and
`launch/slurm/train.sbatch` start one per node. It differs from `torchrun` in two ways:

* **SIGUSR1 and SIGTERM are forwarded to the worker processes, and the launcher keeps
  waiting for them.** Plain torchrun dies on SIGUSR1 (the default action; under SLURM
  that ends the job step, which kills the workers in the middle of their checkpoint),
  and on SIGTERM it kills the workers after `--shutdown-timeout` (30 s), which can cut
  the checkpoint of a large model short. SIGINT, SIGHUP and SIGQUIT keep torchrun's
  behaviour. SLURM signals every process of a job step, so a worker may see the signal
  twice (once from SLURM, once from here); the trainer treats repeats as one.
* **Exit code 75 when the workers stopped because of such a signal**: a worker exited
  with 75 (the trainer's EXIT_PREEMPTED: checkpoint written, "requeue me") or was
  killed by the signal this launcher forwarded (it arrived before the trainer installed
  its handler; the newest checkpoint is still `latest`), and the others did the same
  or were stopped by torchrun afterwards (SIGTERM, then SIGKILL).
* **The workers' documented exit code is passed through** (plain torchrun turns every
  failure into 1): 2 config error, 3 non-finite stop, 4 checkpoint error, 5 data error,
  so a script or SLURM can tell "fix the config" from "requeue me" (75) from "crashed"
  (1). The code is the one documented code the failed workers exited with; the other
  workers may have crashed in their next collective (1) or been stopped by torchrun.
  One line says so instead of torchrun's ChildFailedError report, which is printed
  only for a crash. 0 when every worker succeeded.

Keep `--max_restarts 0` for preemptible jobs: torchrun would otherwise restart workers
that exit 75, and the restarted group would run on until the scheduler kills it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout
from trainer import exit_codes  # noqa: E402  (imports nothing but constants)

EXIT_PREEMPTED = exit_codes.PREEMPTED
DOCUMENTED = {
    code: text for code, text in exit_codes.TRAINER.items()
    if code not in (exit_codes.OK, exit_codes.PREEMPTED)
}
FORWARDED = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []


def _children(pid: int) -> list[int]:
    """PIDs of the direct children of `pid` (torchrun's workers), from /proc."""
    children = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def _forward(signum: int, frame) -> None:  # noqa: ARG001
    _received.append(signum)
    for pid in _children(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def preempted(exit_codes: list[int], received: list[int]) -> bool:
    """Whether failed workers with these exit codes stopped for a preemption signal.

    At least one exited 75 or was killed by a signal this launcher received (and
    forwarded); the others did the same or were stopped by torchrun after the first
    failure (SIGTERM, SIGKILL after its shutdown timeout), which it reports as failures
    too."""
    by_signal = {EXIT_PREEMPTED} | {-sig for sig in received}
    stopped_by_torchrun = {-signal.SIGTERM, -signal.SIGKILL}
    return bool(by_signal & set(exit_codes)) and set(exit_codes) <= by_signal | stopped_by_torchrun


def passed_code(exit_codes_: list[int], received: list[int]) -> int:
    """The launcher's exit code for failed workers with these exit codes (in order of
    failure): 75 for a preemption, the workers' documented code when they agree on one
    (others crashed or were stopped after it), else the first documented one, else 1."""
    if preempted(exit_codes_, received):
        return EXIT_PREEMPTED
    documented = [code for code in exit_codes_ if code in DOCUMENTED]
    return documented[0] if documented else exit_codes.FAILED


def _failures_in_order(exc: ChildFailedError) -> list[tuple[int, int]]:
    """(rank, exit code) of every failed worker, earliest failure first."""
    failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
    return [(rank, failure.exitcode) for rank, failure in failures]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handled = [s.strip() for s in args.signals_to_handle.split(",")]
    args.signals_to_handle = ",".join(
        s for s in handled if s and s not in {sig.name for sig in FORWARDED}
    )
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    try:
        run(args)
    except ChildFailedError as exc:
        failures = _failures_in_order(exc)
        codes = [code for _, code in failures]
        code = passed_code(codes, _received)
        if code == EXIT_PREEMPTED:
            names = ", ".join(sorted({signal.Signals(s).name for s in _received})) or "a signal"
            print(
                f"node_launcher: workers stopped after {names} (exit codes {sorted(set(codes))}): "
                f"exit {EXIT_PREEMPTED}, rerun to resume from the checkpoint",
                file=sys.stderr,
            )
        elif code in DOCUMENTED:
            ranks = ", ".join(f"rank {rank} exit {c}" for rank, c in failures)
            print(f"node_launcher: workers failed ({ranks}): exit {code}, {DOCUMENTED[code]} "
                  "(the workers' own lines above say why)", file=sys.stderr)
        else:
            print(exc.format_msg(), file=sys.stderr)
        return code
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
