"""Triton kernels for weight-only int8 / int4 linear layers (W8A16, W4A16): ``y = x @ dequant(W)^T + bias``.

Weight format (defined once in ``nvlm_kernels/packing.py``; the kernels only read it):

* int8, per output channel, symmetric: ``qweight int8 [N, K]``, ``scale [N]``; ``w[n, k] = q[n, k] * scale[n]``.
* int4, group-wise with an integer zero point: ``qweight uint8 [N, K/2]`` (low nibble = even k, high = odd k),
  ``scales [N, K/g]``, ``zeros uint8 [N, K/g]`` (0..15); ``w[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]``.

``x: [..., K]`` (fp32/fp16/bf16) -> ``y: [..., N]`` in ``x.dtype``; ``bias: [N]`` or None. All maths in fp32.

Two kernels per format, chosen by the number of activation rows ``M`` by the package's one routing rule
(``nvlm_kernels.quant_linear.select_kernel``, CUDA thresholds; :func:`select_kernel` here forwards to it):

* ``gemv`` (M <= ``GEMV_MAX_M`` = 8, decode): one program per (BLOCK_N outputs, K slice). The weight tile is
  loaded and dequantised once and reused for the up-to-8 rows of ``x`` (``BLOCK_M`` = next power of two >= M,
  unrolled). Decode is memory bound, so the grid must cover every SM several times even when N is small (k/v_proj,
  N = 1024): the K axis is split (split-K) and the slices are added with fp32 atomics into a zeroed fp32 buffer,
  then cast. Integers become floats with the ``0x4B000000`` exponent trick (an OR and an FADD instead of the
  quarter-rate I2F conversion), and for int4 the scale and zero point are factored out of each group:
  ``sum_k (q - z) s x = s (sum_k q x - z sum_k x)``, so a weight costs one FMA.
* ``gemm`` (M > 8, prefill / vision tower): tiled ``tl.dot`` on tensor cores. The weight tile is dequantised in
  registers to the activation dtype (bf16/fp16) and multiplied with fp32 accumulation; int8's per-channel scale is
  applied once to the accumulator. ``GROUP_M`` program ordering keeps weight tiles in L2 across M blocks.

Under ``TRITON_INTERPRET=1`` (tests on CPU) bf16 arithmetic and bf16 ``tl.dot`` are broken, so every load is upcast
to fp32 first and, for bf16 inputs only, the GEMM's dot runs in fp32 (``DOT_FP32``); on a GPU bf16/fp16 tiles go to
the tensor cores. No autotuning: launch configs are a small table by shape (:func:`gemv_config`,
:func:`gemm_config`), checked ahead of time for register spills with ptxas (:func:`gate_specs`).

Public: custom ops ``nvlm_kernels::w8a16_linear_triton`` and ``nvlm_kernels::w4a16_linear_triton`` (called by the
"triton" backend of ``nvlm_kernels.quant_linear``), :func:`select_kernel`, :func:`gate_specs`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from nvlm_kernels import quant_linear as _quant_linear

#: Largest M that uses the GEMV kernels (decode, batch <= 8): ``nvlm_kernels.quant_linear``'s CUDA threshold, since
#: this backend targets GPUs (the interpreter runs the same kernels on CPU tensors for tests).
GEMV_MAX_M = _quant_linear.GEMV_MAX_M["cuda"]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def select_kernel(m: int, bits: int = 4) -> str:
    """``"gemv"`` for ``m <= GEMV_MAX_M`` rows of x, else ``"gemm"``: the package's one routing rule,
    ``nvlm_kernels.quant_linear.select_kernel``, for a CUDA device."""
    return _quant_linear.select_kernel(m, bits, "cuda")


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _u22_to_f32(v):
    """Exact int32 -> fp32 for 0 <= v < 2**22: put v in the mantissa of 2**23, then subtract 2**23.

    One OR + one FADD (full rate) instead of I2F, which runs at a quarter of the FP32 rate on sm_80/sm_90 and would
    bound a W4A16 GEMV below HBM bandwidth."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,  # x [M, K], w int8 [N, K], scale [N], bias [N], out [M, N]
    M, N, K, K_PER_SPLIT,
    HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_mask = rn < N
    k_start = pid_k * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        q = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        w = _u22_to_f32(q.to(tl.int32) + 128) - 128.0                    # [BLOCK_N, BLOCK_K], exact
        for mm in tl.static_range(BLOCK_M):                              # reuse the weight tile for every row of x
            xv = tl.load(x_ptr + mm * K + rk, mask=k_mask & (mm < M), other=0.0).to(tl.float32)
            part = tl.sum(w * xv[None, :], axis=1)                       # [BLOCK_N]
            acc = tl.where(rm[:, None] == mm, acc + part[None, :], acc)
    scale = tl.load(scale_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_mask & (pid_k == 0), other=0.0).to(tl.float32)  # added by slice 0 only
        acc = acc + bias[None, :]
    out_ptrs = out_ptr + rm[:, None] * N + rn[None, :]
    out_mask = (rm[:, None] < M) & n_mask[None, :]
    if USE_ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")      # out is a zeroed fp32 buffer
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,  # qw uint8 [N, K/2]; scales, zeros [N, K/GROUP]
    M, N, K, K_PER_SPLIT,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K divides GROUP
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rb = tl.arange(0, HALF_K)
    n_mask = rn < N
    n_groups = K // GROUP
    k_start = pid_k * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        kb = k0 // 2 + rb                                                # byte index along the packed row
        kb_mask = kb < K // 2
        packed = tl.load(qw_ptr + rn[:, None] * (K // 2) + kb[None, :],
                         mask=n_mask[:, None] & kb_mask[None, :], other=0).to(tl.int32)
        q_even = _u22_to_f32(packed & 0xF)                               # [BLOCK_N, HALF_K] weights of k = 2j
        q_odd = _u22_to_f32(packed >> 4)                                 # weights of k = 2j + 1
        g = k0 // GROUP                                                  # one group per tile (BLOCK_K | GROUP)
        g_mask = n_mask & (k0 < K)
        s = tl.load(scales_ptr + rn * n_groups + g, mask=g_mask, other=0.0).to(tl.float32)
        z = _u22_to_f32(tl.load(zeros_ptr + rn * n_groups + g, mask=g_mask, other=0).to(tl.int32))
        for mm in tl.static_range(BLOCK_M):
            row_mask = kb_mask & (mm < M)
            x_even = tl.load(x_ptr + mm * K + 2 * kb, mask=row_mask, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + mm * K + 2 * kb + 1, mask=row_mask, other=0.0).to(tl.float32)
            qx = tl.sum(q_even * x_even[None, :] + q_odd * x_odd[None, :], axis=1)   # [BLOCK_N] sum_k q x
            x_sum = tl.sum(x_even + x_odd, axis=0)                                     # sum_k x (for the zero)
            part = s * (qx - z * x_sum)
            acc = tl.where(rm[:, None] == mm, acc + part[None, :], acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_mask & (pid_k == 0), other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    out_ptrs = out_ptr + rm[:, None] * N + rn[None, :]
    out_mask = (rm[:, None] < M) & n_mask[None, :]
    if USE_ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M blocks of M at a time so their shared weight tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _w8a16_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,  # x [M, K], w int8 [N, K], scale [N], bias [N], out [M, N]
    M, N, K,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)                                              # M * K passes 2**31 at ~72k prompt tokens
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        a = tl.load(x_ptr + rm64[:, None] * K + (k0 + rk)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # B[k, n] = W[n, k]: a K-major tile, the layout wgmma reads natively.
        q = tl.load(w_ptr + rn[None, :] * K + (k0 + rk)[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, q.to(a.dtype), acc)                           # int8 -> bf16/fp16 is exact
    scale = tl.load(scale_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]                                          # per-channel scale factors out of the sum
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm64[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    M, N, K,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,  # BLOCK_K | GROUP
):
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)                                              # M * K passes 2**31 at ~72k prompt tokens
    m_mask = rm < M
    n_mask = rn < N
    n_groups = K // GROUP
    shift = (rk % 2) * 4                                                # low nibble = even k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):                                     # K is a multiple of GROUP, so of BLOCK_K
        a = tl.load(x_ptr + rm64[:, None] * K + (k0 + rk)[None, :], mask=m_mask[:, None], other=0.0)
        # B[k, n] = W[n, k], K-major like the int8 kernel. Each byte is loaded for both of its k (the two loads hit
        # one cache line) and its nibble picked by a shift: unpacking with tl.interleave + tl.trans instead needed
        # layout conversions that spilled 300-1000 bytes at every tile size (ptxas, sm_90a).
        packed = tl.load(qw_ptr + rn[None, :] * (K // 2) + ((k0 + rk) // 2)[:, None], mask=n_mask[None, :], other=0)
        q = (packed.to(tl.int32) >> shift[:, None]) & 0xF                # [BLOCK_K, BLOCK_N]
        g = k0 // GROUP
        s = tl.load(scales_ptr + rn * n_groups + g, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + rn * n_groups + g, mask=n_mask, other=0).to(tl.int32)
        w = (q - z[None, :]).to(tl.float32) * s[None, :]                 # dequantised in fp32
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm64[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations (no autotune: a small table by shape, spill-checked by gate_specs()/ptxas)
# ----------------------------------------------------------------------------------------------------------------
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only shapes the grid under the interpreter


def gemv_config(m: int, n: int, k: int, bits: int, group_size: int = 128, num_sms: int = 132) -> dict:
    """Launch parameters of the GEMV kernels for ``m <= GEMV_MAX_M`` rows.

    BLOCK_N x BLOCK_K = 32 x 128 weights per step at 4 warps (32 dequantised fp32 values per thread). ptxas
    (sm_90a, bf16 x): 64 x 128 spills 56-124 bytes for BLOCK_M >= 2 (int8) and 128 x 128 spills 580 bytes even at
    BLOCK_M = 1; 32 x 128 needs 128-168 registers and no spill at every BLOCK_M, so three CTAs fit per SM. The loop
    has no tl.dot, so Triton does not software-pipeline it: num_stages = 1. K is split until the grid covers every
    SM ~4 times, keeping at least 4 K steps per program (fewer and the atomics and loop prologue dominate)."""
    block_m = triton.next_power_of_2(max(m, 1))
    block_n = 32
    # int8 at BLOCK_M = 8 with BLOCK_K = 128 spills 24 bytes on sm_80: halve the K step there.
    block_k = (128 if block_m < 8 else 64) if bits == 8 else min(128, group_size)
    n_blocks = triton.cdiv(n, block_n)
    k_steps = triton.cdiv(k, block_k)
    split = 1
    while n_blocks * split < 4 * num_sms and k_steps // (2 * split) >= 4:
        split *= 2
    k_per_split = triton.cdiv(k_steps, split) * block_k
    split = triton.cdiv(k, k_per_split)                                  # no empty slices
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, K_PER_SPLIT=k_per_split,
                num_warps=4, num_stages=1)


def gemm_config(m: int, n: int, k: int, bits: int, group_size: int = 128) -> dict:
    """Launch parameters of the tensor-core GEMM kernels for ``m > GEMV_MAX_M``.

    Pruned with ptxas -v on sm_90a and sm_80 (bf16 x, fp16 scales); every config kept compiles without spills on
    both. Rejected (spill bytes sm_90a / sm_80; first measured without the JIT's divisibility hints):
      int8 128x128x64 8 warps (0 / 292), 64x128x64 4w (496 / 1100), 64x64x64 4w (0 / 124), 16x64x128 4w (0 / 328),
      64x128x32 4w (0 / 84): the K-major int8 tile converted to bf16 needs more registers than the int4 path, so
      int8 takes BLOCK_K = 32 on large tiles;
      int4 128x128x64 4 warps (608 on sm_90a), and any tile that unpacked nibbles with tl.interleave + tl.trans
      (300-1000 bytes), replaced by a shifted load of each byte for both of its k;
      128x256x64 4 warps (~2 KB, build_notes.md).
    Re-measured by the GPU gate with the JIT's 16-divisibility hints (aligned pointers, N, K, M = 16/64/2048),
    triton 3.8, 2026-11-22, regs sm_90a / sm_80: int8 M <= 64 64x64x32 4w (64 / 96) spills 16-24 B on sm_80 at
    2-4 stages (ptxas keeps it at 96 registers), so it became 64x64x64 4w 4 stages (80 / 128 regs, no spill with
    the hints -- the 124 B above was without them -- and the same N/64 programs); 64x128x32 4w (119 / 157) and
    64x64x32 8w (42 / 76) are clean too. int8 128x128x32 8w (106 / 160), int4 64x128x64 4w (190 / 255) and 128x128x64 8w
    (128 / 203): no spill.
    No 16-row tile: below 64 rows Triton emits mma.sync instead of wgmma on sm_90a, so M = 9..64 share the 64-row
    tile (wgmma's minimum). 128x128 tiles at 8 warps hold 64 fp32 accumulators per thread."""
    if bits == 8:
        if m <= 64:
            cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    else:
        if m <= 64:
            cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)                 # one (scale, zero) per row per tile
    cfg["GROUP_M"] = 8
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _check(op: str, x, tensors: dict, bias, n: int):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"nvlm_kernels.{op}: argument 'x' must be a float32/float16/bfloat16 tensor [..., K], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    for name, t in {**tensors, **({"bias": bias} if bias is not None else {})}.items():
        if t.device != x.device:
            raise ValueError(f"nvlm_kernels.{op}: argument '{name}' is on {t.device}, 'x' on {x.device}")
    if bias is not None and (bias.shape != (n,) or bias.dtype not in _FLOAT_DTYPES):
        raise ValueError(f"nvlm_kernels.{op}: argument 'bias' must be a float tensor of shape ({n},), "
                         f"got {bias.dtype} {tuple(bias.shape)}")


def _dot_fp32(x: torch.Tensor) -> bool:
    # fp32 activations use an exact fp32 dot; bf16 ones too under the interpreter, whose bf16 tl.dot is broken.
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _store_dtype(x: torch.Tensor) -> torch.dtype:
    # The interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest even): write fp32 and let
    # PyTorch round, so CPU results are the ones a GPU gives.
    if x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return torch.float32
    return x.dtype


def _launch(x, gemv_kernel, gemm_kernel, weights: tuple, n: int, k: int, bias, bits: int, group_size: int):
    x2 = x.reshape(-1, k).contiguous()                                   # [M, K]
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return x.new_empty(out_shape)
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else x2                     # never read when HAS_BIAS is False
    extra = dict(GROUP=group_size) if bits == 4 else {}
    if select_kernel(m, bits) == "gemv":
        cfg = gemv_config(m, n, k, bits, group_size, _num_sms(x.device))
        use_atomic = cfg["SPLIT_K"] > 1
        out = (torch.zeros if use_atomic else torch.empty)((m, n), device=x.device,
                                                           dtype=torch.float32 if use_atomic else _store_dtype(x))
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        gemv_kernel[grid](x2, *weights, bias_arg, out, m, n, k, cfg["K_PER_SPLIT"], **extra, HAS_BIAS=has_bias,
                          USE_ATOMIC=use_atomic, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return out.to(x.dtype).reshape(out_shape)
    cfg = gemm_config(m, n, k, bits, group_size)
    out = torch.empty((m, n), device=x.device, dtype=_store_dtype(x))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    gemm_kernel[grid](x2, *weights, bias_arg, out, m, n, k, **extra, HAS_BIAS=has_bias, DOT_FP32=_dot_fp32(x),
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.to(x.dtype).reshape(out_shape)


@torch.library.custom_op("nvlm_kernels::w8a16_linear_triton", mutates_args=())
def w8a16_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ (qweight int8 [N, K] * scale[N, None])^T + bias`` with the Triton GEMV/GEMM kernels."""
    op = "w8a16_linear_triton"
    if qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise ValueError(f"nvlm_kernels.{op}: argument 'qweight' must be int8 [N, K], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, k = qweight.shape
    _check(op, x, {"qweight": qweight, "scale": scale}, bias, n)
    if x.shape[-1] != k:
        raise ValueError(f"nvlm_kernels.{op}: argument 'x' has K={x.shape[-1]}, 'qweight' has K={k}")
    if scale.shape != (n,) or scale.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"nvlm_kernels.{op}: argument 'scale' must be a float tensor of shape ({n},), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    return _launch(x, _w8a16_gemv_kernel, _w8a16_gemm_kernel, (qweight.contiguous(), scale.contiguous()), n, k,
                   bias, 8, 0)


@w8a16_linear_triton.register_fake
def _w8a16_linear_triton_fake(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("nvlm_kernels::w4a16_linear_triton", mutates_args=())
def w4a16_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ dequant_int4(qweight uint8 [N, K/2], scales, zeros [N, K/g])^T + bias`` (Triton)."""
    op = "w4a16_linear_triton"
    if qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise ValueError(f"nvlm_kernels.{op}: argument 'qweight' must be uint8 [N, K/2], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if group_size not in (32, 64, 128) or k % group_size:
        raise ValueError(f"nvlm_kernels.{op}: argument 'group_size' must be 32, 64 or 128 and divide K={k}, "
                         f"got {group_size}")
    _check(op, x, {"qweight": qweight, "scales": scales, "zeros": zeros}, bias, n)
    if x.shape[-1] != k:
        raise ValueError(f"nvlm_kernels.{op}: argument 'x' has K={x.shape[-1]}, 'qweight' packs K={k}")
    groups = (n, k // group_size)
    if scales.shape != groups or scales.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"nvlm_kernels.{op}: argument 'scales' must be a float tensor of shape {groups}, got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    if zeros.shape != groups or zeros.dtype != torch.uint8:
        raise ValueError(f"nvlm_kernels.{op}: argument 'zeros' must be uint8 of shape {groups}, got {zeros.dtype} "
                         f"{tuple(zeros.shape)}")
    return _launch(x, _w4a16_gemv_kernel, _w4a16_gemm_kernel,
                   (qweight.contiguous(), scales.contiguous(), zeros.contiguous()), n, k, bias, 4, group_size)


@w4a16_linear_triton.register_fake
def _w4a16_linear_triton_fake(x, qweight, scales, zeros, group_size, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time specs for the GPU gate (compile with triton.compile(ASTSource(...)) and check ptxas -v)
# ----------------------------------------------------------------------------------------------------------------
#: NVLM-D-72B decoder Linear shapes (K -> N): q/o_proj, k/v_proj, gate/up_proj, down_proj.
DECODER_SHAPES = ((8192, 8192), (8192, 1024), (8192, 29568), (29568, 8192))
DECODE_MS = (1, 2, 3, 4, 5, 6, 7, 8)
BATCHED_DECODE_MS = (16, 64)  # the two smaller GEMM tiles (batched decode, short prompts)
PREFILL_M = 2048


def gate_specs(group_size: int = 128, dtype: str = "bf16") -> list[dict]:
    """One dict per (kernel, launch config) this package launches at the NVLM-D-72B decoder shapes, decode M = 1..8
    and prefill M = 2048, with bf16 activations: ``name, fn, signature, constexprs, num_warps, num_stages,
    hot_path, tensor_cores, shape, divisible_by_16``; batched decode M = 16 and 64 too (the smaller GEMM tiles).
    Configs that coincide (e.g. M = 5..8 share BLOCK_M = 8) are listed once, with every shape that uses them.

    ``divisible_by_16`` mirrors Triton's JIT specialisation at these launches: every pointer (``x.reshape(-1, K)
    .contiguous()`` of a contiguous activation, fresh outputs, the packed weight/scale/zero buffers; the unused
    bias argument is x itself), N and K (1024, 8192, 29568 are multiples of 16), K_PER_SPLIT (a multiple of
    BLOCK_K), and M where M % 16 == 0 (M = 16, 64, 2048; M = 2..8 get no hint, so they are separate specs from any
    M % 16 == 0 launch of the same config). M = 1 is passed as the constexpr 1, as the JIT does for an int equal to
    1."""
    act = f"*{dtype}"
    specs: dict[tuple, dict] = {}
    for bits, gemv, gemm in ((8, _w8a16_gemv_kernel, _w8a16_gemm_kernel), (4, _w4a16_gemv_kernel,
                                                                          _w4a16_gemm_kernel)):
        weights = {"w_ptr": "*i8", "scale_ptr": "*fp16"} if bits == 8 else {
            "qw_ptr": "*u8", "scales_ptr": "*fp16", "zeros_ptr": "*u8"}
        for k, n in DECODER_SHAPES:
            for m in (*DECODE_MS, *BATCHED_DECODE_MS, PREFILL_M):
                kind = select_kernel(m, bits)
                if kind == "gemv":
                    cfg = gemv_config(m, n, k, bits, group_size)
                    use_atomic = cfg["SPLIT_K"] > 1
                    sig = {"x_ptr": act, **weights, "bias_ptr": act, "out_ptr": "*fp32" if use_atomic else act,
                           "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32"}
                    const = dict(HAS_BIAS=False, USE_ATOMIC=use_atomic, BLOCK_M=cfg["BLOCK_M"],
                                 BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
                    fn, tc = gemv, False
                else:
                    cfg = gemm_config(m, n, k, bits, group_size)
                    sig = {"x_ptr": act, **weights, "bias_ptr": act, "out_ptr": act, "M": "i32", "N": "i32",
                           "K": "i32"}
                    const = dict(HAS_BIAS=False, DOT_FP32=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                 BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"])
                    fn, tc = gemm, True
                if bits == 4:
                    const = {"GROUP": group_size, **const}
                div = [a for a in sig if sig[a].startswith("*") or a in ("N", "K", "K_PER_SPLIT")]
                if m == 1:  # the JIT passes an int equal to 1 as a constexpr
                    sig = {a: t for a, t in sig.items() if a != "M"}
                    const = {"M": 1, **const}
                elif m % 16 == 0:
                    div.append("M")
                key = (fn.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(const.items())), cfg["num_warps"],
                       cfg["num_stages"], tuple(div))
                shape = f"M={m} K={k} N={n}"
                if key in specs:
                    specs[key]["shape"] += f", {shape}"
                    continue
                tag = "_".join(f"{c}{v}" for c, v in const.items() if c.startswith(("BLOCK", "USE", "GROUP")))
                tag += "_M1" if m == 1 else ("_M16x" if m % 16 == 0 else "")
                specs[key] = dict(name=f"w{bits}a16_{kind}_{tag}_w{cfg['num_warps']}s{cfg['num_stages']}",
                                  fn=fn, signature=sig, constexprs=const, num_warps=cfg["num_warps"],
                                  num_stages=cfg["num_stages"], hot_path=True, tensor_cores=tc, shape=shape,
                                  divisible_by_16=div)
    return list(specs.values())
