"""`arcshard-plan`: the memory plan of a training run from the command line.

    arcshard-plan --num-classes 100000000 --world-size 8 --device-memory 80 --storage bf16

prints the per-rank table (trainer/plan.py has the formulae) and ends with
`max_num_classes: M`; exit code 0 when --num-classes fits, 3 when it does not, 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import math
import sys

from trainer import exit_codes
from trainer.plan import ACTIVATION_BYTES_PER_IMAGE, GIB, STORAGE_BYTES, PlanInputs, make_plan


def gib(text: str) -> float:
    """An argparse type: a memory size in GiB, finite and > 0 (inf, nan, -1 refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of GiB above 0, e.g. 80")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="arcshard-plan",
        description="Per-rank memory plan of an arcshard training run and the largest "
                    "num_classes that fits (formulae: trainer/plan.py).",
        epilog="Exit codes: 0 the run fits, 3 it does not, 2 bad arguments. Memory sizes in "
               "GiB; --host-memory is per rank (a node's memory / its GPUs) and is only "
               "checked when given.",
    )
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) in total")
    p.add_argument("--device-memory", type=gib, required=True, metavar="GIB",
                   help="memory of one device (GiB)")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--backbone", default="iresnet100",
                   help=f"{', '.join(ACTIVATION_BYTES_PER_IMAGE)} or none (classifier only)")
    p.add_argument("--storage", choices=tuple(STORAGE_BYTES), default="fp32")
    p.add_argument("--offload", choices=("none", "host"), default="none")
    p.add_argument("--host-memory", type=gib, default=None, metavar="GIB",
                   help="host memory per rank (GiB); default: not checked")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default) or cpu (then host memory is the device's)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="optimiser of backbone and classifier (adamw: two moments + step counts)")
    p.add_argument("--activation-checkpointing", choices=("none", "blocks"), default="none",
                   help="backbone.activation_checkpointing (blocks: iresnet*, vit_*)")
    p.add_argument("--precision", choices=("fp32", "16bit"), default="16bit",
                   help="backbone autocast on CUDA (activation estimate); default 16bit")
    p.add_argument("--subcenters", type=int, default=1,
                   help="partial_fc.subcenters: centres per class (sub-center ArcFace)")
    args = p.parse_args(argv)
    try:
        inputs = PlanInputs(
            num_classes=args.num_classes, world_size=args.world_size,
            device_memory=int(args.device_memory * GIB), embedding_size=args.embedding_size,
            batch_size=args.batch_size, sample_rate=args.sample_rate,
            backbone=None if args.backbone == "none" else args.backbone,
            storage=args.storage, offload=args.offload,
            host_memory=None if args.host_memory is None else int(args.host_memory * GIB),
            device=args.device, optimizer=args.optimizer, amp16=args.precision == "16bit",
            activation_checkpointing=args.activation_checkpointing == "blocks",
            subcenters=args.subcenters,
        )
    except ValueError as exc:
        name, _, why = str(exc).partition(": ")
        p.error(f"--{name.replace('_', '-')}: {why}")
    plan = make_plan(inputs)
    print(plan.table())
    return exit_codes.OK if plan.fits else exit_codes.DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
