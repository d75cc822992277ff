"""Benchmark: tiled ViT attention (``nvlm_kernels.tiled_attention``) at the real InternViT shape.

Shape: T=7 tiles (6 + thumbnail), H=25 real heads, N=1025 tokens, D=128 (plus D=64). q/k/v are the strided slices
of one fused qkv projection ``[T, N, 3, H, D]``, exactly what the model passes. FLOPs = 4*T*H*N^2*D (QK^T and PV).

GPU rows (when a GPU is present), bf16: the Triton kernel, torch SDPA (default backend choice) and flash-attn
(``flash_attn_func``, if installed), each with TFLOP/s and % of the measured bf16 matmul peak, and the Triton row's
speed-up over each baseline from the same run. Plus the fused QK RMSNorm path (stats kernel + attention with the
norm folded in) against what the model would do without it: the reference RMSNorm (fp32, InternVL convention) on q
and k, then SDPA.

CPU row: the SDPA reference at the real shape (bf16; one timed repetition in quick mode: a call takes seconds on the
2-core development machine), so the CPU table carries the op.
"""

from __future__ import annotations

import importlib.util

import torch

import nvlm_kernels
from bench import harness
from bench.shapes import MAX_TILES, VIT_HEAD_DIM, VIT_HEADS, VIT_TOKENS
from nvlm_kernels.tiled_attention import tiled_attention_ref

OP = "tiled_attention"


def _flops(t, h, n, d) -> float:
    return 4.0 * t * h * n * n * d


def _qkv(t, h, n, d, dtype, device):
    """q, k, v: strided ``[T, H, N, D]`` views of one ``[T, N, 3, H, D]`` projection output (the model's layout)."""
    qkv = torch.randn(t, n, 3, h, d, device=device, dtype=torch.float32).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return qkv, q, k, v


def _triton(q, k, v, **kw):
    with nvlm_kernels.force_backend("triton"):
        return nvlm_kernels.tiled_attention(q, k, v, **kw)


def _triton_qknorm(q, k, v, wq, wk):
    return _triton(q, k, v, q_norm_weight=wq, k_norm_weight=wk, norm_eps=1e-6)


def _gpu_rows(quick: bool) -> list[harness.Row]:
    rows = []
    dev = torch.device("cuda")
    reps = 10 if quick else 50
    flash = None
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_func as flash
    t, h, n = MAX_TILES, VIT_HEADS, VIT_TOKENS
    for d in (VIT_HEAD_DIM, 64):
        qkv, q, k, v = _qkv(t, h, n, d, torch.bfloat16, dev)
        shape = f"T{t}xH{h}xN{n}xD{d}"
        flops = _flops(t, h, n, d)
        baselines = {"sdpa": harness.measure(tiled_attention_ref, args_list=[(q, k, v)], reps=reps)}
        if flash is not None:
            q_tn, k_tn, v_tn = qkv.unbind(2)          # [T, N, H, D] views: flash-attn's layout
            baselines["flash_attn"] = harness.measure(flash, args_list=[(q_tn, k_tn, v_tn)], reps=reps)
        for name, timing in baselines.items():
            rows.append(harness.make_row(OP, shape, torch.bfloat16, name, timing, flops=flops, limit="matmul_tflops",
                                         device=dev, note="baseline"))
        timing = harness.measure(_triton, args_list=[(q, k, v)], reps=reps)
        rows.append(harness.make_row(OP, shape, torch.bfloat16, "triton", timing, flops=flops, limit="matmul_tflops",
                                     baselines=baselines, device=dev, note="strided q/k/v from fused qkv"))
        if d == VIT_HEAD_DIM:
            wq = torch.rand(h * d, device=dev).to(torch.bfloat16) + 0.5
            wk = torch.rand(h * d, device=dev).to(torch.bfloat16) + 0.5
            args = [(q, k, v, None, wq, wk, 1e-6)]
            base = {"ref_norm+sdpa": harness.measure(tiled_attention_ref, args_list=args, reps=reps)}
            timing = harness.measure(_triton_qknorm, args_list=[(q, k, v, wq, wk)], reps=reps)
            rows.append(harness.make_row(OP + "+qk_rmsnorm", shape, torch.bfloat16, "triton", timing, flops=flops,
                                         limit="matmul_tflops", baselines=base, device=dev,
                                         note="stats kernel + norm folded into attention"))
    return rows


def _cpu_rows(quick: bool) -> list[harness.Row]:
    t, h, n, d = MAX_TILES, VIT_HEADS, VIT_TOKENS, VIT_HEAD_DIM
    _, q, k, v = _qkv(t, h, n, d, torch.bfloat16, "cpu")
    if quick:
        timing = harness.measure(lambda: tiled_attention_ref(q, k, v), warmup=0, reps=1, min_time_s=0.0)
    else:
        timing = harness.measure(lambda: tiled_attention_ref(q, k, v), warmup=1, reps=3, min_time_s=0.0)
    return [harness.make_row(OP, f"T{t}xH{h}xN{n}xD{d}", torch.bfloat16, "ref", timing, flops=_flops(t, h, n, d),
                             limit="matmul_tflops", device="cpu",
                             note="torch SDPA (CPU path); " + ("1 rep" if quick else f"{timing.n} reps"))]


def run(quick: bool = False) -> list[harness.Row]:
    rows = _cpu_rows(quick)
    if torch.cuda.is_available():
        rows += _gpu_rows(quick)
    return rows


# ---- pytest-benchmark entry points (``pytest bench/bench_tiled_attention.py``) ------------------------------------
def test_tiled_attention_rows(benchmark):
    """The whole table once (quick set), rows stored in the benchmark JSON."""
    rows = benchmark.pedantic(run, args=(True,), rounds=1, iterations=1)
    benchmark.extra_info["rows"] = [r.to_dict() for r in rows]
    benchmark.extra_info["machine"] = harness.machine_info()
    assert rows and all(r.median_ms > 0 for r in rows)


def test_tiled_attention_default_backend(benchmark):
    """The dispatched op as the model calls it: real shape on a GPU, one tile on CPU."""
    if torch.cuda.is_available():
        _, q, k, v = _qkv(MAX_TILES, VIT_HEADS, VIT_TOKENS, VIT_HEAD_DIM, torch.bfloat16, "cuda")

        def fn():
            out = nvlm_kernels.tiled_attention(q, k, v)
            torch.cuda.synchronize()
            return out
    else:
        _, q, k, v = _qkv(1, VIT_HEADS, VIT_TOKENS, VIT_HEAD_DIM, torch.bfloat16, "cpu")

        def fn():
            return nvlm_kernels.tiled_attention(q, k, v)
    out = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == q.shape
