"""Hypothesis fuzz of every op against an independent truth, over shapes and dtypes, on the compiled CPU path, the
reference path and (interpreted, few examples) the Triton path. Bounded: fixed example counts, no deadline,
derandomised (the same examples in every CI run), no example database written to the checkout.

Truths are independent of the code under test: pixel shuffle as one reshape/permute (the library's reference
follows InternVL's sequence of views), everything else in fp64. Tolerances follow the team rule: the kernel's
error is compared with the error of the same computation done by torch in the input dtype.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nvlm_kernels as nk
from nvlm_kernels import _ext, dispatch, packing
from nvlm_kernels.gated_xattn import gated_cross_attention_ref

HAS_CPU = _ext.has_kernel("pixel_shuffle", "CPU") and _ext.has_kernel("w8a16_linear", "CPU")
CPU_BACKENDS = ["cpu", "ref"] if HAS_CPU else ["ref"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)
SLOW = settings(max_examples=8, deadline=None, derandomize=True, database=None)   # Triton interpreter

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
# Triton runs on the GPU when there is one, else under the interpreter (tests/conftest.py) on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (dispatch.triton_available() and (torch.cuda.is_available() or dispatch.triton_interpreted())),
    reason="no Triton (or no GPU and no TRITON_INTERPRET=1)")


def _randn(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _eps(dtype) -> float:
    return torch.finfo(dtype).eps


# ----------------------------------------------------------------------------------------------------------------
# pixel_shuffle / pixel_shuffle_layernorm
# ----------------------------------------------------------------------------------------------------------------
def shuffle_truth(x, version):
    """One reshape + permute: out[t, i*(s/2)+j, b*2C + a*C + c] = x[t, (2i+b)*s + 2j+a, c] (v2; v1 swaps i, j)."""
    t, n, c = x.shape
    half = int(round(n ** 0.5)) // 2
    h = x.reshape(t, half, 2, half, 2, c)                                  # [t, i, b, j, a, c]
    order = (0, 1, 3, 2, 4, 5) if version == "v2" else (0, 3, 1, 2, 4, 5)
    return h.permute(*order).reshape(t, half * half, 4 * c)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@FAST
@given(t=st.integers(1, 3), half=st.integers(1, 5), c=st.integers(1, 40), dtype=st.sampled_from(DTYPES),
       version=st.sampled_from(["v1", "v2"]), seed=st.integers(0, 2**16))
def test_fuzz_pixel_shuffle(backend, t, half, c, dtype, version, seed):
    x = _randn(seed, t, 4 * half * half, c, dtype=dtype)
    with nk.force_backend(backend):
        out = nk.pixel_shuffle(x, version=version)
    assert out.dtype == dtype and torch.equal(out, shuffle_truth(x, version))        # pure data movement: exact


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@FAST
@given(t=st.integers(1, 3), half=st.integers(1, 4), c=st.integers(1, 48), dtype=st.sampled_from(DTYPES),
       version=st.sampled_from(["v1", "v2"]), eps=st.sampled_from([1e-5, 1e-6]), shift=st.sampled_from([0.0, 30.0]),
       seed=st.integers(0, 2**16))
def test_fuzz_pixel_shuffle_layernorm(backend, t, half, c, dtype, version, eps, shift, seed):
    x = (_randn(seed, t, 4 * half * half, c) + shift).to(dtype)                      # shift: |mean| >> std
    w, b = _randn(seed + 1, 4 * c, dtype=dtype), _randn(seed + 2, 4 * c, dtype=dtype)
    with nk.force_backend(backend):
        out = nk.pixel_shuffle_layernorm(x, w, b, eps, version=version)
    y = shuffle_truth(x, version).double()
    truth = F.layer_norm(y, (4 * c,), w.double(), b.double(), eps)
    low = F.layer_norm(shuffle_truth(x, version), (4 * c,), w, b, eps).double()      # torch in the input dtype
    err, low_err = (out.double() - truth).abs().max().item(), (low - truth).abs().max().item()
    # Conditioning: a row's values are known to ~fp32 eps * max|y|, which is cond = max|y| / std(y) times that
    # relative to the normalised output (30 for the shifted rows); a single small case can be luckier in torch.
    cond = (y.abs().amax(-1) / y.std(-1, correction=0).clamp_min(1e-3)).max().item()
    slack = 4 * _eps(dtype) * truth.abs().max().item() + 4 * _eps(torch.float32) * cond * w.abs().max().item()
    assert out.dtype == dtype and out.shape == truth.shape
    assert err <= 2 * low_err + slack + 1e-6, (err, low_err, slack)


# ----------------------------------------------------------------------------------------------------------------
# w8a16_linear / w4a16_linear
# ----------------------------------------------------------------------------------------------------------------
def _exact_scales(seed, shape, scale_dtype):
    """Few significant bits, so the dequantised weight is exact in every dtype: the error is the matmul's alone."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(-9, -5, shape, generator=g).float()
    j = torch.randint(0, 4, shape, generator=g).float()
    return (torch.exp2(e) * (1 + j / 4)).to(scale_dtype)


