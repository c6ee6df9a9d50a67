"""The classifier inside a real iresnet50 bf16 step on a GPU, side by side with
arcface_torch's PartialFC_V2 and a data-parallel nn.Linear (issue 15).

    python3 benchmarks/gpu_bench.py                       # one GPU: 1M and 10M classes
    python3 benchmarks/gpu_bench.py --rows compile        # the torch.compile row alone
    python3 benchmarks/gpu_bench.py --device cpu --tiny   # every row on CPU, tiny sizes
    ANCHOR_DIR=.anchors/arcface_torch python3 benchmarks/gpu_bench.py --json bench.json

A GPU box receives only the checkout, so copy the oracle into an ignored directory of it
first (`cp -r ../shared/anchors .anchors`; `.anchors/` is in .gitignore): the anchor
rows read `ANCHOR_DIR` (default `.anchors/arcface_torch`) and are skipped with one line
when it is absent. Under torchrun each GPU is one rank; the table shows rank 0's timings.

One step, on synthetic data already on the device (one batch of random images,
channels_last, and uniform labels, reused every step; the same tensors for every row of
a class count): the backbone's forward under bf16 autocast (fp32 on CPU); the embeddings
cast to fp32 and detached; the classifier's forward, backward and optimiser update;
then the backbone's backward from the embeddings' gradient and its SGD update. Cutting
the graph at the embeddings gives the gradients one backward would, and lets CUDA
events time the classifier alone: "clf ms" is its time, "clf %" its share of the step.

Rows (momentum 0.9, weight decay 5e-4, lr 0.1 everywhere; ArcFace s=64, m=0.5):
  arcshard  trainer.partial_fc.PartialFC + trainer.optim.ShardSGD, fp32 storage, no offload;
  anchor    arcface_torch PartialFC_V2 + CombinedMarginLoss, torch.optim.SGD (train_v2.py's);
  dense     DDP(nn.Linear) + cross-entropy without margin, torch.optim.SGD: the plain
            baseline; torch.cuda.OutOfMemoryError is reported as "OOM" (expected at 10M);
  compile   the backbone's training step (forward, a mean-square loss, backward, SGD)
            eager vs torch.compile(backbone); a compile error is reported in the row.
"peak GiB" is torch.cuda.max_memory_allocated over the row (reset at its start; it
includes the backbone, its optimiser state and activations). "plan GiB" is
arcshard-plan's per-rank prediction for the same setting (trainer.plan.make_plan)
without the parts PyTorch's allocator never sees (the fixed CUDA runtime, DALI buffers).
Targets: classifier <= 10% of the step at 1M classes, r=0.1; at 10M classes the arcshard
classifier step >= 2x faster than PartialFC_V2's and its peak memory <= 0.7x; planner
within 10% of the measured peak. Exit codes: 0 every row ran (OOM and missed targets are
results), 1 a row failed, 2 bad arguments or no CUDA device.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks._bench_classifiers import (
    BUILDERS,
    IMPLS,
    AnchorMissing,
    ClassifierStep,
    load_anchor,
    sgd,
)
from benchmarks._bench_table import print_table, summary, targets
from benchmarks._launch import GIB, fmt_classes
from data_tools.atomic import write_atomic
from trainer import exit_codes

GROUPS = ("arcshard", "anchor", "dense", "compile")
DEFAULT_ANCHOR = REPO / ".anchors" / "arcface_torch"
NOT_IN_ALLOCATOR = ("runtime", "DALI")  # trainer.plan part names max_memory_allocated misses


@dataclass(frozen=True)
class Scale:
    """The sizes of a run: FULL on a GPU, TINY for a CPU check of every code path."""

    backbone: str
    batch: int  # per rank
    dim: int
    small: int  # classes
    large: int
    warmup: int
    steps: int


FULL = Scale("iresnet50", 128, 512, 1_000_000, 10_000_000, warmup=3, steps=10)
TINY = Scale("mobilefacenet", 8, 512, 2000, 4000, warmup=1, steps=2)


@dataclass
class Bench:
    """What every row shares: device, sizes, the input batch and the DDP backbone."""

    device: torch.device
    rank: int
    world: int
    scale: Scale
    amp: torch.dtype | None
    images: Tensor
    backbone: nn.Module = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.reset_backbone()

    def reset_backbone(self) -> None:
        """A fresh DDP backbone and SGD (also after a failed row: its DDP state is unknown)."""
        model = new_backbone(self.scale, self.device)
        self.backbone = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = sgd(self.backbone.parameters())

    def labels(self, classes: int) -> Tensor:
        """This rank's labels for `classes`, the same for every row of that class count."""
        g = torch.Generator().manual_seed(classes * 1009 + self.rank)
        return torch.randint(0, classes, (self.scale.batch,), generator=g).to(self.device)


