"""Benchmark the DDP and memory-layout settings trainer/run.py chooses, one at a time, on CPU.

    .venv/bin/python benchmarks/ddp_settings.py                 # 2 backbones x 7 rows, ~3 min
    .venv/bin/python benchmarks/ddp_settings.py --backbones mobilefacenet --batch-size 2 \\
        --warmup 1 --steps 1 --json out.json                    # seconds

Every (backbone, setting) row runs in a FRESH 2-process gloo group (TCP on 127.0.0.1, one
torch thread per rank by default, started as torchrun starts ranks and joined through
`trainer.dist.init_distributed`), one group at a time, so each row's peak RSS is its own.
A step is what trainer.loop.forward_backward + the optimizer step do to the backbone:
(channels_last rows) the per-batch NCHW -> NHWC copy, forward through a DDP-wrapped
backbone with trainer.run's summing comm hook (`_sum_allreduce_hook`), loss =
embeddings.square().mean() (backward runs through the backbone only), backward (DDP's
all-reduce included), SGD step (`make_backbone_optimizer`, config defaults) and
zero_grad(set_to_none=True) as `TrainingOptimizer.zero_grad` does (view_fill: False).
Each rank has one fixed random NCHW fp32 batch, made before the steps. The ranks meet at
a barrier (not timed) before each step; a step takes as long as its slower rank; the
table shows the median over the timed steps.

Rows (each changes one setting of the baseline; `trainer` is trainer/run.py's choice):
  baseline       broadcast_buffers=True, gradient_as_bucket_view=False, NCHW (DDP defaults)
  bucket_view    gradient_as_bucket_view=True: gradients are views into DDP's buckets
  no_broadcast   broadcast_buffers=False: no broadcast of the BN buffers every forward
  channels_last  the backbone in channels_last + the per-batch copy to channels_last
  trainer        broadcast_buffers=True, gradient_as_bucket_view=True, channels_last
  view_fill      trainer + zero_grad(set_to_none=False): autograd accumulates straight
                 into the bucket views (with set_to_none=True it allocates a fresh
                 gradient each step, which DDP copies into the bucket and drops)
The default run measures the baseline again at the end: how far its two medians lie
apart is the noise floor of the cross-row comparison on this machine (rows may repeat in
--settings; "vs base" compares with the first baseline row).

`broadcast_buffers` is passed as `forward_sync_buffers` where the installed torch has that
name (2.13 deprecates the old one). Everything runs on the CPU, even where a GPU is
present; torch.backends.cudnn.benchmark (set by trainer.dist on GPUs) has no CPU
counterpart and is not measured here.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._launch import (add_launcher_args, finish_row, machine_info, machine_line, ok,
    peak_rss_gib, run_pair)

MIB = 1024**2


class Setting(NamedTuple):
    broadcast_buffers: bool
    bucket_view: bool  # gradient_as_bucket_view
    channels_last: bool
    set_to_none: bool = True  # zero_grad(set_to_none=...), True as TrainingOptimizer does


SETTINGS: dict[str, Setting] = {
    "baseline": Setting(True, False, False),
    "bucket_view": Setting(True, True, False),
    "no_broadcast": Setting(False, False, False),
    "channels_last": Setting(True, False, True),
    "trainer": Setting(True, True, True),
    "view_fill": Setting(True, True, True, set_to_none=False),
}
DEFAULT_SETTINGS = (*SETTINGS, "baseline")


# ----------------------------------------------------------------------------- worker


def ddp_kwargs(broadcast_buffers: bool, bucket_view: bool) -> dict:
    """DistributedDataParallel keyword arguments for these settings, with the buffer-sync
    flag under the name the installed torch accepts without a deprecation warning."""
    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {name: broadcast_buffers, "gradient_as_bucket_view": bucket_view}


def traffic_bytes(module, broadcast_buffers: bool) -> tuple[int, int]:
    """(bytes DDP broadcasts from rank 0 every forward: all the module's buffers when
    buffers are synced, else 0; bytes of gradients all-reduced every step)."""
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    grads = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return (buffers if broadcast_buffers else 0), grads


def grad_storages(params) -> tuple[int, int]:
    """(number of distinct storages behind the parameters' gradients, their total bytes):
    one per parameter for ordinary gradients, one per DDP bucket for bucket views."""
    storages = {}
    for p in params:
        if p.grad is not None:
            s = p.grad.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return len(storages), sum(storages.values())


def _build(spec: dict, cfg, device):
    """The DDP-wrapped backbone (as trainer.run._backbone builds it, with this row's
    settings) and its SGD optimizer."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from trainer.backbones import get_backbone
    from trainer.optim import make_backbone_optimizer
    from trainer.run import _sum_allreduce_hook

    s = SETTINGS[spec["setting"]]
    torch.manual_seed(cfg.run.seed)
    backbone = get_backbone(cfg.backbone.name, embedding_size=cfg.backbone.embedding_size,
                            dropout=cfg.backbone.dropout).to(device)
    if s.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    ddp = DistributedDataParallel(backbone, device_ids=None,
                                  **ddp_kwargs(s.broadcast_buffers, s.bucket_view))
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    o = cfg.optim
    opt = make_backbone_optimizer(ddp.parameters(), o.name, o.lr, o.momentum, o.weight_decay)
    return ddp, opt


def worker(spec: dict, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from trainer.config import load_config
    from trainer.dist import init_distributed, shutdown

    torch.set_num_threads(spec["threads"])
    cfg = load_config(None, [f"backbone.name={spec['backbone']}",
                             f"backbone.embedding_size={spec['dim']}", "dist.backend=gloo"])
    ctx = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        device = torch.device("cpu")  # gloo's device; a GPU's steps would need synchronising
        ddp, opt = _build(spec, cfg, device)
        s = SETTINGS[spec["setting"]]
        params = [p for p in ddp.parameters() if p.requires_grad]
        size = ddp.module.input_size
        gen = torch.Generator().manual_seed(cfg.run.seed + ctx.rank)
        batch = torch.randn(spec["batch"], 3, size, size, generator=gen)  # NCHW, as loaders give
        rss_built = peak_rss_gib()
        ddp.train()
        step_s, convert_s = [], []
        for step in range(spec["warmup"] + spec["steps"]):
            dist.barrier()
            t0 = time.perf_counter()
            images = batch.to(device, non_blocking=True)
            if s.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            t1 = time.perf_counter()
            loss = ddp(images).float().square().mean()
            loss.backward()
            storages = grad_storages(params)
            opt.step()
            opt.zero_grad(set_to_none=s.set_to_none)
            t2 = time.perf_counter()
            if step >= spec["warmup"]:
                step_s.append(t2 - t0)
                convert_s.append(t1 - t0)
        buffer_bytes, grad_bytes = traffic_bytes(ddp.module, s.broadcast_buffers)
        result = {"rank": ctx.rank, "step_s": step_s, "convert_s": convert_s,
                  "peak_rss_gib": peak_rss_gib(), "rss_built_gib": rss_built,
                  "buffer_bytes_per_forward": buffer_bytes, "grad_bytes_per_step": grad_bytes,
                  "grad_storages": storages[0], "grad_storage_bytes": storages[1],
                  "num_params": len(params), "loss": float(loss.detach()),
                  "ddp_kwargs": ddp_kwargs(s.broadcast_buffers, s.bucket_view)}
        dist.barrier()
    finally:
        shutdown()
    Path(out_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- launcher


def run_row(spec: dict, mem_limit_gib: float | None, timeout: float) -> dict:
    """Run one (backbone, setting) in a fresh 2-process group; the row ('error' on failure)."""
    row = dict(spec)
    run = run_pair(__file__, spec, mem_limit_gib, timeout, tmp_prefix="ddp_settings_", poll_s=0.2)
    if run.results is not None:
        results = run.results
        r0 = results[0]
        # Both ranks start each step at the same barrier: a step takes its slower rank's time.
        step_s = [max(v) for v in zip(*(r["step_s"] for r in results))]
        convert_s = [max(v) for v in zip(*(r["convert_s"] for r in results))]
        row.update(
            median_s=statistics.median(step_s), step_s=step_s,
            median_convert_s=statistics.median(convert_s),
            per_rank_step_s=[r["step_s"] for r in results],
            peak_rss_gib=[r["peak_rss_gib"] for r in results],
            rss_built_gib=[r["rss_built_gib"] for r in results],
            **{k: r0[k] for k in ("buffer_bytes_per_forward", "grad_bytes_per_step",
                                  "grad_storages", "grad_storage_bytes", "num_params",
                                  "loss", "ddp_kwargs")},
        )
    return finish_row(row, run)


# ----------------------------------------------------------------------------- report


COLUMNS = ("backbone", "setting", "bcast", "view", "NHWC", "zero_grad", "step ms", "min-max ms",
           "NHWC copy ms", "vs base", "peak RSS/rank MiB", "BN bcast/fwd", "grad AR/step",
           "grad storages", "load")


def fmt_bytes(n: int) -> str:
    if n == 0:
        return "0"
    if n < MIB:
        return f"{n / 1024:.1f} KiB"
    return f"{n / MIB:.1f} MiB"


def baselines(rows: list[dict], backbone: str) -> list[dict]:
    """The measured baseline rows of `backbone`, in run order."""
    return [r for r in rows if r["backbone"] == backbone and r["setting"] == "baseline" and ok(r)]


def table_cells(row: dict, rows: list[dict]) -> list[str]:
    """The table's cells of one measured row (see COLUMNS)."""
    s = SETTINGS[row["setting"]]
    base = (baselines(rows, row["backbone"]) or [None])[0]
    vs = ("ref" if row is base else "-" if base is None
          else f"{100 * (row['median_s'] / base['median_s'] - 1):+.1f}%")
    yes_no = ["yes" if flag else "no" for flag in s[:3]]
    return [row["backbone"], row["setting"], *yes_no, "none" if s.set_to_none else "fill",
            f"{1000 * row['median_s']:.0f}",
            f"{1000 * min(row['step_s']):.0f}-{1000 * max(row['step_s']):.0f}",
            f"{1000 * row['median_convert_s']:.1f}" if s.channels_last else "-", vs,
            " / ".join(f"{x * 1024:.0f}" for x in row["peak_rss_gib"]),
            fmt_bytes(row["buffer_bytes_per_forward"]), fmt_bytes(row["grad_bytes_per_step"]),
            f"{row['grad_storages']}/{row['num_params']}", f"{row['load1_at_end']:.1f}"]


def noise_line(rows: list[dict], backbone: str) -> str | None:
    """How far the repeated baseline rows of `backbone` lie apart (the noise floor)."""
    base = baselines(rows, backbone)
    if len(base) < 2:
        return None
    medians = [1000 * r["median_s"] for r in base]
    spread = 100 * (max(medians) / min(medians) - 1)
    return (f"noise floor, {backbone}: the {len(base)} baseline rows took "
            + ", ".join(f"{m:.0f}" for m in medians) + f" ms ({spread:.1f}% apart); step-time "
            "differences between rows smaller than that are noise")


def print_table(machine: dict, rows: list[dict]) -> None:
    cells = [list(COLUMNS)]
    failed = []
    for r in rows:
        if ok(r):
            cells.append(table_cells(r, rows))
        else:
            failed.append(f"{r['backbone']} {r['setting']}: FAILED: {r['error'].splitlines()[0]}")
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(line, widths))) for line in cells]
    print(lines[0])
    print("-" * len(lines[0]))
    print("\n".join(lines[1:] + failed))
    print("bcast: BN buffers broadcast from rank 0 every forward; view: gradient_as_bucket_view;"
          "\nNHWC: model + per-batch copy in channels_last; zero_grad: set_to_none=True (none) or "
          "False (fill);\nstep ms: median of the slower rank (forward + backward incl. all-reduce"
          " + SGD step + zero_grad);\nNHWC copy ms: the per-batch conversion inside it; vs base: "
          "step vs the first baseline row;\nBN bcast/fwd: bytes DDP broadcasts per forward (all "
          "buffers); grad AR/step: bytes all-reduced per\nstep; grad storages: distinct gradient "
          "storages / parameters after backward (bucket views: one per\nDDP bucket); load: 1-min "
          "load average at the row's end (includes the row's own 2 workers).")
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        line = noise_line(rows, backbone)
        if line:
            print(line)
    print(machine_line(machine))


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--backbones", default="iresnet50,mobilefacenet",
                   help="comma list of backbone names (default iresnet50,mobilefacenet)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                   help=f"comma list of rows, of {', '.join(SETTINGS)}; repeats allowed "
                        f"(default {','.join(DEFAULT_SETTINGS)})")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="batch per rank (default 8)")
    p.add_argument("--dim", type=int, default=512, help="embedding size D (default 512)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--json", metavar="OUT", help="write machine info and rows to this file")
    add_launcher_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = make_parser()
    args = p.parse_args(argv)
    if args._worker:
        worker(json.loads(args._worker[0]), args._worker[1])
        return 0

    from trainer.backbones import available_backbones

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for b in backbones:
        if b not in available_backbones():
            p.error(f"--backbones: {b!r} is not one of {', '.join(available_backbones())}")
    for s in settings:
        if s not in SETTINGS:
            p.error(f"--settings: {s!r} is not one of {', '.join(SETTINGS)}")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.threads < 1:
        p.error("need --steps >= 1, --warmup >= 0, --batch-size >= 1, --threads >= 1")

    machine = machine_info(args.threads)
    print(machine_line(machine))
    print(f"batch {args.batch_size}/rank, D={args.dim}, fp32, {args.warmup} warmup + "
          f"{args.steps} timed steps per row; one fresh process group per row\n", flush=True)
    rows = []
    for backbone in backbones:
        for setting in settings:
            spec = {"backbone": backbone, "setting": setting, "batch": args.batch_size,
                    "dim": args.dim, "warmup": args.warmup, "steps": args.steps,
                    "threads": args.threads}
            t0 = time.monotonic()
            row = run_row(spec, args.mem_limit_gib, args.row_timeout)
            row["wall_s"] = time.monotonic() - t0
            rows.append(row)
            status = (f"median {1000 * row['median_s']:.0f} ms/step" if ok(row)
                      else "FAILED:\n" + row["error"])
            print(f"[{backbone} {setting}] {status} (row took {row['wall_s']:.0f} s)", flush=True)
    print()
    print_table(machine, rows)
    if args.json:
        payload = {"machine": machine,
                   "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                   "rows": rows}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"rows written to {args.json}")
    return 1 if any(not ok(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
