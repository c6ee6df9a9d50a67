"""`arcshard-ckpt`: look into checkpoints and take the backbone out of one.

    arcshard-ckpt info PATH                    step, world size, classes, sizes, integrity
    arcshard-ckpt verify PATH                  check every file's checksum, and that its .pt
                                               files hold only tensors (exit 1 if damaged)
    arcshard-ckpt export-backbone PATH OUT.pt  backbone weights only (a state_dict): the EMA
                                               when the run kept one, else (or with
                                               --raw-weights) the trained weights
    arcshard-ckpt import-arcface-torch SRC_DIR OUT_RUN_DIR --num-classes C [--backbone NAME]
                                               an arcface_torch run's checkpoint_gpu_{rank}.pt
                                               files -> a checkpoint that resumes at any world size

PATH is a run output dir (its `checkpoints/latest`), a `checkpoints` dir or one
`step-N` directory. Re-sharding needs no command: a checkpoint saved at any world size
loads at any other (trainer/checkpoint/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data_tools.atomic import write_atomic_with
from trainer import exit_codes
from trainer.checkpoint import (
    BEST, LATEST, REPLICATED, CheckpointError, complete_checkpoints, read_index, read_replicated,
    resolve, verify_all,
)
from trainer.checkpoint.backbone import checkpoint_weights
from trainer.checkpoint.files import human_size
from trainer.config import ConfigError

EXIT_OK, EXIT_DAMAGED, EXIT_USAGE = exit_codes.OK, exit_codes.FAILED, exit_codes.USAGE


def info(path: Path, check: bool, as_json: bool) -> int:
    ckpt = resolve(path)
    index = read_index(ckpt)
    files = index["files"]
    total = sum(e["bytes"] for e in files.values())
    classifier = sum(e["bytes"] for rel, e in files.items() if rel.startswith("classifier/"))
    problems = verify_all(ckpt) if check else None
    root = ckpt.parent
    facts = {
        "checkpoint": str(ckpt),
        "step": index["step"],
        "train_state": index.get("train_state"),
        "world_size": index["world_size"],
        "num_classes": index["num_classes"],
        "embedding_size": index["embedding_size"],
        "classifier_dtype": index["classifier_dtype"],
        "backbone": index["backbone"],
        "created": index["created"],
        "run_id": index.get("run_id"),  # None: saved before run ids were recorded
        "files": len(files),
        "bytes": total,
        "classifier_bytes": classifier,
        "momentum": bool(index["classifier"]["momentum"]),
        "backbone_ema": index.get("backbone_ema"),  # {"decay", "updates"}; None: no average
        "latest": (root / LATEST).read_text().strip() if (root / LATEST).exists() else None,
        "best": (root / BEST).read_text().strip() if (root / BEST).exists() else None,
        "others": [p.name for p in complete_checkpoints(root) if p != ckpt],
        "integrity": None if problems is None else ("ok" if not problems else problems),
    }
    if as_json:
        print(json.dumps(facts, indent=1))
    else:
        state = facts["train_state"] or {}
        print(f"checkpoint      {ckpt}")
        print(f"step            {index['step']} (epoch {state.get('epoch', '?')}, batch "
              f"{state.get('batch_in_epoch', '?')} of it)")
        run = f", run {facts['run_id']}" if facts["run_id"] else ""
        print(f"saved by        {index['world_size']} ranks, {index['created']}{run}")
        print(f"model           {index['backbone']}, {index['num_classes']} classes x "
              f"{index['embedding_size']} ({index['classifier_dtype']}"
              f"{', with momentum' if facts['momentum'] else ''})")
        ema = facts["backbone_ema"]
        print("backbone EMA    " + (f"decay {ema['decay']}, {ema['updates']} updates (export and "
                                    "evaluation use it; --raw-weights: the trained weights)"
                                    if ema else "none (backbone.ema_decay was 0)"))
        print(f"size            {human_size(total)} in {len(files)} files "
              f"(classifier {human_size(classifier)})")
        print(f"pointers        latest -> {facts['latest']}, best -> {facts['best']}")
        if facts["others"]:
            print(f"also complete   {', '.join(facts['others'])}")
        if problems is None:
            print("integrity       not checked (--no-verify)")
        elif not problems:
            print("integrity       ok (every file's size and sha256 match index.json)")
        else:
            print("integrity       DAMAGED:")
            for p in problems:
                print(f"  {p}")
    return EXIT_DAMAGED if problems else EXIT_OK


def export_backbone(path: Path, out: Path, raw: bool) -> int:
    ckpt = resolve(path)
    index = read_index(ckpt)
    state, used = checkpoint_weights(read_replicated(ckpt, index), "raw" if raw else "ema", ckpt / REPLICATED)
    write_atomic_with(out, lambda f: torch.save(state, f))
    params = sum(t.numel() for t in state.values() if t.is_floating_point())
    kind = "EMA" if used == "ema" else "raw (trained)" + ("" if raw else "; the checkpoint has no EMA")
    print(f"wrote {out}: {index['backbone']} backbone of step {index['step']}, {kind} weights "
          f"({len(state)} tensors, {params / 1e6:.2f} M values), embedding size "
          f"{index['embedding_size']}; load with get_backbone(name).load_state_dict(torch.load(...))")
    return EXIT_OK


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="arcshard-ckpt",
        description=__doc__.split("\n\n")[0],
        epilog="PATH: a run output dir (uses checkpoints/latest), a checkpoints dir, or a "
        "step-N checkpoint dir. Exit codes: 0 ok, 1 damaged checkpoint (a file that fails its "
        "checksum, or a .pt file that would unpickle more than tensors and plain data), 2 bad "
        "arguments or unreadable checkpoint.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="step, world size, classes, sizes and integrity")
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument("--no-verify", action="store_true", help="skip the checksums (fast)")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p = sub.add_parser("verify", help="check every file's size and sha256, and that its .pt files "
                       "hold only tensors and plain data (exit 1 if not)")
    p.add_argument("path", type=Path, metavar="PATH")
    p = sub.add_parser(
        "export-backbone", help="write the backbone's weights (a state_dict) for deployment"
    )
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument("out", type=Path, metavar="OUT.pt")
    p.add_argument("--raw-weights", action="store_true",
                   help="the trained weights instead of the EMA (default: the EMA when the run kept "
                   "one, backbone.ema_decay > 0)")
    p = sub.add_parser(
        "import-arcface-torch", help="turn an arcface_torch run (checkpoint_gpu_{rank}.pt per GPU) "
        "into an arcshard checkpoint that resumes at any world size",
        description="Reads SRC_DIR/checkpoint_gpu_{rank}.pt (arcface_torch train_v2.py with "
        "save_all_states=True): class centres mapped to global class ids by arcface_torch's "
        "sharding, SGD momentum where the files have it, backbone, step and epoch. Writes "
        "OUT_RUN_DIR/checkpoints/step-N and OUT_RUN_DIR/config.yaml; resume with "
        "arcshard-train --config OUT_RUN_DIR/config.yaml run.output_dir=OUT_RUN_DIR data.source=... "
        "data.path=...",
    )
    p.add_argument("src", type=Path, metavar="SRC_DIR")
    p.add_argument("out", type=Path, metavar="OUT_RUN_DIR")
    p.add_argument("--num-classes", type=int, required=True, metavar="C",
                   help="the run's class count (arcface_torch config num_classes)")
    p.add_argument("--backbone", default="iresnet50",
                   help="arcshard backbone name: r18..r200 -> iresnet18..200, mbf -> mobilefacenet")
    p.add_argument("--embedding-size", type=int, default=None, metavar="D",
                   help="default: the class centres' size")
    return parser.parse_args(argv)


def import_arcface_torch(args: argparse.Namespace) -> int:
    from trainer.checkpoint.arcface_torch import import_run

    ckpt = import_run(args.src, args.out, args.num_classes, args.backbone, args.embedding_size)
    index = read_index(ckpt)
    print(f"wrote {ckpt}: step {index['step']}, {index['num_classes']} classes x "
          f"{index['embedding_size']} ({'with' if index['classifier']['momentum'] else 'without'} "
          f"momentum), {index['backbone']}; resumes at any world size")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "info":
            return info(args.path, check=not args.no_verify, as_json=args.json)
        if args.command == "verify":
            problems = verify_all(resolve(args.path))
            for p in problems:
                print(p, file=sys.stderr)
            if not problems:
                print(f"{resolve(args.path)}: ok")
            return EXIT_DAMAGED if problems else EXIT_OK
        if args.command == "import-arcface-torch":
            return import_arcface_torch(args)
        return export_backbone(args.path, args.out, args.raw_weights)
    except (CheckpointError, ConfigError) as e:
        print(f"arcshard-ckpt: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"arcshard-ckpt: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
