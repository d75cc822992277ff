"""Benchmark: gated cross-attention (``nvlm_kernels.gated_cross_attention``) for NVLM-X / NVLM-H.

Shapes (72B): text queries Hq=64, kv heads Hkv=8, D=128, image memory M = 7*256 = 1792 tokens (6 tiles + thumbnail),
bf16. Prefill L=1024 with a realistic NVLM-X mask: 16 system-prompt tokens before the image (empty range), then the
7 tile tags (4 tokens each, tag k -> tile k only), then text that sees the whole image. Decode: L=1 over the whole
image, batch 1 and 16. Useful FLOPs = 4 * Hq * D * sum of the range lengths (masked-out keys are not counted).

Baselines, measured in the same run, are what public Llama-3.2-Vision code does (anchors.md §2: HF / vLLM mllama):
* ``sdpa+ops``: K/V expanded per query head (``repeat_kv``), torch SDPA with a dense additive mask prepared once per
  forward (fully-masked rows set to attend everywhere, as mllama does), transpose + reshape to [B, L, Hq*D], then
  the row mask and ``tanh(gate)`` as separate multiplies.
* ``sdpa_gqa+ops``: the same with SDPA's own GQA (``enable_gqa=True``, no K/V expansion): a stronger baseline.
Rows:
* ``gated_xattn`` (attention + gate + row mask, output in o_proj's layout): the kernel vs both baselines.
* ``gated_xattn_block`` (+ o_proj and residual): the kernel then ``torch.addmm(x, attn, W_o^T)`` (residual fused in the
  GEMM epilogue; see the module docstring of nvlm_kernels.gated_xattn for why the residual cannot go in the attention
  epilogue) vs ``sdpa+ops``: SDPA, o_proj, row mask, tanh(gate), residual add as separate ops.

GPU rows need a CUDA device (target: >= 1.5x over ``sdpa+ops``). CPU rows time the CPU path (dispatch backend
``ref``: SDPA over GQA-grouped rows) against the same baselines and against the explicit fp32 reference
(``gated_cross_attention_ref``): the real decode shape, and in quick mode a reduced prefill (Hq=16, Hkv=2, L=256,
M=448); the full mode adds the real prefill shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import nvlm_kernels
from bench import harness
from bench.shapes import HEAD_DIM, HIDDEN, IMAGE_TOKENS, NUM_HEADS, NUM_KV_HEADS
from nvlm_kernels.gated_xattn import gated_cross_attention, gated_cross_attention_ref, ranges_to_mask

OP = "gated_xattn"
PROMPT_TOKENS = 16   # text before the image: empty ranges
TAG_TOKENS = 4       # tokens per <tile_k> tag


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def nvlm_x_ranges(bsz: int, seq_q: int, tiles: int, tile_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_start, kv_end [B, L] int32 for: prompt text (empty) | tags of tiles 0..T-1 (tile k) | text (all tiles).
    Decode (L=1) is a text token after the image."""
    m = tiles * tile_tokens
    start = torch.zeros(seq_q, dtype=torch.int32)
    end = torch.full((seq_q,), m, dtype=torch.int32)
    if seq_q > PROMPT_TOKENS + tiles * TAG_TOKENS:
        end[:PROMPT_TOKENS] = 0
        for t in range(tiles):
            rows = slice(PROMPT_TOKENS + t * TAG_TOKENS, PROMPT_TOKENS + (t + 1) * TAG_TOKENS)
            start[rows], end[rows] = t * tile_tokens, (t + 1) * tile_tokens
    return start.expand(bsz, seq_q).contiguous().to(device), end.expand(bsz, seq_q).contiguous().to(device)


def _inputs(bsz, hq, hkv, seq_q, tiles, tile_tokens, d, dtype, device, copies=1):
    """q in the model's layout (a [B, Hq, L, D] view of [B, L, Hq, D]); ``copies`` K/V sets to rotate through."""
    m = tiles * tile_tokens
    q = torch.randn(bsz, seq_q, hq, d, device=device).to(dtype).transpose(1, 2)
    kvs = [(torch.randn(bsz, hkv, m, d, device=device).to(dtype), torch.randn(bsz, hkv, m, d, device=device).to(dtype))
           for _ in range(copies)]
    gate = torch.tensor(0.37, device=device).to(dtype)
    start, end = nvlm_x_ranges(bsz, seq_q, tiles, tile_tokens, device)
    return q, kvs, gate, start, end


def _mllama_mask(start, end, m, dtype):
    """What mllama prepares once per forward: additive mask [B, 1, L, M] whose fully-masked rows are all 0
    (attend everywhere, output discarded later) and the row mask [B, L, 1]."""
    allowed = ranges_to_mask(start, end, m)
    row = allowed.any(-1, keepdim=True)
    add = torch.zeros(allowed.shape, dtype=dtype, device=start.device)
    add = add.masked_fill(~(allowed | ~row), torch.finfo(dtype).min)
    return add[:, None], row.to(dtype)