def new_backbone(scale: Scale, device: torch.device) -> nn.Module:
    from trainer.backbones import get_backbone

    torch.manual_seed(0)
    model = get_backbone(scale.backbone, embedding_size=scale.dim).to(device)
    return model.to(memory_format=torch.channels_last)  # the trainer's default


class Marks:
    """Time points within each step: CUDA events on a GPU (read once, at the end), the
    wall clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps: list[list] = []

    def mark(self, new_step: bool = False) -> None:
        if new_step:
            self.steps.append([])
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.steps[-1].append(event)
        else:
            self.steps[-1].append(time.perf_counter())

    def seconds(self) -> list[list[float]]:
        """Per step, the seconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [[a.elapsed_time(b) / 1000 for a, b in pairwise(s)] for s in self.steps]
        return [[b - a for a, b in pairwise(s)] for s in self.steps]


def run_steps(bench: Bench, classifier_step: ClassifierStep, labels: Tensor) -> dict:
    """Warm-up and timed training steps with `classifier_step`; the row's timings."""
    marks = Marks(bench.device)
    for i in range(bench.scale.warmup + bench.scale.steps):
        if i == bench.scale.warmup:
            marks = Marks(bench.device)  # the warm-up steps are not counted
        marks.mark(new_step=True)
        with torch.autocast(bench.device.type, dtype=bench.amp, enabled=bench.amp is not None):
            embeddings = bench.backbone(bench.images)
        features = embeddings.float()
        leaf = features.detach().requires_grad_(True)
        marks.mark()
        classifier_step(leaf, labels)
        marks.mark()
        features.backward(leaf.grad)
        bench.optimizer.step()
        bench.optimizer.zero_grad(set_to_none=True)
        marks.mark()
    seconds = marks.seconds()
    steps, classifier = [sum(s) for s in seconds], [s[1] for s in seconds]
    step_s = statistics.fmean(steps)
    return {"samples_per_s": bench.world * bench.scale.batch / step_s, "step_ms": 1000 * step_s,
            "classifier_ms": 1000 * statistics.fmean(classifier),
            "classifier_share": sum(classifier) / sum(steps)}


# ------------------------------------------------------------------------------ rows


def _free(bench: Bench) -> None:
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(bench.device)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def run_row(bench: Bench, group: str, classes: int, rate: float, anchor) -> dict:
    """One classifier row; OOM and other errors become the row's status."""
    row = {"group": group, "impl": IMPLS[group], "classes": classes, "rate": rate}
    if isinstance(anchor, AnchorMissing) and group == "anchor":
        return {**row, "status": "skipped", "note": str(anchor)}
    _free(bench)
    step, failed = None, True
    try:
        step = BUILDERS[group](bench.device, bench.scale.dim, classes, rate, anchor)
        row.update(run_steps(bench, step, bench.labels(classes)), status="ok")
        failed = False
        if bench.device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(bench.device) / GIB
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="OOM", note=_first_line(exc))
    except Exception as exc:  # noqa: BLE001 - reported in the row; the other rows still run
        row.update(status="failed", note=_first_line(exc))
    del step
    if failed:
        bench.reset_backbone()
    _free(bench)
    if group == "arcshard":
        row["plan_gib"] = plan_gib(bench, classes, rate)
    return row


def plan_gib(bench: Bench, classes: int, rate: float) -> float:
    """arcshard-plan's per-rank device bytes for the row's setting, in GiB, without the
    parts PyTorch's allocator does not see."""
    import psutil

    from trainer.plan import PlanInputs, make_plan

    cuda = bench.device.type == "cuda"
    memory = (torch.cuda.get_device_properties(bench.device).total_memory if cuda
              else psutil.virtual_memory().total)
    plan = make_plan(PlanInputs(
        num_classes=classes, world_size=bench.world, device_memory=memory,
        embedding_size=bench.scale.dim, batch_size=bench.scale.batch, sample_rate=rate,
        backbone=bench.scale.backbone, storage="fp32", offload="none",
        device="cuda" if cuda else "cpu", momentum=True, optimizer="sgd",
        amp16=bench.amp is not None))
    return sum(p.device for p in plan.parts if not p.name.startswith(NOT_IN_ALLOCATOR)) / GIB


