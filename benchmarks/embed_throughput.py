"""Embedding throughput on CPU: onnxruntime vs PyTorch eager, same run, same machine.

For each backbone (freshly initialised weights: speed does not depend on their values)
the script exports an ONNX model with `deploy.onnx_export.export_onnx` (parity-checked
like `arcshard-export onnx`), then times forward passes of random normalised 112x112
batches at batch 1 and 32:

* PyTorch eager: the eval-mode module under `torch.inference_mode()`, float32,
  `torch.get_num_threads()` threads;
* onnxruntime: `InferenceSession` on the CPUExecutionProvider with default options
  (all graph optimisations, one intra-op thread per core).

Each measurement runs `--warmup` passes, then passes until `--seconds` have elapsed (at
least `--min-iters`), and reports images/s from the median pass time, plus CPU time per
image (this process, user + system). The PyTorch row is the baseline of the speed-up
column. Wall-clock rates are only meaningful when the load average (printed) is well
below the core count; CPU time per image is much less sensitive to other work.

    python benchmarks/embed_throughput.py [--backbones iresnet50,mobilefacenet]
        [--batches 1,32] [--seconds 5] [--warmup 2] [--min-iters 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from deploy.onnx_export import INPUT_NAME, export_onnx  # noqa: E402
from trainer.backbones import get_backbone  # noqa: E402


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(
    run: Callable[[], object], batch: int, seconds: float, warmup: int, min_iters: int
) -> tuple[float, float]:
    """(images/s from the median pass, CPU ms per image) of `run` on batches of `batch`."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    cpu = _cpu_seconds() - cpu_start
    return batch / statistics.median(times), 1000 * cpu / (batch * len(times))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="iresnet50,mobilefacenet")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-iters", type=int, default=3)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load average before: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones.split(","):
            torch.manual_seed(0)
            module = get_backbone(name).eval()
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(module, path, random_count=4)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for batch in batches:
                x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)
                xt = torch.from_numpy(x)

                def eager() -> object:
                    with torch.inference_mode():
                        return module(xt)

                def onnx() -> object:
                    return session.run(None, {INPUT_NAME: x})

                base, base_cpu = measure(eager, batch, args.seconds, args.warmup, args.min_iters)
                fast, fast_cpu = measure(onnx, batch, args.seconds, args.warmup, args.min_iters)
                rows.append((name, batch, base, base_cpu, fast, fast_cpu))
                print(f"  measured {name} batch {batch}", file=sys.stderr)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print()
    print("| backbone | batch | PyTorch eager img/s | onnxruntime img/s | speed-up "
          "| CPU ms/img eager | CPU ms/img ORT |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, batch, base, base_cpu, fast, fast_cpu in rows:
        print(f"| {name} | {batch} | {base:.1f} | {fast:.1f} | {fast / base:.2f}x "
              f"| {base_cpu:.1f} | {fast_cpu:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
