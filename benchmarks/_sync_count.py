"""Count the host synchronisations of each step of a real training process.

    python3 benchmarks/_sync_count.py --json OUT [--steps 3-8] -- [trainer/train.py arguments]
    torchrun --nproc_per_node N benchmarks/_sync_count.py --json OUT -- --config ...

Runs `trainer.train.main(argv)` in this process, switches on
`torch.cuda.set_sync_debug_mode("warn")` when the first step starts (CUDA only: on CPU
nothing synchronises and every count is 0) and counts PyTorch's "called a synchronizing CUDA operation" warnings.
Nothing in the trainer reads a switch for this: the step boundaries come from wrapping
the loop's step function, `trainer.loop.train_step` (one call per optimizer step), in
every trainer module that holds it, so the count does not depend on how the loop imports
it. Step i's count is what was warned between
the start of call i and the start of call i+1: its forward, backward, update, finiteness
check, and whatever runs before the next step (keep log points and checkpoints out of
the counted steps). Rank 0 writes {"hook", "steps": {"3": n, ...}, "exit_code"} to OUT;
the exit code is the trainer's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SYNC_MESSAGE = "called a synchronizing CUDA operation"
STEP_FUNCTION = ("trainer.loop", "train_step")


class SyncCounter:
    """Counts the sync warnings and where each step started (by calls of the hooked
    step function). `on_first_step` runs when the first step starts (the trainer has
    picked its device by then)."""

    def __init__(self, on_first_step: Callable[[], None] | None = None) -> None:
        self.syncs = 0
        self.step_starts: list[int] = []  # self.syncs when call i (0-based) began
        self.on_first_step = on_first_step

    def install(self) -> None:
        """Count every sync warning (shown each time, not once per code location);
        other warnings are shown as usual."""
        warnings.filterwarnings("always", message=SYNC_MESSAGE)
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if SYNC_MESSAGE in str(message):
                self.syncs += 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning

    def wrap(self, fn: Callable) -> Callable:
        def counted(*args, **kwargs):
            if not self.step_starts and self.on_first_step is not None:
                self.on_first_step()
            self.step_starts.append(self.syncs)
            return fn(*args, **kwargs)

        return counted

    def per_step(self, first: int, last: int) -> dict[str, int]:
        """Syncs of 1-based steps first..last (those whose next step started)."""
        starts = self.step_starts
        return {str(i): starts[i] - starts[i - 1] for i in range(first, last + 1) if i < len(starts)}


def hook_step_function(counter: SyncCounter) -> str:
    """Wrap the loop's step function wherever the trainer's modules hold it; its name."""
    import importlib

    import trainer.train  # noqa: F401 - imports every module of the loop

    module_name, attr = STEP_FUNCTION
    fn = getattr(importlib.import_module(module_name), attr, None)
    if fn is None:
        raise RuntimeError(f"{module_name}.{attr} does not exist: point "
                           "benchmarks/_sync_count.py STEP_FUNCTION at the loop's step function")
    wrapped = counter.wrap(fn)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "trainer" and module is not None:
            for key, value in list(vars(module).items()):
                if value is fn:
                    setattr(module, key, wrapped)
    return f"{module_name}.{attr}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="_sync_count.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, metavar="OUT")
    p.add_argument("--steps", default="3-8", help="1-based steps to report, FIRST-LAST (default 3-8)")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER,
                   help="after --: the arguments of trainer/train.py")
    args = p.parse_args(argv)
    try:
        first, last = (int(x) for x in args.steps.split("-"))
    except ValueError:
        p.error(f"--steps: expected FIRST-LAST, e.g. 3-8, got {args.steps!r}")
    trainer_args = args.trainer_args[1:] if args.trainer_args[:1] == ["--"] else args.trainer_args

    import torch

    def warn_on_sync() -> None:
        torch.cuda.set_sync_debug_mode("warn")

    counter = SyncCounter(warn_on_sync if torch.cuda.is_available() else None)
    counter.install()
    hook = hook_step_function(counter)
    from trainer.train import main as train_main

    code = train_main(trainer_args)
    if os.environ.get("RANK", "0") == "0":
        from data_tools.atomic import write_atomic

        write_atomic(args.json, json.dumps(
            {"hook": hook, "steps": counter.per_step(first, last), "exit_code": code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