def run_compile(bench: Bench, backend: str) -> dict:
    """The backbone's training step, eager vs torch.compile (same module and inputs)."""
    model = new_backbone(bench.scale, bench.device)
    optimizer = sgd(model.parameters())
    row = {"group": "compile", "impl": f"{bench.scale.backbone} torch.compile ({backend})",
           "classes": None, "rate": None}

    def step_ms(module: nn.Module, steps: int) -> float:
        marks = Marks(bench.device)
        for _ in range(steps):
            marks.mark(new_step=True)
            with torch.autocast(bench.device.type, dtype=bench.amp, enabled=bench.amp is not None):
                embeddings = module(bench.images)
            embeddings.float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks.mark()
        return 1000 * statistics.fmean(s[0] for s in marks.seconds())

    step_ms(model, bench.scale.warmup)
    row["eager_ms"] = step_ms(model, bench.scale.steps)
    try:
        compiled = torch.compile(model, backend=backend)
        started = time.perf_counter()
        step_ms(compiled, 2)  # compiles forward and backward
        row["compile_s"] = time.perf_counter() - started
        row["step_ms"] = step_ms(compiled, bench.scale.steps)
        row.update(speedup=row["eager_ms"] / row["step_ms"], status="ok")
    except Exception as exc:  # noqa: BLE001 - a compile failure is this row's result
        row.update(status="failed", note="compile failed: " + _first_line(exc))
    return row


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true",
                   help=f"tiny sizes ({TINY.backbone}, batch {TINY.batch}, {TINY.small} and "
                        f"{TINY.large} classes, {TINY.warmup}+{TINY.steps} steps): a CPU check")
    p.add_argument("--rows", default=",".join(GROUPS),
                   help=f"comma list of row groups (default all: {','.join(GROUPS)})")
    p.add_argument("--anchor-dir", type=Path, default=Path(os.environ.get("ANCHOR_DIR", DEFAULT_ANCHOR)),
                   help="arcface_torch copy (default $ANCHOR_DIR, else .anchors/arcface_torch)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the rows and targets here")
    args = p.parse_args(argv)
    groups = [g.strip() for g in args.rows.split(",") if g.strip()]
    if not groups or any(g not in GROUPS for g in groups):
        p.error(f"--rows: use a comma list of {', '.join(GROUPS)}, got {args.rows!r}")
    args.groups = groups
    return args


def row_settings(groups: list[str], scale: Scale) -> list[tuple[str, int, float]]:
    """(group, classes, rate) of the classifier rows, by class count: the dense rows
    last (they are the ones expected to run out of memory)."""
    wanted = [("arcshard", scale.small, 0.1), ("arcshard", scale.small, 1.0),
              ("anchor", scale.small, 0.1), ("anchor", scale.small, 1.0), ("dense", scale.small, 1.0),
              ("arcshard", scale.large, 0.1), ("anchor", scale.large, 0.1), ("dense", scale.large, 1.0)]
    return [w for w in wanted if w[0] in groups]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_bench: no CUDA device visible (torch {torch.__version__}, CUDA "
              f"{torch.version.cuda}); on CPU use --device cpu --tiny", file=sys.stderr)
        return exit_codes.USAGE
    from trainer.dist import init_distributed, shutdown

    ctx = init_distributed("nccl" if args.device == "cuda" else "gloo")
    try:
        return _bench(args, ctx)
    finally:
        shutdown()


def _bench(args: argparse.Namespace, ctx) -> int:
    device = ctx.device if args.device == "cuda" else torch.device("cpu")
    scale = TINY if args.tiny else FULL
    g = torch.Generator().manual_seed(ctx.rank)
    images = (torch.rand(scale.batch, 3, 112, 112, generator=g) * 2 - 1).to(device)
    bench = Bench(device, ctx.rank, ctx.world_size, scale,
                  torch.bfloat16 if device.type == "cuda" else None,
                  images.contiguous(memory_format=torch.channels_last))
    say = print if ctx.is_main else (lambda *a, **k: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(f"gpu_bench: {ctx.world_size} x {name}, torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}); {scale.backbone}, batch {scale.batch}/rank, D={scale.dim}, "
        f"{'bf16' if bench.amp else 'fp32'}; {scale.warmup} warm-up + {scale.steps} timed steps per row",
        flush=True)
    anchor = None
    if "anchor" in args.groups:
        try:
            anchor = load_anchor(args.anchor_dir)
        except AnchorMissing as exc:
            anchor = exc
            say(f"anchor rows {exc}")
    rows = []
    for group, classes, rate in row_settings(args.groups, scale):
        started = time.perf_counter()
        rows.append(run_row(bench, group, classes, rate, anchor))
        rows[-1]["wall_s"] = time.perf_counter() - started
        say(f"[{IMPLS[group]} {fmt_classes(classes)} r={rate:g}] {rows[-1]['status']} "
            f"({rows[-1]['wall_s']:.1f} s)", flush=True)
    if "compile" in args.groups:
        started = time.perf_counter()
        rows.append(run_compile(bench, args.compile_backend))
        rows[-1]["wall_s"] = time.perf_counter() - started
        say(f"[compile] {rows[-1]['status']} ({rows[-1]['wall_s']:.1f} s)", flush=True)
    verdicts = targets(rows, scale.small, scale.large, scale.backbone)
    if ctx.is_main:
        print_table(rows, verdicts)
        print(summary(rows, verdicts))
        if args.json:
            payload = {"device": name, "world_size": ctx.world_size, "torch": torch.__version__,
                       "scale": asdict(scale), "rows": rows,
                       "targets": verdicts}
            write_atomic(args.json, json.dumps(payload, indent=2))
    return exit_codes.FAILED if any(r["status"] == "failed" for r in rows) else exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
