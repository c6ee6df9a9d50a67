"""The checks and the report of benchmarks/gpu_smoke.sh, one subcommand each.

    python3 benchmarks/_smoke.py run-summary RUN_DIR           # one line about a training run
    python3 benchmarks/_smoke.py offload-compare RUN_A RUN_B   # same classifier rows updated?
    python3 benchmarks/_smoke.py sync-summary SYNC_JSON        # benchmarks/_sync_count.py's counts
    torchrun --nproc_per_node N benchmarks/_smoke.py collectives [--backend nccl|gloo]
    python3 benchmarks/_smoke.py faces DIR                     # JPEG identity folders for DALI
    python3 benchmarks/_smoke.py report PARTS_TSV [--bench JSON ...] [--json OUT]

Each check prints its result as its last line (gpu_smoke.sh shows that line in its table)
and exits 1 when what it checks is wrong. Exit code 2: bad arguments.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._bench_table import print_table
from data_tools.atomic import write_atomic
from trainer import exit_codes

PART_FIELDS = ("part", "status", "seconds", "detail")
BROKEN = ("FAIL", "timeout")


def run_summary(run_dir: Path) -> int:
    """The run's last metrics line and peak memory; fails unless it finished every step and
    skipped exactly the steps its config injected (run.inject_nonfinite)."""
    from trainer.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    log = (run_dir / "logs" / "rank0.log").read_text()
    # The last "finished" line: a resumed run appends to the log of the run it continues.
    finished = ([None] + list(re.finditer(r"finished (\d+) steps .*?; (peak .*)$", log, re.MULTILINE)))[-1]
    resumed = re.search(r"resumed from .*?: step (\d+)", log)
    injected = len([s for s in set(cfg.run.inject_nonfinite) if 0 < s <= cfg.run.max_steps])
    print(f"step {last['step']}/{cfg.run.max_steps}: loss {last['loss']:.3f}, "
          f"{last['samples_per_sec']:.0f} samples/s, {last['nonfinite_total']} non-finite step(s) "
          f"skipped; {finished.group(2) if finished else 'no finished line'}"
          + (f"; resumed from step {resumed.group(1)}" if resumed else ""))
    problems = []
    if not finished or int(finished.group(1)) != cfg.run.max_steps:
        problems.append(f"did not finish {cfg.run.max_steps} steps")
    if last["nonfinite_total"] != injected:
        problems.append(f"{last['nonfinite_total']} non-finite steps, {injected} injected")
    for step in cfg.run.inject_nonfinite:
        if f"step {step}: non-finite" not in log:
            problems.append(f"no 'step {step}: non-finite' warning in logs/rank0.log")
    if problems:
        print(f"{run_dir}: " + "; ".join(problems))
    return exit_codes.FAILED if problems else exit_codes.OK


def final_classifier(run_dir: Path):
    """(rows [C, D], index.json) of the run's latest checkpoint, from its raw row files."""
    import torch

    root = run_dir / "checkpoints"
    ckpt = root / (root / "latest").read_text().strip()
    index = json.loads((ckpt / "index.json").read_text())
    dtype, dim = getattr(torch, index["classifier_dtype"]), index["embedding_size"]
    rows = torch.empty(index["num_classes"], dim, dtype=dtype)
    for shard in index["classifier"]["weight"]:
        data = bytearray((ckpt / shard["file"]).read_bytes())
        rows[shard["start"] : shard["end"]] = torch.frombuffer(data, dtype=dtype).view(-1, dim)
    return rows, index


def initial_classifier(num_classes: int, dim: int, seed: int):
    """The class centres a run with `seed` starts from (the same at every world size)."""
    import torch.distributed as dist

    from trainer.partial_fc import PartialFC

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return PartialFC(num_classes, dim, seed=seed).weight.detach()
    finally:
        dist.destroy_process_group()


