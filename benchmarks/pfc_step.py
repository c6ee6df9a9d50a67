"""Benchmark one Partial FC classifier step on CPU: arcshard's sparse path vs a dense baseline.

    .venv/bin/python benchmarks/pfc_step.py                 # 200k/1M/2M classes x r 1/0.1/0.01
    .venv/bin/python benchmarks/pfc_step.py --quick         # smoke test (20k classes, seconds)
    .venv/bin/python benchmarks/pfc_step.py --classes 2000000 --rates 0.1 --json out.json
    .venv/bin/python benchmarks/pfc_step.py --classes 2000000 --rates 0.1 --impls sparse --profile
    .venv/bin/python benchmarks/pfc_step.py --classes 2M --rates 0.1 --impls sparse \
        --storages fp32,bf16,fp16 --offloads none,host      # class-centre storage columns
    .venv/bin/python benchmarks/pfc_step.py --classes 2M --rates 0.1 --impls sparse \
        --margins arcface,curricular,adaface --subcenters 1,3   # the margin losses

Every (classes, rate, impl) row runs in a FRESH 2-process gloo group (TCP on 127.0.0.1,
one torch thread per rank), one group at a time, so each row's peak RSS is its own. A
step is forward + backward + optimiser update of the classifier alone; the embeddings
are random [batch, D] tensors requiring grad, labels uniform over the classes. The time
of a step is the slower rank's; the table shows the median over the timed steps.

impl "sparse" is arcshard: `PartialFC` + `ShardSGD(momentum 0.9, wd 5e-4)`, with the class
centres and momentum stored as --storages says (fp32, or bf16/fp16 with stochastic
rounding) and --offloads (none, or host: on this CPU-only machine host = device, so it
measures the staging path's cost, not a transfer).
impl "dense" is the same layer trained the straightforward way: a PartialFC subclass
whose `_scored_rows` returns `weight[rows]` of a trainable `nn.Parameter` (the whole
shard at rate 1) instead of a detached copy, so autograd gives the shard a dense
[num_local, D] gradient, and `torch.optim.SGD([weight], momentum 0.9, wd 5e-4)` updates
every row (fp32 storage, no offload only). Both run PartialFC's fused forward/backward;
the difference is exactly the dense gradient and update.
--margins (arcface = CombinedMargin(64, 1, 0.5, 0), curricular = CurricularFace(),
adaface = AdaFace(), trainer/margins.py defaults) and --subcenters K (sub-center ArcFace:
K centres per class, the shard K times larger) vary the sparse rows' loss; dense rows are
always ArcFace with K = 1, the baseline.

A watchdog kills a row's workers when their RSS together exceeds --mem-limit-gib (default:
the memory available when the row starts minus 1.5 GiB) and reports the row as failed; a
row whose estimated memory already exceeds the limit is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._launch import (GIB, WORLD_SIZE, add_launcher_args, default_mem_limit_gib,
    finish_row, fmt_classes, machine_info, machine_line, ok, peak_rss_gib, run_pair)

# Numbers quoted in the issue, NOT measured by this script: insightface arcface_torch
# PartialFC_V2 on this kind of machine (seconds per step, peak RSS per rank in GB).
REFERENCE = {200_000: (0.88, 1.4), 1_000_000: (6.0, 4.4), 2_000_000: (12.5, 8.2)}


# ----------------------------------------------------------------------------- worker


def _dense_partial_fc():
    from trainer.partial_fc import PartialFC

    class DenseGradPartialFC(PartialFC):
        """PartialFC scoring `weight[rows]` of a trainable shard (the shard itself at
        rate 1) instead of a detached copy, so autograd gives the whole shard a dense
        gradient for torch.optim.SGD. Same fused forward/backward as PartialFC."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.weight.requires_grad_(True)

        def _scored_rows(self, rows):
            return self.weight if self.samples_all else self.weight[rows]

    return DenseGradPartialFC


