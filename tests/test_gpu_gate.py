"""The GPU gate (nvlm_kernels/gpu_gate.py): every kernel compiles for sm_80 and sm_90a, hot-path kernels do not
spill, matmul-type kernels use tensor cores. No GPU needed: Triton and nvcc compile ahead of time, ptxas -v reports.

The gate runs in a subprocess (``python -m nvlm_kernels.gpu_gate``) because this test session runs Triton under
the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), whose @triton.jit functions cannot be compiled.

* ``test_gate_flags_bad_kernels`` proves each check can fail, on kernels defined in this file (``gate_specs`` below):
  a 128x256x64 bf16 tile with 4 warps that spills on sm_90a, a kernel that claims tensor cores but has no tl.dot,
  a 64-row tile that requires mma.sync but gets wgmma, a kernel that does not compile, a spec with a wrong
  signature or a bad ``divisible_by_16``, and a jit function no spec covers; and that the divisibility hints reach
  the compiler (16-byte loads with them, none without) and a 16-row tile passes as ``tensor_cores="mma"``.
* ``test_cuda_gate_flags_spills`` does the same for the CUDA C++ path with a kernel capped at 32 registers.
* ``test_package_kernels_pass_the_gate`` gates the package itself, prints the table and writes it to
  bench/results/gpu_gate.md (+ .json).
"""

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import triton
import triton.language as tl

from nvlm_kernels import gpu_gate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(REPO, "bench", "results")


# ----------------------------------------------------------------------------------------------------------------
# Kernels for the negative test (compiled only by the gate subprocess, never launched)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _gate_mm_kernel(a, b, c, K, N, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """c[BM, BN] tile = a[BM, K] @ b[K, N] in bf16 with an fp32 accumulator (shapes multiples of the tile)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        x = tl.load(a + rm[:, None] * K + (k + rk)[None, :])
        y = tl.load(b + (k + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(x, y)
    tl.store(c + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))


@triton.jit
def _gate_twice(x):
    return 2.0 * x


@triton.jit
def _gate_scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, _gate_twice(x).to(tl.bfloat16), mask=mask)


@triton.jit
def _gate_orphan_kernel(x_ptr):
    tl.store(x_ptr, 0.0)