def offload_compare(run_a: Path, run_b: Path) -> int:
    """Fails unless the two runs updated the same classifier rows. A row changes from its
    initial value exactly when some step sampled it (weight decay moves every sampled
    row), so equal sets of changed rows mean equal sampling, whatever the (possibly
    non-deterministic) backbone did to the values."""
    from trainer.config import load_config

    (a, index_a), (b, index_b) = final_classifier(run_a), final_classifier(run_b)
    seed = load_config(run_a / "config.yaml").run.seed
    if (index_a["step"], a.shape) != (index_b["step"], b.shape) or seed != load_config(
            run_b / "config.yaml").run.seed:
        print(f"{run_a} and {run_b} differ in step, classifier shape or seed: not comparable")
        return exit_codes.FAILED
    init = initial_classifier(a.shape[0], a.shape[1], seed).to(a.dtype)
    changed_a, changed_b = (a != init).any(1), (b != init).any(1)
    only_one = int((changed_a ^ changed_b).sum())
    both = changed_a & changed_b
    diff = float((a[both].float() - b[both].float()).abs().max()) if both.any() else 0.0
    print(f"rows updated in {index_a['step']} steps: {int(changed_a.sum()):,} ({run_a.name}) and "
          f"{int(changed_b.sum()):,} ({run_b.name}) of {a.shape[0]:,}; in one run only: "
          f"{only_one:,}; max |dw| where both updated {diff:.2e}"
          + ("" if only_one == 0 else ": the runs sampled different rows"))
    return exit_codes.OK if only_one == 0 else exit_codes.FAILED


def sync_summary(path: Path) -> int:
    """The per-step sync counts; fails when the trainer failed or no step was counted.
    The target (1 per step: the step's one finiteness read) is reported, not enforced."""
    result = json.loads(path.read_text())
    counts = result["steps"]
    verdict = "PASS" if counts and all(n == 1 for n in counts.values()) else "FAIL"
    steps = f"steps {min(counts, key=int)}-{max(counts, key=int)}" if counts else "no steps"
    print(f"{steps}: {' '.join(str(n) for n in counts.values())} synchronizing CUDA "
          f"operation(s) per step ({result['hook']}); target 1 per step: {verdict}")
    return exit_codes.OK if counts and result["exit_code"] == 0 else exit_codes.FAILED