def worker(cfg: dict, out_path: str) -> None:
    import datetime

    import psutil
    import torch
    import torch.distributed as dist

    from trainer.margins import AdaFace, CombinedMargin, CurricularFace
    from trainer.optim import ShardSGD
    from trainer.partial_fc import PartialFC

    torch.set_num_threads(cfg["threads"])
    rank = int(os.environ["RANK"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=cfg["collective_timeout"]),
    )
    proc = psutil.Process()
    rss = {"after_init": proc.memory_info().rss / GIB}
    lr, momentum, wd = 0.1, 0.9, 5e-4
    C, D, B = cfg["classes"], cfg["dim"], cfg["batch"]
    if cfg["impl"] == "sparse":
        margin = {"arcface": lambda: CombinedMargin(64.0, 1.0, 0.5, 0.0),
                  "curricular": CurricularFace, "adaface": AdaFace}[cfg["margin"]]()
        pfc = PartialFC(C, D, sample_rate=cfg["rate"], seed=0, storage=cfg["storage"],
                        offload=cfg["offload"], margin=margin, subcenters=cfg["subcenters"])
        rss["after_model"] = proc.memory_info().rss / GIB
        opt = ShardSGD(pfc, lr=lr, momentum=momentum, weight_decay=wd)
    else:
        pfc = _dense_partial_fc()(C, D, sample_rate=cfg["rate"], seed=0)
        rss["after_model"] = proc.memory_info().rss / GIB
        opt = torch.optim.SGD([pfc.weight], lr=lr, momentum=momentum, weight_decay=wd)
    rss["after_optimizer"] = proc.memory_info().rss / GIB  # (torch SGD: momentum is lazy)
    pfc.train()

    def batch(step: int):
        g = torch.Generator().manual_seed(1000 * step + rank)
        emb = torch.randn(B, D, generator=g).requires_grad_(True)
        return emb, torch.randint(0, C, (B,), generator=g)

    def update():
        if cfg["impl"] == "sparse":
            opt.step()
            opt.zero_grad()
        else:
            opt.step()
            opt.zero_grad()  # set_to_none, torch's default
            with warnings.catch_warnings():  # it reads .grad of the non-leaf weight[rows]
                warnings.simplefilter("ignore", UserWarning)
                pfc.zero_grad()  # forgets the scored rows it keeps for sampled_grad()

    def one_step(emb, labels):
        loss = pfc(emb, labels)
        loss.backward()
        update()
        return loss

    n_warm, n_timed = cfg["warmup"], cfg["steps"]
    times, cpu_times, losses = [], [], []
    profile_table = None
    for step in range(n_warm + n_timed):
        emb, labels = batch(step)
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = one_step(emb, labels)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(loss.detach()))
        if step >= n_warm:
            times.append(dt)
            cpu_times.append(dc)
    peak_rss = peak_rss_gib()  # before the profiled step: the profiler has a footprint too
    if cfg["profile"]:
        from torch.profiler import ProfilerActivity, profile, record_function

        emb, labels = batch(n_warm + n_timed)
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("## forward"):
                loss = pfc(emb, labels)
            with record_function("## backward"):
                loss.backward()
            with record_function("## update"):
                update()
        profile_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    # A step takes as long as its slowest rank.
    t = torch.tensor([times, cpu_times], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    result = {
        "rank": rank,
        "step_s": t[0].tolist(),
        "cpu_s": t[1].tolist(),
        "peak_rss_gib": peak_rss,
        "rss_gib": rss,
        "num_local": pfc.num_local,
        "num_sample": pfc.num_sample,
        "losses": losses,
        "profile": profile_table,
    }
    dist.destroy_process_group()
    Path(out_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- launcher


def est_gib_per_rank(cfg: dict) -> float:
    """Rough peak memory of one rank for `cfg`, fitted to measured rows (CPU, float32).

    ~0.35 GiB for the interpreter, torch and gloo; shard-sized tensors: weight + momentum
    (sparse, in the storage dtype), + dense gradient + SGD's `grad + wd * w` temporary
    (dense); a few sampled-rows-sized tensors (forward's copy, its gradient, the
    optimiser's gathers; with offload the staging buffers). trainer/plan.py has the
    exact formulae; this only decides which rows to skip.
    """
    num_local = math.ceil(cfg["classes"] / WORLD_SIZE)
    sampled = math.ceil(cfg["rate"] * num_local)
    every_row = sampled == num_local
    if cfg["impl"] == "sparse":
        shard_copies, sampled_copies = 2, (2.5 if every_row else 5)
    else:
        shard_copies, sampled_copies = 4, (1 if every_row else 3)
    shard_bytes = 4 if cfg["storage"] == "fp32" else 2
    staging = 6 * sampled * shard_bytes if cfg["offload"] == "host" else 0  # host + device
    rows = shard_copies * num_local * shard_bytes + sampled_copies * sampled * 4 + staging
    return 0.35 + rows * cfg["subcenters"] * cfg["dim"] / GIB


def run_row(cfg: dict, mem_limit_gib: float | None, timeout: float) -> dict:
    """Run one config in a fresh 2-process group; return the row (with 'error' on failure)."""
    if mem_limit_gib is None:
        mem_limit_gib = default_mem_limit_gib()
    row = {k: cfg[k] for k in ("classes", "rate", "impl", "storage", "offload", "margin",
                               "subcenters", "dim", "batch", "warmup", "steps")}
    need = WORLD_SIZE * est_gib_per_rank(cfg)
    if need > mem_limit_gib:
        row["error"] = (f"skipped: {WORLD_SIZE} ranks need about {need:.0f} GiB, "
                        f"memory limit {mem_limit_gib:.1f} GiB (--mem-limit-gib)")
        row["skipped"] = True
        return row
    run = run_pair(__file__, cfg, mem_limit_gib, timeout, tmp_prefix="pfc_step_")
    if run.results is not None:
        results = run.results
        steps, cpu = results[0]["step_s"], results[0]["cpu_s"]
        row.update(
            median_s=statistics.median(steps),
            median_cpu_s=statistics.median(cpu),
            step_s=steps,
            cpu_s=cpu,
            peak_rss_gib=[r["peak_rss_gib"] for r in results],
            rss_gib=[r["rss_gib"] for r in results],
            num_sample=[r["num_sample"] for r in results],
            num_local=[r["num_local"] for r in results],
            losses=results[0]["losses"],
            profile=results[0]["profile"],
        )
    return finish_row(row, run)


CODE_FILES = (
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "trainer" / "partial_fc").glob("*.py")),
    "trainer/optim.py", "trainer/margins.py",
)


