"""Gated cross-attention of text queries over image tokens (NVLM-X / NVLM-H, Flamingo-style), flash-style.

Signature::

    gated_cross_attention(q, k, v, gate, kv_start, kv_end, *, softmax_scale=None, num_splits=None,
                          check_ranges=True) -> out

    q         [B, Hq, L, D]   float32/float16/bfloat16; text queries (already q_proj'ed and normed)
    k, v      [B, Hkv, M, D]  same dtype/device; the image memory (M = tiles * 256), laid out image by image,
                              tile by tile. GQA: Hq % Hkv == 0, query head h reads kv head h // (Hq // Hkv).
    gate      0-dim or [1] float tensor: the raw alpha (tanh is applied here), read on the device (no sync)
    kv_start, kv_end  [B, L] int32: query row (b, i) attends to image tokens kv_start[b,i] <= m < kv_end[b,i]
    out       [B, L, Hq, D]   q.dtype, contiguous: ``out.view(B, L, Hq * D)`` is the o_proj input, no copy

Only the last (head-dim) stride of q, k, v must be 1, so ``q_proj(x).view(B, L, Hq, D).transpose(1, 2)`` and
``k_proj(img).view(B, M, Hkv, D).transpose(1, 2)`` are passed without a copy.

Maths, per batch b, query row i, query head h, with kv head g = h // (Hq / Hkv) and R = [kv_start[b,i], kv_end[b,i])::

    out[b, i, h] = tanh(gate) * sum_{m in R} softmax_m(q[b,h,i] . k[b,g,m] * scale) v[b,g,m]   if R is non-empty
    out[b, i, h] = 0 exactly                                                                    if R is empty

``scale = D ** -0.5`` unless given. The NVLM-X mask (nvlm_spec.md §7, issue 4) becomes ranges because the memory is
contiguous per tile: a ``<tile_k>`` tag's tokens get tile k's 256 tokens; other text tokens get
``[0, end of the last image that precedes them)``; text before any image gets an empty range (start == end), and
its output row is exactly zero rather than the NaN of an empty softmax. Ranges must satisfy
``0 <= kv_start <= kv_end <= M`` (checked with one device sync; ``check_ranges=False`` skips it in hot loops).

What is fused and what is not (and why). The block is ``x + tanh(alpha) * o_proj(XAttn(norm(x), img))``.
``o_proj`` (bias-free in Qwen2-style attention) sits between the attention and the residual. A scalar gate and a
per-row 0/1 mask commute with a bias-free linear map (``o_proj(c * a) = c * o_proj(a)`` row by row), so
``tanh(gate)`` and the row mask move into this kernel's epilogue at no cost. The residual add cannot: it must come
after o_proj, a GEMM over all Hq*D channels of a row, whereas each attention program owns one head. Folding o_proj
in would need a cross-head split-K reduction (atomics into fp32, nondeterministic) for a GEMM of its own size; the
honest fusion is the residual in the o_proj GEMM's epilogue instead, ``torch.addmm(x2d, out2d, w_o.t())`` (cuBLAS
beta=1), which the benchmark uses. If an o_proj had a bias, the caller must gate and row-mask that bias itself.
The output layout [B, L, Hq, D] is the other saving: SDPA returns [B, Hq, L, D], and public code then pays a
transpose + contiguous copy before o_proj.

Kernel (Triton, CUDA tensors): GQA rows are packed so that the G = Hq/Hkv query heads that share a kv head are one
tile's rows (row r = query i * G + head g): K/V are read once per kv head, not once per query head. Online softmax
with exp2, fp32 accumulators, tl.dot on the storage dtype (bf16/fp16 tensor cores; fp32 inputs use IEEE fp32 dots).
Each program skips the KV blocks outside [min kv_start, max kv_end) of its (non-empty) rows. Epilogue:
``acc / l * tanh(gate)``, empty rows forced to 0. Decode (few rows per kv head, e.g. L=1) would leave most SMs idle,
so the KV axis is split (flash-decoding): each split writes fp32 partials (normalised output + log2-sum-exp) and a
small combine kernel merges them and applies the gate and row mask.

Backends: ``triton`` (custom op ``nvlm_kernels::gated_cross_attention_triton``; also runs on CPU tensors under
``TRITON_INTERPRET=1``, which tests use; forward only) and ``ref``, the pure-PyTorch path for CPU tensors and for
training (autograd): torch SDPA with the ranges as a boolean mask, over GQA-grouped rows at decode and with SDPA's
``enable_gqa`` at prefill, then one multiply for the gate, the row mask and the output layout (:func:`_sdpa_path`).
The truth is :func:`gated_cross_attention_ref` (dense mask, explicit fp32 matmul/softmax, K/V expanded per query
head, empty rows zeroed). It was the CPU path first, but at the 72B decode shape it spent its time upcasting and
expanding K/V (bench/bench_gated_xattn.py times both). No C++ CPU kernel: what is left is SDPA's fused CPU kernel
(oneDNN/AMX GEMMs, fp32 online softmax); a hand-written one would mostly re-implement it.
"""