_MM_SIG = {"a": "*bf16", "b": "*bf16", "c": "*bf16", "K": "i32", "N": "i32"}
_SCALE_SIG = {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32"}


def gate_specs() -> list[dict]:
    """Specs the negative test hands to the gate (``--module test_gpu_gate``)."""
    common = dict(num_stages=3, hot_path=True)
    return [
        # 64x128x64, 4 warps: fits in registers, wgmma on sm_90a -> passes
        dict(name="mm_ok", fn=_gate_mm_kernel, signature=_MM_SIG, constexprs=dict(BM=64, BN=128, BK=64),
             num_warps=4, tensor_cores=True, **common),
        # 128x256 fp32 accumulator over 128 threads = 256 values per thread > 255 registers -> spills (build_notes)
        dict(name="mm_spills", fn=_gate_mm_kernel, signature=_MM_SIG, constexprs=dict(BM=128, BN=256, BK=64),
             num_warps=4, tensor_cores=True, **common),
        # 16-row tile (a decode tile): below wgmma's M = 64, so mma.sync on sm_90a too -> passes as "mma"
        dict(name="mm_m16_mma", fn=_gate_mm_kernel, signature=_MM_SIG, constexprs=dict(BM=16, BN=64, BK=64),
             num_warps=4, tensor_cores="mma", divisible_by_16=list(_MM_SIG), **common),
        # 64-row tile requiring mma.sync: Triton emits wgmma on sm_90a instead -> flagged
        dict(name="mm_ok_claims_mma", fn=_gate_mm_kernel, signature=_MM_SIG, constexprs=dict(BM=64, BN=128, BK=64),
             num_warps=4, tensor_cores="mma", **common),
        # elementwise, but claims to be a matmul -> no wgmma
        dict(name="scale_claims_tc", fn=_gate_scale_kernel, signature=_SCALE_SIG, constexprs=dict(BLOCK=1024),
             num_warps=4, tensor_cores=True, **common),
        # the same kernel with the JIT's divisibility hints: 16-byte vector loads (none without them, above)
        dict(name="scale_hinted", fn=_gate_scale_kernel, signature=_SCALE_SIG, constexprs=dict(BLOCK=1024),
             num_warps=4, tensor_cores=False, divisible_by_16=["x_ptr", "y_ptr", "n"], **common),
        # a hint on a constexpr (it is not an argument at run time) -> rejected before compiling
        dict(name="scale_bad_hint", fn=_gate_scale_kernel, signature=_SCALE_SIG, constexprs=dict(BLOCK=1024),
             num_warps=4, tensor_cores=False, divisible_by_16=["x_ptr", "BLOCK"], **common),
        # tl.arange needs a power-of-two length -> compile error
        dict(name="scale_bad_block", fn=_gate_scale_kernel, signature=_SCALE_SIG, constexprs=dict(BLOCK=1000),
             num_warps=4, tensor_cores=False, **common),
        # y_ptr missing from the signature -> rejected before compiling
        dict(name="scale_bad_signature", fn=_gate_scale_kernel, signature={"x_ptr": "*bf16", "n": "i32"},
             constexprs=dict(BLOCK=1024), num_warps=4, tensor_cores=False, **common),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Unit tests of the parsing and arithmetic
# ----------------------------------------------------------------------------------------------------------------
_PTXAS_LOG = """\
ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient \
register resources for the wgmma pipeline in the function 'mm'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mm' for 'sm_90a'
ptxas info    : Function properties for mm
    1472 bytes stack frame, 1992 bytes spill stores, 1612 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1472 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 368 bytes cmem[0]
"""


def test_parse_ptxas():
    st = gpu_gate.parse_ptxas(_PTXAS_LOG)
    assert set(st) == {("mm", "sm_90a"), ("_Z6kernelPf", "sm_80")}
    mm = st[("mm", "sm_90a")]
    assert (mm["registers"], mm["spill_stores"], mm["spill_loads"], mm["stack_bytes"]) == (255, 1992, 1612, 1472)
    assert mm["notes"] and "serialized" in mm["notes"][0]
    k = st[("_Z6kernelPf", "sm_80")]
    assert (k["registers"], k["spill_stores"], k["smem_static"], k["notes"]) == (40, 0, 4096, [])


def test_occupancy_arithmetic():
    h100, a100 = gpu_gate.ARCHS["90a"], gpu_gate.ARCHS["80"]
    # 255 regs -> 8192 per warp -> 8 warps/SM -> one 8-warp block (12.5 %), limited by registers
    assert gpu_gate.occupancy(h100, 255, 0, 8) == (1, 0.125, "registers")
    # 32 regs, 4 warps: 16 blocks by warps, 16 by registers (65536 / (1024*4)) -> 100 %
    blocks, occ, _ = gpu_gate.occupancy(h100, 32, 0, 4)
    assert (blocks, occ) == (16, 1.0)
    # 48 KiB + 1 KiB reserved per block: 164 KiB / 49 KiB = 3 blocks on sm_80, 228 / 49 = 4 on sm_90a
    assert gpu_gate.occupancy(a100, 64, 48 * 1024, 4)[:1] == (3,)
    assert gpu_gate.occupancy(h100, 64, 48 * 1024, 4)[:1] == (4,)
    # more shared memory than a block may have -> cannot launch
    assert gpu_gate.occupancy(a100, 64, 200 * 1024, 4)[0] == 0


def test_judge_flags_each_problem():
    arch = gpu_gate.ARCHS["90a"]
    ok = gpu_gate.KernelReport("triton", "m", "k", "90a", hot_path=True, tensor_cores=True, num_warps=4,
                               compiled=True, registers=128, spill_stores=0, spill_loads=0, smem_dynamic=32768,
                               tc_ptx=4, tc_sass=4)
    gpu_gate.judge(ok, arch)
    assert ok.problems == [] and ok.occupancy > 0
    bad = gpu_gate.KernelReport("triton", "m", "k", "90a", hot_path=True, tensor_cores=True, num_warps=4,
                                compiled=True, registers=255, spill_stores=8, spill_loads=8,
                                smem_dynamic=300 * 1024, tc_ptx=0, tc_sass=0)
    gpu_gate.judge(bad, arch)
    text = " | ".join(bad.problems)
    assert "shared memory" in text and "spills" in text and "no wgmma" in text
    cold = gpu_gate.KernelReport("triton", "m", "k", "90a", hot_path=False, num_warps=4, compiled=True,
                                 registers=255, spill_stores=8, spill_loads=8)
    gpu_gate.judge(cold, arch)
    assert cold.problems == []                     # spills off the hot path are reported, not failed


def test_divisibility_attrs_match_the_jit():
    spec = dict(name="s", signature=_MM_SIG, constexprs=dict(BM=64, BN=128, BK=64), divisible_by_16=["N", "a", "c"])
    attrs = gpu_gate.divisibility_attrs(_gate_mm_kernel, spec)
    # what triton's JIT builds for an argument it specialised as "D" (16-aligned pointer / int multiple of 16),
    # keyed by the parameter's index among all parameters
    from triton.backends.compiler import BaseBackend

    assert attrs == {(0,): BaseBackend.parse_attr("D"), (2,): BaseBackend.parse_attr("D"),
                     (4,): BaseBackend.parse_attr("D")} == {(i,): [["tt.divisibility", 16]] for i in (0, 2, 4)}
    assert gpu_gate.divisibility_attrs(_gate_mm_kernel, dict(spec, divisible_by_16=[])) == {}
    for bad, msg in ((["BM"], "not in its signature"), (["nope"], "not in its signature"), ("a", "list")):
        with pytest.raises(ValueError, match=msg):
            gpu_gate.divisibility_attrs(_gate_mm_kernel, dict(spec, divisible_by_16=bad))
    fsig = dict(_SCALE_SIG, n="fp32")
    with pytest.raises(ValueError, match="neither pointers nor integers"):
        gpu_gate.divisibility_attrs(_gate_scale_kernel, dict(name="f", signature=fsig, divisible_by_16=["n"]))


def test_tensor_core_modes():
    h100, a100 = gpu_gate.ARCHS["90a"], gpu_gate.ARCHS["80"]
    assert gpu_gate.tensor_core_instr(h100, True)[0] == "wgmma"
    assert gpu_gate.tensor_core_instr(h100, "mma")[0] == "mma" == gpu_gate.tensor_core_instr(a100, True)[0]
    # judge: an "mma" kernel is measured on mma.sync; without it (tc_ptx = 0) it fails on either arch
    for arch in (h100, a100):
        r = gpu_gate.KernelReport("triton", "m", "k", arch.name, tensor_cores="mma", num_warps=4, compiled=True,
                                  registers=100, spill_stores=0, spill_loads=0, tc_ptx=0, tc_sass=0)
        gpu_gate.judge(r, arch)
        assert r.problems == [f"tensor_cores kernel emits no mma on {arch.sm}"]
    # a spec with an unknown mode is rejected
    mod = types.SimpleNamespace(__name__="fake", gate_specs=lambda: [
        dict(name="k", fn=None, signature={}, constexprs={}, num_warps=4, num_stages=1, hot_path=True,
             tensor_cores="wgmma")])
    with pytest.raises(ValueError, match="'tensor_cores' must be one of"):
        gpu_gate.module_specs(mod, h100)


# ----------------------------------------------------------------------------------------------------------------
# The gate end to end
# ----------------------------------------------------------------------------------------------------------------
def _run_gate(args, *, cwd, env_extra=None, timeout):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "nvlm_kernels.gpu_gate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_gate_flags_bad_kernels(tmp_path):
    out = tmp_path / "gate.json"
    # TRITON_INTERPRET=1 on purpose: the gate must restart itself without it; a fresh cache: really compile
    res = _run_gate(["--module", "test_gpu_gate", "--arch", "90a", "--no-cuda", "--seed", "", "--json", str(out)],
                    cwd=HERE,
                    env_extra={"TRITON_INTERPRET": "1", "NVLM_GATE_CACHE": str(tmp_path / "cache")}, timeout=600)
    print(res.stdout)
    assert res.returncode == 1, res.stderr[-3000:]
    data = json.loads(out.read_text())
    reps = {r["name"]: r for r in data["reports"]}
    assert set(reps) == {s["name"] for s in gate_specs()}

    good = reps["mm_ok"]
    assert good["compiled"] and good["problems"] == [], good
    assert good["tc_ptx"] > 0 and good["spill_stores"] == 0 and good["registers"] <= 255 and good["occupancy"] > 0

    spill = reps["mm_spills"]
    assert spill["compiled"] and spill["registers"] == 255 and spill["spill_stores"] > 1000, spill
    assert any("spills" in p for p in spill["problems"])
    assert any("serialized" in p for p in spill["problems"])   # ptxas: wgmma serialised for lack of registers

    assert reps["scale_claims_tc"]["compiled"]
    assert reps["scale_claims_tc"]["problems"] == ["tensor_cores kernel emits no wgmma on sm_90a"]
    # "mma": a 16-row tile gets mma.sync (also in the SASS: HMMA) and passes; a 64-row one gets wgmma and fails
    m16 = reps["mm_m16_mma"]
    assert m16["problems"] == [] and m16["tc_ptx"] > 0 and m16["tc_sass"] > 0, m16
    assert reps["mm_ok_claims_mma"]["compiled"] and good["tc_ptx"] > 0
    assert reps["mm_ok_claims_mma"]["problems"] == ["tensor_cores kernel emits no mma on sm_90a"]
    # the hints reach the compiler: vectorised loads with them (mm_m16_mma: 16-byte cp.async), none without
    assert reps["scale_claims_tc"]["vector_loads"] == 0 and reps["scale_hinted"]["vector_loads"] > 0
    assert good["vector_loads"] == 0 and m16["vector_loads"] > 0
    assert reps["scale_hinted"]["problems"] == []
    assert not reps["scale_bad_hint"]["compiled"]
    assert "'divisible_by_16' names ['BLOCK']" in reps["scale_bad_hint"]["problems"][0]
    assert not reps["scale_bad_block"]["compiled"]
    assert reps["scale_bad_block"]["problems"][0].startswith("does not compile")
    assert not reps["scale_bad_signature"]["compiled"]
    assert "miss parameters ['y_ptr']" in reps["scale_bad_signature"]["problems"][0]
    # _gate_twice is covered (called by a covered kernel); _gate_orphan_kernel is not
    assert data["module_problems"] == {"test_gpu_gate": ["@triton.jit functions with no gate spec: "
                                                         "['_gate_orphan_kernel']"]}

    # Run again, seeded with the first run's JSON and an empty cache: every compiled entry is reused (its key,
    # i.e. kernel source + spec + tools, is unchanged), failures are retried, and the verdicts are the same.
    out2 = tmp_path / "gate2.json"
    res2 = _run_gate(["--module", "test_gpu_gate", "--arch", "90a", "--no-cuda", "--seed", str(out), "--json",
                      str(out2)], cwd=HERE, env_extra={"NVLM_GATE_CACHE": str(tmp_path / "cache2")}, timeout=600)
    assert res2.returncode == 1, res2.stderr[-3000:]
    reps2 = {r["name"]: r for r in json.loads(out2.read_text())["reports"]}
    for name, r in reps.items():
        assert reps2[name]["cached"] == r["compiled"], name
        assert reps2[name]["problems"] == r["problems"], name
        assert reps2[name]["registers"] == r["registers"], name


_CUDA_SRC = r"""
__global__ void clean_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = 2.0f * x[i];
}
// 64 live accumulators under a 32-register cap (1024 threads x 2 blocks per SM): must spill.
__global__ void __launch_bounds__(1024, 2) spill_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = x[threadIdx.x + i * n];
#pragma unroll
  for (int r = 1; r < 8; ++r) {
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = acc[i] * acc[(i + r) & 63] + 1.0f;
  }
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s += acc[i];
  y[threadIdx.x] = s;
}
"""


def test_cuda_gate_flags_spills(tmp_path):
    ext, why = gpu_gate._setup_extension()
    if ext is None:
        pytest.skip(f"setup.py does not build CUDA here: {why}")
    src = tmp_path / "k.cu"
    src.write_text(_CUDA_SRC)
    reps = [gpu_gate._to_report(d) for d in gpu_gate.compile_cuda_source(str(src), "90a", ext, use_cache=False)]
    for r in reps:
        gpu_gate.judge(r, gpu_gate.ARCHS["90a"])
    by = {r.name.split("(")[0]: r for r in reps}
    assert set(by) == {"clean_kernel", "spill_kernel"}, [r.name for r in reps]
    assert by["clean_kernel"].compiled and by["clean_kernel"].problems == []
    assert by["spill_kernel"].registers <= 32 and by["spill_kernel"].spill_stores > 0
    assert any("spills" in p for p in by["spill_kernel"].problems)


@pytest.mark.slow
def test_package_kernels_pass_the_gate():
    """Every Triton spec and every csrc/cuda kernel, sm_80 and sm_90a. Writes bench/results/gpu_gate.{md,json}."""
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("nvcc not found: CUDA C++ kernels cannot be gated here")
    os.makedirs(RESULTS, exist_ok=True)
    md, js = os.path.join(RESULTS, "gpu_gate.md"), os.path.join(RESULTS, "gpu_gate.json")
    # Entries whose key (kernel source + spec + tool versions) is unchanged are reused from the committed
    # bench/results/gpu_gate.json and the local cache; NVLM_GATE_NO_CACHE=1 recompiles everything.
    extra = ["--no-cache"] if os.environ.get("NVLM_GATE_NO_CACHE") == "1" else []
    res = _run_gate(["--json", js, "--table", md, *extra], cwd=REPO, timeout=3000)
    print(res.stdout)                                  # the table, in the test log
    assert os.path.exists(md) and os.path.exists(js), res.stderr[-3000:]
    data = json.loads(open(js).read())
    assert data["reports"], "the gate found no kernels"
    assert res.returncode == 0, "GPU gate problems:\n" + "\n".join(data["problems"])
