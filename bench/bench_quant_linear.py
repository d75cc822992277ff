"""Benchmark: weight-only int4 / int8 linear (``nvlm_kernels.w4a16_linear`` / ``w8a16_linear``) at the decoder's
largest projection, gate/up_proj of Qwen2-72B: K=8192 -> N=29568, M=1 (decode), M=16 (small batch / spec) and, on
CPU, M=64 (a batch or short prefill: int4 still on the tiled kernel, int8 on dequantise + matmul).

CPU rows (the headline CPU figures, design.md §4), bf16 activations, all torch threads:

* ours: ``w4a16`` (g128, fp16 scales, uint8 zeros; the file format, no repacking) and ``w8a16`` (fp16 scale);
* baselines from the same run: ``aten._weight_int4pack_mm_for_cpu`` (weights prepacked once with
  ``aten._convert_weight_to_int4pack_for_cpu``; same g128 (q - z) * s maths: scale s, zero (8 - z) * s),
  ``aten._weight_int8pack_mm`` (bf16 x and scales), the bf16 dense matmul (oneDNN), and bitsandbytes nf4 / int8
  (``--full`` only: a call takes ~0.5 s on the dev machine; time-boxed).

Every timed call reads a different weight copy: enough copies rotate to exceed twice the last-level cache
(``harness.copies_to_exceed_cache``), so the GB/s figures are DRAM figures. GB/s = weight bytes (incl. scales and
zeros) / median time; % of limit = that over the STREAM-like DRAM read bandwidth measured in the same process.
GPU rows (when a GPU is present): the CUDA GEMV (M=1, 8) vs the bf16 cuBLAS matmul, % of measured HBM bandwidth.
"""

from __future__ import annotations

import warnings

import torch

import nvlm_kernels
from bench import harness

OP = "quant_linear"
K, N = 8192, 29568   # Qwen2-72B gate/up_proj (bench/shapes.py: HIDDEN -> INTERMEDIATE)
GROUP = 128