def check_linear(out, x, w, bias):
    truth = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    low = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype)).double()
    err, low_err = (out.double() - truth).abs().max().item(), (low - truth).abs().max().item()
    slack = 1e-6 * (x.double().abs() @ w.double().abs().t()).max().item() + 1e-6
    assert out.dtype == x.dtype and out.shape == truth.shape
    assert err <= 2 * low_err + slack, (err, low_err, slack)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@FAST
@given(m=st.integers(1, 40), k=st.integers(1, 160), n=st.integers(1, 48), dtype=st.sampled_from(DTYPES),
       scale_dtype=st.sampled_from(DTYPES), with_bias=st.booleans(), lead=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_w8a16_linear(backend, m, k, n, dtype, scale_dtype, with_bias, lead, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = _exact_scales(seed, (n,), scale_dtype)
    x = _randn(seed + 1, *((2, m) if lead else (m,)), k, dtype=dtype)               # any leading shape
    bias = _randn(seed + 2, n, dtype=dtype) if with_bias else None
    with nk.force_backend(backend):
        out = nk.w8a16_linear(x, q, scale, bias)
    check_linear(out, x, packing.dequantize_int8(q, scale, torch.float64), bias)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@FAST
@given(m=st.integers(1, 40), groups=st.integers(1, 3), group_size=st.sampled_from([32, 64, 128]),
       n=st.integers(1, 48), dtype=st.sampled_from(DTYPES), scale_dtype=st.sampled_from(DTYPES),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_w4a16_linear(backend, m, groups, group_size, n, dtype, scale_dtype, with_bias, seed):
    k = groups * group_size
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8, generator=g)
    scales = _exact_scales(seed, (n, groups), scale_dtype)
    qweight = packing.pack_int4(q)
    x = _randn(seed + 1, m, k, dtype=dtype)
    bias = _randn(seed + 2, n, dtype=dtype) if with_bias else None
    with nk.force_backend(backend):
        out = nk.w4a16_linear(x, qweight, scales, zeros, group_size, bias)
    w = (q.double().reshape(n, groups, group_size) - zeros.double()[..., None]) * scales.double()[..., None]
    check_linear(out, x, w.reshape(n, k), bias)                                      # truth from unpacked q


# ----------------------------------------------------------------------------------------------------------------
# tiled_attention
# ----------------------------------------------------------------------------------------------------------------
def attention_truth(q, k, v, scale, qw=None, kw=None, eps=1e-6):
    """fp64 formula; the optional RMSNorm spans all heads of a token (InternViT q_norm/k_norm)."""
    q, k, v = q.double(), k.double(), v.double()
    if qw is not None:
        t, h, n, d = q.shape

        def norm(x, w):
            return x * torch.rsqrt(x.pow(2).mean(dim=(1, 3), keepdim=True) + eps) * w.double().view(1, h, 1, d)

        q, k = norm(q, qw), norm(k, kw)
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def check_attention(out, truth, dtype, low):
    """``low``: the same computation done by torch in the input dtype (the fp32-statistics reference)."""
    err = (out.double() - truth).abs().max().item()
    low_err = (low.double() - truth).abs().max().item()
    assert out.dtype == dtype and out.shape == truth.shape
    assert err <= 2 * low_err + 8 * _eps(dtype) + 1e-6, (err, low_err)


def _attention_case(t, h, n, d, dtype, norm, seed):
    q, k, v = (_randn(seed + i, t, h, n, d, dtype=dtype) for i in range(3))
    qw = kw = None
    if norm:
        qw, kw = (1 + 0.1 * _randn(seed + 3, h * d)).to(dtype), (1 + 0.1 * _randn(seed + 4, h * d)).to(dtype)
    return q, k, v, qw, kw


@FAST
@given(t=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(1, 40), d=st.sampled_from([8, 64, 80, 96, 128]),
       dtype=st.sampled_from(DTYPES), norm=st.booleans(), scale=st.sampled_from([None, 0.05]),
       seed=st.integers(0, 2**16))
def test_fuzz_tiled_attention_reference_path(t, h, n, d, dtype, norm, scale, seed):
    q, k, v, qw, kw = _attention_case(t, h, n, d, dtype, norm, seed)
    with nk.force_backend("ref"):
        out = nk.tiled_attention(q, k, v, softmax_scale=scale, q_norm_weight=qw, k_norm_weight=kw)
    s = d ** -0.5 if scale is None else scale
    truth = attention_truth(q, k, v, s, qw, kw)
    # "torch in the input dtype": the math path on inputs rounded to the dtype, in fp32 (SDPA's own accumulation)
    low = attention_truth(q.float(), k.float(), v.float(), s, qw, kw).to(dtype)
    check_attention(out, truth, dtype, low)


@needs_triton
@SLOW
@given(t=st.integers(1, 2), h=st.integers(1, 2), n=st.integers(1, 24), d=st.sampled_from([64, 80]),
       dtype=st.sampled_from([torch.float32, torch.float16]), norm=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_tiled_attention_triton(t, h, n, d, dtype, norm, seed):
    q, k, v, qw, kw = _attention_case(t, h, n, d, dtype, norm, seed)
    dev = [None if x is None else x.to(TRITON_DEVICE) for x in (q, k, v, qw, kw)]
    with nk.force_backend("triton"):
        out = nk.tiled_attention(*dev[:3], q_norm_weight=dev[3], k_norm_weight=dev[4]).cpu()
    ref = nk.tiled_attention_ref(q, k, v, None, qw, kw)
    check_attention(out, attention_truth(q, k, v, d ** -0.5, qw, kw), dtype, ref)


# ----------------------------------------------------------------------------------------------------------------
# gated_cross_attention
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def xattn_case(draw, dtypes=DTYPES, max_len=12):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    seq_q, seq_kv = draw(st.integers(1, max_len)), draw(st.integers(1, 16))
    d = draw(st.sampled_from([8, 16, 32, 64]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, seq_kv + 1, (b, seq_q), generator=g, dtype=torch.int32)
    end = torch.minimum(start + torch.randint(0, seq_kv + 1, (b, seq_q), generator=g, dtype=torch.int32),
                        torch.tensor(seq_kv, dtype=torch.int32))               # empty ranges included
    q = _randn(seed, b, hq, seq_q, d, dtype=dtype)
    k, v = _randn(seed + 1, b, hkv, seq_kv, d, dtype=dtype), _randn(seed + 2, b, hkv, seq_kv, d, dtype=dtype)
    gate = torch.tensor(draw(st.sampled_from([-1.5, 0.0, 0.3, 2.0])), dtype=dtype)
    return q, k, v, gate, start, end


def check_xattn(out, case):
    q = case[0]
    truth = gated_cross_attention_ref(*case)                                 # explicit fp32 formula
    low = gated_cross_attention_ref(*case, upcast=False)                     # the same in the input dtype
    err = (out.double() - truth.double()).abs().max().item()
    low_err = (low.double() - truth.double()).abs().max().item()
    assert out.dtype == q.dtype and out.shape == truth.shape
    assert err <= 2 * low_err + 8 * _eps(q.dtype) + 1e-6, (err, low_err)
    empty = case[5] <= case[4]                                               # [B, L]: no memory to attend to
    assert (out[empty] == 0).all()                                           # exactly 0, as the contract says


@FAST
@given(case=xattn_case())
def test_fuzz_gated_cross_attention_reference_path(case):
    with nk.force_backend("ref"):
        out = nk.gated_cross_attention(*case)
    check_xattn(out, case)


@needs_triton
@SLOW
@given(case=xattn_case(dtypes=[torch.float32, torch.float16], max_len=8))
def test_fuzz_gated_cross_attention_triton(case):
    with nk.force_backend("triton"):
        out = nk.gated_cross_attention(*(t.to(TRITON_DEVICE) for t in case)).cpu()
    check_xattn(out, case)
