"""Bidirectional attention batched over all ViT tiles of all images in one launch (InternViT self-attention).

Maths. ``q, k, v: [T, H, N, D]`` (T tiles, H heads, N tokens per tile = 1025 in NVLM-D-72B, D in {64, 80, 96, 128})
-> ``out: [T, H, N, D]``, per tile and head ``out = softmax(q k^T * scale) v``, no mask, ``scale = D**-0.5`` unless
given.

Variable-length tiles (``cu_tiles``; flash-attn's varlen / ``cu_seqlens`` idea): tiles of different sizes (images at
different resolutions) go through one launch without padding. q, k, v are then ``[1, H, S, D]``, the tiles packed
along the token axis, and ``cu_tiles: [n_tiles + 1]`` int32/int64 (same device) holds cumulative offsets
``0 = cu[0] <= cu[1] <= ... <= cu[n_tiles] = S`` (empty tiles allowed). Token i in ``[cu[t], cu[t+1])`` attends
exactly to the tokens of tile t (block-diagonal attention); output ``[1, H, S, D]``. The dense call is the special
case ``cu_tiles = [0, N, 2N, ..., T*N]`` of the same tokens packed as ``[1, H, T*N, D]``. The contents of
``cu_tiles`` are checked on the host (one device sync per call), which also yields the longest tile for the grid.

Optional fused QK RMSNorm (InternViT ``q_norm``/``k_norm``, spec §3): with ``q_norm_weight, k_norm_weight: [H*D]``
the attention uses ``qn = RMSNorm(q)``, ``kn = RMSNorm(k)`` where the statistic of token (t, n) is taken over the
``H*D`` channels of ALL heads (3200 in 72B: pass the 25 real heads, not the 7 zero dummy heads)::

    rstd[t, n] = rsqrt(mean_{h, d} x[t, h, n, d]^2 + eps)          (fp32)
    xn[t, h, n, d] = (x * rstd).to(x.dtype) * w[h*D + d]          (InternVL InternRMSNorm convention)

Triton kernel (``triton`` backend, CUDA tensors; CPU tensors only when forced under ``TRITON_INTERPRET=1``):
flash-attention forward. Grid ``(cdiv(N, BLOCK_M), T*H)``: one program owns BLOCK_M query rows of one (tile, head)
and streams K/V in BLOCK_N blocks with an online softmax (running max ``m``, running sum ``l``, fp32 accumulator),
so no N x N matrix ever reaches memory. ``exp2`` with ``scale*log2(e)`` folded into one multiply. The full K/V
blocks run without a token mask; only the last partial block (N = 1025 = 8*128 + 1) is masked. Head dims 80 and 96
are padded to ``BLOCK_D`` = 128 inside the kernel with masked loads/stores (no host copies). q/k/v may be any
``[T, H, N, D]`` view with a unit stride on D -- e.g. the slices of the fused qkv projection
``qkv.view(T, N, 3, H, D).permute(2, 0, 3, 1, 4)`` -- so the model never copies them. The output is allocated
token-major (memory ``[T, N, H, D]``, returned as the ``[T, H, N, D]`` view, as SDPA's flash backend does), so
``out.transpose(1, 2).reshape(T, N, H*D)`` for the output projection is a free view.

Varlen kernel (``_attn_fwd_varlen_kernel``, ``cu_tiles`` given): the same online-softmax loop (it calls the same
``_attn_step``, so the dense kernel's source and compiled code are untouched) over the grid
``(cdiv(max_len, BLOCK_M), n_tiles*H)``, ``max_len`` = longest tile (from the host check). Each program loads its
tile's ``[start, end)`` from ``cu_tiles``, offsets the q/k/v/out (and rstd) pointers to ``start`` and runs the dense
loop with ``N = end - start``; programs whose q block starts past the end of a short (or empty) tile exit at once.
The fused QK-norm needs nothing new: its statistic is per token, so the stats kernel runs on the packed ``[1, H, S]``
tokens unchanged.

Fused QK RMSNorm, and whether it pays. The RMS statistic spans all heads of a token, so a per-(tile, head) attention
program cannot compute it; a tiny prologue kernel (``_qk_rms_stats_kernel``) reads q and k once and writes only
``rstd_q, rstd_k: [T, N]`` fp32. The norm then costs nothing inside the attention loop, because it factors out of
the dot product::

    qn[m] . kn[n] = rstd_k[n] * sum_d (q[m, d] * rstd_q[m] * wq[d] * wk[d]) * k[n, d]

so each program scales its q block once (``q' = q * rstd_q * wq * wk``, rounded once to the input dtype) and
multiplies each QK^T tile by the column vector ``rstd_k * scale * log2(e)`` instead of the scalar -- the same
number of multiplies as the unnormalised kernel; K and V tiles are used raw. (Rounding differs from the reference's
four roundings -- one rounding of q' instead -- and stays inside the test tolerance.)
Bytes per ViT block at the real shape (T=7, N=1025, H*D=3200, bf16; one of q/k = 45.9 MB):

* eager InternRMSNorm x2 (``float()``, ``pow``, ``mean``, ``mul``, ``to``, ``mul w``: ~36 B/element) = ~1.65 GB,
  then attention reads qn, kn;
* best separate one-pass prologue (read q, k, write normalised head-major qn, kn) = 184 MB, then attention reads
  qn, kn = 92 MB more: 275 MB;
* this fusion: stats read q, k = 92 MB, attention reads raw q, k = 92 MB: 184 MB.

So the fusion saves 92 MB per block over the best unfused kernel (~27 us at 3.35 TB/s; 4.1 GB = ~1.2 ms per 45-block
ViT forward of 7 tiles) and ~1.5 GB per block over eager PyTorch; against ~0.24 ms of attention maths per block at
~400 TFLOP/s that is ~10 % over a good prologue and several x over eager. GPU timing: not measured yet (no GPU in
the session that wrote this; bench/bench_tiled_attention.py measures it).

Call from the model (nvlm/vision.py), raw projection, no separate norm modules::

    qkv = attn.qkv(h).view(T, N, 3, H, D)                  # [T, N, 3, H, D], H = real heads (25)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)         # each [T, H, N, D], strided views, no copy
    o = nvlm_kernels.tiled_attention(q, k, v, softmax_scale=D ** -0.5,
                                     q_norm_weight=attn.q_norm.weight[:H * D], k_norm_weight=attn.k_norm.weight[:H * D],
                                     norm_eps=1e-6)         # [T, H, N, D]
    h = attn.proj(o.transpose(1, 2).reshape(T, N, H * D))

Backends: ``triton`` (above; chosen for fp16/bf16 CUDA tensors) and ``ref`` (``F.scaled_dot_product_attention``
after the reference RMSNorm; the CPU path, and fp32 CUDA tensors unless triton is forced: Triton's IEEE fp32 dots
spill, see ``_CONFIGS_FP32``). Launch configurations: an explicit, ptxas-pruned candidate list per (arch, head dim,
norm) that ``triton.autotune`` chooses from on the first call per N (``_CONFIGS_16BIT``); ``gate_specs()`` lists
every kernel + config the package can launch at the real shape, for the GPU gate.
"""

