"""Every exit code of arcshard's commands, defined once.

The codes are part of the interface: SLURM scripts and `launch/node_launcher.py` tell
"fix the config" (2) from "requeue me" (75) from "crashed" (1) by them. Each command
documents the subset it uses in its `--help`.

`data_tools` (the lowest layer, which imports nothing from `trainer`) uses only
`USAGE` (2) and keeps that one value in `data_tools/cli.py` with a pointer here.
"""

OK = 0
FAILED = 1  # an unexpected crash (a traceback); also `arcshard-ckpt verify`: damaged
USAGE = 2  # bad arguments, config or input file: the one line says which and the fix
CONFIG = USAGE  # the trainer's config errors (validated before any process group)
NONFINITE = 3  # trainer: run.max_nonfinite non-finite steps in a row
DOES_NOT_FIT = 3  # arcshard-plan: the run does not fit in memory
CHECKPOINT = 4  # trainer: a checkpoint cannot be loaded or written
DATA = 5  # trainer: a bad record or shard met while training
PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; rerun to resume
INTERRUPTED = 130  # Ctrl-C in an offline command

# The trainer's codes, in the order its --help lists them.
TRAINER = {
    OK: "done",
    CONFIG: "config error (or another run holds run.output_dir)",
    NONFINITE: "stopped after run.max_nonfinite non-finite steps in a row",
    CHECKPOINT: "checkpoint cannot be loaded or written",
    DATA: "a bad record in the dataset",
    PREEMPTED: "preempted: checkpoint written, rerun to resume",
}


def describe(codes: dict[int, str]) -> str:
    """'Exit codes: 0 done, 2 config error, ...' for a --help epilog."""
    return "Exit codes: " + ", ".join(f"{code} {text}" for code, text in codes.items()) + "."
