"""The quantised weight format: THE definition every kernel, loader and checkpoint uses (design.md §3).

int8, per output channel, symmetric::

    qweight int8 [N, K]     q in -127..127 (-128 is never produced; kernels accept it)
    scale        [N]        fp16 by default (bf16 / fp32 accepted)
    w[n, k] = q[n, k] * scale[n]

int4, group-wise (g = 32 | 64 | 128, default 128), asymmetric with an integer zero point as GPTQ/AWQ use::

    qweight uint8 [N, K/2]  byte j of a row holds k = 2j in its low nibble and k = 2j+1 in its high nibble
    scales        [N, K/g]  fp16 by default (bf16 / fp32 accepted)
    zeros   uint8 [N, K/g]  0..15 (one byte per group: unpacked, unlike GPTQ's packed int32 zeros)
    w[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]

K must be a multiple of g. Backends may re-tile these tensors in memory at load time; the file format never changes.

Quantisers (round to nearest, no calibration):

* int8: ``scale = absmax(row) / 127``, ``q = round(w / scale)``.
* int4: GPTQ's min/max rule: the group's range is widened to include 0 (``lo = min(min w, 0)``,
  ``hi = max(max w, 0)``) so that 0 is exactly representable, ``scale = (hi - lo) / 15``,
  ``zero = round(-lo / scale)``, ``q = clamp(round(w / scale) + zero, 0, 15)``. An all-zero group gets
  ``lo, hi = -1, 1`` (as GPTQ does) instead of a zero scale, so nothing divides by zero.

Scale dtype: fp16 by default, which is what the size tables in design.md/anchors.md assume (4.125 bit per weight at
g128) and what GPTQ/AWQ checkpoints hold. Scales are rounded *up* to the scale dtype (never down), so every weight
still lies within the representable range and the round-to-nearest error bound ``|w - w_hat| <= scale / 2`` holds
with the stored scale. Pass ``scale_dtype=torch.bfloat16`` (or float32) for weights whose scales overflow fp16.
"""

import torch