def code_hash() -> str:
    """Short hash of the files under test, to tell if they changed between rows."""
    h = hashlib.sha256()
    for name in CODE_FILES:
        h.update((REPO / name).read_bytes())
    return h.hexdigest()[:12]


def code_version() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--", *CODE_FILES)
    changed = ", ".join(line[3:] for line in dirty.splitlines())
    return f"git {head}" + (f" + uncommitted changes to {changed}" if changed else "")


def find(rows: list[dict], classes: int, rate: float, impl: str, storage: str = "fp32",
         offload: str = "none", margin: str = "arcface", subcenters: int = 1) -> dict | None:
    want = (classes, rate, impl, storage, offload, margin, subcenters)
    for r in rows:
        if tuple(r[k] for k in ("classes", "rate", "impl", "storage", "offload", "margin",
                                "subcenters")) == want:
            return r
    return None


def print_table(rows: list[dict]) -> None:
    head = f"{'classes':>8} {'rate':>5} {'impl':>6} {'storage':>7} {'offload':>7} " \
           f"{'margin':>10} {'K':>2} " \
           f"{'sampled/rank':>12} {'s/step':>8} {'cpu s/step':>10} {'peak RSS/rank GiB':>18} " \
           f"{'speed-up':>8} {'load':>5}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cls, rate = fmt_classes(r["classes"]), f"{r['rate']:g}"
        kind = (f"{r['impl']:>6} {r['storage']:>7} {r['offload']:>7} {r['margin']:>10} "
                f"{r['subcenters']:>2}")
        if not ok(r):
            first = r["error"].splitlines()[0]
            word = "SKIPPED" if r.get("skipped") else "FAILED"
            print(f"{cls:>8} {rate:>5} {kind}  {word}: {first.removeprefix('skipped: ')}")
            continue
        rss = " / ".join(f"{x:.2f}" for x in r["peak_rss_gib"])
        speed = ""
        if r["impl"] == "sparse" and (r["margin"], r["subcenters"]) == ("arcface", 1):
            dense = find(rows, r["classes"], r["rate"], "dense")
            if ok(dense):
                speed = f"{dense['median_s'] / r['median_s']:.1f}x"
        print(f"{cls:>8} {rate:>5} {kind} {max(r['num_sample']):>12} "
              f"{r['median_s']:>8.3f} {r['median_cpu_s']:>10.3f} {rss:>18} {speed:>8} "
              f"{r['load1_at_end']:>5.1f}")


def targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(verdict, target, detail) for the issue's targets at 2M classes."""
    C = 2_000_000
    s1, d1, s01 = find(rows, C, 0.1, "sparse"), find(rows, C, 0.1, "dense"), find(rows, C, 0.01, "sparse")
    out = []

    def add(name, need, measure):
        if not all(ok(r) for r in need):
            why = "; ".join(f"{fmt_classes(r['classes'])} r={r['rate']:g} {r['impl']}: "
                            f"{r['error'].splitlines()[0]}" for r in need if r and not ok(r))
            out.append(("SKIP", name, "not measured: " + (
                why or "run with --classes 2M --rates 0.1,0.01 --impls sparse,dense")))
            return
        verdict, detail = measure()
        out.append(("PASS" if verdict else "FAIL", name, detail))

    def ratio(slow, fast):
        return (f"{slow['median_s']:.3f} s / {fast['median_s']:.3f} s = "
                f"{slow['median_s'] / fast['median_s']:.1f}x; by CPU time "
                f"{slow['median_cpu_s'] / fast['median_cpu_s']:.1f}x")

    add("2M, r=0.1: sparse >= 10x faster than dense", [s1, d1],
        lambda: (d1["median_s"] / s1["median_s"] >= 10, ratio(d1, s1)))
    add("2M, r=0.1: sparse peak RSS per rank <= 5 GiB", [s1],
        lambda: (max(s1["peak_rss_gib"]) <= 5,
                 f"max over ranks {max(s1['peak_rss_gib']):.2f} GiB"))
    add("2M: sparse r=0.01 >= 4x faster than r=0.1", [s1, s01],
        lambda: (s1["median_s"] / s01["median_s"] >= 4, ratio(s1, s01)))
    b1 = find(rows, C, 0.1, "sparse", "bf16")
    add("2M, r=0.1: bf16 storage peak RSS per rank <= 60% of fp32 storage", [s1, b1],
        lambda: (max(b1["peak_rss_gib"]) <= 0.6 * max(s1["peak_rss_gib"]),
                 f"{max(b1['peak_rss_gib']):.2f} / {max(s1['peak_rss_gib']):.2f} GiB = "
                 f"{max(b1['peak_rss_gib']) / max(s1['peak_rss_gib']):.0%}"))
    return out


