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

Rounding (``rounding=``; the stored format is the same either way, only the chosen scales/zeros differ):

* ``"rtn"`` (default): the min/max rules above.
* ``"mse"``: data-free clipping search (GPTQ's ``mse`` option, llama.cpp/HQQ style): for each int4 group (int8: each
  row) try the range shrunk by ``p`` in ``MSE_SHRINK_GRID`` (1.0 down to 0.5), keep the candidate with the smallest
  squared error of the group's weights, then refit the scale by least squares for the chosen codes (a closed form)
  and keep that if it lowers the error further. Never worse than ``"rtn"`` for a group (``p = 1`` is the RTN
  candidate, and the refit is kept only when it helps); ~25x the arithmetic of RTN. Clipped weights no longer obey
  ``|w - w_hat| <= scale / 2``; the group's total squared error is what is minimised.

Scale dtype: fp16 by default, which is what the size tables in design.md/anchors.md assume (4.125 bit per weight at
g128) and what GPTQ/AWQ checkpoints hold. Scales are rounded *up* to the scale dtype (never down), so every weight
still lies within the representable range and the round-to-nearest error bound ``|w - w_hat| <= scale / 2`` holds
with the stored scale. Pass ``scale_dtype=torch.bfloat16`` (or float32) for weights whose scales overflow fp16.
"""

import torch

INT4_GROUP_SIZES = (32, 64, 128)
ROUNDINGS = ("rtn", "mse")
#: Range shrink factors tried by ``rounding="mse"`` (1.0 = the RTN range, so the search never loses to RTN).
MSE_SHRINK_GRID = tuple(1.0 - i / 40 for i in range(21))
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


def _check_rounding(rounding, fn: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"nvlm_kernels.packing.{fn}: argument 'rounding' must be one of {ROUNDINGS}, got {rounding!r}")


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


def _to_positive(x: torch.Tensor, dtype: torch.dtype, fn: str) -> torch.Tensor:
    """fp32 ``x`` -> nearest ``dtype`` value, kept > 0 (a least-squares scale can round to 0 or go negative)."""
    tiny = torch.finfo(dtype).tiny
    y = x.clamp(min=tiny).to(dtype)
    y = torch.where(y > 0, y, torch.full_like(y, tiny))
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
def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float16, rounding: str = "rtn"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(qweight int8 [N, K], scale [N] scale_dtype)`` with ``w ~= q * scale``.

    ``rounding``: ``"rtn"`` (absmax scale) or ``"mse"`` (clipping search, module docstring)."""
    _check_weight(w, "quantize_int8")
    _check_scale_dtype(scale_dtype, "quantize_int8")
    _check_rounding(rounding, "quantize_int8")
    wf = w.float()
    absmax = wf.abs().amax(dim=1)                                          # [N]
    absmax = torch.where(absmax > 0, absmax, torch.full_like(absmax, 127.0))  # all-zero row: scale 1, q = 0

    def codes(scale):                                                      # scale [N] (stored dtype) -> q [N, K]
        return torch.round(wf / scale.float()[:, None]).clamp_(-127, 127)

    scale = _round_up_to(absmax / 127.0, scale_dtype, "quantize_int8")
    if rounding == "mse":
        best_err = None
        for p in MSE_SHRINK_GRID:
            cand = _round_up_to(absmax * (p / 127.0), scale_dtype, "quantize_int8")
            err = (codes(cand) * cand.float()[:, None] - wf).pow_(2).sum(dim=1)          # [N]
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            scale, best_err = torch.where(better, cand, scale), torch.where(better, err, best_err)
        q = codes(scale)                                                   # least-squares scale for these codes
        qq = q.pow(2).sum(dim=1)
        ls = torch.where(qq > 0, (q * wf).sum(dim=1) / qq.clamp(min=1), scale.float())
        cand = _to_positive(ls, scale_dtype, "quantize_int8")
        err = (codes(cand) * cand.float()[:, None] - wf).pow_(2).sum(dim=1)
        scale = torch.where(err < best_err, cand, scale)
    return codes(scale).to(torch.int8), scale


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
def quantize_int4(w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float16,
                  rounding: str = "rtn") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(qweight uint8 [N, K/2], scales [N, K/g], zeros uint8 [N, K/g])`` (module docstring).

    ``rounding``: ``"rtn"`` (GPTQ's min/max rule) or ``"mse"`` (per-group clipping search, module docstring)."""
    _check_weight(w, "quantize_int4")
    _check_scale_dtype(scale_dtype, "quantize_int4")
    _check_rounding(rounding, "quantize_int4")
    n, k = w.shape
    check_group_size(group_size, k, "nvlm_kernels.packing.quantize_int4")
    wg = w.float().reshape(n, k // group_size, group_size)                 # [N, G, g]
    scales, zeros = int4_params(wg, scale_dtype, rounding)                 # [N, G] each
    q = int4_codes(wg, scales, zeros).to(torch.uint8).reshape(n, k)
    return pack_int4(q), scales, zeros.to(torch.uint8)


def int4_codes(wg: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """fp32 codes ``clamp(round(w / s) + z, 0, 15)`` of ``wg [..., g]`` for ``scales, zeros [...]``."""
    return (torch.round(wg / scales.float()[..., None]) + zeros.float()[..., None]).clamp_(0, 15)


def _int4_sq_err(wg: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Squared error ``sum_g ((q - z) s - w)^2`` of each group: ``[...]``."""
    s, z = scales.float()[..., None], zeros.float()[..., None]
    return ((int4_codes(wg, scales, zeros) - z) * s - wg).pow_(2).sum(dim=-1)


def _int4_range_params(lo: torch.Tensor, hi: torch.Tensor, scale_dtype, fn: str):
    """GPTQ's min/max rule for a range ``lo <= 0 <= hi`` (not both 0): ``(scales, fp32 zeros)``."""
    scales = _round_up_to((hi - lo) / 15.0, scale_dtype, fn)
    zeros = torch.round(-lo / scales.float()).clamp_(0, 15)
    return scales, zeros


def int4_params(wg: torch.Tensor, scale_dtype: torch.dtype = torch.float16, rounding: str = "rtn"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (``scale_dtype``) and fp32 integer-valued zeros ``[...]`` for the fp32 groups ``wg [..., g]``."""
    fn = "quantize_int4"
    lo0 = wg.amin(dim=-1).clamp(max=0.0)                                   # [...], <= 0
    hi0 = wg.amax(dim=-1).clamp(min=0.0)                                   # [...], >= 0
    empty = (lo0 == 0) & (hi0 == 0)
    lo0 = torch.where(empty, torch.full_like(lo0, -1.0), lo0)
    hi0 = torch.where(empty, torch.ones_like(hi0), hi0)
    scales, zeros = _int4_range_params(lo0, hi0, scale_dtype, fn)
    if rounding == "rtn":
        return scales, zeros
    best_err = _int4_sq_err(wg, scales, zeros)
    for p in MSE_SHRINK_GRID[1:]:
        s, z = _int4_range_params(lo0 * p, hi0 * p, scale_dtype, fn)
        err = _int4_sq_err(wg, s, z)
        better = err < best_err
        scales, zeros, best_err = (torch.where(better, s, scales), torch.where(better, z, zeros),
                                   torch.where(better, err, best_err))
    # least-squares refit of the scale for the chosen codes and zero point: s* = sum(w (q-z)) / sum((q-z)^2)
    d = int4_codes(wg, scales, zeros) - zeros[..., None]
    dd = d.pow(2).sum(dim=-1)
    ls = torch.where(dd > 0, (d * wg).sum(dim=-1) / dd.clamp(min=1), scales.float())
    s = _to_positive(ls, scale_dtype, fn)
    err = _int4_sq_err(wg, s, zeros)
    return torch.where(err < best_err, s, scales), zeros


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