import torch
import torch.nn.functional as F

from nvlm_kernels import dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path still works without triton
    triton = None

_HEAD_DIMS = (64, 80, 96, 128)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------
def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"nvlm_kernels.tiled_attention: argument '{name}' must be [T, H, N, D], got {shape}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"nvlm_kernels.tiled_attention: argument '{name}' must be float32/float16/bfloat16, "
                             f"got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"nvlm_kernels.tiled_attention: q, k, v must have one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("nvlm_kernels.tiled_attention: q, k, v must share dtype and device")
    if q.numel() == 0:
        raise ValueError(f"nvlm_kernels.tiled_attention: q, k, v must be non-empty, got shape {tuple(q.shape)}")


def _check_cu_tiles(q, cu_tiles) -> int:
    """Validate ``cu_tiles`` against ``q: [1, H, S, D]``; returns the longest tile's length (one host sync)."""
    def bad(why):
        return ValueError(f"nvlm_kernels.tiled_attention: argument 'cu_tiles' {why}")

    if not isinstance(cu_tiles, torch.Tensor):
        raise bad(f"must be a tensor, got {type(cu_tiles).__name__}")
    if cu_tiles.dtype not in (torch.int32, torch.int64):
        raise bad(f"must be int32 or int64, got {cu_tiles.dtype}")
    if cu_tiles.dim() != 1 or cu_tiles.numel() < 2:
        raise bad(f"must be 1-D [n_tiles + 1] with n_tiles >= 1, got shape {tuple(cu_tiles.shape)}")
    if cu_tiles.device != q.device:
        raise bad(f"is on {cu_tiles.device}, 'q' on {q.device}")
    if q.shape[0] != 1:
        raise bad(f"needs the tiles packed along the token axis, q/k/v [1, H, S, D]; got T={q.shape[0]} "
                  f"(shape {tuple(q.shape)})")
    cu = cu_tiles.tolist()                                   # the one host sync per call
    s = q.shape[2]
    if cu[0] != 0:
        raise bad(f"must start at 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if min(lengths) < 0:
        raise bad(f"must be non-decreasing, got a decrease at index {lengths.index(min(lengths)) + 1}")
    if cu[-1] != s:
        raise bad(f"must end at S = q.shape[2] = {s}, got {cu[-1]}")
    return max(lengths)


def _check_norm(q, q_norm_weight, k_norm_weight, norm_eps):
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("nvlm_kernels.tiled_attention: give both 'q_norm_weight' and 'k_norm_weight' or neither")
    if q_norm_weight is None:
        return
    width = q.shape[1] * q.shape[3]
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (width,):
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"nvlm_kernels.tiled_attention: argument '{name}' must have shape (H*D,) = ({width},), "
                             f"got {shape}")
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"nvlm_kernels.tiled_attention: argument '{name}' must be a float tensor, got {w.dtype}")
        if w.device != q.device:
            raise ValueError(f"nvlm_kernels.tiled_attention: argument '{name}' is on {w.device}, 'q' on {q.device}")
    if not (isinstance(norm_eps, (int, float)) and norm_eps >= 0):
        raise ValueError(f"nvlm_kernels.tiled_attention: argument 'norm_eps' must be a float >= 0, got {norm_eps!r}")


