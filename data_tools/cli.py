"""`arcshard-data`: one command line for every data tool.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> exit code``; only the module of the subcommand being run is imported.
User errors (``ValueError``, ``OSError``) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from data_tools.shards import DrillStop

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("data_tools.build", "image folder or list file -> sharded training set"),
    "import-insightface": ("data_tools.insightface", "insightface train.rec/.idx/property -> sharded training set"),
    "inspect": ("data_tools.inspect", "summarise a dataset and show sample records"),
    "verify": ("data_tools.verify", "check a dataset against its manifest"),
    "make-pairs": ("data_tools.pairs", "draw verification pairs"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="arcshard-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except DrillStop as exc:
        print(f"arcshard-data {args.command}: {exc}; continue with --resume", file=sys.stderr)
        return 75
    except KeyboardInterrupt:
        print(f"arcshard-data {args.command}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"arcshard-data {args.command}: error: {exc}", file=sys.stderr)
        return 2
