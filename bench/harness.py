"""Benchmark harness shared by every ``bench/bench_<op>.py``.

A bench module exposes ``run(quick: bool) -> list[Row]``; ``bench/run.py`` (``nvlm bench``) collects the rows and
writes JSON / CSV / PNG / markdown. The pieces:

* :func:`measure` times ``fn(*args)`` and returns a :class:`Timing` (median, p20, p80 in ms). CPU: wall clock per
  call. GPU: CUDA events per call with a synchronise, the L2 flushed between calls when only one argument set is
  given (as ``triton.testing.do_bench`` does).
* :func:`copies_to_exceed_cache` says how many weight/input copies a bench must rotate through (``args_list``) so the
  last-level cache cannot flatter a bandwidth figure.
* :func:`machine_limits` *measures* (once per process and device) the limits that ``% of limit`` refers to: DRAM
  read bandwidth (a STREAM-like sum over a buffer much larger than the LLC), copy bandwidth, bf16 matmul peak.
* :func:`make_row` turns a timing plus bytes/FLOPs and baseline timings into a :class:`Row`.
* :func:`machine_info` records what the figures were measured on.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import glob
import importlib.metadata
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: limit names accepted by :func:`make_row` and returned by :func:`machine_limits`; bandwidth ones compare GB/s,
#: ``matmul_tflops`` compares TFLOP/s.
BANDWIDTH_LIMITS = ("dram_read_gbps", "copy_gbps")
COMPUTE_LIMITS = ("matmul_tflops",)
LIMIT_NAMES = BANDWIDTH_LIMITS + COMPUTE_LIMITS


# ----------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Per-call time quantiles in milliseconds over ``n`` timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int = 0


@dataclass
class Row:
    """One line of a benchmark table.

    ``speedup[name] = baseline_ms / median_ms`` for each baseline measured in the same run (> 1: we are faster).
    ``pct_of_limit`` is achieved GB/s (or TFLOP/s) as a percentage of the measured machine limit ``limit_name``.
    """

    op: str
    shape: str
    dtype: str
    backend: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float | None = None
    tflops: float | None = None
    pct_of_limit: float | None = None
    limit_name: str | None = None
    speedup: dict[str, float] = field(default_factory=dict)
    note: str = ""
    limit_value: float | None = None   # the measured limit pct_of_limit was computed against (GB/s or TFLOP/s)
    device: str = ""                   # where it ran ("cpu", "cuda:0"): whose limits limit_value belongs to

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted, non-empty sequence (same rule as numpy's default)."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _iter_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _iter_tensors(o)


def _cuda_device_of(args_list) -> torch.device | None:
    for args in args_list:
        for t in _iter_tensors(args):
            if t.is_cuda:
                return t.device
    return None


def timing_from_samples(samples_ms: Sequence[float]) -> Timing:
    """Quantiles of per-call times (ms)."""
    if not samples_ms:
        raise ValueError("bench.harness.timing_from_samples: argument 'samples_ms' is empty")
    xs = sorted(samples_ms)
    return Timing(_quantile(xs, 0.5), _quantile(xs, 0.2), _quantile(xs, 0.8), len(xs))


def measure(fn: Callable, *, args_list: Sequence[tuple] | None = None, warmup: int = 2, reps: int = 10,
            min_time_s: float = 0.2, max_time_s: float = 30.0) -> Timing:
    """Time ``fn(*args)``, cycling through ``args_list`` (one tuple per call), and return per-call quantiles.

    At least ``reps`` calls are timed, and more until ``min_time_s`` of timed calls have accumulated; timing stops
    early (after at least 3 calls) once ``max_time_s`` is exceeded, so one slow baseline cannot stall ``--quick``.
    Callers rotate through enough copies (:func:`copies_to_exceed_cache`) that the cache does not flatter the result.
    When tensors are on a GPU each call is timed with CUDA events and a synchronise; with a single argument set the
    L2 is flushed (by zeroing a buffer twice its size) between calls, outside the timed region.
    """
    if args_list is None:
        args_list = [()]
    args_list = [a if isinstance(a, tuple) else (a,) for a in args_list]
    if not args_list:
        raise ValueError("bench.harness.measure: argument 'args_list' is empty")
    if reps < 1:
        raise ValueError(f"bench.harness.measure: argument 'reps' must be >= 1, got {reps}")
    dev = _cuda_device_of(args_list)
    n_args = len(args_list)

    for i in range(max(warmup, 0)):
        fn(*args_list[i % n_args])
    if dev is not None:
        torch.cuda.synchronize(dev)

    samples: list[float] = []
    if dev is None:
        total = 0.0
        i = 0
        while len(samples) < reps or total < min_time_s:
            args = args_list[i % n_args]
            t0 = time.perf_counter()
            fn(*args)
            dt = time.perf_counter() - t0
            samples.append(dt * 1e3)
            total += dt
            i += 1
            if total > max_time_s and len(samples) >= 3:
                break
        return timing_from_samples(samples)

    # GPU: events per call (the launch is asynchronous: wall clock would measure the launch, not the kernel).
    flush = None
    if n_args == 1:
        l2 = torch.cuda.get_device_properties(dev).L2_cache_size
        flush = torch.empty(max(2 * l2, 1 << 20), dtype=torch.int8, device=dev)
    total = 0.0
    i = 0
    while len(samples) < reps or total < min_time_s:
        args = args_list[i % n_args]
        if flush is not None:
            flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        samples.append(ms)
        total += ms / 1e3
        i += 1
        if total > max_time_s and len(samples) >= 3:
            break
    return timing_from_samples(samples)


# ----------------------------------------------------------------------------------------------------------------
# Cache size and copies
# ----------------------------------------------------------------------------------------------------------------
def _parse_size(text: str) -> int:
    """'32768K', '32 MiB', '300 MB' -> bytes."""
    m = re.match(r"\s*([\d.]+)\s*([KMGkmg]?)(i?[Bb])?", text)
    if not m:
        raise ValueError(f"bench.harness: cannot parse cache size {text!r}")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


@functools.lru_cache(maxsize=1)
def llc_bytes() -> int:
    """Total last-level CPU cache in bytes: the highest cache level in /sys, summed over its distinct instances
    (CPUs sharing one instance are counted once); falls back to ``lscpu``."""
    best_level, instances = -1, {}
    for idx in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            with open(os.path.join(idx, "level")) as f:
                level = int(f.read())
            with open(os.path.join(idx, "type")) as f:
                ctype = f.read().strip()
            with open(os.path.join(idx, "size")) as f:
                size = _parse_size(f.read())
            with open(os.path.join(idx, "shared_cpu_list")) as f:
                shared = f.read().strip()
        except (OSError, ValueError):
            continue
        if ctype == "Instruction":
            continue
        if level > best_level:
            best_level, instances = level, {}
        if level == best_level:
            instances[shared] = size
    if instances:
        return sum(instances.values())
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for level in ("L3", "L2"):
            m = re.search(rf"^{level} cache:\s*([\d.]+\s*[KMG]i?B)", out, re.M)
            if m:
                return _parse_size(m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    raise RuntimeError("bench.harness.llc_bytes: could not read the last-level cache size from /sys or lscpu")


def copies_to_exceed_cache(bytes_per_copy: int, cache_bytes: int | None = None, *, device=None) -> int:
    """Number of copies of a ``bytes_per_copy`` working set to rotate through so that their total is at least twice
    the last-level cache (CPU LLC, or the GPU's L2 for a CUDA ``device``): each call then finds its data evicted.
    One copy when a single one is already twice the cache (it evicts itself as it streams through)."""
    if bytes_per_copy <= 0:
        raise ValueError(f"bench.harness.copies_to_exceed_cache: argument 'bytes_per_copy' must be > 0, "
                         f"got {bytes_per_copy}")
    if cache_bytes is None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda":
            cache_bytes = torch.cuda.get_device_properties(dev).L2_cache_size
        else:
            cache_bytes = llc_bytes()
    return max(1, math.ceil(2 * cache_bytes / bytes_per_copy))


# ----------------------------------------------------------------------------------------------------------------
# Machine limits (measured, never assumed)
# ----------------------------------------------------------------------------------------------------------------
_LIMITS_CACHE: dict[str, dict] = {}


def _best(fn, args, reps) -> float:
    """Fastest of ``reps`` calls (ms) after one warm-up: for a machine limit the best run is the one least
    disturbed by the other processes sharing the machine."""
    fn(*args)
    return min(measure(fn, args_list=[args], warmup=0, reps=1, min_time_s=0.0).median_ms for _ in range(reps))


def _device_key(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def rescale_to_best_limits(rows: list[Row], limits: dict[str, dict]) -> None:
    """Make every row's % of limit refer to the best figure measured for its device and limit in this run (in this
    process, ``limits``: device key -> machine_limits dict, or in a subprocess, a row's own ``limit_value``): a limit
    measured at a busy moment would otherwise overstate % of limit. Updates ``limits`` and ``rows`` in place."""
    for r in rows:
        if r.limit_name and r.limit_value and r.device in limits:
            lim = limits[r.device]
            lim[r.limit_name] = max(lim[r.limit_name], r.limit_value)
    for r in rows:
        if r.limit_name and r.limit_value and r.device in limits:
            best = limits[r.device][r.limit_name]
            if best > r.limit_value:
                r.pct_of_limit *= r.limit_value / best
                r.limit_value = best


def remeasure_limits(device="cpu") -> dict:
    """Measure ``device``'s limits again and keep, per limit, the higher of the two measurements (the one less
    disturbed by other processes): a limit measured while the machine was busy would inflate % of limit.
    Returns ``{limit name: (old, new best)}`` for the limits that changed."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    old = _LIMITS_CACHE.pop(str(dev), None)
    new = machine_limits(dev)
    changed = {}
    if old is not None:
        for k in LIMIT_NAMES:
            if old[k] > new[k]:
                new[k] = old[k]
            elif new[k] > old[k]:
                changed[k] = (old[k], new[k])
    return changed