def _check_triton_head_dim(q):
    if q.shape[-1] not in _HEAD_DIMS:
        raise ValueError(f"nvlm_kernels.tiled_attention: the triton kernel supports head dim D in {_HEAD_DIMS}, "
                         f"got D={q.shape[-1]} (argument 'q')")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _attn_step(acc, m_i, l_i, q, k_base, v_base, rstd_k_base, stride_kn, stride_vn, start_n, N, qk_scale,
                   offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   MASK_N: tl.constexpr, NORM: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One K/V block of the online softmax. ``MASK_N``: the block crosses N (only the last one)."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]          # [BLOCK_N, BLOCK_D]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASK_N:
            kv_mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            kv_mask = offs_d[None, :] < HEAD_DIM
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)             # [BLOCK_M, BLOCK_N] fp32
        if NORM:
            # kn = k * rstd_k (the weight wk is folded into q): scale the columns; log2 domain as below.
            if MASK_N:
                rk = tl.load(rstd_k_base + offs_n, mask=offs_n < N, other=0.0)
            else:
                rk = tl.load(rstd_k_base + offs_n)
            qk = qk * (rk * qk_scale)[None, :]
            if MASK_N:
                qk = tl.where((offs_n < N)[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
        else:
            if MASK_N:
                qk = tl.where((offs_n < N)[None, :], qk, float("-inf"))
            # scale (> 0) commutes with max: one FMA per element, qk * scale*log2e - m.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)                                       # 0 on the first block (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASK_N or BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)     # [BLOCK_M, BLOCK_D] fp32
        return acc, m_new, l_i

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, Out, RSTD_Q, RSTD_K, WQ, WK,
                         stride_qt, stride_qh, stride_qn,
                         stride_kt, stride_kh, stride_kn,
                         stride_vt, stride_vh, stride_vn,
                         stride_ot, stride_oh, stride_on,
                         H, N, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, NORM: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Flash-attention forward. Grid ``(cdiv(N, BLOCK_M), T*H)``; unit stride on D assumed (launcher ensures).

        ``qk_scale`` = softmax scale * log2(e). ``NORM``: fused QK RMSNorm with ``RSTD_Q/RSTD_K: [T, N]`` fp32 from
        ``_qk_rms_stats_kernel`` and weights ``WQ/WK: [H*D]`` (unused, any pointer, when not NORM).
        """
        pid_m = tl.program_id(0)
        pid_th = tl.program_id(1)
        t = pid_th // H
        h = pid_th % H
        # 64-bit tile/head offsets: T*stride_t may pass 2^31 for long inputs; in-tile offsets stay 32-bit.
        q_base = Q + t.to(tl.int64) * stride_qt + h.to(tl.int64) * stride_qh
        k_base = K + t.to(tl.int64) * stride_kt + h.to(tl.int64) * stride_kh
        v_base = V + t.to(tl.int64) * stride_vt + h.to(tl.int64) * stride_vh
        o_base = Out + t.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
        rstd_k_base = RSTD_K + t.to(tl.int64) * N

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
        if NORM:
            # q' = q * rstd_q * wq * wk (wk folded in: see module docstring), rounded once to the input dtype.
            rq = tl.load(RSTD_Q + t.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
            w_offs = h * HEAD_DIM + offs_d
            wq = tl.load(WQ + w_offs, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
            wk = tl.load(WK + w_offs, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
            q = (q.to(tl.float32) * rq[:, None] * (wq * wk)[None, :]).to(Q.dtype.element_ty)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        n_full = (N // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, k_base, v_base, rstd_k_base, stride_kn, stride_vn,
                                       start_n, N, qk_scale, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
                                       False, NORM, DOT_PRECISION)
        if n_full < N:
            acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, k_base, v_base, rstd_k_base, stride_kn, stride_vn,
                                       n_full, N, qk_scale, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
                                       True, NORM, DOT_PRECISION)
        acc = acc / l_i[:, None]
        tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _attn_fwd_varlen_kernel(Q, K, V, Out, CU_TILES, RSTD_Q, RSTD_K, WQ, WK,
                                stride_qh, stride_qn, stride_kh, stride_kn,
                                stride_vh, stride_vn, stride_oh, stride_on,
                                H, MAX_LEN_P2, qk_scale,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, NORM: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Flash-attention forward over packed variable-length tiles: q/k/v/out ``[1, H, S, D]`` (the T=1 axis is
        not addressed), ``CU_TILES: [n_tiles + 1]`` int32 token offsets, ``RSTD_Q/RSTD_K: [S]`` fp32 when NORM.

        Grid ``(cdiv(max_len, BLOCK_M), n_tiles*H)``. ``MAX_LEN_P2`` (next power of two of the longest tile) is
        unused here: it is the autotuner's key, so the choice of config follows the tile size, as N does for dense.
        """
        pid_m = tl.program_id(0)
        pid_th = tl.program_id(1)
        t = pid_th // H
        h = pid_th % H
        tile_start = tl.load(CU_TILES + t)
        n = tl.load(CU_TILES + t + 1) - tile_start                              # this tile's length, may be 0
        start = tile_start.to(tl.int64)
        if pid_m * BLOCK_M >= n:
            return                                                              # q block past a short tile's end
        # 64-bit tile start/head offsets (S*stride_n may pass 2^31); in-tile offsets stay 32-bit.
        q_base = Q + h.to(tl.int64) * stride_qh + start * stride_qn
        k_base = K + h.to(tl.int64) * stride_kh + start * stride_kn
        v_base = V + h.to(tl.int64) * stride_vh + start * stride_vn
        rstd_k_base = RSTD_K + start

        # From here on the dense kernel's body with N = n.
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (offs_m[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
        if NORM:
            rq = tl.load(RSTD_Q + start + offs_m, mask=offs_m < n, other=0.0)
            w_offs = h * HEAD_DIM + offs_d
            wq = tl.load(WQ + w_offs, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
            wk = tl.load(WK + w_offs, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
            q = (q.to(tl.float32) * rq[:, None] * (wq * wk)[None, :]).to(Q.dtype.element_ty)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        n_full = (n // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, k_base, v_base, rstd_k_base, stride_kn, stride_vn,
                                       start_n, n, qk_scale, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
                                       False, NORM, DOT_PRECISION)
        if n_full < n:
            acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, k_base, v_base, rstd_k_base, stride_kn, stride_vn,
                                       n_full, n, qk_scale, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
                                       True, NORM, DOT_PRECISION)
        acc = acc / l_i[:, None]
        # The output base is formed only now, from the tile start read again: keeping it live through the loop
        # made the fused-norm (128, 64, 8, 4) config spill on sm_90a (GPU gate).
        o_base = Out + h.to(tl.int64) * stride_oh + tl.load(CU_TILES + t).to(tl.int64) * stride_on
        tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _qk_rms_stats_kernel(Q, K, RSTD_Q, RSTD_K,
                             stride_qt, stride_qh, stride_qn,
                             stride_kt, stride_kh, stride_kn,
                             H, N, inv_width, eps,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
        """``rstd[t, n] = rsqrt(mean over all heads and channels of x^2 + eps)`` for q and k in one pass.

        Grid ``(cdiv(N, BLOCK_T), T)``; writes ``RSTD_Q, RSTD_K: [T, N]`` fp32 (contiguous).
        """
        pid_n = tl.program_id(0)
        t = tl.program_id(1).to(tl.int64)
        offs_n = pid_n * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
        q_ptrs = Q + t * stride_qt + offs_n[:, None] * stride_qn + offs_d[None, :]      # [BLOCK_T, BLOCK_D]
        k_ptrs = K + t * stride_kt + offs_n[:, None] * stride_kn + offs_d[None, :]
        ssq_q = tl.zeros([BLOCK_T], dtype=tl.float32)
        ssq_k = tl.zeros([BLOCK_T], dtype=tl.float32)
        for h in range(0, H):
            xq = tl.load(q_ptrs + h * stride_qh, mask=mask, other=0.0).to(tl.float32)
            xk = tl.load(k_ptrs + h * stride_kh, mask=mask, other=0.0).to(tl.float32)
            ssq_q += tl.sum(xq * xq, 1)
            ssq_k += tl.sum(xk * xk, 1)
        rq = 1.0 / tl.sqrt(ssq_q * inv_width + eps)
        rk = 1.0 / tl.sqrt(ssq_k * inv_width + eps)
        tl.store(RSTD_Q + t * N + offs_n, rq, mask=offs_n < N)
        tl.store(RSTD_K + t * N + offs_n, rk, mask=offs_n < N)


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages, also_with_norm) candidates per compute capability major and head dim,
# for 16-bit inputs; also_with_norm=False: that config spills only with the fused QK-norm (q' = q*rstd*wq*wk keeps
# extra fp32 values live), so the NORM variant does not try it. The GPU gate (``python -m nvlm_kernels.gpu_gate``,
# or ``python -m nvlm_kernels.tiled_attention`` for this module alone) compiles every D=128 candidate for sm_90a and
# sm_80 with the JIT's 16-divisibility hints and reads ptxas -v: kept = no spills, shared memory within the block
# limit (sm_90: 227 KiB, sm_80: 163 KiB), both dots on wgmma (sm_90a) / mma.sync (sm_80).
# D=128 (NVLM-D-72B), ptxas -v of triton 3.8, bf16, with hints (2026-11-22):
#   sm_90a kept:  (128, 64, 8, 3|4) 178-182 regs, with norm 252; (128, 128, 8, 3) 254 regs, 224 KiB smem;
#                 (64, 64, 4, 3) 178 regs.
#   sm_90a removed: (128, 64, 4, 3) 204 B spill (one warpgroup holds the 128x128 fp32 accumulator), with norm
#                 608 B + wgmma serialised; (64, 128, 4, 3) 32 B, with norm 176 B; (128, 128, 8, 2) no spill but
#                 redundant with stages=3, with norm 128 B.  With norm only: (128, 128, 8, 3) 124 B, (64, 64, 4, 3) 8 B.
#   sm_80 kept:   (128, 32, 8, 2|3) 254-255 regs (also with norm); (128, 64, 8, 2|3), (64, 64, 8, 3) 255 regs.
#   sm_80 removed: every 4-warp config: (128, 64, 4, 2) 820 B, (64, 64, 4, 3) 240 B, (64, 32, 4, 2|3) 48 B (with norm
#                 640-1000 B); (128, 128, 8, 2) 44 B.  With norm only: (128, 64, 8, 2|3) 32-80 B, (64, 64, 8, 3) 384 B.
#   (Without the hints -- what the gate compiled before it passed them -- (128, 32|64, 8, *) and (64, 64, 8, 3)
#   spilled 28-264 B on sm_80: the figures depend on them, so the gate must use them.)
# The varlen kernel (cu_tiles) runs the same candidates; gated the same way (2026-11-22): sm_90a 178-181 regs,
#   (128, 128, 8, 3) 249, with norm 253; sm_80 255; no spills (the fused-norm (128, 64, 8, 4) spilled 4 B on sm_90a
#   until the kernel formed its output pointer after the loop).
# D = 64/80/96 are not NVLM-D-72B shapes and are no longer gated (a cold gate took 10-20 min with them); their lists
# were pruned the same way without hints on 2026-11-22 and the runtime still uses them for such head dims.
_CONFIGS_16BIT = {
    9: {
        64: [(128, 64, 8, 3, True), (128, 128, 8, 3, True), (64, 64, 4, 3, True), (128, 64, 4, 3, False)],
        80: [(128, 64, 8, 3, True), (128, 64, 8, 4, True), (64, 64, 4, 3, True), (128, 128, 8, 3, False)],
        96: [(128, 64, 8, 3, True), (128, 64, 8, 4, True), (64, 64, 4, 3, True), (128, 128, 8, 3, False)],
        # D=128, N=1025: (128, 128, 8, 3) needs 224 KiB of shared memory (fits sm_90's 227 KiB); spills with norm.
        128: [(128, 64, 8, 3, True), (128, 64, 8, 4, True), (128, 128, 8, 3, False), (64, 64, 4, 3, False)],
    },
    8: {
        64: [(128, 64, 4, 2, True), (64, 64, 4, 3, True), (128, 64, 8, 3, True), (128, 64, 4, 3, False)],
        80: [(128, 32, 8, 2, True), (128, 32, 8, 3, True), (128, 64, 8, 3, False), (128, 64, 8, 2, False),
             (64, 64, 8, 3, False)],
        96: [(128, 32, 8, 2, True), (128, 32, 8, 3, True), (128, 64, 8, 3, False), (128, 64, 8, 2, False),
             (64, 64, 8, 3, False)],
        128: [(128, 32, 8, 2, True), (128, 32, 8, 3, True), (128, 64, 8, 3, False), (128, 64, 8, 2, False),
              (64, 64, 8, 3, False)],
    },
}
# fp32 inputs need IEEE dots, which Triton lowers to FMA loops that spill in every tile shape tried (>= 592 B for
# 32x32 tiles at D=128 on sm_90): fp32 CUDA tensors therefore go to SDPA unless triton is forced (tests, debugging),
# which runs these small, correct but slow tiles.
_CONFIGS_FP32 = [(32, 32, 8, 2), (16, 32, 4, 2)]
# The interpreter (CPU tests): small blocks, BLOCK_M != BLOCK_N so both loops' edges are exercised.
_INTERPRETER_CONFIG = (32, 16, 4, 1)
_STATS_BLOCK_T = 16
_STATS_WARPS = 4


def _capability_major(device: torch.device) -> int:
    major = torch.cuda.get_device_capability(device)[0]
    return 9 if major >= 9 else 8


def _candidates(head_dim: int, dtype: torch.dtype, major: int, norm: bool) -> list[tuple[int, int, int, int]]:
    if dtype == torch.float32:
        return list(_CONFIGS_FP32)
    return [c[:4] for c in _CONFIGS_16BIT[major][head_dim] if c[4] or not norm]


_TUNERS: dict = {}


def _tuned_kernel(head_dim: int, dtype: torch.dtype, major: int, norm: bool, varlen: bool = False):
    """A triton.autotune wrapper over the explicit candidate list for this (head dim, dtype kind, arch, norm), of
    the dense kernel (tuned per N) or the varlen kernel (tuned per power-of-two bucket of the longest tile). Both
    share the candidate lists: same inner loop, and the GPU gate checks every candidate of both for spills."""
    key = (head_dim, dtype == torch.float32, major, norm, varlen)
    if key not in _TUNERS:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in _candidates(head_dim, dtype, major, norm)]
        if varlen:
            _TUNERS[key] = triton.autotune(configs=configs, key=["MAX_LEN_P2", "HEAD_DIM"])(_attn_fwd_varlen_kernel)
        else:
            _TUNERS[key] = triton.autotune(configs=configs, key=["N", "HEAD_DIM"])(_attn_fwd_kernel)
    return _TUNERS[key]


# ----------------------------------------------------------------------------------------------------------------
# Launcher + custom op
# ----------------------------------------------------------------------------------------------------------------
def _unit_d_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    """Output ``[T, H, N, D]`` stored token-major (memory ``[T, N, H, D]``), so the proj input view is free."""
    t, h, n, d = q.shape
    return torch.empty((t, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


_MAX_GRID_Y = 65535


def _launch_stats(q, k, rstd_q, rstd_k, norm_eps):
    """QK-norm statistics of ``q, k: [t, H, N, D]`` into ``rstd_q, rstd_k: [t, N]`` fp32."""
    t, h, n, d = q.shape
    _qk_rms_stats_kernel[(triton.cdiv(n, _STATS_BLOCK_T), t)](
        q, k, rstd_q, rstd_k, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        h, n, 1.0 / (h * d), float(norm_eps),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_T=_STATS_BLOCK_T, num_warps=_STATS_WARPS)


def _launch_chunk(q, k, v, out, softmax_scale, rstd_q, rstd_k, wq, wk, norm_eps, interpreted):
    """Both kernels on ``[t, H, N, D]`` views with t*H <= _MAX_GRID_Y; ``rstd_q`` None = no QK norm."""
    t, h, n, d = q.shape
    norm = rstd_q is not None
    if norm:
        _launch_stats(q, k, rstd_q, rstd_k, norm_eps)
    else:
        rstd_q = rstd_k = wq = wk = q  # unused by the kernel when NORM is False
    args = (q, k, v, out, rstd_q, rstd_k, wq, wk,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            h, n, float(softmax_scale) * _LOG2E)
    meta = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), NORM=norm,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if interpreted:
        bm, bn, warps, stages = _INTERPRETER_CONFIG
        _attn_fwd_kernel[(triton.cdiv(n, bm), t * h)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                     num_warps=warps, num_stages=stages)
    else:
        kernel = _tuned_kernel(d, q.dtype, _capability_major(q.device), norm)
        grid = lambda cfg: (triton.cdiv(n, cfg["BLOCK_M"]), t * h)
        kernel[grid](*args, **meta)


def _launch_varlen(q, k, v, out, softmax_scale, cu_tiles, max_len, rstd_q, rstd_k, wq, wk, norm_eps,
                   interpreted):
    """Varlen attention on packed ``[1, H, S, D]`` tiles; ``cu_tiles: [n_tiles + 1]`` int32, ``max_len`` its
    longest tile (> 0); ``rstd_q`` None = no QK norm, else ``[1, S]`` fp32 buffers to fill."""
    _, h, _, d = q.shape
    norm = rstd_q is not None
    if norm:
        _launch_stats(q, k, rstd_q, rstd_k, norm_eps)                   # per token: the packing does not matter
    else:
        rstd_q = rstd_k = wq = wk = q  # unused by the kernel when NORM is False
    meta = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), NORM=norm,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    n_tiles = cu_tiles.numel() - 1
    # Grid axis 1 holds n_tiles*H programs (<= 65535): chunk over tiles; a chunk's offsets are a view of cu_tiles
    # (absolute token offsets, so the q/k/v/out/rstd base pointers stay the same).
    chunk = max(1, _MAX_GRID_Y // h)
    for t0 in range(0, n_tiles, chunk):
        nt = min(n_tiles, t0 + chunk) - t0
        args = (q, k, v, out, cu_tiles[t0:t0 + nt + 1], rstd_q, rstd_k, wq, wk,
                q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
                out.stride(1), out.stride(2), h, triton.next_power_of_2(max_len), float(softmax_scale) * _LOG2E)
        if interpreted:
            bm, bn, warps, stages = _INTERPRETER_CONFIG
            _attn_fwd_varlen_kernel[(triton.cdiv(max_len, bm), nt * h)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                                      num_warps=warps, num_stages=stages)
        else:
            kernel = _tuned_kernel(d, q.dtype, _capability_major(q.device), norm, varlen=True)
            grid = lambda cfg, nt=nt: (triton.cdiv(max_len, cfg["BLOCK_M"]), nt * h)
            kernel[grid](*args, **meta)


def _launch(q, k, v, softmax_scale, q_norm_weight, k_norm_weight, norm_eps, cu_tiles=None, max_len=0):
    interpreted = q.device.type == "cpu"
    out_dtype = q.dtype
    if interpreted and q.dtype == torch.bfloat16:
        # The interpreter mishandles bf16 dots/arithmetic (build_notes.md): compute in fp32 there.
        q, k, v = q.float(), k.float(), v.float()
    if interpreted and q_norm_weight is not None:
        q_norm_weight, k_norm_weight = q_norm_weight.float(), k_norm_weight.float()
    q, k, v = _unit_d_stride(q), _unit_d_stride(k), _unit_d_stride(v)
    t, h, n, d = q.shape
    out = _empty_out(q)
    norm = q_norm_weight is not None
    rstd_q = rstd_k = wq = wk = None
    if norm:
        rstd_q = torch.empty((t, n), dtype=torch.float32, device=q.device)                # [T, N]
        rstd_k = torch.empty((t, n), dtype=torch.float32, device=q.device)
        wq, wk = q_norm_weight.contiguous(), k_norm_weight.contiguous()                   # [H*D]
    if cu_tiles is not None:
        _launch_varlen(q, k, v, out, softmax_scale, cu_tiles.to(torch.int32), max_len, rstd_q, rstd_k, wq, wk,
                       norm_eps, interpreted)
        return out if out.dtype == out_dtype else out.to(out_dtype)
    # CUDA caps grid axis 1 at 65535 (T*H programs there): launch in chunks of whole tiles (views, no copies).
    chunk = max(1, _MAX_GRID_Y // h)
    for t0 in range(0, t, chunk):
        sl = slice(t0, min(t, t0 + chunk))
        _launch_chunk(q[sl], k[sl], v[sl], out[sl], softmax_scale, rstd_q[sl] if norm else None,
                      rstd_k[sl] if norm else None, wq, wk, norm_eps, interpreted)
    return out if out.dtype == out_dtype else out.to(out_dtype)


@torch.library.custom_op("nvlm_kernels::tiled_attention_triton", mutates_args=())
def _tiled_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                            q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None,
                            norm_eps: float, cu_tiles: torch.Tensor | None = None,
                            max_tile_len: int = 0) -> torch.Tensor:
    """``cu_tiles`` None: dense ``[T, H, N, D]``; else packed ``[1, H, S, D]`` tiles with ``max_tile_len`` = the
    longest tile of (already validated) ``cu_tiles``, passed in so the op needs no device sync of its own."""
    return _launch(q, k, v, softmax_scale, q_norm_weight, k_norm_weight, norm_eps, cu_tiles, max_tile_len)


@_tiled_attention_triton.register_fake
def _tiled_attention_triton_fake(q, k, v, softmax_scale, q_norm_weight, k_norm_weight, norm_eps, cu_tiles=None,
                                 max_tile_len=0):
    return _empty_out(q)                                # [T, H, N, D] (or [1, H, S, D]), token-major like the op


# ----------------------------------------------------------------------------------------------------------------
# Reference (pure PyTorch)
# ----------------------------------------------------------------------------------------------------------------
def qk_rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """InternViT q/k RMSNorm on ``x: [T, H, N, D]``: statistic per token over all ``H*D`` channels, in fp32; cast to
    ``x.dtype``, then times ``weight: [H*D]`` (InternVL ``InternRMSNorm`` convention)."""
    t, h, n, d = x.shape
    xf = x.float()
    var = xf.pow(2).mean(dim=(1, 3), keepdim=True)                     # [T, 1, N, 1]
    xn = (xf * torch.rsqrt(var + eps)).to(x.dtype)
    return xn * weight.view(1, h, 1, d).to(x.dtype)


def tiled_attention_ref(q, k, v, softmax_scale=None, q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6,
                        cu_tiles=None):
    """``softmax(qn kn^T * scale) v`` over each tile and head, via PyTorch SDPA (qn = q unless norm weights).

    ``cu_tiles`` (packed ``[1, H, S, D]`` tiles, module docstring): one SDPA per non-empty tile on views of q/k/v,
    the outputs concatenated along the token axis. That is the CPU path too. Measured on the shared 2-core dev CPU
    (fp32, H=16, D=64, best of 4, 2026-11-22; noisy, other jobs running): six 1025-token tiles + one of 257: this
    loop 0.54 s, stacking equal-length tiles into one batched call 0.50 s, one SDPA with a block-diagonal mask 2.6 s
    (it computes every cross-tile product, then discards it); 64 tiles of 9 tokens: 9.5 / 3.4 / 21 ms. The loop is
    within noise of batching at ViT sizes and simpler; the mask never wins."""
    if q_norm_weight is not None:
        q = qk_rmsnorm_ref(q, q_norm_weight, norm_eps)           # per token: independent of the tile packing
        k = qk_rmsnorm_ref(k, k_norm_weight, norm_eps)
    if cu_tiles is None:
        return _dense_sdpa(q, k, v, softmax_scale)
    cu = cu_tiles.tolist()
    tiles = [(a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]

    def attend():                                                # [1, H, S, D]
        return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=softmax_scale)
                          for a, b in tiles], dim=2)

    if _all_finite(q, k, v):
        return attend()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):                           # NaN/Inf-faithful: see _dense_sdpa
        return attend()


def _all_finite(q, k, v) -> bool:
    return torch.compiler.is_compiling() or bool(q.isfinite().all() & k.isfinite().all() & v.isfinite().all())


def _dense_sdpa(q, k, v, softmax_scale):
    """SDPA over ``[T, H, N, D]`` (the dense reference), NaN/Inf-faithful."""
    if not _all_finite(q, k, v):
        # PyTorch's fused CPU SDPA returns a ZERO row for a query row holding NaN (a silent wrong answer); the math
        # backend propagates NaN/Inf as the formula does. One tile at a time bounds its H x N x N score memory.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return torch.cat([F.scaled_dot_product_attention(q[t:t + 1], k[t:t + 1], v[t:t + 1], scale=softmax_scale)
                              for t in range(q.shape[0])])
    return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