def collectives(backend: str) -> int:
    """The collectives the trainer uses, checked in fp32 and bf16 on every rank, and one
    timed 64 MiB all_reduce; raises on a wrong result."""
    import torch
    import torch.distributed as dist

    from trainer.dist import init_distributed, shutdown

    ctx = init_distributed(backend)
    try:
        device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
        world, rank = ctx.world_size, ctx.rank
        names = [n for n in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                             "reduce_scatter_tensor") if hasattr(dist, n)]
        with warnings.catch_warnings():  # torch 2.13 deprecates the *_tensor names
            warnings.simplefilter("ignore", FutureWarning)
            for dtype in (torch.float32, torch.bfloat16):
                _check_collectives(dist, names, world, rank, torch.device(device), dtype)
        dist.barrier()
        x = torch.ones(16 * 2**20, device=device)
        dist.all_reduce(x)
        _sync(device)
        started = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(x)
        _sync(device)
        seconds = (time.perf_counter() - started) / 5
        if ctx.is_main:
            print(f"world {world} ({ctx.backend}): all_reduce sum/max, {', '.join(names)}, "
                  f"broadcast, barrier correct in fp32 and bf16; all_reduce 64 MiB "
                  f"{seconds * 1000:.2f} ms ({x.nbytes / seconds / 1e9:.1f} GB/s)")
    finally:
        shutdown()
    return exit_codes.OK


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_collectives(dist, names: list[str], world: int, rank: int, device, dtype) -> None:
    import torch

    def expect(name: str, got, want) -> None:
        if not torch.equal(got.float().cpu(), want.float().cpu()):
            raise AssertionError(f"rank {rank}: {name} in {dtype} returned {got.tolist()[:8]}, "
                                 f"expected {want.tolist()[:8]}")

    x = torch.full((4,), rank + 1.0, dtype=dtype, device=device)
    dist.all_reduce(x)
    expect("all_reduce(SUM)", x, torch.full((4,), world * (world + 1) / 2))
    x = torch.full((4,), rank + 1.0, dtype=dtype, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    expect("all_reduce(MAX)", x, torch.full((4,), float(world)))
    for name in names:
        if "gather" in name:
            out = torch.empty(world * 4, dtype=dtype, device=device)
            getattr(dist, name)(out, torch.full((4,), float(rank), dtype=dtype, device=device))
            expect(name, out, torch.arange(world).repeat_interleave(4))
        else:
            out = torch.empty(4, dtype=dtype, device=device)
            getattr(dist, name)(out, torch.full((world * 4,), rank + 1.0, dtype=dtype, device=device))
            expect(name, out, torch.full((4,), world * (world + 1) / 2))
    x = torch.full((4,), 42.0 if rank == 0 else 0.0, dtype=dtype, device=device)
    dist.broadcast(x, src=0)
    expect("broadcast", x, torch.full((4,), 42.0))


def faces(root: Path, identities: int = 100, per_identity: int = 20) -> int:
    """Folders of 112x112 JPEGs, one per identity (noisy views of a random base image)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(identities):
        (root / f"id{c:03d}").mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        for i in range(per_identity):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"id{c:03d}" / f"{i}.jpg", quality=95)
    print(f"{identities * per_identity} JPEGs of {identities} identities in {root}")
    return exit_codes.OK


def report(parts_tsv: Path, benches: list[Path], out: Path | None) -> int:
    """Print the parts table (and each benchmark table), write it all as JSON to `out`;
    exit 1 when a part failed or timed out."""
    parts = [dict(zip(PART_FIELDS, line.split("\t", 3)))
             for line in parts_tsv.read_text().splitlines() if line.strip()]
    for p in parts:
        p["seconds"] = float(p["seconds"])
    counts = {s: sum(p["status"] == s for p in parts) for s in dict.fromkeys(p["status"] for p in parts)}
    print(f"\ngpu_smoke: {len(parts)} parts ({', '.join(f'{n} {s}' for s, n in counts.items())}) "
          f"in {sum(p['seconds'] for p in parts):.0f} s")
    print(f"{'part':<22} {'status':<8} {'s':>5}  detail")
    for p in parts:
        print(f"{p['part']:<22} {p['status']:<8} {p['seconds']:>5.0f}  {p['detail']}")
    tables = []
    for path in benches:
        if path.is_file():
            tables.append(json.loads(path.read_text()))
            print(f"\n{path.name}:")
            print_table(tables[-1]["rows"], tables[-1]["targets"])
    if out is not None:
        write_atomic(out, json.dumps({"parts": parts, "gpu_bench": tables}, indent=2))
        print(f"\nwritten to {out}")
    return exit_codes.FAILED if any(p["status"] in BROKEN for p in parts) else exit_codes.OK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="_smoke.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run-summary").add_argument("run_dir", type=Path)
    compare = sub.add_parser("offload-compare")
    compare.add_argument("run_a", type=Path)
    compare.add_argument("run_b", type=Path)
    sub.add_parser("sync-summary").add_argument("json", type=Path)
    sub.add_parser("collectives").add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    sub.add_parser("faces").add_argument("root", type=Path)
    rep = sub.add_parser("report")
    rep.add_argument("parts_tsv", type=Path)
    rep.add_argument("--bench", type=Path, action="append", default=[])
    rep.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.command == "run-summary":
        return run_summary(args.run_dir)
    if args.command == "offload-compare":
        return offload_compare(args.run_a, args.run_b)
    if args.command == "sync-summary":
        return sync_summary(args.json)
    if args.command == "collectives":
        return collectives(args.backend)
    if args.command == "faces":
        return faces(args.root)
    return report(args.parts_tsv, args.bench, args.json)


if __name__ == "__main__":
    sys.exit(main())
