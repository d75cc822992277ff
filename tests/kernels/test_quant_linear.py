"""W8A16 / W4A16 linear (nvlm_kernels/quant_linear.py + csrc/cpu/quant_*.cpp + csrc/cuda/quant_gemv.cu).

Weights are built in the quantised domain first (q, scales, zeros) with scales of 4 significant bits, so the
dequantised weight is exactly representable in fp32, fp16 and bf16: the reference error is then only the matmul's.
Truth is the fp64 product. Tolerance (team rule): kernel error <= 2 x the error of the same torch computation in
the activation dtype (``F.linear`` on x.dtype tensors) + a tiny fp32-level epsilon.
"""

import os
import re

import pytest
import torch
import torch.nn.functional as F

import nvlm_kernels
from nvlm_kernels import _ext, dispatch, quant_linear
from nvlm_kernels.packing import dequantize_int4, dequantize_int8, pack_int4, quantize_int4, quantize_int8
from nvlm_kernels.quant_linear import (
    select_kernel,
    w4a16_linear,
    w4a16_linear_ref,
    w8a16_linear,
    w8a16_linear_ref,
)

HAS_CPU_KERNEL = _ext.has_kernel("w4a16_linear", "CPU") and _ext.has_kernel("w8a16_linear", "CPU")
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="compiled CPU kernels not built")
ISAS = ["avx512", "avx2", "scalar"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _exact_scales(shape, scale_dtype=torch.float16, mantissa_bits=3):
    """2^e * (1 + j / 2^mantissa_bits): few significant bits, so (q - z) * s is exact in bf16."""
    e = torch.randint(-9, -5, shape).float()
    j = torch.randint(0, 2**mantissa_bits, shape).float()
    return (torch.exp2(e) * (1 + j / 2**mantissa_bits)).to(scale_dtype)


def make_int4(n, k, g, scale_dtype=torch.float16):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // g), dtype=torch.uint8)
    return pack_int4(q), _exact_scales((n, k // g), scale_dtype), zeros


def make_int8(n, k, scale_dtype=torch.float16):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    return q, _exact_scales((n,), scale_dtype, mantissa_bits=1)


def check_close(y, x, w, bias, extra_eps=0.0):
    """``y`` vs the fp64 truth of ``x @ w^T + bias``, against the same computation done by torch in x.dtype.
    ``extra_eps``: an accumulation error the kernel is documented to add (the int4 offset decode, see its test)."""
    truth = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    low = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype)).double()
    assert y.dtype == x.dtype and y.shape == truth.shape
    err = (y.double() - truth).abs().max().item()
    low_err = (low - truth).abs().max().item()
    eps = 1e-6 * (x.double().abs() @ w.double().abs().t()).max().item() + 1e-6 + extra_eps
    assert err <= 2 * low_err + eps, f"kernel error {err:.3g} > 2 x torch {x.dtype} error {low_err:.3g} + {eps:.2g}"


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Cap the CPU kernels' SIMD level for this test (read by the extension on every call)."""
    monkeypatch.setenv("NVLM_KERNELS_CPU_ISA", request.param)
    return request.param


# ----------------------------------------------------------------------------------------------------------------
# Compiled CPU kernels vs truth, every ISA level
# ----------------------------------------------------------------------------------------------------------------
@needs_cpu_kernel
@pytest.mark.parametrize("m", [1, 3, 16, 33, 257])
@pytest.mark.parametrize("k, n, g", [(384, 96, 128), (640, 200, 64), (640, 200, 32), (96, 40, 32), (192, 24, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_w4a16_cpu(isa, m, k, n, g, dtype, with_bias):
    qw, s, z = make_int4(n, k, g)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    with nvlm_kernels.force_backend("cpu"):
        y = w4a16_linear(x, qw, s, z, g, bias)
    check_close(y, x, dequantize_int4(qw, s, z, g), bias)


@needs_cpu_kernel
@pytest.mark.parametrize("m", [1, 3, 16, 257])
@pytest.mark.parametrize("k, n", [(384, 96), (640, 200), (100, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a16_cpu(isa, m, k, n, dtype, with_bias):
    qw, s = make_int8(n, k)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    with nvlm_kernels.force_backend("cpu"):
        y = w8a16_linear(x, qw, s, bias)
    check_close(y, x, dequantize_int8(qw, s), bias)


@needs_cpu_kernel
@pytest.mark.parametrize("m", [5, 6, 9, 31, 32, 33, 96, 97])  # GEMV <-> tile <-> GEMM (TILE_MIN_M, TILE_MAX_M_INT4)
@pytest.mark.parametrize("k, n, g", [(96, 37, 32), (192, 29, 64), (640, 41, 128), (384, 16, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a16_cpu_tile_boundaries(isa, m, k, n, g, dtype):
    """The tiled kernel's edges: x rows (M x bf16 parts, padded to 4) split into blocks of 16 with a last block of
    4, 8 or 12 (m = 6 / 9 / 33 with 1-3 parts; m = 96 x 3 parts: 18 full blocks), N not a multiple of its 16-row
    weight tile (37, 29, 41), K not a multiple of a 128-k chunk (96, 192, 640) with 1-4 groups per chunk, with bias;
    fp32 x takes the exact q - z decode. m = 32 / 33 and 96 / 97 cross GEMV_MAX_M and TILE_MAX_M_INT4."""
    qw, s, z = make_int4(n, k, g)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    with nvlm_kernels.force_backend("cpu"):
        y = w4a16_linear(x, qw, s, z, g, bias)
    w = dequantize_int4(qw, s, z, g)
    # The GEMM path (m = 97; m >= 33 below AVX-512): with bf16 x, the bias is added to the bf16-rounded product (a
    # second rounding, up to half an ulp of |y| more; csrc/cpu/quant_linear.cpp)
    gemm = m > (quant_linear.TILE_MAX_M_INT4 if isa == "avx512" else quant_linear.GEMV_MAX_M)["cpu"]
    gemm_bf16 = gemm and dtype == torch.bfloat16
    second_rounding = 2.0**-8 * (x.double() @ w.double().t() + bias.double()).abs().max().item() if gemm_bf16 else 0.0
    check_close(y, x, w, bias, extra_eps=second_rounding)


@needs_cpu_kernel
@pytest.mark.parametrize("m", [5, 6, 9, 31, 32])
@pytest.mark.parametrize("k, n", [(100, 33), (300, 17), (544, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_w8a16_cpu_tile_boundaries(isa, m, k, n, dtype):
    """As above for int8: K not a multiple of 32 (100, 300) or of the 256-column block (544), odd N."""
    qw, s = make_int8(n, k)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    with nvlm_kernels.force_backend("cpu"):
        y = w8a16_linear(x, qw, s, bias)
    check_close(y, x, dequantize_int8(qw, s), bias)


@needs_cpu_kernel
@pytest.mark.parametrize("m", [1, 12])
def test_int4_offset_decode_with_cancellation(m):
    """bf16 / fp16 x use the offset decode bf16(128 + q) with the zero point removed per group via sums of x: check
    it where that correction nearly cancels the sum (all weights at their zero point but one nibble per row), with
    large-magnitude x of one sign, so a wrong per-group sum or offset would show as a large error."""
    n, k, g = 40, 512, 128
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // g), dtype=torch.uint8)
    q.copy_(zeros.repeat_interleave(g, dim=1))                      # w = 0 everywhere ...
    q[:, 5] = (q[:, 5] + 1) % 16                                   # ... but one weight per row
    qw, s = pack_int4(q), _exact_scales((n, k // g))
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.rand(m, k) * 100 + 50).to(dtype)
        with nvlm_kernels.force_backend("cpu"):
            y = w4a16_linear(x, qw, s, zeros, g)
        # The offset decode sums x (128 + q) s in fp32 and subtracts (128 + z) s sum(x): its documented error is
        # ~2^-24 * 143 * sum_k |x_k| s_k (quant_kernels.h), which here, with w ~ 0, is not covered by the error of
        # torch's own computation (measured over 400 seeds: at most 3x that term beyond 2x torch's error). A wrong
        # offset or group sum errs by ~128 * s * x per weight, 2^24 / 143 times more.
        offset_err = 2**-24 * 143 * (x.double().abs() @ s.double().repeat_interleave(g, dim=1).t()).max().item()
        check_close(y, x, dequantize_int4(qw, s, zeros, g), None, extra_eps=4 * offset_err)


@needs_cpu_kernel
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [2, 20])
def test_scale_dtypes_and_leading_dims(isa, scale_dtype, m):
    qw, s, z = make_int4(72, 256, 128, scale_dtype)
    q8, s8 = make_int8(72, 256, scale_dtype)
    x = torch.randn(2, m, 256).to(torch.bfloat16)
    with nvlm_kernels.force_backend("cpu"):
        y4 = w4a16_linear(x, qw, s, z, 128)
        y8 = w8a16_linear(x, q8, s8)
    assert y4.shape == (2, m, 72) and y8.shape == (2, m, 72)
    check_close(y4.reshape(-1, 72), x.reshape(-1, 256), dequantize_int4(qw, s, z, 128), None)
    check_close(y8.reshape(-1, 72), x.reshape(-1, 256), dequantize_int8(q8, s8), None)


@needs_cpu_kernel
def test_real_quantised_weights_match_reference():
    """Weights from the quantisers (fp16 scales of full precision): kernel == dequantise + fp32 F.linear."""
    w = torch.randn(64, 512) * 0.02
    x = torch.randn(5, 512)
    qw, s, z = quantize_int4(w, 128)
    q8, s8 = quantize_int8(w)
    with nvlm_kernels.force_backend("cpu"):
        torch.testing.assert_close(w4a16_linear(x, qw, s, z, 128), w4a16_linear_ref(x, qw, s, z, 128),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w8a16_linear(x, q8, s8), w8a16_linear_ref(x, q8, s8), rtol=1e-4, atol=1e-5)


def test_reference_backend_and_empty_batch():
    qw, s, z = make_int4(40, 96, 32)
    x = torch.randn(3, 96)
    with nvlm_kernels.force_backend("ref"):
        y = w4a16_linear(x, qw, s, z, 32)
        assert w4a16_linear(torch.randn(0, 96), qw, s, z, 32).shape == (0, 40)
    check_close(y, x, dequantize_int4(qw, s, z, 32), None)


@needs_cpu_kernel
def test_empty_batch_compiled():
    qw, s, z = make_int4(40, 96, 32)
    with nvlm_kernels.force_backend("cpu"):
        assert w4a16_linear(torch.randn(0, 96), qw, s, z, 32).shape == (0, 40)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def test_w4a16_value_errors():
    qw, s, z = make_int4(16, 128, 64)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="'x'"):
        w4a16_linear(torch.randn(2, 64), qw, s, z, 64)
    with pytest.raises(ValueError, match="'x'"):
        w4a16_linear(x.to(torch.int32), qw, s, z, 64)
    with pytest.raises(ValueError, match="'qweight'"):
        w4a16_linear(x, qw.to(torch.int8), s, z, 64)
    with pytest.raises(ValueError, match="'group_size'"):
        w4a16_linear(x, qw, s, z, 48)
    with pytest.raises(ValueError, match="not a multiple of argument 'group_size'"):
        w4a16_linear(torch.randn(2, 96), *make_int4(16, 96, 32)[:3], 64)
    with pytest.raises(ValueError, match="'scales'"):
        w4a16_linear(x, qw, s[:, :1], z, 64)
    with pytest.raises(ValueError, match="'zeros'"):
        w4a16_linear(x, qw, s, z.to(torch.int32), 64)
    with pytest.raises(ValueError, match="'bias'"):
        w4a16_linear(x, qw, s, z, 64, torch.randn(15))
    with pytest.raises(ValueError, match="'qweight' must be contiguous"):
        w4a16_linear(torch.randn(2, 64), qw.t().contiguous().t()[:, :32], s[:, :1].contiguous(),
                     z[:, :1].contiguous(), 64)
    with pytest.raises(ValueError, match="'qweight' is on meta"):
        w4a16_linear(x, qw.to("meta"), s, z, 64)


def test_w8a16_value_errors():
    q8, s8 = make_int8(16, 128)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="'x'"):
        w8a16_linear(torch.randn(2, 127), q8, s8)
    with pytest.raises(ValueError, match="'qweight'"):
        w8a16_linear(x, q8.to(torch.uint8), s8)
    with pytest.raises(ValueError, match="'scale'"):
        w8a16_linear(x, q8, s8[:3])
    with pytest.raises(ValueError, match="'scale'"):
        w8a16_linear(x, q8, s8.to(torch.int32))
    with pytest.raises(ValueError, match="'bias' is on meta"):
        w8a16_linear(x, q8, s8, torch.randn(16, device="meta"))


@needs_cpu_kernel
def test_compiled_op_raises_value_error_itself():
    """The C++ entry points validate too (TORCH_CHECK_VALUE -> ValueError naming the argument)."""
    qw, s, z = make_int4(16, 128, 64)
    with pytest.raises(ValueError, match="group_size"):
        torch.ops.nvlm_kernels.w4a16_linear(torch.randn(2, 128), qw, s, z, 96, None)
    with pytest.raises(ValueError, match="'x'"):
        torch.ops.nvlm_kernels.w8a16_linear(torch.randn(2, 64), *make_int8(16, 128), None)


# ----------------------------------------------------------------------------------------------------------------
# Op registration, opcheck, routing
# ----------------------------------------------------------------------------------------------------------------
@needs_cpu_kernel
@pytest.mark.parametrize("m", [1, 20])
def test_opcheck(m):
    qw, s, z = make_int4(24, 128, 64)
    q8, s8 = make_int8(24, 128)
    x = torch.randn(m, 128).to(torch.bfloat16)
    bias = torch.randn(24).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.nvlm_kernels.w4a16_linear.default, (x, qw, s, z, 64, bias))
    torch.library.opcheck(torch.ops.nvlm_kernels.w8a16_linear.default, (x, q8, s8, None))


@pytest.mark.skipif(not _ext.built_with_cuda(), reason="extension built without CUDA")
def test_cuda_kernels_registered():
    assert _ext.has_kernel("w4a16_linear", "CUDA")
    assert _ext.has_kernel("w8a16_linear", "CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("m", [1, 5, 8, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_truth(m, dtype):
    qw, s, z = make_int4(200, 640, 64)
    q8, s8 = make_int8(200, 640)
    x = torch.randn(m, 640).to(dtype)
    bias = torch.randn(200).to(dtype)
    dev = torch.device("cuda")
    with nvlm_kernels.force_backend("cuda"):
        y4 = w4a16_linear(x.to(dev), qw.to(dev), s.to(dev), z.to(dev), 64, bias.to(dev)).cpu()
        y8 = w8a16_linear(x.to(dev), q8.to(dev), s8.to(dev), bias.to(dev)).cpu()
    check_close(y4, x, dequantize_int4(qw, s, z, 64), bias)
    check_close(y8, x, dequantize_int8(q8, s8), bias)


def test_select_kernel_rule_and_header_agree():
    assert select_kernel(1, 4, "cpu") == "gemv" and select_kernel(5, 8, "cpu") == "gemv"
    assert select_kernel(6, 4, "cpu") == "tile" and select_kernel(32, 8, "cpu") == "tile"
    assert select_kernel(33, 8, "cpu") == "gemm" and select_kernel(33, 4, "cpu") == "tile"
    assert select_kernel(96, 4, "cpu") == "tile" and select_kernel(97, 4, "cpu") == "gemm"
    assert select_kernel(33, 4, "cuda") == "gemm"
    assert select_kernel(8, 4, "cuda") == "gemv" and select_kernel(9, 8, "cuda") == "gemm"
    with pytest.raises(ValueError, match="'bits'"):
        select_kernel(1, 3, "cpu")
    header = open(os.path.join(ROOT, "csrc", "common", "quant_layout.h")).read()
    cpu = int(re.search(r"kGemvMaxMCpu = (\d+);", header).group(1))
    cuda = int(re.search(r"kGemvMaxMCuda = (\d+);", header).group(1))
    tile = int(re.search(r"kTileMinMCpu = (\d+);", header).group(1))
    assert (cpu, cuda) == (quant_linear.GEMV_MAX_M["cpu"], quant_linear.GEMV_MAX_M["cuda"])
    assert tile == quant_linear.TILE_MIN_M["cpu"]
    tile_max = int(re.search(r"kTileMaxMInt4Cpu = (\d+);", header).group(1))
    assert tile_max == quant_linear.TILE_MAX_M_INT4["cpu"]


def test_triton_backend_is_routed_when_present():
    """'triton' is listed only when nvlm_kernels.quant_linear_triton imports; forced, it runs that op."""
    implemented = quant_linear._implemented()
    if "triton" not in implemented:
        pytest.skip("nvlm_kernels.quant_linear_triton does not import here")
    if not dispatch.triton_interpreted() and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    qw, s, z = make_int4(16, 64, 32)
    x = torch.randn(2, 64)
    with nvlm_kernels.force_backend("triton"):
        y = w4a16_linear(x.to(dev), qw.to(dev), s.to(dev), z.to(dev), 32).cpu()
    before = dispatch.usage[("w4a16_linear", "triton")]
    assert before >= 1
    check_close(y, x, dequantize_int4(qw, s, z, 32), None)
