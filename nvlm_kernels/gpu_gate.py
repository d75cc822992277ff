"""GPU gate without a GPU: compile every kernel for sm_80 and sm_90a and report its resource usage.

``python -m nvlm_kernels.gpu_gate [--arch 80,90a] [--json FILE] [--table FILE] [--jobs N] [--no-cuda]``

Triton kernels. Every ``nvlm_kernels`` submodule that defines ``gate_specs()`` returns one dict per (kernel, launch
configuration) the package would launch at the real NVLM-D-72B shapes (autotune candidates included)::

    name: str                      unique within the module
    fn: the @triton.jit function   (an autotuner/heuristics wrapper is unwrapped)
    signature: {param: "*bf16" | "*fp32" | "*u8" | "i32" | "fp32" | ...}   every non-constexpr parameter
    constexprs: {param: value}
    num_warps: int, num_stages: int
    hot_path: bool                 launched by NVLM-D-72B inference: must not spill
    tensor_cores: bool | "mma"     True: a matmul-type kernel, must emit wgmma on sm_90a and mma.sync on sm_80;
                                   "mma": must emit mma.sync on every arch (tiles below wgmma's M = 64, e.g. a
                                   16-row decode tile); False: no requirement
    (optional) shape: str          what it is launched for, shown in the table
    (optional) divisible_by_16: [param, ...]   parameters that are 16-aligned pointers / multiples of 16 at the
                                   real launch. Triton's JIT specialises such arguments at run time (``tt.divisibility
                                   = 16``: vectorised loads, cp.async pipelining, fewer registers), so the gate
                                   compiles with ``ASTSource(attrs={(index,): [["tt.divisibility", 16]]})`` for them;
                                   list only parameters that really meet it, or the figures are better than what runs

``gate_specs`` may take a ``capability`` argument (80 or 90): it is then called once per arch, so that arch-specific
candidate lists are gated on their own arch. Each spec is compiled ahead of time with ``triton.compile(ASTSource,
target=GPUTarget("cuda", cc, 32))``, the PTX is assembled again by the ptxas that Triton ships, with the flags Triton
uses and ``-v``, and its report is parsed: registers, spill stores/loads, stack, static shared memory; the dynamic
shared memory is what Triton's metadata says the launch needs. Tensor-core use is counted in the PTX (``wgmma`` /
``mma.sync``) and the SASS (``HGMMA`` / ``HMMA``), 16-byte global loads in the PTX (``ld.global.v4`` / 16-byte
``cp.async``: what the divisibility hints buy); ptxas' "Potential Performance Loss" notes (e.g. wgmma serialised
for lack of registers) are kept. Theoretical occupancy follows from registers, shared memory and warps per block.

CUDA C++ kernels. Each ``csrc/cuda/*.cu`` is compiled (device code only, ``--fatbin``) for each arch with the
include paths and nvcc flags that ``setup.py``'s ``nvlm_kernels._C`` extension uses (setup.py is executed with
``setuptools.setup`` captured, so the flags are not duplicated here) plus ``-Xptxas=-v``; every ``__global__``
function is reported. All of them count as hot path.

Problems (exit status 1, and ``tests/test_gpu_gate.py`` fails): a kernel that fails to compile, a hot-path kernel
that spills, a ``tensor_cores`` kernel without the tensor-core instruction it requires on its arch, a spec whose
``divisible_by_16`` names an unknown or non-integer parameter, wgmma serialised by ptxas in a hot-path kernel, shared
memory over the per-block limit, zero occupancy, a module whose import or ``gate_specs`` raises, and a
``@triton.jit`` function that no spec covers (directly or as a function a covered kernel calls).

Results are cached by a hash of the kernel source (Triton's ``cache_key``, which covers the jit functions it calls),
signature, constexprs, divisibility hints, options, arch and tool versions (``$NVLM_GATE_CACHE``, default
``~/.cache/nvlm_kernels/gpu_gate``), so an unchanged kernel is not recompiled. Compiles run in parallel processes.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import io
import json
import math
import multiprocessing
import os
import pkgutil
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

GATE_VERSION = 2  # bump when what a cached result contains changes
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_KEYS = ("name", "fn", "signature", "constexprs", "num_warps", "num_stages", "hot_path", "tensor_cores")
TENSOR_CORE_MODES = (False, True, "mma")


# ----------------------------------------------------------------------------------------------------------------
# Per-architecture limits (CUDA C Programming Guide, "Compute capabilities" table)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    name: str                  # "80" / "90a" (command line)
    cc: int                    # Triton GPUTarget capability
    sm: str                    # ptxas / nvcc name
    smem_per_sm: int           # max shared memory per SM (bytes)
    smem_per_block: int        # max (opt-in) shared memory per block
    tc_ptx: str                # regex: tensor-core instruction in PTX
    tc_sass: str               # regex: tensor-core instruction in SASS
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    max_regs_per_thread: int = 255
    smem_reserved_per_block: int = 1024  # the driver reserves 1 KiB per block on sm_80+


ARCHS = {
    "80": Arch("80", 80, "sm_80", smem_per_sm=164 * 1024, smem_per_block=163 * 1024,
               tc_ptx=r"\bmma\.sync\.", tc_sass=r"\bHMMA\."),
    "90a": Arch("90a", 90, "sm_90a", smem_per_sm=228 * 1024, smem_per_block=227 * 1024,
                tc_ptx=r"\bwgmma\.mma_async\.", tc_sass=r"\bHGMMA\."),
}


def tensor_core_instr(arch: Arch, mode) -> tuple[str, str, str]:
    """``(name, PTX regex, SASS regex)`` of the tensor-core instruction a ``tensor_cores`` mode requires on ``arch``:
    True (or False, for the informational count) = the arch's best (wgmma on sm_90a, mma.sync on sm_80); "mma" =
    mma.sync on every arch (HMMA in SASS)."""
    if mode == "mma" or arch.cc < 90:
        return "mma", ARCHS["80"].tc_ptx, ARCHS["80"].tc_sass
    return "wgmma", arch.tc_ptx, arch.tc_sass


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class KernelReport:
    kind: str                  # "triton" | "cuda"
    module: str                # python module or .cu file
    name: str                  # spec name or demangled kernel name
    arch: str
    hot_path: bool = True
    tensor_cores: bool | str = False   # False | True (wgmma on sm_90a, mma on sm_80) | "mma" (mma.sync everywhere)
    shape: str = ""
    num_warps: int | None = None
    num_stages: int | None = None
    compiled: bool = False
    error: str = ""
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    smem_static: int | None = None     # ptxas "bytes smem"
    smem_dynamic: int | None = None    # Triton metadata "shared"
    tc_ptx: int | None = None          # the required tensor-core instruction (tensor_core_instr) in PTX
    tc_sass: int | None = None         # ... and in SASS (None: not disassembled / disassembler unavailable)
    mma_sync_ptx: int | None = None    # sm_90a: Ampere-style mma.sync in the PTX (tensor cores, without wgmma)
    vector_loads: int | None = None    # 16-byte global loads in the PTX (ld.global.v4 / 16-byte cp.async): what the
                                       # divisibility hints enable
    ptxas_notes: list[str] = field(default_factory=list)
    blocks_per_sm: int | None = None
    occupancy: float | None = None     # active warps / max warps per SM
    occupancy_limiter: str = ""
    threads_assumed: bool = False      # CUDA C++: block size unknown to ptxas, 256 threads assumed
    compile_s: float = 0.0
    cached: bool = False               # taken from the cache / seed file (same key = same source and tools)
    key: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def smem_total(self) -> int:
        return (self.smem_static or 0) + (self.smem_dynamic or 0)


# ----------------------------------------------------------------------------------------------------------------
# ptxas -v parsing
# ----------------------------------------------------------------------------------------------------------------
_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
# 16-byte global -> register (ld.global[.nc...].v4.b32 / .v2.b64) or global -> shared (cp.async ... 16) copies
_RE_VEC_LOAD = re.compile(r"\bld\.global(?:\.\w+)*\.(?:v4\.(?:b|u|s|f)32|v2\.(?:b|u|s|f)64)\b"
                          r"|\bcp\.async\.c[ag]\.shared\.global(?:\.\w+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(?:0x10|16)\b")
_RE_NOTE = re.compile(r"(Potential Performance Loss: .*?)(?: (?:in|for) the function '([^']+)')?\s*$")


def parse_ptxas(log: str) -> dict[tuple[str, str], dict]:
    """Parse ``ptxas -v`` output (alone or inside nvcc's) into ``{(function, sm): stats}`` for entry functions.

    stats: registers, spill_stores, spill_loads, stack_bytes, smem_static, notes (performance warnings).
    ptxas prints, per entry function: "Compiling entry function 'f' for 'sm_90a'", "Function properties for f",
    "N bytes stack frame, N bytes spill stores, N bytes spill loads", "Used N registers, ... N bytes smem ...".
    """
    out: dict[tuple[str, str], dict] = {}
    notes: dict[str, list[str]] = {}
    current: tuple[str, str] | None = None
    props_for: str | None = None
    for line in log.splitlines():
        m = _RE_NOTE.search(line)
        if m:
            notes.setdefault(m.group(2) or "*", []).append(m.group(1).strip())
            continue
        m = _RE_ENTRY.search(line)
        if m:
            current = (m.group(1), m.group(2))
            out[current] = {"registers": None, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0,
                            "smem_static": 0, "notes": []}
            props_for = None
            continue
        m = _RE_PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _RE_FRAME.search(line)
        if m and current is not None and props_for == current[0]:
            st = out[current]
            st["stack_bytes"], st["spill_stores"], st["spill_loads"] = (int(g) for g in m.groups())
            continue
        m = _RE_USED.search(line)
        if m and current is not None:
            out[current]["registers"] = int(m.group(1))
            s = _RE_SMEM.search(line)
            if s:
                out[current]["smem_static"] = int(s.group(1))
            current = None
    for (fn, _sm), st in out.items():
        st["notes"] = notes.get(fn, []) + notes.get("*", [])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Occupancy and problems
# ----------------------------------------------------------------------------------------------------------------
def occupancy(arch: Arch, registers: int, smem_bytes: int, warps_per_block: int) -> tuple[int, float, str]:
    """Theoretical ``(blocks per SM, active warps / max warps, limiter)`` from registers, shared memory and the
    warps- and blocks-per-SM limits. ``(0, 0.0, reason)`` when one block does not fit."""
    if warps_per_block * 32 > 1024:
        return 0, 0.0, "threads per block > 1024"
    regs = max(registers, 1)
    regs_per_warp = math.ceil(regs * 32 / arch.reg_alloc_unit) * arch.reg_alloc_unit
    by_regs = (arch.regs_per_sm // regs_per_warp) // warps_per_block
    smem = smem_bytes + arch.smem_reserved_per_block
    by_smem = arch.smem_per_sm // smem if smem_bytes <= arch.smem_per_block else 0
    by_warps = arch.max_warps_per_sm // warps_per_block
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": by_warps, "blocks": arch.max_blocks_per_sm}
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return blocks, blocks * warps_per_block / arch.max_warps_per_sm, limiter


def judge(r: KernelReport, arch: Arch) -> None:
    """Fill in occupancy and the list of problems for one compiled (or failed) kernel."""
    if not r.compiled:
        r.problems.append(f"does not compile: {r.error.strip().splitlines()[-1] if r.error.strip() else '?'}")
        return
    if r.registers is None:
        r.problems.append("ptxas reported no register count")
        return
    warps = r.num_warps or 8
    r.blocks_per_sm, r.occupancy, r.occupancy_limiter = occupancy(arch, r.registers, r.smem_total, warps)
    if r.smem_total > arch.smem_per_block:
        r.problems.append(f"shared memory {r.smem_total} B > {arch.smem_per_block} B per block on {arch.sm}")
    elif r.blocks_per_sm == 0:
        r.problems.append(f"zero occupancy on {arch.sm} ({r.occupancy_limiter})")
    if r.hot_path and (r.spill_stores or r.spill_loads):
        r.problems.append(f"hot-path kernel spills on {arch.sm}: {r.spill_stores} B stores, "
                          f"{r.spill_loads} B loads ({r.registers} registers)")
    if r.tensor_cores:
        want = tensor_core_instr(arch, r.tensor_cores)[0]
        if not r.tc_ptx:
            fallback = (f" (it has {r.mma_sync_ptx} mma.sync: the Ampere path, without Hopper's wgmma throughput)"
                        if r.mma_sync_ptx and want == "wgmma" else "")
            r.problems.append(f"tensor_cores kernel emits no {want} on {arch.sm}{fallback}")
        elif r.tc_sass == 0:
            r.problems.append(f"tensor_cores kernel: {want} in PTX but none in the SASS on {arch.sm}")
        serialised = [n for n in r.ptxas_notes if "serialized" in n or "serialised" in n]
        if r.hot_path and serialised:
            r.problems.append(f"ptxas on {arch.sm}: {serialised[0]}")


# ----------------------------------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------------------------------
def _triton_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


@functools.cache
def _tool_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return "missing"
    return out.strip().splitlines()[-1] if out.strip() else "?"


def count_sass(cubin_path: str, pattern: str) -> int | None:
    """Number of SASS lines matching ``pattern`` in a cubin (Triton's cuobjdump); None if it cannot disassemble."""
    try:
        r = subprocess.run([_triton_bin("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True,
                           timeout=300)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0 or "Function" not in r.stdout:
        return None
    return len(re.findall(pattern, r.stdout))


def _cache_dir() -> str:
    d = os.environ.get("NVLM_GATE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nvlm_kernels",
                                                           "gpu_gate")
    os.makedirs(d, exist_ok=True)
    return d


def _cache_get(key: str) -> dict | None:
    path = os.path.join(_cache_dir(), key + ".json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cache_put(key: str, value: dict) -> None:
    path = os.path.join(_cache_dir(), key + ".json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Triton specs
# ----------------------------------------------------------------------------------------------------------------
def _unwrap(fn):
    """An autotuner / heuristics wrapper -> the JITFunction inside."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn") and seen < 8:
        fn, seen = fn.fn, seen + 1
    return fn


def _takes_capability(gate_specs) -> bool:
    try:
        return "capability" in inspect.signature(gate_specs).parameters
    except (TypeError, ValueError):
        return False


def module_specs(mod, arch: Arch) -> list[dict]:
    """``mod.gate_specs()`` for ``arch`` (passing ``capability`` when it takes one), validated."""
    gs = mod.gate_specs
    specs = list(gs(capability=arch.cc) if _takes_capability(gs) else gs())
    names = set()
    for i, s in enumerate(specs):
        missing = [k for k in SPEC_KEYS if k not in s]
        if missing:
            raise ValueError(f"{mod.__name__}.gate_specs()[{i}] ({s.get('name', '?')}): missing keys {missing}")
        if s["name"] in names:
            raise ValueError(f"{mod.__name__}.gate_specs(): duplicate name {s['name']!r}")
        if not any(s["tensor_cores"] is m or s["tensor_cores"] == m for m in TENSOR_CORE_MODES):
            raise ValueError(f"{mod.__name__}.gate_specs()[{i}] ({s['name']}): 'tensor_cores' must be one of "
                             f"{TENSOR_CORE_MODES}, got {s['tensor_cores']!r}")
        names.add(s["name"])
    return specs


def _full_signature(fn, spec: dict) -> dict:
    """Signature with every constexpr listed as "constexpr"; every kernel parameter must be in one of the two."""
    sig = dict(spec["signature"])
    for k in spec["constexprs"]:
        sig[k] = "constexpr"
    params = list(fn.arg_names)
    unknown = [k for k in sig if k not in params]
    missing = [p for p in params if p not in sig]
    if unknown or missing:
        raise ValueError(f"spec {spec['name']!r} for {fn.__name__}: signature/constexprs "
                         f"{'name unknown parameters ' + str(unknown) if unknown else ''}"
                         f"{' and ' if unknown and missing else ''}"
                         f"{'miss parameters ' + str(missing) if missing else ''}")
    return {p: sig[p] for p in params}  # in parameter order


def divisibility_attrs(fn, spec: dict) -> dict:
    """``ASTSource`` attrs for the spec's ``divisible_by_16`` parameters, in the format Triton's JIT itself builds
    (triton 3.8 ``JITFunction._pack_args`` -> ``backend.parse_attr("D")``): ``{(param index,): [["tt.divisibility",
    16]]}``, the index counting every parameter of ``fn`` (constexprs included)."""
    names = list(spec.get("divisible_by_16", []))
    if isinstance(spec.get("divisible_by_16"), str):
        raise ValueError(f"spec {spec['name']!r}: 'divisible_by_16' must be a list of parameter names, not a string")
    bad = [n for n in names if n not in spec["signature"]]
    if bad:
        raise ValueError(f"spec {spec['name']!r}: 'divisible_by_16' names {bad}, which are not in its signature "
                         f"(only non-constexpr parameters can carry the hint)")
    wrong_type = [n for n in names if not (spec["signature"][n].startswith("*") or spec["signature"][n][0] in "iu")]
    if wrong_type:
        raise ValueError(f"spec {spec['name']!r}: 'divisible_by_16' names {wrong_type}, which are neither pointers "
                         f"nor integers")
    params = list(fn.arg_names)
    return {(params.index(n),): [["tt.divisibility", 16]] for n in sorted(set(names), key=params.index)}


def _spec_key(fn, spec: dict, arch: Arch, options: dict) -> str:
    import triton

    payload = json.dumps([GATE_VERSION, fn.cache_key, spec["signature"], spec["constexprs"],
                          sorted(spec.get("divisible_by_16", [])), spec["tensor_cores"], options, arch.name,
                          triton.__version__, _tool_version(_triton_bin("ptxas"))], sort_keys=True, default=repr)
    return "triton-" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def _spec_base(module_name: str, spec: dict, arch: Arch) -> dict:
    """The report fields a spec itself decides (not the compiler)."""
    return dict(kind="triton", module=module_name, name=spec["name"], arch=arch.name,
                hot_path=bool(spec["hot_path"]), tensor_cores=spec["tensor_cores"],
                shape=str(spec.get("shape", "")), num_warps=int(spec["num_warps"]),
                num_stages=int(spec["num_stages"]))


def _spec_options(spec: dict) -> dict:
    return {"num_warps": int(spec["num_warps"]), "num_stages": int(spec["num_stages"]), **spec.get("options", {})}


def triton_spec_key(spec: dict, arch: Arch) -> str | None:
    """Cache key of a spec (None when the spec is malformed: compiling it reports why)."""
    try:
        fn = _unwrap(spec["fn"])
        _full_signature(fn, spec)
        divisibility_attrs(fn, spec)
        return _spec_key(fn, spec, arch, _spec_options(spec))
    except Exception:
        return None


def _first(hit):
    return hit if isinstance(hit, dict) else hit[0]


def compile_triton_spec(module_name: str, spec_name: str, arch_name: str, use_cache: bool = True) -> dict:
    """Compile the spec named ``spec_name`` of ``module_name.gate_specs()`` for one arch and measure it (runs in a
    worker process). Returns KernelReport fields as a dict (no problems/occupancy yet: :func:`judge` adds those)."""
    arch = ARCHS[arch_name]
    mod = importlib.import_module(module_name)
    found = [s for s in module_specs(mod, arch) if s["name"] == spec_name]
    if not found:
        return dict(kind="triton", module=module_name, name=spec_name, arch=arch.name, compiled=False,
                    error=f"LookupError: {module_name}.gate_specs() no longer has a spec named {spec_name!r}")
    spec = found[0]
    fn = _unwrap(spec["fn"])
    rep = _spec_base(module_name, spec, arch)
    options = _spec_options(spec)
    try:
        from triton.runtime.jit import JITFunction

        if not isinstance(fn, JITFunction):
            raise TypeError(f"'fn' is {type(fn).__name__}, not a @triton.jit function (is TRITON_INTERPRET set?)")
        sig = _full_signature(fn, spec)
        attrs = divisibility_attrs(fn, spec)
        key = _spec_key(fn, spec, arch, options)
    except Exception as e:
        rep.update(compiled=False, error=f"{type(e).__name__}: {e}")
        return rep
    rep["key"] = key
    if use_cache:
        hit = _cache_get(key)
        if hit is not None:
            return {**_first(hit), **rep, "cached": True}
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        src = ASTSource(fn=fn, signature=sig, constexprs=dict(spec["constexprs"]), attrs=attrs)
        # Triton runs ptxas with -v itself; make it compile (no cache hit) and print that log, so ptxas runs once
        log = io.StringIO()
        saved = (triton.knobs.compilation.always_compile, triton.knobs.nvidia.dump_ptxas_log)
        triton.knobs.compilation.always_compile, triton.knobs.nvidia.dump_ptxas_log = True, True
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(src, target=GPUTarget("cuda", arch.cc, 32), options=options)
        finally:
            triton.knobs.compilation.always_compile, triton.knobs.nvidia.dump_ptxas_log = saved
        ptx = kernel.asm["ptx"]
        rep["smem_dynamic"] = int(kernel.metadata.shared)
        entry = [v for (_name, sm), v in parse_ptxas(log.getvalue()).items() if sm == arch.sm]
        with tempfile.TemporaryDirectory() as tmp:
            cubin_path = os.path.join(tmp, "k.cubin")
            with open(cubin_path, "wb") as f:
                f.write(kernel.asm["cubin"])
            if len(entry) != 1:  # no log captured: assemble the PTX again with the flags Triton's make_cubin uses
                ptx_path = os.path.join(tmp, "k.ptx")
                with open(ptx_path, "w") as f:
                    f.write(ptx)
                fp_fusion = getattr(kernel.metadata, "enable_fp_fusion", True)
                cmd = [_triton_bin("ptxas"), "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
                       "--regAllocOptLevel=2", f"--gpu-name={arch.sm}", ptx_path, "-o", os.path.join(tmp, "p.o")]
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if res.returncode != 0:
                    raise RuntimeError(f"ptxas failed ({res.returncode}): {res.stderr[-2000:]}")
                entry = [v for (_name, sm), v in parse_ptxas(res.stderr).items() if sm == arch.sm]
            if len(entry) != 1:
                raise RuntimeError(f"expected one entry function in the ptxas report, got {len(entry)}")
            st = entry[0]
            _want, tc_ptx_re, tc_sass_re = tensor_core_instr(arch, rep["tensor_cores"])
            if rep["tensor_cores"]:  # disassembling is slow on big kernels: only where the check needs it
                rep["tc_sass"] = count_sass(cubin_path, tc_sass_re)
        rep.update(registers=st["registers"], spill_stores=st["spill_stores"], spill_loads=st["spill_loads"],
                   stack_bytes=st["stack_bytes"], smem_static=st["smem_static"], ptxas_notes=st["notes"],
                   tc_ptx=len(re.findall(tc_ptx_re, ptx)), vector_loads=len(_RE_VEC_LOAD.findall(ptx)),
                   compiled=True)
        if arch.cc >= 90:
            rep["mma_sync_ptx"] = len(re.findall(ARCHS["80"].tc_ptx, ptx))
    except Exception as e:
        rep.update(compiled=False, error=f"{type(e).__name__}: {str(e)[-3000:]}")
    rep["compile_s"] = round(time.perf_counter() - t0, 2)
    if use_cache and rep["compiled"]:  # failures are not cached: they may be transient (memory, time)
        _cache_put(key, [rep])
    return rep


def _jit_functions(mod) -> dict[str, object]:
    """``@triton.jit`` functions defined in ``mod`` (autotuned ones unwrapped): name -> JITFunction."""
    from triton.runtime.jit import JITFunction

    out = {}
    for obj in vars(mod).values():
        fn = _unwrap(obj) if hasattr(obj, "fn") or isinstance(obj, JITFunction) else None
        if isinstance(fn, JITFunction) and getattr(fn.fn, "__module__", None) == mod.__name__:
            out[fn.__name__] = fn
    return out


def uncovered_kernels(mod, specs: list[dict]) -> list[str]:
    """jit functions in ``mod`` neither named by a spec nor called (transitively) from one that is."""
    jits = _jit_functions(mod)
    covered = {_unwrap(s["fn"]).__name__ for s in specs}
    frontier = list(covered)
    while frontier:
        fn = jits.get(frontier.pop())
        src = getattr(fn, "src", "") if fn is not None else ""
        for name in jits:
            if name not in covered and re.search(rf"\b{re.escape(name)}\s*\(", src):
                covered.add(name)
                frontier.append(name)
    return sorted(n for n in jits if n not in covered)


def discover_modules() -> list[str]:
    """Every ``nvlm_kernels`` submodule (imported to find out which define ``gate_specs``)."""
    import nvlm_kernels

    return sorted(f"nvlm_kernels.{m.name}" for m in pkgutil.iter_modules(nvlm_kernels.__path__)
                  if not m.name.startswith("_") and m.name != "gpu_gate")


# ----------------------------------------------------------------------------------------------------------------
# CUDA C++ kernels
# ----------------------------------------------------------------------------------------------------------------
def _setup_extension():
    """Run setup.py with ``setuptools.setup`` captured and return its nvlm_kernels._C extension (or None + why)."""
    import setuptools

    captured: dict = {}
    real_setup = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(REPO_ROOT)  # setup.py globs csrc/ relative to the working directory
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            import runpy

            runpy.run_path(os.path.join(REPO_ROOT, "setup.py"), run_name="nvlm_gate_setup")
    finally:
        setuptools.setup = real_setup
        os.chdir(cwd)
    exts = [e for e in captured.get("ext_modules", []) if e.name == "nvlm_kernels._C"]
    if not exts:
        return None, "setup.py defines no nvlm_kernels._C extension"
    ext = exts[0]
    if "nvcc" not in (ext.extra_compile_args or {}):
        return None, (err.getvalue().strip() or "setup.py builds the CPU kernels only")
    return ext, ""


def nvcc_command(ext, source: str, arch: Arch, out_path: str) -> list[str]:
    """nvcc command compiling ``source``'s device code for ``arch`` with the extension's include paths, macros
    and nvcc flags, torch's standard extension flags, and ``-Xptxas=-v``."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    flags = list(ext.extra_compile_args["nvcc"])
    if "-Xptxas=-v" not in flags and "--resource-usage" not in flags:
        flags.append("-Xptxas=-v")
    macros = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in (ext.define_macros or [])]
    incs = [f"-I{os.path.join(REPO_ROOT, d) if not os.path.isabs(d) else d}" for d in ext.include_dirs]
    return [nvcc, "--fatbin", f"-gencode=arch=compute_{arch.sm[3:]},code={arch.sm}", *COMMON_NVCC_FLAGS,
            "-std=c++20", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", *macros, *incs, *flags,
            source, "-o", out_path]


def _source_digest(source: str) -> str:
    """Hash of a .cu file and every header under csrc/ (a conservative stand-in for its include closure)."""
    h = hashlib.sha256()
    files = [source] + sorted(p for d in ("csrc",) for p in _walk(os.path.join(REPO_ROOT, d))
                              if p.endswith((".h", ".cuh", ".hpp")))
    for p in files:
        h.update(os.path.relpath(p, REPO_ROOT).encode())  # relative: a clone elsewhere gets the same key
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _walk(root: str):
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield os.path.join(dirpath, f)


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, timeout=60)
        out = r.stdout.splitlines()
        if len(out) == len(names):
            return dict(zip(names, out))
    except (OSError, subprocess.SubprocessError):
        pass
    return {n: n for n in names}


def cuda_key(ext, source: str, arch: Arch) -> str:
    """Cache key of one .cu for one arch: its text, every csrc/ header, the nvcc command (the Python environment's
    and the repository's paths made symbolic, so a clone elsewhere, with its virtualenv elsewhere, hits the same
    key), torch's version (its headers are included) and nvcc's version."""
    import torch

    cmd = [c.replace(sys.prefix, "<python-prefix>").replace(REPO_ROOT, "<repo>")
           for c in nvcc_command(ext, source, arch, "out")[1:]]
    payload = json.dumps([GATE_VERSION, _source_digest(source), cmd, torch.__version__,
                          _tool_version(nvcc_command(ext, source, arch, "out")[0])])
    return "cuda-" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def compile_cuda_source(source: str, arch_name: str, ext=None, use_cache: bool = True) -> list[dict]:
    """Compile one .cu for one arch and return a report dict per ``__global__`` function."""
    arch = ARCHS[arch_name]
    rel = os.path.relpath(source, REPO_ROOT)
    if ext is None:
        ext, why = _setup_extension()
        if ext is None:
            return [dict(kind="cuda", module=rel, name="*", arch=arch.name, compiled=False,
                         error=f"CUDA build disabled: {why}")]
    key = cuda_key(ext, source, arch)
    if use_cache:
        hit = _cache_get(key)
        if hit is not None:
            return [{**r, "cached": True} for r in hit]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "k.fatbin")
        cmd = nvcc_command(ext, source, arch, out)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
        dt = round(time.perf_counter() - t0, 2)
        if res.returncode != 0:
            reps = [dict(kind="cuda", module=rel, name="*", arch=arch.name, compiled=False, compile_s=dt,
                         error=f"nvcc failed ({res.returncode}): {(res.stderr or res.stdout)[-3000:]}\n"
                               f"command: {shlex.join(cmd)}")]
        else:
            stats = parse_ptxas(res.stdout + "\n" + res.stderr)
            names = _demangle([fn for fn, sm in stats if sm == arch.sm])
            reps = []
            for (fn, sm), st in sorted(stats.items()):
                if sm != arch.sm:
                    continue
                reps.append(dict(kind="cuda", module=rel, name=names.get(fn, fn), arch=arch.name, hot_path=True,
                                 tensor_cores=False, compiled=True, registers=st["registers"],
                                 spill_stores=st["spill_stores"], spill_loads=st["spill_loads"],
                                 stack_bytes=st["stack_bytes"], smem_static=st["smem_static"], smem_dynamic=0,
                                 ptxas_notes=st["notes"], num_warps=8, threads_assumed=True, compile_s=dt,
                                 key=key))
            if not reps:
                reps = [dict(kind="cuda", module=rel, name="(no __global__ functions)", arch=arch.name,
                             hot_path=False, compiled=True, registers=0, compile_s=dt, num_warps=8,
                             threads_assumed=True, key=key)]
        if use_cache and res.returncode == 0:  # failures are not cached: they may be transient (memory, time)
            _cache_put(key, reps)
        return reps


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def _to_report(d: dict) -> KernelReport:
    fields = {f.name for f in dataclasses.fields(KernelReport)}
    return KernelReport(**{k: v for k, v in d.items() if k in fields})


def load_seed(path: str | None) -> dict[str, list[dict]]:
    """Results of an earlier gate run (its --json file): key -> report dicts. Missing/unreadable file: empty."""
    if not path:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    seed: dict[str, list[dict]] = {}
    for r in data.get("reports", []):
        if r.get("key") and r.get("compiled"):
            seed.setdefault(r["key"], []).append(r)
    return seed


_DERIVED = ("problems", "blocks_per_sm", "occupancy", "occupancy_limiter")


def run_gate(archs=("80", "90a"), *, modules: list[str] | None = None, cuda_sources: list[str] | None = None,
             jobs: int | None = None, use_cache: bool = True, seed: str | None = None,
             progress: bool = True) -> dict:
    """Compile and judge every kernel. ``modules``: Python modules to take ``gate_specs`` from (default: every
    nvlm_kernels submodule); ``cuda_sources``: .cu files (default: csrc/cuda/*.cu; ``[]`` for none); ``seed``: an
    earlier ``--json`` whose entries are reused where the cache key (source, spec, tools) is unchanged.
    Returns ``{"reports": [KernelReport], "module_problems": {module: [str]}, "seconds": float}``."""
    t0 = time.perf_counter()
    archs = [ARCHS[a] for a in archs]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("nvlm_kernels.gpu_gate: TRITON_INTERPRET is set, so @triton.jit gives interpreted "
                           "functions that cannot be compiled; run `python -m nvlm_kernels.gpu_gate` (it clears it)")
    seeded = load_seed(seed) if use_cache else {}
    module_problems: dict[str, list[str]] = {}
    results: list[dict] = []
    tasks: list[tuple] = []  # (kind, module or source, spec name, arch name)

    def reuse(key: str | None, base: dict | None) -> bool:
        hit = seeded.get(key) if key else None
        if hit is None and key and use_cache:
            hit = _cache_get(key)
            hit = [hit] if isinstance(hit, dict) else hit
        if not hit:
            return False
        for r in hit:
            r = {k: v for k, v in r.items() if k not in _DERIVED}
            results.append({**r, **(base or {}), "cached": True, "key": key})
        return True

    for name in (discover_modules() if modules is None else modules):
        try:
            mod = importlib.import_module(name)
        except Exception as e:
            module_problems.setdefault(name, []).append(f"import failed: {type(e).__name__}: {e}")
            continue
        if not hasattr(mod, "gate_specs"):
            if _jit_functions(mod):
                module_problems.setdefault(name, []).append(
                    f"defines @triton.jit kernels {sorted(_jit_functions(mod))} but no gate_specs()")
            continue
        all_specs = []
        for arch in archs:
            try:
                specs = module_specs(mod, arch)
            except Exception as e:
                module_problems.setdefault(name, []).append(f"gate_specs() for {arch.sm} raised "
                                                            f"{type(e).__name__}: {e}")
                continue
            all_specs += specs
            for spec in specs:
                if not reuse(triton_spec_key(spec, arch), _spec_base(name, spec, arch)):
                    tasks.append(("triton", name, spec["name"], arch.name))
        missing = uncovered_kernels(mod, all_specs) if all_specs else []
        if missing:
            module_problems.setdefault(name, []).append(f"@triton.jit functions with no gate spec: {missing}")
    if cuda_sources is None:
        cuda_sources = sorted(p for p in _walk(os.path.join(REPO_ROOT, "csrc", "cuda")) if p.endswith(".cu"))
    if cuda_sources:
        ext, why = _setup_extension()
        if ext is None:
            module_problems.setdefault("csrc/cuda", []).append(f"CUDA kernels not compiled: {why}")
        else:
            for src in cuda_sources:
                for arch in archs:
                    if not reuse(cuda_key(ext, src, arch), None):
                        tasks.append(("cuda", src, "", arch.name))

    if tasks:
        jobs = jobs or max(1, min(len(tasks), os.cpu_count() or 1))
        # spawn, not fork: a clean interpreter per worker (no inherited TRITON_INTERPRET/threads state)
        ctx = multiprocessing.get_context("spawn")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(tasks), desc=f"gpu gate ({len(results)} cached)", unit="kernel", file=sys.stderr)
        # CUDA sources first: each nvcc run is long, so start them before the many short Triton compiles
        tasks.sort(key=lambda t: t[0] != "cuda")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futs = {}
            for kind, name, spec_name, arch_name in tasks:
                if kind == "triton":
                    fut = pool.submit(compile_triton_spec, name, spec_name, arch_name, use_cache)
                else:
                    fut = pool.submit(compile_cuda_source, name, arch_name, None, use_cache)
                futs[fut] = (kind, name, spec_name, arch_name)
            for fut in cf.as_completed(futs):
                kind, name, spec_name, arch_name = futs[fut]
                try:
                    out = fut.result()
                except Exception as e:  # a crashed worker is a compile failure of that task
                    out = dict(kind=kind, module=name, name=spec_name or "*", arch=arch_name, compiled=False,
                               error=f"worker failed: {type(e).__name__}: {e}")
                results += out if isinstance(out, list) else [out]
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    reports = [_to_report(d) for d in results]
    for r in reports:
        judge(r, ARCHS[r.arch])
    reports.sort(key=lambda r: (r.kind != "triton", r.module, r.name, r.arch))
    return {"reports": reports, "module_problems": module_problems, "seconds": time.perf_counter() - t0}


def all_problems(result: dict) -> list[str]:
    out = [f"{m}: {p}" for m, ps in result["module_problems"].items() for p in ps]
    out += [f"{r.module}:{r.name} [{r.arch}]: {p}" for r in result["reports"] for p in r.problems]
    return out


def _n(x) -> str:
    return "-" if x is None else str(x)


def format_table(result: dict) -> str:
    """Markdown table of every kernel x arch, then the problems."""
    lines = ["| kernel | arch | hot | warps/stages | regs | spill st/ld B | smem B | 16 B loads "
             "| tensor cores (PTX/SASS) | occupancy (limiter) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["reports"]:
        tc = "-"
        if r.tc_ptx is not None or r.tensor_cores:
            want = tensor_core_instr(ARCHS[r.arch], r.tensor_cores)[0]
            tc = f"{want} {_n(r.tc_ptx)}/{_n(r.tc_sass)}" + (" (required)" if r.tensor_cores else "")
        occ = "-"
        if r.occupancy is not None:
            occ = f"{100 * r.occupancy:.0f}% ({r.blocks_per_sm} blk, {r.occupancy_limiter})"
            if r.threads_assumed:
                occ += " @256 thr"
        ws = f"{_n(r.num_warps)}/{_n(r.num_stages)}" if r.kind == "triton" else "-"
        status = "OK" if not r.problems else "FAIL: " + "; ".join(r.problems)
        if not r.problems and r.ptxas_notes:
            status = "OK (note: " + "; ".join(r.ptxas_notes)[:120] + ")"
        name = f"{r.module.removeprefix('nvlm_kernels.')}:{r.name}"
        smem = _n(r.smem_total if r.compiled else None)
        lines.append(f"| {name} | {ARCHS[r.arch].sm} | {'yes' if r.hot_path else 'no'} | {ws} | {_n(r.registers)} "
                     f"| {_n(r.spill_stores)}/{_n(r.spill_loads)} | {smem} | {_n(r.vector_loads)} | {tc} | {occ} "
                     f"| {status} |")
    n_fail = sum(1 for r in result["reports"] if r.problems)
    probs = all_problems(result)
    lines += ["", f"{len(result['reports'])} kernel x arch compiled-and-checked entries, {n_fail} failing; "
              f"{sum(r.cached for r in result['reports'])} from cache; {result['seconds']:.0f} s."]
    if probs:
        lines += ["", "Problems:"] + [f"- {p}" for p in probs]
    return "\n".join(lines)


def to_json(result: dict) -> dict:
    import triton

    return {"reports": [dataclasses.asdict(r) for r in result["reports"]],
            "module_problems": result["module_problems"], "problems": all_problems(result),
            "seconds": result["seconds"], "triton": triton.__version__,
            "ptxas": _tool_version(_triton_bin("ptxas")),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nvlm_kernels.gpu_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90a", help="comma-separated: 80, 90a (default both)")
    p.add_argument("--json", default=None, help="write the full report as JSON here")
    p.add_argument("--table", default=None, help="write the markdown table here")
    p.add_argument("--module", action="append", default=None,
                   help="take gate_specs from this module instead of every nvlm_kernels submodule (repeatable)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels in csrc/cuda")
    p.add_argument("--cuda-source", action="append", default=None, help="compile these .cu files instead")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: number of CPUs)")
    p.add_argument("--no-cache", action="store_true", help="recompile everything (ignore the cache and --seed)")
    p.add_argument("--seed", default=os.path.join(REPO_ROOT, "bench", "results", "gpu_gate.json"),
                   help="reuse entries of this earlier --json whose key (source, spec, tools) is unchanged "
                        "(default: bench/results/gpu_gate.json; '' for none)")
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        p.error(f"--arch: unknown {bad}; choose from {sorted(ARCHS)}")
    if args.module:
        sys.path.insert(0, os.getcwd())
    cuda = [] if args.no_cuda else ([os.path.abspath(s) for s in args.cuda_source] if args.cuda_source else None)
    result = run_gate(archs, modules=args.module, cuda_sources=cuda, jobs=args.jobs, use_cache=not args.no_cache,
                      seed=args.seed or None)
    table = format_table(result)
    print(table)
    new_json = json.dumps(to_json(result), indent=1)
    if args.json and _same_figures(args.json, new_json):
        return 1 if all_problems(result) else 0   # only cache flags / timings differ: keep the committed files
    for path, text in ((args.table, table + "\n"), (args.json, new_json)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    return 1 if all_problems(result) else 0



_PROVENANCE_KEYS = {"cached", "compile_s", "seconds", "date_utc"}


def _strip_provenance(value):
    if isinstance(value, dict):
        return {k: _strip_provenance(v) for k, v in value.items() if k not in _PROVENANCE_KEYS}
    if isinstance(value, list):
        return [_strip_provenance(v) for v in value]
    return value


def _same_figures(path: str, new_json: str) -> bool:
    """True when ``path`` already holds the same gate figures, differing at most in where they came from (cache
    flags, compile times), so a test run that recompiled nothing leaves the committed results untouched."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    return _strip_provenance(old) == _strip_provenance(json.loads(new_json))

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # nvlm_kernels was imported (as this module's package) with the interpreter on: restart without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "nvlm_kernels.gpu_gate", *sys.argv[1:]], env)
    sys.exit(main())
