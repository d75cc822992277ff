"""Triton W8A16 / W4A16 kernels (nvlm_kernels/quant_linear_triton.py) vs the packing-format reference.

Weights are exactly representable (integer codes times power-of-two scales), so the dequantised matrix is the same in
fp64, fp32, fp16 and bf16 and every difference measures the kernel's arithmetic. Tolerance (design.md §3): the
kernel's relative L2 error against an fp64 truth is at most 2x that of the same PyTorch computation in the
activation dtype. On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes are tiny.
"""

import pytest
import torch
import torch.nn.functional as F

import nvlm_kernels.quant_linear_triton as qlt
from nvlm_kernels import packing
from nvlm_kernels.quant_linear_triton import (
    GEMV_MAX_M,
    gemm_config,
    gemv_config,
    select_kernel,
    w4a16_linear_triton,
    w8a16_linear_triton,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _int8_weights(n, k):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = (2.0 ** torch.randint(-9, -5, (n,))).to(torch.float16)           # powers of two: exact everywhere
    return q.to(DEV), scale.to(DEV)


def _int4_weights(n, k, g):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (2.0 ** torch.randint(-7, -3, (n, k // g))).to(torch.float16)
    zeros = torch.randint(0, 16, (n, k // g), dtype=torch.uint8)
    return packing.pack_int4(q).to(DEV), scales.to(DEV), zeros.to(DEV)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check(y, x, w, bias):
    """``y`` (kernel) against fp64 truth, with the PyTorch low-precision computation as the yardstick."""
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    truth = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    lowp = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    err, err_lowp = _rel(y, truth), _rel(lowp, truth)
    assert err <= 2 * err_lowp + 1e-7, f"kernel rel err {err:.3e} vs torch {x.dtype} {err_lowp:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,n", [(128, 32), (384, 96), (128, 96), (384, 32)])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_w8a16_matches_reference(m, k, n, dtype):
    q, scale = _int8_weights(n, k)
    bias = torch.randn(n, device=DEV).to(dtype) if (m + k) % 2 else None  # half the cases with a bias
    x = torch.randn(m, k, device=DEV).to(dtype)
    _check(w8a16_linear_triton(x, q, scale, bias), x, packing.dequantize_int8(q, scale), bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("k,n", [(128, 32), (384, 96), (384, 32)])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_w4a16_matches_reference(m, k, n, group_size, dtype):
    qw, scales, zeros = _int4_weights(n, k, group_size)
    bias = torch.randn(n, device=DEV).to(dtype) if (m + group_size // 32) % 2 else None
    x = torch.randn(m, k, device=DEV).to(dtype)
    y = w4a16_linear_triton(x, qw, scales, zeros, group_size, bias)
    _check(y, x, packing.dequantize_int4(qw, scales, zeros, group_size), bias)


@pytest.mark.parametrize("bias", [False, True])
def test_both_with_and_without_bias(bias):
    """Bias on/off on both kernels of both formats (M=2 -> GEMV, M=17 -> GEMM)."""
    k, n = 256, 48
    q, scale = _int8_weights(n, k)
    qw, scales, zeros = _int4_weights(n, k, 64)
    b = torch.randn(n, device=DEV, dtype=torch.float16) if bias else None
    for m in (2, 17):
        x = torch.randn(m, k, device=DEV, dtype=torch.float16)
        _check(w8a16_linear_triton(x, q, scale, b), x, packing.dequantize_int8(q, scale), b)
        _check(w4a16_linear_triton(x, qw, scales, zeros, 64, b), x, packing.dequantize_int4(qw, scales, zeros, 64), b)


def test_split_k_atomic_path():
    """A deep K with few outputs splits K across programs (fp32 atomics): results must not change."""
    m, k, n = 2, 1024, 32
    cfg = gemv_config(m, n, k, bits=8)
    assert cfg["SPLIT_K"] > 1, cfg
    assert gemv_config(m, n, k, bits=4, group_size=128)["SPLIT_K"] > 1
    q, scale = _int8_weights(n, k)
    qw, scales, zeros = _int4_weights(n, k, 128)
    bias = torch.randn(n, device=DEV)
    x = torch.randn(m, k, device=DEV)
    _check(w8a16_linear_triton(x, q, scale, bias), x, packing.dequantize_int8(q, scale), bias)
    _check(w4a16_linear_triton(x, qw, scales, zeros, 128, bias), x, packing.dequantize_int4(qw, scales, zeros, 128),
           bias)


def test_bf16_and_batched_input():
    """bf16 activations (upcast inside the kernels) and a [B, L, K] input reshaped to rows and back."""
    k, n = 128, 32
    qw, scales, zeros = _int4_weights(n, k, 128)
    w = packing.dequantize_int4(qw, scales, zeros, 128)
    for shape in ((2, 1, k), (3, 7, k)):  # M = 2 (GEMV) and 21 (GEMM)
        x = torch.randn(*shape, device=DEV).to(torch.bfloat16)
        _check(w4a16_linear_triton(x, qw, scales, zeros, 128, None), x, w, None)
    q, scale = _int8_weights(n, k)
    x = torch.randn(3, 7, k, device=DEV).to(torch.bfloat16)
    _check(w8a16_linear_triton(x, q, scale, None), x, packing.dequantize_int8(q, scale), None)


def test_routing_and_configs():
    assert [select_kernel(m) for m in (1, GEMV_MAX_M, GEMV_MAX_M + 1, 2048)] == ["gemv", "gemv", "gemm", "gemm"]
    for k, n in qlt.DECODER_SHAPES:
        for bits in (8, 4):
            cfg = gemv_config(1, n, k, bits)
            assert cfg["K_PER_SPLIT"] % cfg["BLOCK_K"] == 0
            assert (cfg["SPLIT_K"] - 1) * cfg["K_PER_SPLIT"] < k <= cfg["SPLIT_K"] * cfg["K_PER_SPLIT"]
            if bits == 4:
                assert 128 % cfg["BLOCK_K"] == 0
    assert gemm_config(2048, 8192, 8192, 4, group_size=32)["BLOCK_K"] == 32


def test_gate_specs_cover_the_decoder_shapes():
    specs = qlt.gate_specs()
    names = [s["name"] for s in specs]
    assert len(names) == len(set(names))
    for s in specs:
        assert set(s) == {"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "hot_path",
                          "tensor_cores", "shape", "divisible_by_16"}
        assert set(s["divisible_by_16"]) <= set(s["signature"]), s["name"]
        params = [p for p in s["fn"].arg_names if p not in s["constexprs"]]
        assert sorted(params) == sorted(s["signature"]), s["name"]
        assert s["tensor_cores"] == ("gemm" in s["name"])
    # every (format, kernel, BLOCK_M) the launcher would pick at decode M = 1..8 and prefill M = 2048 is present
    for bits in (8, 4):
        for k, n in qlt.DECODER_SHAPES:
            for m in (*qlt.DECODE_MS, *qlt.BATCHED_DECODE_MS, qlt.PREFILL_M):
                kind = select_kernel(m)
                cfg = (gemv_config if kind == "gemv" else gemm_config)(m, n, k, bits, 128)
                assert any(s["name"].startswith(f"w{bits}a16_{kind}") and f"M={m} K={k} N={n}" in s["shape"]
                           and all(s["constexprs"][c] == cfg[c] for c in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                           and s["num_warps"] == cfg["num_warps"] for s in specs), (bits, k, n, m)


def test_validation_errors_name_the_argument():
    q, scale = _int8_weights(32, 128)
    x = torch.randn(1, 128, device=DEV)
    with pytest.raises(ValueError, match="'x'"):
        w8a16_linear_triton(torch.randn(1, 64, device=DEV), q, scale, None)
    with pytest.raises(ValueError, match="'scale'"):
        w8a16_linear_triton(x, q, scale[:16], None)
    with pytest.raises(ValueError, match="'qweight'"):
        w8a16_linear_triton(x, q.to(torch.uint8), scale, None)
    with pytest.raises(ValueError, match="'bias'"):
        w8a16_linear_triton(x, q, scale, torch.zeros(31, device=DEV))
    qw, scales, zeros = _int4_weights(32, 128, 64)
    with pytest.raises(ValueError, match="'group_size'"):
        w4a16_linear_triton(x, qw, scales, zeros, 48, None)
    with pytest.raises(ValueError, match="'zeros'"):
        w4a16_linear_triton(x, qw, scales, zeros.to(torch.int32), 64, None)
    with pytest.raises(ValueError, match="'scales'"):
        w4a16_linear_triton(x, qw, scales[:, :1], zeros, 64, None)


def test_opcheck():
    q, scale = _int8_weights(32, 128)
    qw, scales, zeros = _int4_weights(32, 128, 64)
    x = torch.randn(2, 128, device=DEV, dtype=torch.float16)
    bias = torch.randn(32, device=DEV, dtype=torch.float16)
    torch.library.opcheck(torch.ops.nvlm_kernels.w8a16_linear_triton.default, (x, q, scale, bias))
    torch.library.opcheck(torch.ops.nvlm_kernels.w4a16_linear_triton.default, (x, qw, scales, zeros, 64, None))


def test_torch_compile_fullgraph():
    """The custom ops trace through their fakes (graph capture + AOT autograd; no Inductor codegen on CPU)."""
    q, scale = _int8_weights(32, 128)
    qw, scales, zeros = _int4_weights(32, 128, 64)

    def f(x):
        return w8a16_linear_triton(x, q, scale, None) + w4a16_linear_triton(x, qw, scales, zeros, 64, None)

    x = torch.randn(3, 128, device=DEV)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))
