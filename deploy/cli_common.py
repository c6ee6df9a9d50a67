"""What the deploy commands share: failing with one line, and argparse number types.

Every expected failure in deploy (and in the trainer code it calls: `CheckpointError`,
`ConfigError`, the embedders' errors) is a `ValueError` whose message already names the
file and what to do; `OSError`s (disk full, permission denied) carry the path. Both
become `PROG: error: <first line>` on stderr and exit code 2. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from trainer import exit_codes
from trainer.cli.extras import install_hint
from trainer.cli.weights import add_weights_arguments, checkpoint_model, weights_model

__all__ = ["EXIT_ERROR", "EXIT_OK", "add_weights_arguments", "checkpoint_model", "non_negative_int",
           "positive_int", "run_reporting_errors", "weights_model"]

EXIT_OK = exit_codes.OK
EXIT_ERROR = exit_codes.USAGE
EXIT_INTERRUPTED = exit_codes.INTERRUPTED


def run_reporting_errors(prog: str, command: Callable[[], int]) -> int:
    """Run `command`; a ValueError or OSError becomes `prog: error: <first line>` on
    stderr and exit code 2, a missing optional dependency the extra to install (exit 2),
    Ctrl-C exit code 130."""
    try:
        return command()
    except ModuleNotFoundError as exc:
        hint = install_hint(exc)
        if hint is None:
            raise
        print(f"{prog}: error: {hint}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as exc:
        text = str(exc).strip()
        line = text.splitlines()[0] if text else type(exc).__name__
        print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _int_at_least(value: str, low: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value!r}") from None
    if number < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {number}")
    return number


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(value, 1)


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(value, 0)
