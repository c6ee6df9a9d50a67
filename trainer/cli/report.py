"""`arcshard-report RUN_DIR [--out PNG]`: one picture and a short text summary of a run.

Reads `RUN_DIR/metrics.jsonl` (rank 0 writes one JSON object per logged step, see
trainer/telemetry.py) and draws five panels against the step: loss, learning rate,
samples/s per rank, data-wait % per rank and verification accuracy per target. Records
without the per-rank lists (`samples_per_sec_per_rank`, `data_wait_frac_per_rank`) are
drawn as one "all ranks" line; verification accuracy comes from the evaluation records
the trainer appends (`{"step": s, "eval": {"lfw": {"accuracy": 0.995, ...}, ...}}`, or a
plain `verification` object `{"lfw": 0.995, ...}`) and its panel says so when there is none.

When a step is logged again (a run restarted or resumed into the same directory appends
to the file), the records of the earlier attempt from that step on are dropped, so the
picture shows the run as it finally went.

The picture needs matplotlib (`pip install 'arcshard[report]'`); the summary does not.
Exit codes: 0 done; 2 no usable metrics file, or matplotlib missing (summary printed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from trainer import exit_codes

PANELS = ("loss", "learning rate", "samples/s per rank", "data wait % per rank",
          "verification accuracy")
FIGSIZE, DPI = (10.0, 13.0), 100  # inches, dots per inch: a 1000 x 1300 pixel PNG


class ReportError(Exception):
    """The run cannot be reported; the message says which file and why."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of `path` in step order, later attempts replacing earlier ones."""
    if not path.is_file():
        raise ReportError(
            f"{path}: no such file; RUN_DIR must be a training output directory "
            "(run.output_dir), where rank 0 writes metrics.jsonl"
        )
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            # A run killed mid-write leaves a cut-off line (one the trainer appended to
            # before it learnt to truncate it on resume): skip it, keep the rest.
            print(f"arcshard-report: warning: {path}: line {number} is not JSON ({exc.msg}); "
                  "skipped", file=sys.stderr)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            print(f"arcshard-report: warning: {path}: line {number} has no integer 'step'; "
                  "skipped", file=sys.stderr)
            continue
        # A repeated step restarts the records of its kind (evaluation records share their
        # step with the step record logged just before them).
        kind = "eval" in record
        records = [r for r in records if ("eval" in r) != kind or r["step"] < record["step"]]
        records.append(record)
    if not records:
        raise ReportError(
            f"{path}: no records yet; rank 0 writes one line every run.log_every steps"
        )
    return records


def _per_rank(records: list[dict[str, Any]], key: str, fallback: str) -> dict[str, list]:
    """{label: [(step, value), ...]}: one line per rank, or one 'all ranks' line."""
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        values = r.get(key)
        if isinstance(values, list):
            for rank, value in enumerate(values):
                lines.setdefault(f"rank {rank}", []).append((r["step"], value))
        elif fallback in r:
            lines.setdefault("all ranks", []).append((r["step"], r[fallback]))
    return lines


def _step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step records (not the evaluation ones)."""
    return [r for r in records if "eval" not in r]


def _verification(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        accuracies = dict(r.get("verification") or {})
        accuracies.update({name: res["accuracy"] for name, res in (r.get("eval") or {}).items()})
        for target, accuracy in accuracies.items():
            lines.setdefault(target, []).append((r["step"], accuracy))
    return lines


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summary(records: list[dict[str, Any]], path: Path) -> str:
    """A few lines: span, loss, learning rate, throughput, data wait, non-finite, accuracy."""
    evals, records = records, _step_records(records) or records
    first, last = records[0], records[-1]
    out = [f"{path}: {len(records)} records, steps {first['step']}..{last['step']}"
           + (f", {last['time']:.0f} s" if "time" in last else "")]
    losses = [(r["loss"], r["step"]) for r in records if math.isfinite(r.get("loss", math.nan))]
    if losses:
        best = min(losses)
        out.append(f"loss          {losses[0][0]:.4g} -> {losses[-1][0]:.4g} "
                   f"(lowest {best[0]:.4g} at step {best[1]})")
    if "lr" in last:
        out.append(f"learning rate peak {max(r['lr'] for r in records):.4g}, last {last['lr']:.4g}")
    for title, key, fallback, scale, unit in (
        ("samples/s    ", "samples_per_sec_per_rank", "samples_per_sec", 1, ""),
        ("data wait    ", "data_wait_frac_per_rank", "data_wait_frac", 100, "%"),
    ):
        lines = _per_rank(records, key, fallback)
        means = ", ".join(f"{label} {scale * _mean([v for _, v in pts]):.3g}{unit}"
                          for label, pts in lines.items())
        out.append(f"{title} mean {means}")
    out.append(f"non-finite    {last.get('nonfinite_total', 0)} steps skipped")
    accuracy = _verification(evals)
    out.append("verification  " + (", ".join(
        f"{t} {pts[-1][1]:.4f} (best {max(v for _, v in pts):.4f})" for t, pts in accuracy.items()
    ) or "none logged"))
    return "\n".join(out)


def plot(records: list[dict[str, Any]], title: str):
    """The report figure: one panel per quantity in PANELS, step on the x axis."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(
            "matplotlib is not installed: pip install 'arcshard[report]' "
            "(bash scripts/bootstrap.sh installs it)"
        ) from None
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    fig.suptitle(title)
    evals, records = records, _step_records(records)
    panels = [  # {line label ('' for a single line): [(step, value), ...]}
        {"": [(r["step"], r.get("loss", math.nan)) for r in records]},
        {"": [(r["step"], r.get("lr", math.nan)) for r in records]},
        _per_rank(records, "samples_per_sec_per_rank", "samples_per_sec"),
        {label: [(step, 100 * v) for step, v in pts] for label, pts in
         _per_rank(records, "data_wait_frac_per_rank", "data_wait_frac").items()},
        _verification(evals),
    ]
    for ax, name, lines in zip(axes, PANELS, panels):
        ax.set_title(name, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        for label, pts in lines.items():
            steps, values = zip(*pts)
            ax.plot(steps, values, marker=".", label=label or None)
        if any(lines):  # labelled lines (ranks, targets)
            ax.legend(fontsize=8, loc="best")
        if not any(lines.values()):
            ax.text(0.5, 0.5, f"no {name} logged", transform=ax.transAxes, ha="center",
                    va="center", color="grey")
    axes[-1].set_xlabel("step")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="arcshard-report",
        description="Draw one picture of a training run from RUN_DIR/metrics.jsonl (loss, "
        "learning rate, samples/s per rank, data-wait %%, verification accuracy against "
        "step) and print a short summary.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's output_dir")
    parser.add_argument("--out", type=Path, help="PNG to write (default RUN_DIR/report.png)")
    args = parser.parse_args(argv)
    path = args.run_dir / "metrics.jsonl"
    out = args.out or args.run_dir / "report.png"
    try:
        records = read_records(path)
        print(summary(records, path))
        fig = plot(records, f"{args.run_dir.resolve().name}: steps "
                   f"{records[0]['step']}..{records[-1]['step']}")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    except ReportError as exc:
        print(f"arcshard-report: error: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    print(f"wrote {out}")
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
