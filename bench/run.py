"""``nvlm bench [--op NAME] [--quick] [--out DIR]`` (also ``python -m bench.run``).

Imports each ``bench/bench_<op>.py`` that exists, calls its ``run(quick) -> list[Row]``, and writes under ``--out``
(default ``bench/results/<UTC date_time>``):

* ``results.json``: machine info, measured machine limits, rows, skipped/failed modules, time per module
* ``results.csv``: the rows (speed-ups flattened to ``speedup_vs_<baseline>`` columns)
* ``chart.png``: speed-up over each baseline and % of machine limit, per row
* ``summary.md``: the markdown table that is also printed to the terminal

The exit status is 1 when a bench module raised (the others still run and are written).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import json
import os
import sys
import time
import traceback

from bench.harness import REPO_ROOT, Row, machine_info, machine_limits, remeasure_limits, rescale_to_best_limits

OPS = ("tiled_attention", "pixel_shuffle", "quant_linear", "gated_xattn", "e2e")


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def markdown_table(rows: list[Row]) -> str:
    """One line per row: time (p20-p80), GB/s, TFLOP/s, % of limit, speed-ups, note."""
    lines = ["| op | shape | dtype | backend | median ms (p20-p80) | GB/s | TFLOP/s | % of limit | speed-up | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = f"{r.pct_of_limit:.0f}% {r.limit_name}" if r.pct_of_limit is not None else "-"
        speed = ", ".join(f"{v:.2f}x vs {k}" for k, v in r.speedup.items()) or "-"
        lines.append(f"| {r.op} | {r.shape} | {r.dtype} | {r.backend} | {_fmt(r.median_ms)} "
                     f"({_fmt(r.p20_ms)}-{_fmt(r.p80_ms)}) | {_fmt(r.gbps)} | {_fmt(r.tflops)} | {pct} | {speed} "
                     f"| {r.note} |")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: str) -> None:
    baselines = sorted({k for r in rows for k in r.speedup})
    base_cols = ["op", "shape", "dtype", "backend", "median_ms", "p20_ms", "p80_ms", "gbps", "tflops",
                 "pct_of_limit", "limit_name", "limit_value", "device"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(base_cols + [f"speedup_vs_{b}" for b in baselines] + ["note"])
        for r in rows:
            d = r.to_dict()
            w.writerow([d[c] for c in base_cols] + [r.speedup.get(b, "") for b in baselines] + [r.note])


def write_chart(rows: list[Row], path: str, title: str) -> bool:
    """Two panels: speed-up over each baseline (log x, 1x marked) and % of machine limit. False if nothing to plot."""
    speed_rows = [r for r in rows if r.speedup]
    pct_rows = [r for r in rows if r.pct_of_limit is not None]
    if not speed_rows and not pct_rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r: Row) -> str:
        return f"{r.op} {r.shape} {r.dtype} [{r.backend}]"

    n_speed = sum(len(r.speedup) for r in speed_rows)
    height = max(3.0, 0.28 * max(n_speed, len(pct_rows)) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(20, height))
    ax = axes[0]
    labels, values = [], []
    for r in speed_rows:
        for b, v in r.speedup.items():
            labels.append(f"{label(r)} vs {b}")
            values.append(v)
    if values:
        ax.barh(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", lw=1)
        ax.invert_yaxis()
    ax.set_title("speed-up over baseline (same run; >1 = faster)")
    ax = axes[1]
    if pct_rows:
        ax.barh(range(len(pct_rows)), [r.pct_of_limit for r in pct_rows], color="tab:blue")
        ax.set_yticks(range(len(pct_rows)), [f"{label(r)} ({r.limit_name})" for r in pct_rows], fontsize=7)
        ax.axvline(100.0, color="black", lw=1)
        ax.invert_yaxis()
    ax.set_title("% of measured machine limit")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.subplots_adjust(left=0.2, wspace=0.9)  # room for the long row labels of both panels
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _parse_ops(values: list[str] | None) -> list[str]:
    if not values:
        return list(OPS)
    ops = []
    for v in values:
        for name in v.split(","):
            name = name.strip().removeprefix("bench_")
            if name not in OPS:
                raise SystemExit(f"nvlm bench: --op must be one of {', '.join(OPS)}; got {name!r}")
            ops.append(name)
    return ops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nvlm bench", description="Per-op and end-to-end benchmarks with baselines "
                                "measured in the same run and % of the machine's measured limits.")
    p.add_argument("--op", action="append", help=f"op(s) to run (repeat or comma-separate): {', '.join(OPS)}")
    p.add_argument("--quick", action="store_true", help="small shape set, under two minutes in total")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<UTC date_time>)")
    args = p.parse_args(argv)
    ops = _parse_ops(args.op)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d_%H%M%S")
    out = args.out or os.path.join(REPO_ROOT, "bench", "results", stamp)
    os.makedirs(out, exist_ok=True)

    from tqdm import tqdm

    t_start = time.perf_counter()
    info = machine_info()
    limits = {"cpu": machine_limits("cpu")}
    import torch

    if torch.cuda.is_available():
        limits["cuda"] = machine_limits("cuda")
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    bar = tqdm(ops, desc="nvlm bench", unit="op", file=sys.stderr)
    for op in bar:
        bar.set_postfix_str(op)
        modname = f"bench.bench_{op}"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                skipped[op] = f"{modname} not present"
                continue
            errors[op] = traceback.format_exc()
            continue
        if not hasattr(mod, "run"):
            errors[op] = f"{modname} has no run(quick) function"
            continue
        t0 = time.perf_counter()
        try:
            new_rows = list(mod.run(args.quick))
        except Exception:
            errors[op] = traceback.format_exc()
            new_rows = []
        seconds[op] = time.perf_counter() - t0
        bad = [r for r in new_rows if not isinstance(r, Row)]
        if bad:
            errors[op] = f"{modname}.run returned {type(bad[0]).__name__}, expected bench.harness.Row"
            new_rows = [r for r in new_rows if isinstance(r, Row)]
        rows.extend(new_rows)
    bar.close()

    # Measure the limits again after the benchmarks and keep the best of the two: on a shared machine a limit taken
    # at a busy moment would overstate every % of limit. Rows computed against a lower value are rescaled.
    # (rows made in a subprocess carry the limit that process measured: the best of all counts)
    for name in list(limits):
        remeasure_limits(name)
        limits[name] = machine_limits(name)
    rescale_to_best_limits(rows, {lim["device"]: lim for lim in limits.values()})

    total_s = time.perf_counter() - t_start
    title = (f"nvlm bench{' --quick' if args.quick else ''} | {info['cpu_model']} ({info['cpu_cores']} cores)"
             f"{' | ' + info['gpu'] if info['gpu'] else ''} | torch {info['torch']} | {info['date_utc']} "
             f"| git {(info['git_sha'] or '?')[:10]}{'+dirty' if info['git_dirty'] else ''}")
    result = {"machine": info, "limits": limits, "quick": args.quick, "ops": ops, "rows": [r.to_dict() for r in rows],
              "skipped": skipped, "errors": errors, "seconds_per_op": seconds, "total_seconds": total_s}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_csv(rows, os.path.join(out, "results.csv"))
    charted = write_chart(rows, os.path.join(out, "chart.png"), title)

    lim_cpu = limits["cpu"]
    lim_lines = [f"CPU limits (measured, {lim_cpu.get('threads')} threads): DRAM read {lim_cpu['dram_read_gbps']:.1f} "
                 f"GB/s, copy {lim_cpu['copy_gbps']:.1f} GB/s, {lim_cpu['matmul_shape']} "
                 f"{lim_cpu['matmul_tflops']:.2f} TFLOP/s"]
    if "cuda" in limits:
        g = limits["cuda"]
        lim_lines.append(f"GPU limits (measured): read {g['dram_read_gbps']:.0f} GB/s, copy {g['copy_gbps']:.0f} "
                         f"GB/s, {g['matmul_shape']} {g['matmul_tflops']:.0f} TFLOP/s")
    md = "\n".join([f"# {title}", "", *lim_lines, "", markdown_table(rows), ""]
                   + [f"- skipped {op}: {why}" for op, why in skipped.items()]
                   + [f"- FAILED {op}: {err.strip().splitlines()[-1]}" for op, err in errors.items()]
                   + [f"- total {total_s:.1f} s; files in {out}" + ("" if charted else " (no chart: no rows)")])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    for op, err in errors.items():
        print(f"\n--- {op} failed ---\n{err}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