def _flops(start, end, hq, d) -> float:
    return 4.0 * hq * d * float((end - start).clamp(min=0).sum())


# ----------------------------------------------------------------------------------------------------------------
# The contenders
# ----------------------------------------------------------------------------------------------------------------
def _ours(backend):
    def fn(q, k, v, gate, start, end):
        with nvlm_kernels.force_backend(backend):
            o = gated_cross_attention(q, k, v, gate, start, end, check_ranges=False)   # [B, L, Hq, D]
        return o.view(o.shape[0], o.shape[1], -1)                                      # o_proj input, no copy
    return fn


def _sdpa_ops(q, k, v, gate, mask_add, row_mask, gqa=False):
    bsz, hq, seq_q, d = q.shape
    if not gqa:
        k = k.repeat_interleave(hq // k.shape[1], dim=1)                                # HF repeat_kv
        v = v.repeat_interleave(hq // v.shape[1], dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_add, enable_gqa=gqa)   # [B, Hq, L, D]
    o = o.transpose(1, 2).reshape(bsz, seq_q, hq * d)
    return o * row_mask * gate.tanh()


def _block_ours(q, k, v, gate, start, end, x, w_o):
    attn = _ours(None)(q, k, v, gate, start, end)                                      # gated, row-masked
    return torch.addmm(x.view(-1, x.shape[-1]), attn.view(-1, attn.shape[-1]), w_o.t()).view(x.shape)


def _block_sdpa_ops(q, k, v, gate, mask_add, row_mask, x, w_o):
    bsz, hq, seq_q, d = q.shape
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    v = v.repeat_interleave(hq // v.shape[1], dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_add)
    o = F.linear(o.transpose(1, 2).reshape(bsz, seq_q, hq * d), w_o)
    return x + gate.tanh() * (o * row_mask)


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------
def _check_same(ours, theirs, what: str) -> None:
    """A benchmark of a wrong answer is worthless: compare once before timing (bf16-level tolerance)."""
    err = (ours.float() - theirs.float()).abs().max().item()
    scale = theirs.float().abs().max().item()
    if not err <= 0.02 * scale + 1e-3:
        raise RuntimeError(f"bench_gated_xattn: {what} differs from the baseline (max err {err:.3g}, max {scale:.3g})")


def _shape(bsz, hq, hkv, seq_q, m, d) -> str:
    return f"B{bsz}xHq{hq}xHkv{hkv}xL{seq_q}xM{m}xD{d}"


def _gpu_rows(quick: bool) -> list[harness.Row]:
    dev = torch.device("cuda")
    dt = torch.bfloat16
    reps = 20 if quick else 100
    rows = []
    cases = [(1, 1024), (1, 1)] if quick else [(1, 1024), (1, 1), (16, 1)]
    for bsz, seq_q in cases:
        hq, hkv, d, tiles = NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, IMAGE_TOKENS // 256
        q, kvs, gate, start, end = _inputs(bsz, hq, hkv, seq_q, tiles, 256, d, dt, dev)
        k, v = kvs[0]
        mask_add, row_mask = _mllama_mask(start, end, k.shape[2], dt)
        shape = _shape(bsz, hq, hkv, seq_q, k.shape[2], d)
        flops = _flops(start, end, hq, d)
        kv_bytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()
        decode = seq_q == 1
        perf = dict(bytes_moved=kv_bytes, limit="dram_read_gbps") if decode else dict(flops=flops,
                                                                                      limit="matmul_tflops")
        base = {
            "sdpa+ops": harness.measure(_sdpa_ops, args_list=[(q, k, v, gate, mask_add, row_mask)], reps=reps),
            "sdpa_gqa+ops": harness.measure(lambda *a: _sdpa_ops(*a, gqa=True),
                                            args_list=[(q, k, v, gate, mask_add, row_mask)], reps=reps),
        }
        for name, t in base.items():
            rows.append(harness.make_row(OP, shape, dt, name, t, device=dev, note="baseline", **perf))
        _check_same(_ours("triton")(q, k, v, gate, start, end), _sdpa_ops(q, k, v, gate, mask_add, row_mask), shape)
        t = harness.measure(_ours("triton"), args_list=[(q, k, v, gate, start, end)], reps=reps)
        rows.append(harness.make_row(OP, shape, dt, "triton", t, baselines=base, device=dev,
                                     note="gate + row mask in the epilogue; out in o_proj layout", **perf))
        # The whole gated block minus the norm: + o_proj and the residual.
        x = torch.randn(bsz, seq_q, HIDDEN, device=dev).to(dt)
        w_o = (torch.randn(HIDDEN, hq * d, device=dev) * (hq * d) ** -0.5).to(dt)
        block_flops = flops + 2.0 * bsz * seq_q * HIDDEN * hq * d
        bb = {"sdpa+ops": harness.measure(_block_sdpa_ops, args_list=[(q, k, v, gate, mask_add, row_mask, x, w_o)],
                                          reps=reps)}
        rows.append(harness.make_row(OP + "_block", shape, dt, "sdpa+ops", bb["sdpa+ops"], flops=block_flops,
                                     device=dev, note="baseline: SDPA, o_proj, mask, tanh, residual"))
        _check_same(_block_ours(q, k, v, gate, start, end, x, w_o),
                    _block_sdpa_ops(q, k, v, gate, mask_add, row_mask, x, w_o), "block " + shape)
        t = harness.measure(_block_ours, args_list=[(q, k, v, gate, start, end, x, w_o)], reps=reps)
        rows.append(harness.make_row(OP + "_block", shape, dt, "triton+addmm", t, flops=block_flops, baselines=bb,
                                     device=dev, note="residual in the o_proj GEMM epilogue (addmm)"))
    return rows


def _cpu_rows(quick: bool) -> list[harness.Row]:
    dt = torch.bfloat16
    rows = []
    # (B, Hq, Hkv, L, tiles, tile tokens): the real decode; a reduced prefill (quick) or the real one (full)
    cases = [(1, NUM_HEADS, NUM_KV_HEADS, 1, 7, 256, "real 72B decode"),
             (1, 16, 2, 256, 7, 64, "reduced prefill")]
    if not quick:
        cases.append((1, NUM_HEADS, NUM_KV_HEADS, 1024, 7, 256, "real 72B prefill"))
    for bsz, hq, hkv, seq_q, tiles, tile_tokens, what in cases:
        d = HEAD_DIM
        m = tiles * tile_tokens
        decode = seq_q == 1
        kv_bytes = 2 * bsz * hkv * m * d * 2
        # Decode is memory-bound: rotate K/V copies past the LLC (10 such layers per token never stay cached).
        copies = min(harness.copies_to_exceed_cache(kv_bytes), 96) if decode else 1
        q, kvs, gate, start, end = _inputs(bsz, hq, hkv, seq_q, tiles, tile_tokens, d, dt, "cpu", copies)
        mask_add, row_mask = _mllama_mask(start, end, m, dt)
        shape = _shape(bsz, hq, hkv, seq_q, m, d)
        perf = (dict(bytes_moved=kv_bytes, limit="dram_read_gbps") if decode
                else dict(flops=_flops(start, end, hq, d), limit="matmul_tflops"))
        slow = not decode and seq_q >= 1024
        kw = dict(warmup=0, reps=1, min_time_s=0.0) if slow else dict(warmup=1, reps=5 if quick else 20)
        args = [(q, k, v, gate, mask_add, row_mask) for k, v in kvs]
        _check_same(_ours("ref")(q, *kvs[0], gate, start, end), _sdpa_ops(*args[0]), shape)
        base = {"sdpa+ops": harness.measure(_sdpa_ops, args_list=args, **kw),
                "sdpa_gqa+ops": harness.measure(lambda *a: _sdpa_ops(*a, gqa=True), args_list=args, **kw),
                "fp32_ref": harness.measure(gated_cross_attention_ref,
                                            args_list=[(q, k, v, gate, start, end) for k, v in kvs], **kw)}
        for name, t in base.items():
            rows.append(harness.make_row(OP, shape, dt, name, t, device="cpu", note=f"baseline; {what}", **perf))
        t = harness.measure(_ours("ref"), args_list=[(q, k, v, gate, start, end) for k, v in kvs], **kw)
        rows.append(harness.make_row(OP, shape, dt, "ref", t, baselines=base, device="cpu",
                                     note=f"CPU path (SDPA over GQA-grouped rows); {what}"
                                          + (f"; {copies} K/V copies rotated" if copies > 1 else ""), **perf))
    return rows


def run(quick: bool = False) -> list[harness.Row]:
    rows = _cpu_rows(quick)
    if torch.cuda.is_available():
        rows += _gpu_rows(quick)
    return rows


# ---- pytest-benchmark entry points (``pytest bench/bench_gated_xattn.py``) ---------------------------------------
def test_gated_xattn_rows(benchmark):
    """The whole table once (quick set), rows stored in the benchmark JSON."""
    rows = benchmark.pedantic(run, args=(True,), rounds=1, iterations=1)
    benchmark.extra_info["rows"] = [r.to_dict() for r in rows]
    benchmark.extra_info["machine"] = harness.machine_info()
    assert rows and all(r.median_ms > 0 for r in rows)


def test_gated_xattn_decode_default_backend(benchmark):
    """The dispatched op as the model's decode step calls it (72B shape, L=1)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, kvs, gate, start, end = _inputs(1, NUM_HEADS, NUM_KV_HEADS, 1, 7, 256, HEAD_DIM, torch.bfloat16, dev)
    k, v = kvs[0]

    def fn():
        out = gated_cross_attention(q, k, v, gate, start, end, check_ranges=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == (1, 1, NUM_HEADS, HEAD_DIM)