from __future__ import annotations

import math

import torch

from nvlm_kernels import dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton: the reference still works
    triton = None

_OP = "nvlm_kernels.gated_cross_attention"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 128          # D = 256 spilled in every tile config tried (ptxas, sm_80 and sm_90a)
_LOG2E = 1.4426950408889634
_GROUPED_MAX_L = 16          # CPU path: GQA-grouped rows up to this many queries, SDPA's enable_gqa above

# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _tanh(x):
        """fp32 tanh (tl has none). Odd Taylor series below |x| = 0.125 (truncation < 2e-10 relative), where
        ``(1 - e^-2|x|) / (1 + e^-2|x|)`` would lose digits to cancellation; exact 0 for x = 0."""
        ax = tl.abs(x)
        x2 = x * x
        small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
        t = tl.exp(-2.0 * ax)
        big = (1.0 - t) / (1.0 + t)
        big = tl.where(x < 0, -big, big)
        return tl.where(ax < 0.125, small, big)

    @triton.jit
    def _gxattn_fwd_kernel(
        Q, K, V, Gate, KVStart, KVEnd,        # q [B,Hq,L,D], k/v [B,Hkv,M,D], gate [1], kv_start/kv_end [B,L] i32
        Out, PartO, PartLse,                  # out [B,L,Hq,D]; SPLIT: part_o [S,B,L,Hq,D] f32, part_lse [S,B,L,Hq]
        stride_qb, stride_qh, stride_ql,      # head-dim strides are 1 (checked by the launcher)
        stride_kb, stride_kh, stride_km,
        stride_vb, stride_vh, stride_vm,
        L, M, Hkv, n_rows,                    # n_rows = B * L * Hq (SPLIT: rows per split in part_o/part_lse)
        qk_scale,                             # softmax_scale * log2(e): scores are in log2 units (exp2)
        split_len,                            # SPLIT: KV tokens per split (a multiple of BLOCK_N)
        D: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hkv = pid_bh % Hkv
        Hq = Hkv * GROUP

        # Rows of this tile: r = i * GROUP + g -> query i, query head hkv * GROUP + g (the GQA group shares K/V).
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        qi = rows // GROUP
        head = hkv * GROUP + rows % GROUP
        row_ok = qi < L
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D

        b64 = b.to(tl.int64)
        q_ptrs = Q + b64 * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_ql + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)          # [BLOCK_M, BLOCK_D]
        start = tl.load(KVStart + b64 * L + qi, mask=row_ok, other=0)                  # [BLOCK_M] i32
        end = tl.load(KVEnd + b64 * L + qi, mask=row_ok, other=0)
        nonempty = row_ok & (end > start)

        # KV blocks this tile needs: the union of its non-empty rows' ranges (empty rows must not widen it).
        lo = tl.min(tl.where(nonempty, start, M), axis=0)
        hi = tl.max(tl.where(nonempty, end, 0), axis=0)
        if SPLIT:
            s_id = tl.program_id(2)
            lo = tl.maximum(lo, s_id * split_len)
            hi = tl.minimum(hi, s_id * split_len + split_len)
        lo = (lo // BLOCK_N) * BLOCK_N

        k_base = K + b64 * stride_kb + hkv * stride_kh
        v_base = V + b64 * stride_vb + hkv * stride_vh
        # m_i starts finite: a row with no valid key in a block then gets exp2(-inf - m) = 0 and alpha = 1,
        # never exp2(-inf - (-inf)) = NaN.
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < M
            kt = tl.load(k_base + offs_n[None, :] * stride_km + offs_d[:, None],
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)                # [BLOCK_D, BLOCK_N]
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale                    # [BLOCK_M, BLOCK_N] f32
            valid = (offs_n[None, :] >= start[:, None]) & (offs_n[None, :] < end[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * stride_vm + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)                 # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        # out / part_o rows are ordered [.., B, L, Hq]: row index (b * L + i) * Hq + head.
        out_row = (b64 * L + qi) * Hq + head
        st_mask = row_ok[:, None] & d_ok[None, :]
        if SPLIT:
            base = tl.program_id(2).to(tl.int64) * n_rows + out_row
            tl.store(PartO + base[:, None] * D + offs_d[None, :], o, mask=st_mask)
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(PartLse + base, lse, mask=row_ok)
        else:
            gate = _tanh(tl.load(Gate).to(tl.float32))
            o = tl.where(nonempty[:, None], o * gate, 0.0)
            tl.store(Out + out_row[:, None] * D + offs_d[None, :], o.to(Out.dtype.element_ty), mask=st_mask)

    @triton.jit
    def _gxattn_combine_kernel(
        PartO, PartLse, Gate, KVStart, KVEnd, Out,   # part_o [S,B,L,Hq,D] f32, part_lse [S,B,L,Hq] f32, out [B,L,Hq,D]
        Hq, n_rows, num_splits,
        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per output row (b, i, head): merge the splits' partial softmaxes, gate, row-mask, store."""
        row = tl.program_id(0).to(tl.int64)           # (b * L + i) * Hq + head
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < num_splits
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        lse = tl.load(PartLse + offs_s * n_rows + row, mask=s_ok, other=float("-inf"))       # [BLOCK_S]
        lse_max = tl.max(lse, axis=0)
        w = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))                 # 0 for empty splits
        po = tl.load(PartO + (offs_s[:, None] * n_rows + row) * D + offs_d[None, :],
                     mask=s_ok[:, None] & d_ok[None, :], other=0.0)                           # [BLOCK_S, BLOCK_D]
        denom = tl.sum(w, axis=0)
        o = tl.sum(w[:, None] * po, axis=0) / tl.where(denom > 0.0, denom, 1.0)
        bi = row // Hq                                # b * L + i indexes the contiguous [B, L] ranges
        nonempty = tl.load(KVEnd + bi) > tl.load(KVStart + bi)
        gate = _tanh(tl.load(Gate).to(tl.float32))
        o = tl.where(nonempty, o * gate, 0.0)
        tl.store(Out + row * D + offs_d, o.to(Out.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _config(rows_per_kv_head: int, head_dim: int) -> dict:
    """Tile sizes and launch parameters for a CUDA launch; ``rows_per_kv_head = L * G``.

    Chosen by compiling ahead of time for sm_90a / sm_80 and reading ptxas -v (see :func:`gate_specs`); every
    config here is spill-free at D <= 128 both with and without the JIT's 16-divisibility specialisation.
    """
    block_d = max(16, _next_pow2(head_dim))
    if dispatch.triton_interpreted():
        # The interpreter costs time per element, not per launch: small tiles keep tests fast and exercise the
        # multi-block loop, the block skipping and the ragged tails at tiny M.
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=1)
    if rows_per_kv_head <= 16:   # decode: the smallest tile tl.dot takes; memory-bound, the KV axis gets split
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=3)
    if rows_per_kv_head <= 64:   # a few queries (speculative decode, short prompts): one warpgroup
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=3)
    # Prefill. 128 x 64 (8 warps) would be the usual choice but spills 96 B when compiled without the
    # divisibility hints; 128 x 128 spills 200+ B either way. 128 x 32 is spill-free both ways (254 / 164 regs).
    return dict(BLOCK_M=128, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=3)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: pretend H100 so the split heuristic is exercised the same way


