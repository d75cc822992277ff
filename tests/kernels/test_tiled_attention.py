"""tiled_attention: the Triton flash-attention kernel (interpreted on CPU) against SDPA, plus the fused QK RMSNorm.

Truth is the reference computed in float64 on the same (already rounded) inputs. The kernel's error must be at most
twice the error of the same PyTorch computation (SDPA, reference RMSNorm) in the input dtype, plus a tiny eps.
"""

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

import nvlm_kernels
from nvlm_kernels import dispatch
from nvlm_kernels.tiled_attention import qk_rmsnorm_ref, tiled_attention, tiled_attention_ref

# The package attribute `tiled_attention` is the function; the module itself:
ta_mod = importlib.import_module("nvlm_kernels.tiled_attention")

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
# The interpreter mishandles bf16 (build_notes.md): on CPU the kernel is tested through fp16/fp32.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
EPS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _triton(*args, **kw):
    with nvlm_kernels.force_backend("triton"):
        return tiled_attention(*args, **kw)


def _inputs(t, h, n, d, dtype, scale=1.0):
    return [(torch.randn(t, h, n, d, device=DEV) * scale).to(dtype) for _ in range(3)]


def _check_close(out, q, k, v, **kw):
    """Kernel error vs float64 truth <= 2 x (same PyTorch computation in q.dtype vs truth) + eps."""
    norm_kw = {key: (w.double() if isinstance(w, torch.Tensor) else w) for key, w in kw.items()}
    truth = tiled_attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                **{key: (w.cpu() if isinstance(w, torch.Tensor) else w) for key, w in norm_kw.items()})
    torch_low = tiled_attention_ref(q, k, v, **kw).double().cpu()
    err_kernel = (out.double().cpu() - truth).abs().max().item()
    err_torch = (torch_low - truth).abs().max().item()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert err_kernel <= 2 * err_torch + EPS[q.dtype], (err_kernel, err_torch)
    return err_kernel, err_torch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize("n", [1, 5, 17, 65])
@pytest.mark.parametrize("t,h", [(1, 1), (3, 2)])
def test_matches_sdpa(t, h, n, d, dtype):
    q, k, v = _inputs(t, h, n, d, dtype)
    _check_close(_triton(q, k, v), q, k, v)


@pytest.mark.parametrize("t,h", [(1, 2), (3, 1)])
def test_other_tile_head_counts(t, h):
    q, k, v = _inputs(t, h, 33, 64, torch.float16)
    _check_close(_triton(q, k, v), q, k, v)


def test_softmax_scale_and_large_logits():
    # Large logits (x4 inputs, scale 0.5) exercise the running max: a softmax without it would overflow.
    q, k, v = _inputs(2, 2, 40, 64, torch.float32, scale=4.0)
    _check_close(_triton(q, k, v, softmax_scale=0.5), q, k, v, softmax_scale=0.5)