INT4_GROUP_SIZES = (32, 64, 128)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_weight(w: torch.Tensor, fn: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"nvlm_kernels.packing.{fn}: argument 'w' must be a 2-D [N, K] tensor, got {shape}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"nvlm_kernels.packing.{fn}: argument 'w' must be a floating tensor, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError(f"nvlm_kernels.packing.{fn}: argument 'w' contains inf or NaN")


def _check_scale_dtype(dtype, fn: str) -> None:
    if dtype not in _SCALE_DTYPES:
        raise ValueError(f"nvlm_kernels.packing.{fn}: argument 'scale_dtype' must be one of {_SCALE_DTYPES}, "
                         f"got {dtype}")


def check_group_size(group_size, k: int, where: str = "nvlm_kernels") -> None:
    """Raise ValueError unless ``group_size`` is 32/64/128 and divides ``k``."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{where}: argument 'group_size' must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if k % group_size != 0:
        raise ValueError(f"{where}: K={k} is not a multiple of argument 'group_size'={group_size}")


def _round_up_to(x: torch.Tensor, dtype: torch.dtype, fn: str) -> torch.Tensor:
    """fp32 ``x > 0`` -> the smallest ``dtype`` value >= x (so a stored scale never shrinks the range)."""
    y = x.to(dtype)
    low = y.float() < x
    if low.any():
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    if not torch.isfinite(y).all():
        raise ValueError(f"nvlm_kernels.packing.{fn}: a scale overflows {dtype}; pass scale_dtype=torch.float32 "
                         f"or torch.bfloat16")
    return y


# ----------------------------------------------------------------------------------------------------------------
# int4 nibble packing
# ----------------------------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``q uint8 [N, K]`` with values 0..15 -> ``uint8 [N, K/2]``; low nibble = even k, high nibble = odd k."""
    if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.dtype != torch.uint8:
        desc = f"{q.dtype} {tuple(q.shape)}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"nvlm_kernels.packing.pack_int4: argument 'q' must be a uint8 [N, K] tensor, got {desc}")
    if q.shape[1] % 2 != 0:
        raise ValueError(f"nvlm_kernels.packing.pack_int4: argument 'q' must have an even K, got {q.shape[1]}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError("nvlm_kernels.packing.pack_int4: argument 'q' has values above 15")
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K/2]`` -> ``uint8 [N, K]`` with values 0..15 (inverse of :func:`pack_int4`)."""
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2 or qweight.dtype != torch.uint8:
        desc = f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight)
        raise ValueError(f"nvlm_kernels.packing.unpack_int4: argument 'qweight' must be uint8 [N, K/2], got {desc}")
    lo = qweight & 0x0F
    hi = qweight >> 4
    return torch.stack((lo, hi), dim=-1).reshape(qweight.shape[0], qweight.shape[1] * 2)


# ----------------------------------------------------------------------------------------------------------------
# int8, per output channel, symmetric
# ----------------------------------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(qweight int8 [N, K], scale [N] scale_dtype)`` with ``w ~= q * scale``."""
    _check_weight(w, "quantize_int8")
    _check_scale_dtype(scale_dtype, "quantize_int8")
    wf = w.float()
    absmax = wf.abs().amax(dim=1)                                          # [N]
    scale = _round_up_to(torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax)), scale_dtype,
                         "quantize_int8")
    q = torch.round(wf / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q [N, K] * scale [N]`` computed in fp32, returned as ``dtype``."""
    if qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise ValueError(f"nvlm_kernels.packing.dequantize_int8: argument 'qweight' must be int8 [N, K], "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    if scale.shape != (qweight.shape[0],):
        raise ValueError(f"nvlm_kernels.packing.dequantize_int8: argument 'scale' must have shape "
                         f"({qweight.shape[0]},), got {tuple(scale.shape)}")
    return (qweight.float() * scale.float()[:, None]).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# int4, group-wise, asymmetric (integer zero point)
# ----------------------------------------------------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float16
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(qweight uint8 [N, K/2], scales [N, K/g], zeros uint8 [N, K/g])`` (module docstring)."""
    _check_weight(w, "quantize_int4")
    _check_scale_dtype(scale_dtype, "quantize_int4")
    n, k = w.shape
    check_group_size(group_size, k, "nvlm_kernels.packing.quantize_int4")
    wg = w.float().reshape(n, k // group_size, group_size)                 # [N, G, g]
    lo = wg.amin(dim=2).clamp(max=0.0)                                     # [N, G], <= 0
    hi = wg.amax(dim=2).clamp(min=0.0)                                     # [N, G], >= 0
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, torch.full_like(lo, -1.0), lo)
    hi = torch.where(empty, torch.ones_like(hi), hi)
    scales = _round_up_to((hi - lo) / 15.0, scale_dtype, "quantize_int4")  # [N, G]
    s = scales.float()
    zeros = torch.round(-lo / s).clamp_(0, 15)                             # [N, G]
    q = (torch.round(wg / s[..., None]) + zeros[..., None]).clamp_(0, 15)  # [N, G, g]
    q = q.to(torch.uint8).reshape(n, k)
    return pack_int4(q), scales, zeros.to(torch.uint8)


def check_int4_shapes(qweight, scales, zeros, group_size, where: str = "nvlm_kernels") -> tuple[int, int]:
    """Validate an int4 triple (dtypes, shapes, group size) and return ``(N, K)``."""
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2 or qweight.dtype != torch.uint8:
        desc = f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight)
        raise ValueError(f"{where}: argument 'qweight' must be uint8 [N, K/2], got {desc}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    check_group_size(group_size, k, where)
    groups = k // group_size
    if not isinstance(scales, torch.Tensor) or scales.dtype not in _SCALE_DTYPES:
        raise ValueError(f"{where}: argument 'scales' must be float16/bfloat16/float32, got "
                         f"{scales.dtype if isinstance(scales, torch.Tensor) else type(scales)}")
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"{where}: argument 'scales' must have shape ({n}, {groups}) for qweight "
                         f"{tuple(qweight.shape)} and group_size={group_size}, got {tuple(scales.shape)}")
    if not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.uint8:
        raise ValueError(f"{where}: argument 'zeros' must be uint8 (values 0..15), got "
                         f"{zeros.dtype if isinstance(zeros, torch.Tensor) else type(zeros)}")
    if tuple(zeros.shape) != (n, groups):
        raise ValueError(f"{where}: argument 'zeros' must have shape ({n}, {groups}), got {tuple(zeros.shape)}")
    return n, k


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int = 128,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - z) * s`` computed in fp32 (exact for fp16/bf16 scales), returned as ``dtype`` ``[N, K]``."""
    n, k = check_int4_shapes(qweight, scales, zeros, group_size, "nvlm_kernels.packing.dequantize_int4")
    q = unpack_int4(qweight).float().reshape(n, k // group_size, group_size)
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(n, k).to(dtype)


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio ``10 log10(sum w^2 / sum (w - w_hat)^2)`` in dB (inf when exact)."""
    w, w_hat = w.double(), w_hat.double()
    noise = (w - w_hat).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(w.pow(2).sum() / noise))