# ----------------------------------------------------------------------------------------------------------------
# Weights (random codes in the file format: the speed does not depend on the values)
# ----------------------------------------------------------------------------------------------------------------
def _int4_weights(device="cpu"):
    qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device)
    scales = (torch.rand(N, K // GROUP, device=device) * 0.01 + 0.001).to(torch.float16)
    zeros = torch.randint(0, 16, (N, K // GROUP), dtype=torch.uint8, device=device)
    return qw, scales, zeros


def _int8_weights(device="cpu"):
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    scale = (torch.rand(N, device=device) * 0.01 + 0.001).to(torch.float16)
    return q, scale


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _aten_int4_pack(qw, scales, zeros):
    """Our int4 triple -> (packed weight, qScaleAndZeros [K/g, N, 2] bf16) for _weight_int4pack_mm_for_cpu."""
    q = nvlm_kernels.packing.unpack_int4(qw).to(torch.int32)                     # [N, K] 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    s = scales.float()
    sz = torch.stack([s, (8.0 - zeros.float()) * s], dim=-1)                     # w = (q - 8) s + (8 - z) s
    return packed, sz.transpose(0, 1).contiguous().to(torch.bfloat16)


def _check_aten_int4_semantics():
    """The baseline must compute the same thing: a small case against our reference."""
    n, k = 64, 256
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    s = (torch.rand(n, k // GROUP) * 0.01 + 0.001).to(torch.float16)
    z = torch.randint(0, 16, (n, k // GROUP), dtype=torch.uint8)
    q = nvlm_kernels.packing.unpack_int4(qw).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([s.float(), (8.0 - z.float()) * s.float()], -1).transpose(0, 1).contiguous().bfloat16()
    x = torch.randn(3, k).bfloat16()
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz).float()
    ref = nvlm_kernels.w4a16_linear_ref(x.float(), qw, s, z, GROUP)
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    if err > 0.05:
        raise RuntimeError(f"bench_quant_linear: aten int4 baseline disagrees with the reference (rel err {err:.3g})")


def _bnb_baselines(x_by_m, n_copies, max_time_s):
    """bitsandbytes nf4 / int8 on CPU, if it runs here; {m: {name: Timing}} (possibly empty) and a note."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf
    except Exception as e:  # ImportError or a broken native library
        return {}, f"bitsandbytes unavailable ({type(e).__name__})"
    out = {m: {} for m in x_by_m}
    try:
        w = (torch.randn(N, K) * 0.02).to(torch.bfloat16)
        nf4 = [bnbf.quantize_4bit(w, quant_type="nf4") for _ in range(n_copies)]
        for m, x in x_by_m.items():
            out[m]["bnb_nf4"] = harness.measure(lambda q, st, x=x: bnb.matmul_4bit(x, q.t(), quant_state=st),
                                                args_list=nf4, warmup=1, reps=3, min_time_s=0.0,
                                                max_time_s=max_time_s)
        del nf4
        lins = []
        for _ in range(n_copies):
            lin = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False)
            lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            lins.append((lin.to("cpu"),))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for m, x in x_by_m.items():
                out[m]["bnb_int8"] = harness.measure(lambda lin, x=x: lin(x), args_list=lins, warmup=1, reps=3,
                                                     min_time_s=0.0, max_time_s=max_time_s)
        return out, f"bitsandbytes {bnb.__version__}"
    except Exception as e:  # a bnb CPU path that does not work in this version: report, do not fail the bench
        return out, f"bitsandbytes failed: {type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------------------------
# CPU rows
# ----------------------------------------------------------------------------------------------------------------
def _cpu_rows(quick: bool) -> list[harness.Row]:
    _check_aten_int4_semantics()
    reps = 5 if quick else 20
    w4 = _int4_weights()
    w8 = _int8_weights()
    b4, b8 = _nbytes(*w4), _nbytes(*w8)
    c4 = harness.copies_to_exceed_cache(b4)
    c8 = harness.copies_to_exceed_cache(b8)
    cbf = harness.copies_to_exceed_cache(2 * N * K)
    int4_copies = [w4] + [_int4_weights() for _ in range(c4 - 1)]
    int8_copies = [w8] + [_int8_weights() for _ in range(c8 - 1)]
    aten4 = [_aten_int4_pack(*c) for c in int4_copies]
    aten8 = [(q, s.to(torch.bfloat16)) for q, s in int8_copies]
    dense = [(torch.randn(N, K, dtype=torch.bfloat16) * 0.02,) for _ in range(cbf)]
    ms = (1, 16, 64)
    xs = {m: torch.randn(m, K, dtype=torch.bfloat16) for m in ms}
    bnb, bnb_note = ({}, "bitsandbytes skipped in --quick (0.5 s per call)") if quick else \
        _bnb_baselines(xs, 2, max_time_s=10.0)

    rows = []
    shape = f"M{{m}}xK{K}xN{N}"
    for m in ms:
        x = xs[m]
        with nvlm_kernels.force_backend("cpu"):
            t4 = harness.measure(lambda q, s, z, x=x: nvlm_kernels.w4a16_linear(x, q, s, z, GROUP),
                                 args_list=int4_copies, reps=reps)
            t8 = harness.measure(lambda q, s, x=x: nvlm_kernels.w8a16_linear(x, q, s), args_list=int8_copies, reps=reps)
        base = {
            "aten_int4pack": harness.measure(
                lambda p, sz, x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, GROUP, sz), args_list=aten4,
                reps=reps),
            "aten_int8pack": harness.measure(lambda q, s, x=x: torch.ops.aten._weight_int8pack_mm(x, q, s),
                                             args_list=aten8, reps=reps),
            "bf16_dense": harness.measure(lambda w, x=x: x @ w.t(), args_list=dense, reps=reps),
        }
        base.update(bnb.get(m, {}))
        sh = shape.format(m=m)
        wbytes = {"aten_int4pack": b4, "aten_int8pack": b8, "bf16_dense": 2 * N * K, "bnb_nf4": N * K // 2,
                  "bnb_int8": N * K}
        for name, t in base.items():
            rows.append(harness.make_row(OP, sh, torch.bfloat16, name, t, bytes_moved=wbytes[name],
                                         limit="dram_read_gbps", note="baseline" + (f"; {bnb_note}"
                                                                                    if name.startswith("bnb") else "")))
        sel4, sel8 = (nvlm_kernels.quant_linear.select_kernel(m, bits, "cpu") for bits in (4, 8))
        isa = nvlm_kernels.backends()["cpu_isa"]
        rows.append(harness.make_row(
            OP, sh, torch.bfloat16, "cpu:w4a16_g128", t4, bytes_moved=b4, limit="dram_read_gbps",
            baselines={k: v for k, v in base.items() if k in ("aten_int4pack", "bf16_dense", "bnb_nf4")},
            note=f"{sel4}, {isa}, {c4} weight copies; {bnb_note}"))
        rows.append(harness.make_row(
            OP, sh, torch.bfloat16, "cpu:w8a16", t8, bytes_moved=b8, limit="dram_read_gbps",
            baselines={k: v for k, v in base.items() if k in ("aten_int8pack", "bf16_dense", "bnb_int8")},
            note=f"{sel8}, {isa}, {c8} weight copies"))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# GPU rows
# ----------------------------------------------------------------------------------------------------------------
def _gpu_rows(quick: bool) -> list[harness.Row]:
    dev = torch.device("cuda")
    reps = 20 if quick else 100
    w4, w8 = _int4_weights(dev), _int8_weights(dev)
    b4, b8 = _nbytes(*w4), _nbytes(*w8)
    c4 = [w4] + [_int4_weights(dev) for _ in range(harness.copies_to_exceed_cache(b4, device=dev) - 1)]
    c8 = [w8] + [_int8_weights(dev) for _ in range(harness.copies_to_exceed_cache(b8, device=dev) - 1)]
    dense = [(torch.randn(N, K, device=dev, dtype=torch.bfloat16),)
             for _ in range(harness.copies_to_exceed_cache(2 * N * K, device=dev))]
    rows = []
    for m in (1, 8):
        x = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
        sh = f"M{m}xK{K}xN{N}"
        base = {"bf16_dense": harness.measure(lambda w, x=x: x @ w.t(), args_list=dense, reps=reps)}
        rows.append(harness.make_row(OP, sh, torch.bfloat16, "bf16_dense", base["bf16_dense"], bytes_moved=2 * N * K,
                                     limit="dram_read_gbps", device=dev, note="baseline (cuBLAS)"))
        with nvlm_kernels.force_backend("cuda"):
            t4 = harness.measure(lambda q, s, z, x=x: nvlm_kernels.w4a16_linear(x, q, s, z, GROUP), args_list=c4,
                                 reps=reps)
            t8 = harness.measure(lambda q, s, x=x: nvlm_kernels.w8a16_linear(x, q, s), args_list=c8, reps=reps)
        rows.append(harness.make_row(OP, sh, torch.bfloat16, "cuda:w4a16_g128", t4, bytes_moved=b4,
                                     limit="dram_read_gbps", baselines=base, device=dev, note="gemv"))
        rows.append(harness.make_row(OP, sh, torch.bfloat16, "cuda:w8a16", t8, bytes_moved=b8,
                                     limit="dram_read_gbps", baselines=base, device=dev, note="gemv"))
    return rows


def run(quick: bool = False) -> list[harness.Row]:
    rows = _cpu_rows(quick)
    if torch.cuda.is_available() and nvlm_kernels._ext.has_kernel("w4a16_linear", "CUDA"):
        rows += _gpu_rows(quick)
    return rows


# ---- pytest-benchmark entry points (``pytest bench/bench_quant_linear.py``) ---------------------------------------
def test_quant_linear_rows(benchmark):
    """The whole table once (quick set), rows stored in the benchmark JSON."""
    rows = benchmark.pedantic(run, args=(True,), rounds=1, iterations=1)
    benchmark.extra_info["rows"] = [r.to_dict() for r in rows]
    benchmark.extra_info["machine"] = harness.machine_info()
    benchmark.extra_info["limits"] = harness.machine_limits("cpu")
    assert rows and all(r.median_ms > 0 for r in rows)


def test_w4a16_decode_gemv(benchmark):
    """The dispatched op as a decode step calls it (M=1, bf16), one weight copy of the real shape."""
    qw, s, z = _int4_weights()
    x = torch.randn(1, K, dtype=torch.bfloat16)
    out = benchmark.pedantic(lambda: nvlm_kernels.w4a16_linear(x, qw, s, z, GROUP), rounds=5, iterations=1,
                             warmup_rounds=1)
    assert out.shape == (1, N)