def machine_limits(device="cpu") -> dict:
    """Measure the machine's limits for ``device`` once per process (cached).

    Keys: ``dram_read_gbps`` (STREAM-like ``sum`` over a float32 buffer of max(1 GiB, 8 x LLC) on all torch threads;
    best of several), ``copy_gbps`` (``dst.copy_(src)`` of a large buffer, counting read + write bytes),
    ``matmul_tflops`` (bf16 matmul, 2048^3 on CPU, 8192^3 on GPU), plus what was measured with (threads, buffer
    sizes, cache size). On a GPU ``dram_read_gbps`` is device-memory read bandwidth.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = str(dev)
    if key in _LIMITS_CACHE:
        return _LIMITS_CACHE[key]
    limits: dict = {"device": key}
    if dev.type == "cuda":
        cache = torch.cuda.get_device_properties(dev).L2_cache_size
        read_bytes = max(2 << 30, 16 * cache)
        copy_bytes = max(1 << 30, 16 * cache)
        mm_n, reps = 8192, 20
    else:
        cache = llc_bytes()
        read_bytes = max(1 << 30, 8 * cache)
        copy_bytes = max(512 << 20, 8 * cache)
        mm_n, reps = 2048, 8
        limits["threads"] = torch.get_num_threads()
    limits["cache_bytes"] = cache

    buf = torch.ones(read_bytes // 4, dtype=torch.float32, device=dev)
    ms = _best(lambda x: x.sum(), (buf,), reps)
    limits["dram_read_gbps"] = read_bytes / (ms / 1e3) / 1e9
    limits["dram_read_buffer_bytes"] = read_bytes
    del buf

    src = torch.ones(copy_bytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    ms = _best(lambda d, s: d.copy_(s), (dst, src), reps)
    limits["copy_gbps"] = 2 * copy_bytes / (ms / 1e3) / 1e9
    limits["copy_buffer_bytes"] = copy_bytes
    del src, dst

    a = torch.randn(mm_n, mm_n, device=dev).to(torch.bfloat16)
    b = torch.randn(mm_n, mm_n, device=dev).to(torch.bfloat16)
    ms = _best(lambda x, y: x @ y, (a, b), reps)
    limits["matmul_tflops"] = 2 * mm_n**3 / (ms / 1e3) / 1e12
    limits["matmul_shape"] = f"bf16 {mm_n}x{mm_n}x{mm_n}"
    del a, b
    _LIMITS_CACHE[key] = limits
    return limits


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8",
                torch.uint8: "uint8", torch.int32: "int32"}


def shape_str(shape) -> str:
    """``(7, 1025, 3200)`` -> ``'7x1025x3200'``; strings pass through."""
    if isinstance(shape, str):
        return shape
    if isinstance(shape, torch.Size | tuple | list):
        return "x".join(str(int(s)) for s in shape)
    return str(shape)


def dtype_str(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    return str(dtype)


def make_row(op: str, shape, dtype, backend: str, timing: Timing, *, bytes_moved: float | None = None,
             flops: float | None = None, limit: str | None = None, baselines: dict[str, Timing] | None = None,
             note: str = "", device="cpu") -> Row:
    """Build a :class:`Row`: GB/s from ``bytes_moved``, TFLOP/s from ``flops``, % of the measured ``limit`` of
    ``device`` (one of :data:`LIMIT_NAMES`), and ``speedup[name] = baselines[name].median_ms / timing.median_ms``."""
    if timing.median_ms <= 0:
        raise ValueError(f"bench.harness.make_row: timing.median_ms must be > 0, got {timing.median_ms}")
    sec = timing.median_ms / 1e3
    gbps = bytes_moved / sec / 1e9 if bytes_moved is not None else None
    tflops = flops / sec / 1e12 if flops is not None else None
    pct = limit_value = None
    if limit is not None:
        if limit not in LIMIT_NAMES:
            raise ValueError(f"bench.harness.make_row: argument 'limit' must be one of {LIMIT_NAMES}, got {limit!r}")
        achieved = gbps if limit in BANDWIDTH_LIMITS else tflops
        if achieved is None:
            need = "bytes_moved" if limit in BANDWIDTH_LIMITS else "flops"
            raise ValueError(f"bench.harness.make_row: limit {limit!r} needs argument '{need}'")
        limit_value = machine_limits(device)[limit]
        pct = 100.0 * achieved / limit_value
    speedup = {name: b.median_ms / timing.median_ms for name, b in (baselines or {}).items()}
    return Row(op=op, shape=shape_str(shape), dtype=dtype_str(dtype), backend=backend, median_ms=timing.median_ms,
               p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, gbps=gbps, tflops=tflops, pct_of_limit=pct,
               limit_name=limit, speedup=speedup, note=note, limit_value=limit_value, device=_device_key(device))


# ----------------------------------------------------------------------------------------------------------------
# Machine info
# ----------------------------------------------------------------------------------------------------------------
_FLAG_RE = re.compile(r"^(avx512\w*|amx\w*|avx2|avx_vnni|fma|f16c)$")


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line and not flags:
                    flags = sorted(fl for fl in line.split(":", 1)[1].split() if _FLAG_RE.match(fl))
    except OSError:
        pass
    return model, flags


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def machine_info() -> dict:
    """CPU model and ISA flags, cores, GPU, library versions, git sha (with a dirty flag), UTC date."""
    model, flags = _cpu_model_and_flags()
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": model,
        "cpu_flags": flags,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "llc_bytes": None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "nvlm_kernels": _version("nvlm-kernels"),
        "numpy": _version("numpy"),
        "bitsandbytes": _version("bitsandbytes"),
        "flash_attn": _version("flash-attn"),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        info["llc_bytes"] = llc_bytes()
    except RuntimeError:
        pass
    try:
        import nvlm_kernels

        b = nvlm_kernels.backends()
        info["nvlm_kernels_backends"] = {k: v for k, v in b.items() if k != "extension_error"}
    except Exception as e:  # the bench must still record the machine when the package is half-built
        info["nvlm_kernels_backends"] = f"unavailable: {type(e).__name__}: {e}"
    return info