_IMPLEMENTED = ("triton", "ref") if triton is not None else ("ref",)


def tiled_attention(q, k, v, *, softmax_scale=None, cu_tiles=None, q_norm_weight=None, k_norm_weight=None,
                    norm_eps=1e-6):
    """Attention over ``[T, H, N, D]`` tiles, optionally with the fused InternViT QK RMSNorm (module docstring).

    With ``cu_tiles`` (int32/int64 ``[n_tiles + 1]`` offsets ``0 = cu[0] <= ... <= cu[-1] = S``, same device),
    q/k/v are ``[1, H, S, D]`` packed variable-length tiles and token i of tile t attends exactly to the tokens of
    tile t (block-diagonal); out ``[1, H, S, D]``."""
    _check(q, k, v)
    max_tile_len = _check_cu_tiles(q, cu_tiles) if cu_tiles is not None else 0
    _check_norm(q, q_norm_weight, k_norm_weight, norm_eps)
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"nvlm_kernels.tiled_attention: argument 'softmax_scale' must be a float > 0, "
                         f"got {softmax_scale!r}")
    if dispatch.needs_grad(q, k, v, q_norm_weight, k_norm_weight):
        return tiled_attention_ref(q, k, v, softmax_scale, q_norm_weight, k_norm_weight, norm_eps, cu_tiles)
    implemented = _IMPLEMENTED
    if q.device.type == "cuda" and q.dtype == torch.float32 and dispatch.forced_backend() is None:
        implemented = ("ref",)  # the Triton kernel's fp32 (IEEE) dots spill: see _CONFIGS_FP32
    backend = dispatch.select("tiled_attention", q.device, implemented)
    if backend == "triton":
        _check_triton_head_dim(q)
        scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
        return torch.ops.nvlm_kernels.tiled_attention_triton(q, k, v, scale, q_norm_weight, k_norm_weight,
                                                             float(norm_eps), cu_tiles, max_tile_len)
    return tiled_attention_ref(q, k, v, softmax_scale, q_norm_weight, k_norm_weight, norm_eps, cu_tiles)