def _num_splits(n_programs: int, m: int, block_n: int, device: torch.device) -> int:
    """flash-decoding: split the KV axis when the (row tile, kv head) grid would leave SMs idle."""
    target = 2 * _sm_count(device)
    if n_programs >= target // 2:
        return 1
    return max(1, min(16, triton.cdiv(m, 2 * block_n), triton.cdiv(target, n_programs)))


def _launch(q, k, v, gate, kv_start, kv_end, softmax_scale: float, num_splits: int, config: dict | None = None):
    """Run the Triton kernel(s). ``num_splits`` 0 = heuristic. Returns out [B, L, Hq, D] (q.dtype)."""
    if triton is None:
        raise RuntimeError(f"{_OP}: triton is not installed")
    bsz, hq, seq_q, dim = q.shape
    hkv, seq_kv = k.shape[1], k.shape[2]
    if dim > _MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head dim {dim} > {_MAX_HEAD_DIM} is not supported by the triton backend")
    out_dtype = q.dtype
    if dispatch.triton_interpreted() and q.dtype == torch.bfloat16:
        # The interpreter computes bf16 dots wrongly (build_notes.md): run the CPU emulation in fp32.
        q, k, v = q.float(), k.float(), v.float()
    group = hq // hkv
    kv_start = kv_start.contiguous()
    kv_end = kv_end.contiguous()
    gate = gate.reshape(1)
    out = torch.empty((bsz, seq_q, hq, dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out.to(out_dtype)
    cfg = dict(config or _config(seq_q * group, dim))
    block_m, block_n, block_d = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_D")
    n_tiles = triton.cdiv(seq_q * group, block_m)
    if num_splits <= 0:
        num_splits = _num_splits(n_tiles * bsz * hkv, seq_kv, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(max(seq_kv, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(seq_kv, split_len))
    split = num_splits > 1
    n_rows = bsz * seq_q * hq
    if split:
        part_o = torch.empty((num_splits, n_rows, dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_splits, n_rows), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused (SPLIT is a constexpr: the branch is compiled out)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16/bf16 operands
    _gxattn_fwd_kernel[(n_tiles, bsz * hkv, num_splits)](
        q, k, v, gate, kv_start, kv_end, out, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        seq_q, seq_kv, hkv, n_rows, softmax_scale * _LOG2E, split_len,
        D=dim, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SPLIT=split, PRECISION=precision,
        **cfg,
    )
    if split:
        _gxattn_combine_kernel[(n_rows,)](
            part_o, part_lse, gate, kv_start, kv_end, out, hq, n_rows, num_splits,
            D=dim, BLOCK_S=max(2, _next_pow2(num_splits)), BLOCK_D=block_d, num_warps=1 if block_d <= 64 else 2,
        )
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Custom op + fake
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("nvlm_kernels::gated_cross_attention_triton", mutates_args=())
def gated_cross_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor,
                                 kv_start: torch.Tensor, kv_end: torch.Tensor, softmax_scale: float,
                                 num_splits: int) -> torch.Tensor:
    """Triton kernel; arguments as :func:`gated_cross_attention` (validated there), ``num_splits`` 0 = auto."""
    return _launch(q, k, v, gate, kv_start, kv_end, softmax_scale, num_splits)


@gated_cross_attention_triton.register_fake
def _gated_cross_attention_triton_fake(q, k, v, gate, kv_start, kv_end, softmax_scale, num_splits):
    bsz, hq, seq_q, dim = q.shape
    return q.new_empty((bsz, seq_q, hq, dim))


# ----------------------------------------------------------------------------------------------------------------
# Reference (pure PyTorch; the tests' truth) and the SDPA-based CPU / training path
# ----------------------------------------------------------------------------------------------------------------
def ranges_to_mask(kv_start: torch.Tensor, kv_end: torch.Tensor, m: int) -> torch.Tensor:
    """Dense boolean mask ``[B, L, M]`` (True = attend) from per-query ranges ``[B, L]``."""
    pos = torch.arange(m, device=kv_start.device)
    return (pos >= kv_start[..., None]) & (pos < kv_end[..., None])


def gated_cross_attention_ref(q, k, v, gate, kv_start, kv_end, softmax_scale=None, upcast: bool = True):
    """Dense-mask attention with GQA, tanh gate and zeroed empty rows; out ``[B, L, Hq, D]`` in ``q.dtype``.

    ``upcast=True`` computes in fp32 (the truth); ``upcast=False`` in the input dtype (tests use it to measure
    how much error the low precision itself costs).
    """
    bsz, hq, seq_q, dim = q.shape
    hkv, seq_kv = k.shape[1], k.shape[2]
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    cdt = torch.float32 if upcast else q.dtype
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if hq != hkv:                                               # GQA: head h reads kv head h // G
        kc = kc.repeat_interleave(hq // hkv, dim=1)
        vc = vc.repeat_interleave(hq // hkv, dim=1)
    mask = ranges_to_mask(kv_start, kv_end, seq_kv)[:, None]    # [B, 1, L, M]
    nonempty = mask.any(-1, keepdim=True)                       # [B, 1, L, 1]
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale     # [B, Hq, L, M]
    # Empty rows attend to everything here (no -inf-only softmax, so no NaN) and are zeroed below.
    scores = scores.masked_fill(~(mask | ~nonempty), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    o = torch.matmul(p, vc)                                     # [B, Hq, L, D]
    o = torch.where(nonempty, o * torch.tanh(gate.to(cdt).reshape(())), 0.0)
    return o.transpose(1, 2).contiguous().to(q.dtype)          # [B, L, Hq, D]


def _sdpa_path(q, k, v, gate, kv_start, kv_end, softmax_scale):
    """The no-kernel path (dispatch backend ``ref``; CPU tensors): torch SDPA with the ranges as a boolean mask.

    Few queries (decode): ``q [B, Hq, L, D]`` is viewed as ``[B, Hkv, G*L, D]`` (head h = hkv*G + g, the kernel's
    grouping) so each kv head's K/V is read once for its G query heads; the mask is expanded to the G*L rows (small
    at small L). Many queries (prefill): SDPA's own GQA (``enable_gqa``) with the [B, 1, L, M] mask broadcast over
    heads, so no mask copy either. SDPA's fused CPU kernel keeps fp32 scores for bf16/fp16 inputs. Empty rows
    attend to everything inside SDPA (no NaN) and are zeroed after, in one multiply that also applies tanh(gate)
    and writes the [B, L, Hq, D] layout. Checked against :func:`gated_cross_attention_ref` in the tests; timed
    against it and against the public SDPA-based code by bench/bench_gated_xattn.py.
    """
    bsz, hq, seq_q, dim = q.shape
    hkv, seq_kv = k.shape[1], k.shape[2]
    group = hq // hkv
    nonempty = kv_end > kv_start                                            # [B, L]
    # Empty rows get the full range in the [B, L] ints (not in the big mask): one dense mask, built once.
    mask = ranges_to_mask(torch.where(nonempty, kv_start, 0), torch.where(nonempty, kv_end, seq_kv), seq_kv)
    if seq_q <= _GROUPED_MAX_L:
        mask = mask[:, None, None].expand(bsz, 1, group, seq_q, seq_kv).reshape(bsz, 1, group * seq_q, seq_kv)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.reshape(bsz, hkv, group * seq_q, dim), k, v, attn_mask=mask, scale=softmax_scale)  # [B,Hkv,G*L,D]
        o = o.view(bsz, hq, seq_q, dim)
    else:
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=softmax_scale,
                                                             enable_gqa=group > 1)               # [B, Hq, L, D]
    # Empty rows attended to everything above: zero them first, so a NaN/Inf in a memory row they must not see
    # cannot reach them through 0 * NaN (the reference gives exactly 0 there).
    o = o.masked_fill(~nonempty[:, None, :, None], 0.0)
    mult = nonempty * torch.tanh(gate.float().reshape(()))                 # [B, L] fp32: tanh(gate), 0 if empty
    # Eager: the multiply writes the [B, L, Hq, D] layout directly (out=). Autograd has no out= and torch.compile's
    # functionalisation keeps the multiply's transposed strides, so there: multiply, then a contiguous copy.
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (o.requires_grad or mult.requires_grad)):
        return (o.transpose(1, 2) * mult[:, :, None, None]).to(o.dtype).contiguous()
    out = torch.empty((bsz, seq_q, hq, dim), dtype=o.dtype, device=o.device)
    return torch.mul(o.transpose(1, 2), mult[:, :, None, None], out=out)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
_IMPLEMENTED = ("triton", "ref")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check(q, k, v, gate, kv_start, kv_end, softmax_scale, num_splits, check_ranges) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            want = "[B, Hq, L, D]" if name == "q" else "[B, Hkv, M, D]"
            raise ValueError(f"{_OP}: argument '{name}' must be a 4-D tensor {want}, got {_shape(t)}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{_OP}: argument '{name}' must be float32/float16/bfloat16, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_OP}: argument '{name}' is on {t.device}, 'q' on {q.device}")
        if t.dtype != q.dtype:
            raise ValueError(f"{_OP}: argument '{name}' has dtype {t.dtype}, 'q' has {q.dtype}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{_OP}: argument '{name}' must have stride 1 in its last (head) dimension, got "
                             f"strides {t.stride()}")
    bsz, hq, seq_q, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{_OP}: arguments 'k' and 'v' must have one shape, got {_shape(k)} and {_shape(v)}")
    if k.shape[0] != bsz or k.shape[3] != dim:
        raise ValueError(f"{_OP}: argument 'k' must be [B={bsz}, Hkv, M, D={dim}], got {_shape(k)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{_OP}: query heads Hq={hq} must be a multiple of kv heads Hkv={hkv} (argument 'k')")
    if seq_q == 0 or dim == 0:
        raise ValueError(f"{_OP}: argument 'q' must have L >= 1 and D >= 1, got {_shape(q)}")
    if not isinstance(gate, torch.Tensor) or gate.numel() != 1 or gate.dim() > 1:
        raise ValueError(f"{_OP}: argument 'gate' must be a 0-dim or [1] tensor (the raw alpha), got {_shape(gate)}")
    if gate.dtype not in _FLOATS or gate.device != q.device:
        raise ValueError(f"{_OP}: argument 'gate' must be a float tensor on {q.device}, got {gate.dtype} on "
                         f"{gate.device}")
    for name, r in (("kv_start", kv_start), ("kv_end", kv_end)):
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != (bsz, seq_q):
            raise ValueError(f"{_OP}: argument '{name}' must have shape [B, L] = ({bsz}, {seq_q}), got {_shape(r)}")
        if r.dtype != torch.int32:
            raise ValueError(f"{_OP}: argument '{name}' must be int32, got {r.dtype}")
        if r.device != q.device:
            raise ValueError(f"{_OP}: argument '{name}' is on {r.device}, 'q' on {q.device}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
                                          and softmax_scale > 0):
        raise ValueError(f"{_OP}: argument 'softmax_scale' must be a positive finite number, got {softmax_scale!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"{_OP}: argument 'num_splits' must be a positive int or None, got {num_splits!r}")
    if check_ranges:
        seq_kv = k.shape[2]
        bad = (kv_start < 0) | (kv_start > kv_end) | (kv_end > seq_kv)
        if bool(bad.any()):                      # one device sync; check_ranges=False skips it
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"{_OP}: arguments 'kv_start'/'kv_end' must satisfy 0 <= start <= end <= M={seq_kv}; "
                             f"row (b={b}, i={i}) has [{int(kv_start[b, i])}, {int(kv_end[b, i])})")


def gated_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor,
                          kv_start: torch.Tensor, kv_end: torch.Tensor, *, softmax_scale: float | None = None,
                          num_splits: int | None = None, check_ranges: bool = True) -> torch.Tensor:
    """``tanh(gate) * attention(q, k[range], v[range])``, empty ranges -> 0; out ``[B, L, Hq, D]``.

    q ``[B, Hq, L, D]``, k/v ``[B, Hkv, M, D]`` (last stride 1), gate 0-dim/[1] raw alpha, kv_start/kv_end
    ``[B, L]`` int32 with ``0 <= start <= end <= M``. ``softmax_scale`` defaults to ``D**-0.5``. ``num_splits``
    (triton only) overrides the flash-decoding KV split count; ``check_ranges=False`` skips the range check's
    device sync. The Triton kernel is forward-only: when autograd needs gradients of q/k/v/gate, the
    differentiable SDPA path runs instead. See the module docstring for the maths, the mask rules and what is
    fused.
    """
    _check(q, k, v, gate, kv_start, kv_end, softmax_scale, num_splits, check_ranges)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    # The Triton op is forward-only (no autograd formula): training (NVLM-X/H x-attn layers) takes the
    # differentiable SDPA path. Head dims over _MAX_HEAD_DIM have no Triton config.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gate))
    implemented = _IMPLEMENTED if q.shape[-1] <= _MAX_HEAD_DIM and not needs_grad else ("ref",)
    backend = dispatch.select("gated_cross_attention", q.device, implemented)
    if backend == "triton":
        return torch.ops.nvlm_kernels.gated_cross_attention_triton(q, k, v, gate, kv_start, kv_end, scale,
                                                                   num_splits or 0)
    return _sdpa_path(q, k, v, gate, kv_start, kv_end, scale)


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations for the GPU gate (ahead-of-time compiled and checked with ptxas; no GPU needed)
# ----------------------------------------------------------------------------------------------------------------
_FWD_SIGNATURE = {
    "Q": "*bf16", "K": "*bf16", "V": "*bf16", "Gate": "*bf16", "KVStart": "*i32", "KVEnd": "*i32",
    "Out": "*bf16", "PartO": "*fp32", "PartLse": "*fp32",
    "stride_qb": "i32", "stride_qh": "i32", "stride_ql": "i32",
    "stride_kb": "i32", "stride_kh": "i32", "stride_km": "i32",
    "stride_vb": "i32", "stride_vh": "i32", "stride_vm": "i32",
    "L": "i32", "M": "i32", "Hkv": "i32", "n_rows": "i32", "qk_scale": "fp32", "split_len": "i32",
}
_COMBINE_SIGNATURE = {
    "PartO": "*fp32", "PartLse": "*fp32", "Gate": "*bf16", "KVStart": "*i32", "KVEnd": "*i32", "Out": "*bf16",
    "Hq": "i32", "n_rows": "i32", "num_splits": "i32",
}


def gate_specs() -> list[dict]:
    """One dict per (kernel, launch config) this package launches at the NVLM-X/H 72B shapes (Hq=64, Hkv=8, D=128,
    bf16, M = 7*256 = 1792 image tokens): prefill L=1024 (8192 GQA rows per kv head -> 64 x 8 programs) and decode
    L=1 (8 rows per kv head: the KV axis is split 14 ways, then the combine kernel merges them).

    Keys: name, fn (@triton.jit), signature (every non-constexpr parameter -> triton type), constexprs, num_warps,
    num_stages, hot_path, tensor_cores (True: QK^T and PV must compile to wgmma on sm_90a / mma on sm_80; "mma":
    mma.sync on every arch), plus ``divisible_by_16``: the parameters that Triton's JIT marks
    ``tt.divisibility=16`` at these shapes (aligned pointers, ints that are multiples of 16); the gate compiles with
    ``ASTSource(attrs={(index,): [["tt.divisibility", 16]]})`` for them, i.e. exactly what runs. Without them the
    loads are not vectorised into cp.async and registers rise, so the check below was made both ways.

    ptxas -v, triton 3.8, 2026-11-22 (no hints / JIT hints), sm_90a:
      prefill 128x32, 8 warps, 3 stages: 254 / 164 regs, 0 spills, wgmma;   sm_80: 255 / 190 regs, 0 spills, mma.
      decode split 16x64, 4 warps, 3 stages: 138 / 101 regs, 0 spills, mma.sync (M=16 is below wgmma's 64).
      combine: 56 regs, 0 spills.
    Pruned: prefill 128x64/8 warps (96 B spill without hints; 181-210 regs with), 128x128/8 warps (200-420 B spill),
    128x64/4 warps (2.8 KB spill), 64x128 (700 B spill), decode 16x128/4 warps (8 B spill without hints), any D=256.
    """
    if triton is None or dispatch.triton_interpreted():
        return []  # the interpreter's tiles are not the GPU's: the gate compiles without TRITON_INTERPRET
    head_dim, group = 128, 8
    fwd_div = [k for k in _FWD_SIGNATURE if k not in ("Hkv", "qk_scale")]  # pointers, strides, L, M, n_rows, ...
    specs = []
    for name, rows, split in (("gxattn_fwd_prefill_L1024", 1024 * group, False),
                              ("gxattn_fwd_decode_split", 1 * group, True)):
        cfg = _config(rows, head_dim)
        div = fwd_div if name.endswith("L1024") else [k for k in fwd_div if k != "L"]
        sig, seq = dict(_FWD_SIGNATURE), {}
        if not name.endswith("L1024"):  # the JIT passes an int equal to 1 (decode L) as the constexpr 1
            del sig["L"]
            seq = {"L": 1}
        # Decode: the 16-row tile (one query x 8 GQA heads, padded to tl.dot's minimum M) is below wgmma's M = 64,
        # so Triton lowers both dots to mma.sync on sm_90a as well: require exactly that (tensor cores, not FMA).
        # A 64-row tile would be 7/8 padding for 8 real rows; the kernel is memory-bound at decode anyway.
        specs.append(dict(
            name=name, fn=_gxattn_fwd_kernel, signature=sig,
            constexprs=dict(**seq, D=head_dim, GROUP=group, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                            BLOCK_D=cfg["BLOCK_D"], SPLIT=split, PRECISION="tf32"),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], hot_path=True,
            tensor_cores="mma" if split else True, divisible_by_16=div))
    specs.append(dict(
        name="gxattn_combine_decode", fn=_gxattn_combine_kernel, signature=dict(_COMBINE_SIGNATURE),
        constexprs=dict(D=head_dim, BLOCK_S=16, BLOCK_D=128), num_warps=2, num_stages=1, hot_path=True,
        tensor_cores=False, divisible_by_16=["PartO", "PartLse", "Gate", "KVStart", "KVEnd", "Out", "n_rows"]))
    return specs
