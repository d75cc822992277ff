"""Weight-only quantised linear layers: W8A16 and W4A16, ``y[..., N] = x[..., K] @ dequant(W)^T (+ bias)``.

Format (defined once in :mod:`nvlm_kernels.packing`; design.md §3):

* int8 per output channel, symmetric: ``qweight int8 [N, K]``, ``scale [N]``; ``w[n, k] = q[n, k] * scale[n]``.
* int4 group-wise with an integer zero point: ``qweight uint8 [N, K/2]`` (low nibble = even k), ``scales [N, K/g]``,
  ``zeros uint8 [N, K/g]`` (0..15), ``g`` in 32/64/128; ``w[n, k] = (q[n, k] - zeros[n, k//g]) * scales[n, k//g]``.

``x`` is fp32/fp16/bf16 with any leading shape; ``y`` has ``x``'s dtype; scales may be fp16/bf16/fp32; ``bias`` is
``[N]`` (any float dtype, added in fp32; on the CPU GEMM path with bf16 x it is added to the bf16-rounded product,
a second rounding: csrc/cpu/quant_linear.cpp). All kernels accumulate in fp32.

Backends (``dispatch.select``): ``cpu`` (csrc/cpu/quant_*.cpp: AVX-512-BF16 / AVX2 / scalar, OpenMP),
``cuda`` (csrc/cuda/quant_gemv.cu), ``triton`` (``nvlm_kernels.quant_linear_triton``, another module, imported
lazily and listed only when it imports) and ``ref`` (dequantise, then ``F.linear`` in fp32).

Kernel choice by M (rows of x) is made by ONE rule, :func:`select_kernel`: ``"gemv"`` (weights streamed once and
decoded in registers; decode) for ``M <= GEMV_MAX_M[device]``, else ``"gemm"`` (dequantise weight tiles, dense
matmul; prefill). Thresholds: CPU 32 (the register-decoding kernel shares one decode across 8 x rows and costs a
constant ~0.6 ms per row at K=8192, N=4096 on one Zen 4 core, vs 0.79 ms/row for dequantise + oneDNN at M=17 and
0.59 at M=32, 0.44 at M=64: the crossover is ~32 rows), CUDA 8 (above it tensor-core GEMMs win; same number as the
Triton backend's GEMV_MAX_M). Within the CPU GEMV range, ``TILE_MIN_M["cpu"] <= M`` is ``"tile"``: the AVX512-BF16
kernel decodes a 16-row weight tile once into L1 and multiplies it with every x row (register-blocked vdpbf16ps);
at K = N = 8192 on one Zen 4 core (bf16 x) it beats the GEMV from M = 6 (int4 9.0 vs 9.6 ms, int8 10.8 vs 12.7; at
M = 7 8.9 vs 11.5 and 10.5 vs 15.5) and loses at M = 4-5 (int4 7.3 vs 6.3, 8.9 vs 7.7). CPUs without AVX512-BF16 run
the GEMV there. int4 stays on the tiled kernel above the GEMV range, up to ``TILE_MAX_M_INT4["cpu"]`` = 96: one
thread, K = N = 8192, bf16 x, it beats dequantise + oneDNN at M = 33 (29.5 vs 34.2 ms), 64 (48.1 vs 54.5) and 96 (70.7
vs 79.7), not at 128 (126 vs 98); 2 threads at Qwen2-72B's gate/up_proj (N = 29568) M = 48 73 vs 105 ms, 96 134 vs
142. (int8's dequantise is cheap, so its GEMM path has no such handicap.) CPUs without AVX512-BF16 run the GEMM
there. csrc/common/quant_layout.h holds the same numbers for the C++/CUDA code; a test checks they agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nvlm_kernels import _ext, dispatch, packing

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

#: Largest M served by the GEMV kernels, per device type (see module docstring).
GEMV_MAX_M = {"cpu": 32, "cuda": 8}
#: Smallest M served by the tiled kernel (CPU, AVX512-BF16), up to GEMV_MAX_M (see module docstring).
TILE_MIN_M = {"cpu": 6}
#: Largest M served by the tiled kernel for int4 weights (CPU, AVX512-BF16; int8 stops at GEMV_MAX_M).
TILE_MAX_M_INT4 = {"cpu": 96}


def select_kernel(m: int, bits: int, device) -> str:
    """THE routing rule for the quantised linear kernels: ``"gemv"`` for ``m <= GEMV_MAX_M[device]`` rows of x
    (``"tile"`` from ``TILE_MIN_M[device]`` rows where the device has a tiled kernel; for int4 ``"tile"`` also up to
    ``TILE_MAX_M_INT4[device]`` rows), else ``"gemm"``. On a CPU without AVX512-BF16 the compiled op runs the GEMV
    where this says ``"tile"`` for ``m <= GEMV_MAX_M``, and the GEMM above."""
    if bits not in (4, 8):
        raise ValueError(f"nvlm_kernels.select_kernel: argument 'bits' must be 4 or 8, got {bits!r}")
    dev_type = torch.device(device).type
    if dev_type not in GEMV_MAX_M:
        dev_type = "cpu"
    gemv_max = GEMV_MAX_M[dev_type]
    tile_max = TILE_MAX_M_INT4.get(dev_type, gemv_max) if bits == 4 else gemv_max
    if TILE_MIN_M.get(dev_type, m + 1) <= m <= tile_max:
        return "tile"
    return "gemv" if m <= gemv_max else "gemm"


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def _desc(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_x_bias(op: str, x, bias, n: int, k: int, others: dict) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise ValueError(f"nvlm_kernels.{op}: argument 'x' must be a float32/float16/bfloat16 tensor, got {_desc(x)}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"nvlm_kernels.{op}: argument 'x' must have last dimension K={k}, got shape "
                         f"{tuple(x.shape)}")
    for name, t in others.items():
        if t.device != x.device:
            raise ValueError(f"nvlm_kernels.{op}: argument '{name}' is on {t.device}, 'x' on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"nvlm_kernels.{op}: argument '{name}' must be contiguous (strides {t.stride()})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOATS or tuple(bias.shape) != (n,):
            raise ValueError(f"nvlm_kernels.{op}: argument 'bias' must be a float tensor of shape ({n},), "
                             f"got {_desc(bias)}")
        if bias.device != x.device:
            raise ValueError(f"nvlm_kernels.{op}: argument 'bias' is on {bias.device}, 'x' on {x.device}")


def _check_int8(x, qweight, scale, bias) -> tuple[int, int]:
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise ValueError(f"nvlm_kernels.w8a16_linear: argument 'qweight' must be int8 [N, K], got {_desc(qweight)}")
    n, k = qweight.shape
    if not isinstance(scale, torch.Tensor) or scale.dtype not in _FLOATS or tuple(scale.shape) != (n,):
        raise ValueError(f"nvlm_kernels.w8a16_linear: argument 'scale' must be a float16/bfloat16/float32 tensor "
                         f"of shape ({n},), got {_desc(scale)}")
    _check_x_bias("w8a16_linear", x, bias, n, k, {"qweight": qweight, "scale": scale})
    return n, k


def _check_int4(x, qweight, scales, zeros, group_size, bias) -> tuple[int, int]:
    n, k = packing.check_int4_shapes(qweight, scales, zeros, group_size, "nvlm_kernels.w4a16_linear")
    _check_x_bias("w4a16_linear", x, bias, n, k, {"qweight": qweight, "scales": scales, "zeros": zeros})
    return n, k


# ----------------------------------------------------------------------------------------------------------------
# References (pure PyTorch): the tests' truth and the no-kernel fallback.
# ----------------------------------------------------------------------------------------------------------------
def _linear_fp32(x, w, bias):
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def w8a16_linear_ref(x, qweight, scale, bias=None) -> torch.Tensor:
    """Dequantise (fp32) then ``F.linear`` in fp32, cast to ``x.dtype``."""
    return _linear_fp32(x, packing.dequantize_int8(qweight, scale), bias)


def w4a16_linear_ref(x, qweight, scales, zeros, group_size, bias=None) -> torch.Tensor:
    """Dequantise (fp32) then ``F.linear`` in fp32, cast to ``x.dtype``."""
    return _linear_fp32(x, packing.dequantize_int4(qweight, scales, zeros, group_size), bias)


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------
_triton_module = None


def _triton_ops():
    """The Triton module (``nvlm_kernels.quant_linear_triton``) if it imports, else None; retried until it does."""
    global _triton_module
    if _triton_module is None and dispatch.triton_available():
        try:
            from nvlm_kernels import quant_linear_triton
        except Exception:  # module absent, or half-written by its owner: the other backends still work
            return None
        _triton_module = quant_linear_triton
    return _triton_module


def _implemented() -> tuple[str, ...]:
    return ("cuda", "triton", "cpu", "ref") if _triton_ops() is not None else ("cuda", "cpu", "ref")


def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ (qweight int8 [N, K] * scale[N, None])^T (+ bias [N])`` -> ``[..., N]`` in ``x.dtype``."""
    _check_int8(x, qweight, scale, bias)
    if dispatch.needs_grad(x, bias):            # training layers around a frozen quantised one
        return w8a16_linear_ref(x, qweight, scale, bias)
    backend = dispatch.select("w8a16_linear", x.device, _implemented())
    if backend in ("cpu", "cuda"):
        return torch.ops.nvlm_kernels.w8a16_linear(x, qweight, scale, bias)
    if backend == "triton":
        _triton_ops()
        return torch.ops.nvlm_kernels.w8a16_linear_triton(x, qweight, scale, bias)
    return w8a16_linear_ref(x, qweight, scale, bias)


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int = 128, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ ((q - zeros) * scales)^T (+ bias [N])`` with int4 ``qweight uint8 [N, K/2]`` -> ``[..., N]``."""
    _check_int4(x, qweight, scales, zeros, group_size, bias)
    if dispatch.needs_grad(x, bias):
        return w4a16_linear_ref(x, qweight, scales, zeros, group_size, bias)
    backend = dispatch.select("w4a16_linear", x.device, _implemented())
    if backend in ("cpu", "cuda"):
        return torch.ops.nvlm_kernels.w4a16_linear(x, qweight, scales, zeros, int(group_size), bias)
    if backend == "triton":
        _triton_ops()
        return torch.ops.nvlm_kernels.w4a16_linear_triton(x, qweight, scales, zeros, int(group_size), bias)
    return w4a16_linear_ref(x, qweight, scales, zeros, group_size, bias)


# ----------------------------------------------------------------------------------------------------------------
# Fakes (shape/dtype only) for the compiled ops, so torch.compile and opcheck can trace them.
# ----------------------------------------------------------------------------------------------------------------
if _ext.LOADED:

    @torch.library.register_fake("nvlm_kernels::w8a16_linear")
    def _w8a16_linear_fake(x, qweight, scale, bias):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake("nvlm_kernels::w4a16_linear")
    def _w4a16_linear_fake(x, qweight, scales, zeros, group_size, bias):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))