# ----------------------------------------------------------------------------------------------------------------
# Specs for the GPU gate, and ahead-of-time compile checks (no GPU needed)
# ----------------------------------------------------------------------------------------------------------------
_TRITON_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def gate_specs(capability: int | None = None) -> list[dict]:
    """Every (kernel, candidate config, dtype) the package launches at NVLM-D-72B's InternViT shape: T=7 tiles,
    H=25 heads, N=1025 tokens, D=128, with and without the fused QK-norm, bf16 (the model's dtype) and fp16 (the
    triton backend serves fp16 CUDA tensors the same way); the same for the varlen (``cu_tiles``) kernel on those
    tiles packed as ``[1, H, S, D]``. Keys as in ``nvlm_kernels.gpu_gate``.

    ``capability``: 90 (sm_90, default when no GPU is visible) or 80; default = the current CUDA device's.
    D = 64/80/96 are not NVLM-D-72B shapes: their candidate lists are not gated (the interpreter tests cover the
    maths); ``_CONFIGS_16BIT`` notes what an ahead-of-time compile found for them when they were.

    ``divisible_by_16`` (the JIT's ``tt.divisibility=16`` specialisation at the real launch): every pointer -- the
    q/k/v slices of the fused qkv projection start at multiples of H*D = 3200 elements, the output, rstd buffers and
    norm weights are fresh allocations or parameters (a grid-chunked launch of > 2621 tiles would offset rstd by
    t0*N*4 bytes, but T=7 is one chunk) -- and every stride (multiples of D=128). Not H=25, N=1025, qk_scale.
    """
    if capability is None:
        capability = 90
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            capability = 10 * major + minor
    major = 9 if capability >= 90 else 8
    d = 128
    specs = []
    for dtype, tname in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        ptr = _TRITON_PTR[dtype]
        attn_sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "RSTD_Q": "*fp32", "RSTD_K": "*fp32",
                    "WQ": ptr, "WK": ptr}
        for name in ("q", "k", "v", "o"):
            for axis in ("t", "h", "n"):
                attn_sig[f"stride_{name}{axis}"] = "i32"
        attn_sig.update({"H": "i32", "N": "i32", "qk_scale": "fp32"})
        for norm in (False, True):
            for bm, bn, warps, stages in _candidates(d, dtype, major, norm):
                specs.append(dict(
                    name=f"tiled_attention{'_qknorm' if norm else ''}_d{d}_{tname}_m{bm}n{bn}w{warps}s{stages}",
                    fn=_attn_fwd_kernel, signature=dict(attn_sig),
                    constexprs=dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=bm, BLOCK_N=bn, NORM=norm, DOT_PRECISION="tf32"),
                    num_warps=warps, num_stages=stages, hot_path=True, tensor_cores=True,
                    shape=f"T=7 H=25 N=1025 D={d} {tname}{' +qk-norm' if norm else ''}",
                    divisible_by_16=[a for a in attn_sig if a not in ("H", "N", "qk_scale")]))
        # The varlen kernel (cu_tiles): same candidates, same inner loop; gated at the same tile size, packed.
        varlen_sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "CU_TILES": "*i32", "RSTD_Q": "*fp32",
                      "RSTD_K": "*fp32", "WQ": ptr, "WK": ptr}
        for name in ("q", "k", "v", "o"):
            for axis in ("h", "n"):
                varlen_sig[f"stride_{name}{axis}"] = "i32"
        varlen_sig.update({"H": "i32", "MAX_LEN_P2": "i32", "qk_scale": "fp32"})
        for norm in (False, True):
            for bm, bn, warps, stages in _candidates(d, dtype, major, norm):
                specs.append(dict(
                    name=f"tiled_attention_varlen{'_qknorm' if norm else ''}_d{d}_{tname}_m{bm}n{bn}w{warps}s{stages}",
                    fn=_attn_fwd_varlen_kernel, signature=dict(varlen_sig),
                    constexprs=dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=bm, BLOCK_N=bn, NORM=norm, DOT_PRECISION="tf32"),
                    num_warps=warps, num_stages=stages, hot_path=True, tensor_cores=True,
                    shape=f"cu_tiles: 7 packed tiles <= 1025 tokens, H=25 D={d} {tname}{' +qk-norm' if norm else ''}",
                    # MAX_LEN_P2 = 1024 or 2048 is a multiple of 16 too, but is unused by the kernel: no hint needed
                    divisible_by_16=[a for a in varlen_sig if a not in ("H", "MAX_LEN_P2", "qk_scale")]))
        stats_sig = {"Q": ptr, "K": ptr, "RSTD_Q": "*fp32", "RSTD_K": "*fp32",
                     "stride_qt": "i32", "stride_qh": "i32", "stride_qn": "i32",
                     "stride_kt": "i32", "stride_kh": "i32", "stride_kn": "i32",
                     "H": "i32", "N": "i32", "inv_width": "fp32", "eps": "fp32"}
        specs.append(dict(
            name=f"qk_rms_stats_d{d}_{tname}_t{_STATS_BLOCK_T}w{_STATS_WARPS}",
            fn=_qk_rms_stats_kernel, signature=stats_sig,
            constexprs=dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_T=_STATS_BLOCK_T),
            num_warps=_STATS_WARPS, num_stages=1, hot_path=True, tensor_cores=False,
            shape=f"T=7 H=25 N=1025 D={d} {tname}",
            divisible_by_16=[a for a in stats_sig if a not in ("H", "N", "inv_width", "eps")]))
    return specs


if __name__ == "__main__":  # pragma: no cover
    import sys

    from nvlm_kernels import gpu_gate

    # The GPU gate on this module's specs only (both arches): registers, spills, shared memory, wgmma/mma.
    sys.exit(gpu_gate.main(["--module", "nvlm_kernels.tiled_attention", "--no-cuda", "--seed", "",
                            *sys.argv[1:]]))