def test_strided_qkv_slices_without_copies():
    # The model's layout: one fused projection [T, N, 3, H, D]; q/k/v are strided [T, H, N, D] views of it.
    t, n, h, d = 2, 37, 3, 80
    qkv = torch.randn(t, n, 3, h, d, device=DEV).to(torch.float16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous() and q.stride(-1) == 1
    out = _triton(q, k, v)
    _check_close(out, q, k, v)
    # Output is stored token-major, so the projection's [T, N, H*D] input is a free view.
    assert out.transpose(1, 2).is_contiguous()


def test_non_unit_head_dim_stride():
    base = torch.randn(2, 2, 9, 2 * 64, device=DEV)
    q, k, v = base[..., ::2], base[..., 1::2], base[..., :64]
    assert q.stride(-1) == 2
    _check_close(_triton(q, k, v), q, k, v)


def test_qk_rmsnorm_ref_matches_rms_norm_over_all_heads():
    # Independent check of the reference: F.rms_norm over the [T, N, H*D] token layout (fp32 throughout).
    t, h, n, d = 2, 3, 7, 64
    x = torch.randn(t, n, h * d) * 3
    w = torch.rand(h * d) + 0.5
    want = F.rms_norm(x, (h * d,), w, 1e-6)                                         # [T, N, H*D]
    got = qk_rmsnorm_ref(x.view(t, n, h, d).transpose(1, 2), w, 1e-6)             # [T, H, N, D]
    torch.testing.assert_close(got.transpose(1, 2).reshape(t, n, h * d), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,h,n,d", [(1, 1, 5, 64), (2, 3, 65, 80), (3, 2, 17, 128)])
def test_fused_qk_rmsnorm(t, h, n, d, dtype):
    # Raw (un-normalised) projections with a large, token-dependent RMS, so a missing or per-head statistic fails.
    q, k, v = _inputs(t, h, n, d, dtype)
    rms = (torch.rand(t, 1, n, 1, device=DEV) * 8 + 0.5)
    q = (q.float() * rms).to(dtype)
    k = (k.float() * rms.flip(2)).to(dtype)
    wq = (torch.rand(h * d, device=DEV) + 0.5).to(dtype)
    wk = (torch.rand(h * d, device=DEV) + 0.5).to(dtype)
    kw = dict(q_norm_weight=wq, k_norm_weight=wk, norm_eps=1e-6)
    out = _triton(q, k, v, **kw)
    _check_close(out, q, k, v, **kw)
    # The norm really changed the result (it is not silently skipped).
    plain = tiled_attention_ref(q, k, v)
    assert (out.double() - plain.double()).abs().max() > 10 * EPS[dtype] + 1e-3


def test_fused_qk_rmsnorm_strided():
    t, n, h, d = 2, 20, 2, 96
    qkv = (torch.randn(t, n, 3, h, d, device=DEV) * 5).to(torch.float16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    wq = torch.rand(h * d, device=DEV) + 0.5
    wk = torch.rand(h * d, device=DEV) + 0.5
    kw = dict(q_norm_weight=wq, k_norm_weight=wk, norm_eps=1e-6, softmax_scale=0.2)
    _check_close(_triton(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.parametrize("norm", [False, True])
def test_launch_split_over_tiles(monkeypatch, norm):
    # More (tile, head) programs than grid axis 1 holds: the launcher splits over tiles (limit lowered to test it).
    monkeypatch.setattr(ta_mod, "_MAX_GRID_Y", 4)
    q, k, v = _inputs(5, 2, 9, 64, torch.float16, scale=2.0)
    w = torch.rand(2 * 64, device=DEV) + 0.5
    kw = dict(q_norm_weight=w, k_norm_weight=w.flip(0)) if norm else {}
    _check_close(_triton(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.skipif(HAS_CUDA, reason="host-side bf16 upcast is the interpreter path only")
def test_bf16_under_interpreter_upcasts():
    q, k, v = _inputs(1, 2, 9, 64, torch.bfloat16)
    out = _triton(q, k, v)
    truth = tiled_attention_ref(q.double(), k.double(), v.double())
    assert out.dtype == torch.bfloat16
    # fp32 maths then one bf16 rounding of the output: within one bf16 ulp of |out| <= ~3.
    assert (out.double() - truth).abs().max() < 2 ** -7 * 2
    w = (torch.rand(2 * 64) + 0.5).to(torch.bfloat16)
    out = _triton(q, k, v, q_norm_weight=w, k_norm_weight=w)
    truth = tiled_attention_ref(q.double(), k.double(), v.double(), q_norm_weight=w.double(), k_norm_weight=w.double())
    assert out.dtype == torch.bfloat16
    assert (out.double() - truth).abs().max() < 2 ** -7 * 2


def test_cpu_default_is_reference():
    q, k, v = _inputs(1, 1, 4, 64, torch.float32)
    if HAS_CUDA:
        q, k, v = q.cpu(), k.cpu(), v.cpu()
    before = dispatch.usage[("tiled_attention", "ref")]
    out = tiled_attention(q, k, v)
    assert dispatch.usage[("tiled_attention", "ref")] == before + 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_reference_accepts_any_head_dim_but_triton_does_not():
    q, k, v = _inputs(1, 1, 4, 48, torch.float32)
    with nvlm_kernels.force_backend("ref"):
        assert tiled_attention(q, k, v).shape == q.shape
    with pytest.raises(ValueError, match="head dim"):
        _triton(q, k, v)


@pytest.mark.parametrize("case", ["rank", "dtype", "shape", "mixed_dtype", "scale", "one_weight",
                                  "weight_shape", "weight_dtype", "eps", "empty"])
def test_bad_inputs_raise(case):
    q, k, v = _inputs(1, 2, 4, 64, torch.float32)
    w = torch.ones(2 * 64, device=DEV)
    kw = {}
    if case == "rank":
        q = q[0]
    elif case == "dtype":
        q, k, v = q.int(), k.int(), v.int()
    elif case == "shape":
        k = k[:, :, :3]
    elif case == "mixed_dtype":
        v = v.half()
    elif case == "scale":
        kw = dict(softmax_scale=-1.0)
    elif case == "one_weight":
        kw = dict(q_norm_weight=w)
    elif case == "weight_shape":
        kw = dict(q_norm_weight=w[:64], k_norm_weight=w)
    elif case == "weight_dtype":
        kw = dict(q_norm_weight=w.int(), k_norm_weight=w)
    elif case == "eps":
        kw = dict(q_norm_weight=w, k_norm_weight=w, norm_eps=-1.0)
    elif case == "empty":
        q, k, v = q[:, :, :0], k[:, :, :0], v[:, :, :0]
    for backend in ("ref", "triton"):
        with nvlm_kernels.force_backend(backend), pytest.raises(ValueError, match="nvlm_kernels.tiled_attention"):
            tiled_attention(q, k, v, **kw)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_opcheck(norm, varlen):
    q, k, v = _inputs(1, 2, 9, 64, torch.float32)
    w = (torch.rand(2 * 64, device=DEV) + 0.5) if norm else None
    args = (q, k, v, 0.125, w, w, 1e-6)
    if varlen:
        args += (torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=DEV), 5)
    torch.library.opcheck(torch.ops.nvlm_kernels.tiled_attention_triton.default, args)


# ----------------------------------------------------------------------------------------------------------------
# Variable-length tiles (cu_tiles): packed [1, H, S, D], block-diagonal attention
# ----------------------------------------------------------------------------------------------------------------
def _cu(lengths, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=dtype, device=DEV)


def _varlen_truth(q, k, v, cu_tiles, softmax_scale=None, q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6):
    """Independent of tiled_attention_ref's loop: one explicit float64 softmax over [S, S] scores with the
    block-diagonal mask (token i sees token j iff they lie in the same tile)."""
    q, k, v = (x.double().cpu() for x in (q, k, v))
    if q_norm_weight is not None:
        q = qk_rmsnorm_ref(q, q_norm_weight.double().cpu(), norm_eps)
        k = qk_rmsnorm_ref(k, k_norm_weight.double().cpu(), norm_eps)
    cu = cu_tiles.cpu().long()
    tile_of = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff())            # [S]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = (q @ k.transpose(-1, -2)) * scale                                              # [1, H, S, S]
    scores = scores.masked_fill(tile_of[:, None] != tile_of[None, :], float("-inf"))
    return scores.softmax(-1) @ v


def _check_varlen(out, q, k, v, cu_tiles, **kw):
    """Kernel error vs the float64 truth <= 2 x (PyTorch reference in q.dtype vs truth) + eps."""
    truth = _varlen_truth(q, k, v, cu_tiles, **kw)
    err_kernel = (out.double().cpu() - truth).abs().max().item()
    err_torch = (tiled_attention_ref(q, k, v, cu_tiles=cu_tiles, **kw).double().cpu() - truth).abs().max().item()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert err_kernel <= 2 * err_torch + EPS[q.dtype], (err_kernel, err_torch)


# [5, 1, 0, 9]: one q block and one masked K block per tile, an empty tile; [40, 17, 0, 33] (interpreter blocks
# BLOCK_M=32, BLOCK_N=16): several q blocks, full + partial K blocks, programs past a short tile's end exiting.
LENGTHS = [[5, 1, 0, 9], [40, 17, 0, 33]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_varlen_matches_truth(lengths, dtype):
    cu = _cu(lengths)
    q, k, v = _inputs(1, 2, sum(lengths), 64, dtype)
    _check_varlen(_triton(q, k, v, cu_tiles=cu), q, k, v, cu)


def test_varlen_model_layout_d80_int64_offsets():
    # Packed fused-qkv projection [1, S, 3, H, D]: strided q/k/v views; D=80 is padded inside the kernel.
    lengths, h, d = [7, 0, 12, 3], 2, 80
    qkv = torch.randn(1, sum(lengths), 3, h, d, device=DEV).to(torch.float16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    cu = _cu(lengths, torch.int64)
    out = _triton(q, k, v, cu_tiles=cu, softmax_scale=0.3)
    _check_varlen(out, q, k, v, cu, softmax_scale=0.3)
    assert out.transpose(1, 2).is_contiguous()                   # token-major, like the dense output
    torch.testing.assert_close(out, _triton(q, k, v, cu_tiles=cu.int(), softmax_scale=0.3), rtol=0, atol=0)


@pytest.mark.parametrize("norm", [False, True])
def test_varlen_equal_lengths_is_the_dense_call(norm):
    t, h, n, d = 3, 2, 17, 64
    q, k, v = _inputs(t, h, n, d, torch.float16, scale=2.0)
    w = (torch.rand(h * d, device=DEV) + 0.5) if norm else None
    kw = dict(q_norm_weight=w, k_norm_weight=w.flip(0)) if norm else {}
    dense = _triton(q, k, v, **kw)                                                        # [T, H, N, D]

    def pack(x):                                                                          # -> [1, H, T*N, D]
        return x.transpose(0, 1).reshape(1, h, t * n, d)

    packed = _triton(pack(q), pack(k), pack(v), cu_tiles=_cu([n] * t), **kw)
    unpacked = packed.reshape(h, t, n, d).transpose(0, 1)
    if HAS_CUDA:  # the two kernels may autotune to different block sizes
        torch.testing.assert_close(unpacked, dense, rtol=2e-3, atol=2e-3)
    else:         # same blocks, same operations: bit-identical
        torch.testing.assert_close(unpacked, dense, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter on NaN tiles
@pytest.mark.parametrize("norm", [False, True])
def test_varlen_is_block_diagonal(norm):
    # Replace every other tile's q/k/v by NaN: the outputs of the kept tiles must not change by one bit (any leak
    # across a tile boundary, through the attention or the QK-norm statistic, would turn them NaN or move them).
    lengths, h, d = [6, 0, 11, 3, 9], 2, 64
    cu = _cu(lengths)
    q, k, v = _inputs(1, h, sum(lengths), d, torch.float16)
    w = (torch.rand(h * d, device=DEV) + 0.5) if norm else None
    kw = dict(q_norm_weight=w, k_norm_weight=w) if norm else {}
    before = _triton(q, k, v, cu_tiles=cu, **kw)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    changed = [bounds[i] for i in (2, 4)]
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for a, b in changed:
        for x in (q2, k2, v2):
            x[:, :, a:b] = float("nan")
    after = _triton(q2, k2, v2, cu_tiles=cu, **kw)
    for i in (0, 3):
        a, b = bounds[i]
        torch.testing.assert_close(after[:, :, a:b], before[:, :, a:b], rtol=0, atol=0)
    for a, b in changed:
        assert after[:, :, a:b].isnan().all()                    # the NaN really went in


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_fused_qk_rmsnorm(dtype):
    lengths, h, d = [9, 0, 4, 13], 2, 64
    cu = _cu(lengths)
    q, k, v = _inputs(1, h, sum(lengths), d, dtype)
    rms = torch.rand(1, 1, sum(lengths), 1, device=DEV) * 8 + 0.5
    q, k = (q.float() * rms).to(dtype), (k.float() * rms.flip(2)).to(dtype)
    kw = dict(q_norm_weight=(torch.rand(h * d, device=DEV) + 0.5).to(dtype),
              k_norm_weight=(torch.rand(h * d, device=DEV) + 0.5).to(dtype), norm_eps=1e-6)
    out = _triton(q, k, v, cu_tiles=cu, **kw)
    _check_varlen(out, q, k, v, cu, **kw)
    plain = _varlen_truth(q, k, v, cu)
    assert (out.double().cpu() - plain).abs().max() > 10 * EPS[dtype] + 1e-3           # the norm was applied


@pytest.mark.parametrize("norm", [False, True])
def test_varlen_launch_split_over_tiles(monkeypatch, norm):
    # More (tile, head) programs than grid axis 1 holds: the launcher splits over tiles (limit lowered to test it).
    monkeypatch.setattr(ta_mod, "_MAX_GRID_Y", 4)                # H=2: 2 tiles per launch, 3 launches
    lengths = [3, 8, 0, 5, 1]
    cu = _cu(lengths)
    q, k, v = _inputs(1, 2, sum(lengths), 64, torch.float16, scale=2.0)
    w = torch.rand(2 * 64, device=DEV) + 0.5
    kw = dict(q_norm_weight=w, k_norm_weight=w.flip(0)) if norm else {}
    _check_varlen(_triton(q, k, v, cu_tiles=cu, **kw), q, k, v, cu, **kw)


@pytest.mark.parametrize("norm", [False, True])
def test_varlen_cpu_path(norm):
    # The CPU default (ref backend: SDPA per tile) against the explicit block-diagonal truth, in fp32 and fp16.
    lengths, h, d = [5, 1, 0, 9, 30], 3, 48
    cu = _cu(lengths).cpu()
    w = (torch.rand(h * d) + 0.5) if norm else None
    kw = dict(q_norm_weight=w, k_norm_weight=w.flip(0)) if norm else {}
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        q, k, v = (x.cpu() for x in _inputs(1, h, sum(lengths), d, dtype))
        before = dispatch.usage[("tiled_attention", "ref")]
        out = tiled_attention(q, k, v, cu_tiles=cu, **kw)
        assert dispatch.usage[("tiled_attention", "ref")] == before + 1
        assert out.shape == q.shape and out.dtype == dtype
        truth = _varlen_truth(q, k, v, cu, **kw)
        assert (out.double() - truth).abs().max() < tol


def test_varlen_reference_propagates_nan_and_has_gradients():
    cu = _cu([4, 0, 6]).cpu()
    q, k, v = (torch.randn(1, 2, 10, 64, requires_grad=True) for _ in range(3))
    out = tiled_attention(q, k, v, cu_tiles=cu)                  # grad needed: the differentiable reference
    out.sum().backward(retain_graph=True)
    assert q.grad is not None and q.grad[:, :, :4].abs().sum() > 0
    # Tile 0's keys do not influence tile 1's outputs: zero gradient across the boundary.
    k.grad = None
    out[:, :, 4:].sum().backward()
    assert (k.grad[:, :, :4] == 0).all() and k.grad[:, :, 4:].abs().sum() > 0
    with torch.no_grad():
        qn = q.detach().clone()
        qn[0, 0, 1, 0] = float("nan")
        res = tiled_attention_ref(qn, k.detach(), v.detach(), cu_tiles=cu)
    assert res[0, 0, 1].isnan().all() and not res[0, 0, 4:].isnan().any()


@pytest.mark.parametrize("case", ["float_dtype", "rank", "too_short", "not_zero_start", "decreasing", "wrong_end",
                                  "device", "batched", "not_tensor"])
def test_varlen_bad_cu_tiles_raise(case):
    q, k, v = _inputs(1, 2, 10, 64, torch.float32)
    cu = _cu([4, 6])
    if case == "float_dtype":
        cu = cu.float()
    elif case == "rank":
        cu = cu.view(1, 3)
    elif case == "too_short":
        cu = cu[:1]
    elif case == "not_zero_start":
        cu = cu + 1
    elif case == "decreasing":
        cu = torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=DEV)
    elif case == "wrong_end":
        cu = _cu([4, 5])
    elif case == "device":
        cu = cu.to("meta")
    elif case == "batched":
        q, k, v = _inputs(2, 2, 10, 64, torch.float32)
    elif case == "not_tensor":
        cu = [0, 4, 10]
    for backend in ("ref", "triton"):
        with nvlm_kernels.force_backend(backend), pytest.raises(ValueError, match="'cu_tiles'"):
            tiled_attention(q, k, v, cu_tiles=cu)


@pytest.mark.parametrize("capability", [80, 90])
def test_gate_specs_cover_kernel_parameters(capability):
    specs = ta_mod.gate_specs(capability)
    assert len({s["name"] for s in specs}) == len(specs)
    for s in specs:
        params = inspect.signature(s["fn"].fn).parameters
        assert set(s["signature"]) | set(s["constexprs"]) == set(params), s["name"]
        assert not set(s["signature"]) & set(s["constexprs"]), s["name"]
        assert set(s["divisible_by_16"]) <= set(s["signature"]), s["name"]
        assert {a for a in s["signature"] if a.startswith("stride")} <= set(s["divisible_by_16"]), s["name"]
        assert not {"H", "N", "MAX_LEN_P2"} & set(s["divisible_by_16"]), s["name"]  # 25 heads, 1025 tokens
        assert s["num_warps"] in (4, 8) and s["num_stages"] >= 1
        assert s["hot_path"] and s["constexprs"]["HEAD_DIM"] == 128      # only NVLM-D-72B's head dim is gated
    # every (kernel, dtype, norm) the package launches has at least one config, and the gate covers exactly the
    # candidates the runtime autotuner may pick -- for the dense and the varlen (cu_tiles) kernel alike
    major = 9 if capability >= 90 else 8
    for kernel in (ta_mod._attn_fwd_kernel, ta_mod._attn_fwd_varlen_kernel):
        attn = [s for s in specs if s["fn"] is kernel]
        assert all(s["tensor_cores"] is True for s in attn)
        for dtype, ptr in ((torch.bfloat16, "*bf16"), (torch.float16, "*fp16")):
            for norm in (False, True):
                gated = sorted((s["constexprs"]["BLOCK_M"], s["constexprs"]["BLOCK_N"], s["num_warps"],
                                s["num_stages"])
                               for s in attn if s["signature"]["Q"] == ptr and s["constexprs"]["NORM"] == norm)
                assert gated and gated == sorted(ta_mod._candidates(128, dtype, major, norm)), (kernel, dtype, norm)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_varlen_real_shape_gpu():
    # Six full tiles and a smaller one (a different resolution), packed: the compiled varlen kernel + QK-norm.
    lengths, h, d = [1025] * 6 + [257, 0, 577], 25, 128
    cu = _cu(lengths)
    qkv = torch.randn(1, sum(lengths), 3, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    w = (torch.rand(h * d, device="cuda") + 0.5).to(torch.bfloat16)
    for kw in ({}, dict(q_norm_weight=w, k_norm_weight=w)):
        out = tiled_attention(q, k, v, cu_tiles=cu, **kw)
        truth = tiled_attention_ref(q.float(), k.float(), v.float(), cu_tiles=cu,
                                    **{key: x.float() for key, x in kw.items()})
        err = (out.float() - truth).abs().max().item()
        err_torch = (tiled_attention_ref(q, k, v, cu_tiles=cu, **kw).float() - truth).abs().max().item()
        assert err <= 2 * err_torch + EPS[torch.bfloat16], (err, err_torch)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("d", [64, 128])
def test_real_shape_gpu(d):
    t, h, n = 7, 25, 1025
    qkv = torch.randn(t, n, 3, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = tiled_attention(q, k, v)
    truth = tiled_attention_ref(q.float(), k.float(), v.float())
    err = (out.float() - truth).abs().max().item()
    err_torch = (tiled_attention_ref(q, k, v).float() - truth).abs().max().item()
    assert err <= 2 * err_torch + EPS[torch.bfloat16], (err, err_torch)