def parse_list(text: str, kind) -> list:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1
        if kind is int and part[-1:] in ("k", "m"):
            mult, part = (1000 if part[-1] == "k" else 1_000_000), part[:-1]
        out.append(kind(float(part) * mult) if kind is int else kind(part))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", default=None,
                   help="comma list of class counts, k/M suffixes ok (default 200k,1M,2M)")
    p.add_argument("--rates", default=None,
                   help="comma list of sample rates (default 1.0,0.1,0.01)")
    p.add_argument("--impls", default="sparse,dense", help="comma list: sparse, dense")
    p.add_argument("--storages", default="fp32",
                   help="comma list of class-centre storage dtypes for sparse rows: fp32, bf16, "
                        "fp16 (default fp32)")
    p.add_argument("--offloads", default="none",
                   help="comma list for sparse rows: none, host (default none)")
    p.add_argument("--margins", default="arcface",
                   help="comma list for sparse rows: arcface, curricular, adaface (default arcface)")
    p.add_argument("--subcenters", default="1",
                   help="comma list of sub-centres per class K for sparse rows (default 1)")
    p.add_argument("--dim", type=int, default=512, help="embedding size D (default 512)")
    p.add_argument("--batch", type=int, default=128, help="batch per rank (default 128)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: defaults become 20k classes, rates 1.0,0.1, 1 warmup + 2 "
                        "timed steps (flags given explicitly still win)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile one more step on rank 0 and print "
                        "the op table (torch.profiler)")
    p.add_argument("--json", metavar="OUT", help="write machine info and rows to this file")
    add_launcher_args(p, "; a row whose estimated need exceeds it is skipped")
    args = p.parse_args(argv)

    if args._worker:
        worker(json.loads(args._worker[0]), args._worker[1])
        return 0

    defaults = (("20k", "1.0,0.1", 1, 2) if args.quick else ("200k,1M,2M", "1.0,0.1,0.01", 2, 5))
    for name, value in zip(("classes", "rates", "warmup", "steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    classes = parse_list(args.classes, int)
    rates = parse_list(args.rates, float)
    impls = parse_list(args.impls, str)
    if any(i not in ("sparse", "dense") for i in impls):
        p.error(f"--impls: use sparse and/or dense, got {args.impls}")
    if any(not 0 < r <= 1 for r in rates):
        p.error(f"--rates must be in (0, 1], got {args.rates}")
    storages = parse_list(args.storages, str)
    offloads = parse_list(args.offloads, str)
    if any(s not in ("fp32", "bf16", "fp16") for s in storages):
        p.error(f"--storages: use fp32, bf16 and/or fp16, got {args.storages}")
    if any(o not in ("none", "host") for o in offloads):
        p.error(f"--offloads: use none and/or host, got {args.offloads}")
    margins = parse_list(args.margins, str)
    subcenters = parse_list(args.subcenters, int)
    if any(m not in ("arcface", "curricular", "adaface") for m in margins):
        p.error(f"--margins: use arcface, curricular and/or adaface, got {args.margins}")
    if any(k < 1 for k in subcenters):
        p.error(f"--subcenters must be >= 1, got {args.subcenters}")

    machine = machine_info(args.threads)
    machine["code"] = code_version()
    print(machine_line(machine))
    print(f"code under test: {machine['code']} ({', '.join(CODE_FILES)} hash {code_hash()})")
    print(f"D={args.dim}, batch {args.batch}/rank (global {args.batch * WORLD_SIZE}), "
          f"{args.warmup} warmup + {args.steps} timed steps per row; one fresh process "
          f"group per row\n", flush=True)

    rows = []
    variants = [(impl, storage, offload, margin, k) for impl in impls
                for storage in (storages if impl == "sparse" else ["fp32"])
                for offload in (offloads if impl == "sparse" else ["none"])
                for margin in (margins if impl == "sparse" else ["arcface"])
                for k in (subcenters if impl == "sparse" else [1])]
    for c in classes:
        for r in rates:
            for impl, storage, offload, margin, k in variants:
                cfg = dict(classes=c, rate=r, impl=impl, storage=storage, offload=offload,
                           margin=margin, subcenters=k,
                           dim=args.dim, batch=args.batch, warmup=args.warmup, steps=args.steps,
                           threads=args.threads, profile=args.profile,
                           collective_timeout=max(600, args.row_timeout))
                t0 = time.monotonic()
                code = code_hash()
                row = run_row(cfg, args.mem_limit_gib, args.row_timeout)
                row["code_hash"] = code if code == code_hash() else "changed during the row"
                row["wall_s"] = time.monotonic() - t0
                rows.append(row)
                status = (f"median {row['median_s']:.3f} s/step, peak RSS "
                          f"{max(row['peak_rss_gib']):.2f} GiB/rank" if ok(row)
                          else row["error"] if row.get("skipped") else "FAILED:\n" + row["error"])
                print(f"[{fmt_classes(c)} r={r:g} {impl} {storage} {offload} {margin} K={k}] {status} "
                      f"(row took {row['wall_s']:.0f} s)", flush=True)
                if ok(row) and row.get("profile"):
                    print(f"\nprofile of one step, rank 0 ({fmt_classes(c)}, r={r:g}, {impl}):")
                    print(row["profile"], flush=True)

    print()
    print_table(rows)
    print("s/step: median wall time of the slower rank; cpu s/step: median process CPU time "
          "of the busier rank\n(less sensitive to other load on the machine); speed-up: dense "
          "s/step / sparse s/step; load: 1-min\nload average when the row ended (includes "
          "the row's own 2 workers).")
    hashes = {r.get("code_hash") for r in rows if not r.get("skipped")}
    if len(hashes) > 1:
        print(f"WARNING: {', '.join(CODE_FILES)} changed while the rows ran "
              f"(hashes {sorted(hashes)}); rows measured different code")
    print()
    print("Reference, quoted from the issue (NOT measured here): insightface arcface_torch "
          "PartialFC_V2 on this kind of machine:")
    for c, (sec, gb) in REFERENCE.items():
        print(f"  {fmt_classes(c):>5} classes: {sec:>5.2f} s/step, {gb:.1f} GB peak RSS per rank")
    print()
    verdicts = targets(rows)
    for verdict, name, detail in verdicts:
        print(f"{verdict}: {name} ({detail})")
    print(machine_line(machine))

    if args.json:
        payload = {"machine": machine, "args": {k: v for k, v in vars(args).items()
                                                if not k.startswith("_")},
                   "rows": rows,
                   "targets": [dict(verdict=v, target=n, detail=d) for v, n, d in verdicts]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"rows written to {args.json}")
    return 1 if any(not ok(r) and not r.get("skipped") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
