"""gpu_bench.py's table and the issue's targets, from its rows (dicts, as in its JSON):
a row has group, impl, classes, rate, status ("ok", "OOM", "skipped", "failed") and, when
measured, samples_per_s, step_ms, classifier_ms, classifier_share, peak_gib (CUDA only),
plan_gib (arcshard rows); the compile row has eager_ms, step_ms (compiled), speedup,
compile_s. benchmarks/_smoke.py prints the same table from the JSON (without torch).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

if __name__ == "__main__":  # `python benchmarks/_bench_table.py --help`: say what it is
    print(__doc__.strip() + "\n(a module of gpu_bench.py and _smoke.py; it has no command line)")
    sys.exit(0)

from benchmarks._launch import fmt_classes  # noqa: E402


def _find(rows: list[dict], group: str, classes: int, rate: float) -> dict | None:
    return next((r for r in rows if (r["group"], r["classes"], r["rate"]) == (group, classes, rate)), None)


def targets(rows: list[dict], small_classes: int, large_classes: int, backbone: str) -> list[dict]:
    """The issue's targets for rows measured at `small_classes` (1M) and `large_classes`
    (10M): verdict PASS, FAIL or SKIP (with why), and the measured detail."""
    out = []

    def add(name: str, need: list[dict | None], check: Callable[[], tuple[bool, str]],
            memory: bool = False) -> None:
        why = [f"{r['impl']} {fmt_classes(r['classes'])}: {r['status']}"
               for r in need if r is not None and r["status"] != "ok"]
        if any(r is None for r in need):
            why.append("not measured (see --rows)")
        elif memory and not why and any(r.get("peak_gib") is None for r in need):
            why.append("peak memory is measured on CUDA only")
        if why:
            out.append({"verdict": "SKIP", "target": name, "detail": "; ".join(why)})
            return
        good, detail = check()
        out.append({"verdict": "PASS" if good else "FAIL", "target": name, "detail": detail})

    small, large = fmt_classes(small_classes), fmt_classes(large_classes)
    a = _find(rows, "arcshard", small_classes, 0.1)
    add(f"{small}, r=0.1: classifier <= 10% of the {backbone} step", [a],
        lambda: (a["classifier_share"] <= 0.10,
                 f"{a['classifier_share']:.1%} ({a['classifier_ms']:.1f} of {a['step_ms']:.1f} ms)"))
    ours, theirs = _find(rows, "arcshard", large_classes, 0.1), _find(rows, "anchor", large_classes, 0.1)
    add(f"{large}, r=0.1: arcshard classifier step >= 2x faster than PartialFC_V2", [ours, theirs],
        lambda: (theirs["classifier_ms"] >= 2 * ours["classifier_ms"],
                 (f"{theirs['classifier_ms']:.1f} / {ours['classifier_ms']:.1f} ms = "
                  f"{theirs['classifier_ms'] / ours['classifier_ms']:.2f}x")))
    add(f"{large}, r=0.1: arcshard peak memory <= 0.7x PartialFC_V2's", [ours, theirs],
        lambda: (ours["peak_gib"] <= 0.7 * theirs["peak_gib"],
                 (f"{ours['peak_gib']:.2f} / {theirs['peak_gib']:.2f} GiB = "
                  f"{ours['peak_gib'] / theirs['peak_gib']:.2f}x")), memory=True)
    for r in [r for r in rows if r["group"] == "arcshard"]:
        add(f"{fmt_classes(r['classes'])}, r={r['rate']:g}: planner within 10% of measured peak",
            [r], lambda r=r: (abs(r["plan_gib"] - r["peak_gib"]) <= 0.1 * r["peak_gib"],
                              (f"plan {r['plan_gib']:.2f} GiB, measured {r['peak_gib']:.2f} GiB "
                               f"({r['plan_gib'] / r['peak_gib'] - 1:+.1%})")), memory=True)
    return out


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else format(value, fmt)


def _tally(values: list[str]) -> str:
    return ", ".join(f"{values.count(v)} {v}" for v in dict.fromkeys(values)) or "none"


def summary(rows: list[dict], verdicts: list[dict]) -> str:
    """gpu_bench's last line: how the rows ended and the targets' verdicts."""
    return (f"gpu_bench: {len(rows)} rows ({_tally([r['status'] for r in rows])}); "
            f"targets {_tally([v['verdict'] for v in verdicts])}")


def print_table(rows: list[dict], verdicts: list[dict]) -> None:
    """The rows (columns: see benchmarks/gpu_bench.py), then one line per target."""
    head = (f"{'row':<30} {'classes':>7} {'rate':>4} {'samples/s':>9} {'step ms':>8} "
            f"{'clf ms':>8} {'clf %':>6} {'peak GiB':>8} {'plan GiB':>8}  status")
    print(head)
    print("-" * len(head))
    for r in rows:
        classes = "-" if r["classes"] is None else fmt_classes(r["classes"])
        rate = "-" if r["rate"] is None else f"{r['rate']:g}"
        status = r["status"] if r["status"] != "ok" else ""
        if r["group"] == "compile" and r["status"] == "ok":
            status = (f"eager {r['eager_ms']:.1f} ms, compiled {r['step_ms']:.1f} ms: "
                      f"{r['speedup']:.2f}x (compile {r['compile_s']:.0f} s)")
        note = f": {r['note']}" if r.get("note") else ""
        print(f"{r['impl']:<30} {classes:>7} {rate:>4} {_cell(r, 'samples_per_s', '.0f'):>9} "
              f"{_cell(r, 'step_ms', '.1f'):>8} {_cell(r, 'classifier_ms', '.1f'):>8} "
              f"{_cell(r, 'classifier_share', '.1%'):>6} {_cell(r, 'peak_gib', '.2f'):>8} "
              f"{_cell(r, 'plan_gib', '.2f'):>8}  {status}{note}")
    for v in verdicts:
        print(f"{v['verdict']}: {v['target']} ({v['detail']})")
