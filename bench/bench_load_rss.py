"""Peak host memory of ``NVLM.from_pretrained`` while quantising (issue #3; design.md "Loading").

    python -m bench.bench_load_rss [--params 7.5e8] [--shards 4] [--formats bf16,int8,int4] [--keep DIR]

1. Writes a random bf16 checkpoint of about ``--params`` parameters (default 7.5e8: ~1.5 GB) in the published
   layout (``nvlm.testing.make_checkpoint`` with ``nvlm.testing.sized_config``: ``--shards`` safetensors shards +
   index) into a temporary folder, in a child process so the generator's memory is not counted anywhere.
2. For each format, a FRESH child process imports torch and nvlm, resets its high-water mark
   (``/proc/self/clear_refs`` = 5), reads the baseline ``VmRSS``, runs ``from_pretrained(path, quantization=...)``
   and reports ``VmHWM`` (peak resident set) minus the baseline, next to the bytes of the finished model's
   tensors (parameters + buffers) and the checkpoint's size on disk. The file pages the loader reads go to the page
   cache, which is not part of the resident set of the process.
3. Deletes the checkpoint (unless ``--keep``).

Target (design.md §4): peak RSS over baseline <= final model + 10%; never a whole shard or the whole bf16 model.
This is a measurement script, not a unit test; run it under ``/tmp/quiet.sh`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FORMATS = {"bf16": None, "int8": "int8", "int4": "int4"}


def _status_kib(field: str) -> int:
    """A ``kB`` line of ``/proc/self/status`` (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")


def _child_generate(folder: str, params: float, shards: int) -> None:
    from nvlm.testing import make_checkpoint, sized_config

    make_checkpoint(folder, sized_config(params), num_shards=shards)


def _child_load(folder: str, fmt: str) -> None:
    import resource

    import torch

    import nvlm.quant  # noqa: F401  (imported before the baseline: its import cost is not the loader's)
    from nvlm.model import NVLM

    torch.set_num_threads(1)                                # memory, not speed, is measured; 2 cores are shared
    Path("/proc/self/clear_refs").write_text("5")          # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    model = NVLM.from_pretrained(folder, quantization=FORMATS[fmt], progress=False)
    peak = _status_kib("VmHWM")
    after = _status_kib("VmRSS")
    tensors = list(model.parameters()) + list(model.buffers())
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    print(json.dumps({"format": fmt, "baseline_kib": base, "peak_kib": peak, "after_kib": after,
                      "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "model_bytes": model_bytes}))


def _run_child(args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "bench.bench_load_rss", *args], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return out.stdout


def measure(folder: Path, formats: list[str]) -> list[dict]:
    ckpt_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    shard_bytes = max(p.stat().st_size for p in folder.glob("*.safetensors"))
    rows = []
    for fmt in formats:
        r = json.loads(_run_child(["--_load", str(folder), fmt]).strip().splitlines()[-1])
        r["ckpt_bytes"], r["largest_shard_bytes"] = ckpt_bytes, shard_bytes
        r["peak_over_baseline_bytes"] = (r["peak_kib"] - r["baseline_kib"]) * 1024
        r["peak_over_model"] = r["peak_over_baseline_bytes"] / r["model_bytes"]
        rows.append(r)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_load_rss", description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=7.5e8, help="parameters of the generated model (~2 bytes each)")
    p.add_argument("--shards", type=int, default=4, help="safetensors shards of the generated checkpoint")
    p.add_argument("--formats", default="bf16,int8,int4", help=f"comma-separated, of {sorted(FORMATS)}")
    p.add_argument("--keep", default=None, help="write the checkpoint to this new folder and keep it (reused if it "
                                                "already holds a checkpoint)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--_generate", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--_load", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._generate:
        _child_generate(args._generate[0], float(args._generate[1]), int(args._generate[2]))
        return 0
    if args._load:
        _child_load(*args._load)
        return 0
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise SystemExit(f"--formats: unknown format {bad[0]!r}; known: {sorted(FORMATS)}")

    tmp = None
    if args.keep:
        folder = Path(args.keep)
    else:
        tmp = tempfile.mkdtemp(prefix="nvlm_rss_", dir=os.environ.get("TMPDIR", "/tmp"))
        folder = Path(tmp) / "ckpt"
    try:
        if not (folder / "config.json").is_file():
            _run_child(["--_generate", str(folder), str(args.params), str(args.shards)])
        rows = measure(folder, formats)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    mib = 1024 ** 2
    print(f"checkpoint: {rows[0]['ckpt_bytes'] / mib:.0f} MiB bf16 in {args.shards} shards (largest "
          f"{rows[0]['largest_shard_bytes'] / mib:.0f} MiB); baseline RSS after imports "
          f"~{rows[0]['baseline_kib'] / 1024:.0f} MiB")
    print(f"{'format':<7}{'final model MiB':>16}{'peak RSS - base MiB':>21}{'peak / model':>14}"
          f"{'RSS after - base MiB':>22}")
    for r in rows:
        print(f"{r['format']:<7}{r['model_bytes'] / mib:>16.0f}{r['peak_over_baseline_bytes'] / mib:>21.0f}"
              f"{r['peak_over_model']:>14.3f}{(r['after_kib'] - r['baseline_kib']) / 1024:>22.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
