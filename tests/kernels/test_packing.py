"""The quantised weight format (nvlm_kernels/packing.py): nibble order, round trips, error bounds, SQNR."""

import pytest
import torch

from nvlm_kernels import packing
from nvlm_kernels.packing import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    sqnr_db,
    unpack_int4,
)


@pytest.mark.parametrize("shape", [(1, 2), (7, 64), (96, 384)])
def test_pack_unpack_round_trip(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (shape[0], shape[1] // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)


def test_pack_nibble_order():
    """Low nibble = even k, high nibble = odd k (the layout every kernel reads)."""
    q = torch.tensor([[1, 2, 15, 0, 7, 9]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[1 | 2 << 4, 15 | 0 << 4, 7 | 9 << 4]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="'q'"):
        pack_int4(torch.randint(0, 16, (2, 3), dtype=torch.uint8))         # odd K
    with pytest.raises(ValueError, match="above 15"):
        pack_int4(torch.full((2, 2), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="'q'"):
        pack_int4(torch.zeros(2, 2, dtype=torch.int32))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_error_bound_and_sqnr(scale_dtype):
    w = torch.randn(64, 512) * 0.05
    q, s = quantize_int8(w, scale_dtype=scale_dtype)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == scale_dtype and s.shape == (64,)
    assert int(q.abs().max()) <= 127
    err = (w - dequantize_int8(q, s)).abs()
    assert (err <= s.float()[:, None] / 2 * (1 + 1e-6)).all()                 # round to nearest with the stored scale
    assert (s.float() >= w.abs().amax(1) / 127).all()                          # scales rounded up, never down
    assert sqnr_db(w, dequantize_int8(q, s)) > 38.0                           # ~42 dB for Gaussian rows


@pytest.mark.parametrize("group_size, min_db", [(32, 20.5), (64, 19.5), (128, 18.5)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_int4_error_bound_and_sqnr(group_size, min_db, scale_dtype):
    n, k = 48, 640
    w = torch.randn(n, k) * 0.02 + 0.003
    qw, s, z = quantize_int4(w, group_size, scale_dtype=scale_dtype)
    g = k // group_size
    assert qw.shape == (n, k // 2) and qw.dtype == torch.uint8
    assert s.shape == (n, g) and s.dtype == scale_dtype and z.shape == (n, g) and z.dtype == torch.uint8
    assert int(z.max()) <= 15
    w_hat = dequantize_int4(qw, s, z, group_size)
    err = (w - w_hat).abs().reshape(n, g, group_size)
    assert (err <= s.float()[..., None] / 2 * (1 + 1e-6)).all()
    db = sqnr_db(w, w_hat)
    assert db > min_db, db
    print(f"int4 g{group_size} {scale_dtype}: SQNR {db:.1f} dB")


def test_int4_constant_and_zero_groups():
    w = torch.zeros(4, 128)
    w[1] = 3.0
    w[2] = -2.0
    w[3, :64] = 0.5                                                  # half constant, half zero
    qw, s, z = quantize_int4(w, 64)
    assert torch.isfinite(s.float()).all() and (s.float() > 0).all()
    w_hat = dequantize_int4(qw, s, z, 64)
    assert torch.equal(w_hat[0], torch.zeros(128))                   # zero is exactly representable
    err = (w - w_hat).abs().reshape(4, 2, 64)
    assert (err <= s.float()[..., None] / 2 * (1 + 1e-6)).all()


def test_int4_group_size_errors():
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match="not a multiple of argument 'group_size'"):
        quantize_int4(w, 64)
    with pytest.raises(ValueError, match="'group_size' must be one of"):
        quantize_int4(w, 48)
    with pytest.raises(ValueError, match="'w'"):
        quantize_int4(torch.randn(96), 32)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))


def test_fp16_scale_overflow_is_reported():
    w = torch.full((2, 32), 1e7)
    with pytest.raises(ValueError, match="overflows"):
        quantize_int8(w)
    q, s = quantize_int8(w, scale_dtype=torch.float32)
    assert torch.allclose(dequantize_int8(q, s), w, rtol=1e-2)


def test_dequantize_checks_shapes():
    qw, s, z = quantize_int4(torch.randn(8, 256), 128)
    with pytest.raises(ValueError, match="'scales'"):
        dequantize_int4(qw, s[:, :1], z, 128)
    with pytest.raises(ValueError, match="'zeros'"):
        dequantize_int4(qw, s, z.to(torch.int32), 128)
    with pytest.raises(ValueError, match="'scale'"):
        dequantize_int8(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))


def test_group_sizes_constant():
    assert packing.INT4_GROUP_SIZES == (32, 64, 128)


# ----------------------------------------------------------------------------------------------------------------
# rounding="mse": clipping search (never worse than RTN per group / row)
# ----------------------------------------------------------------------------------------------------------------
def _weights(kind, n, k):
    g = torch.Generator().manual_seed(3)
    if kind == "gauss":
        return torch.randn(n, k, generator=g) * 0.02
    if kind == "heavy":                                              # Student-t-like: a few large outliers
        return torch.randn(n, k, generator=g) * 0.02 / torch.rand(n, k, generator=g).clamp(min=0.05).sqrt()
    return torch.rand(n, k, generator=g) - 0.3                      # uniform, offset (zero point matters)


@pytest.mark.parametrize("kind", ["gauss", "heavy", "uniform"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_mse_never_worse_than_rtn_per_group(kind, group_size):
    n, k = 64, 384
    w = _weights(kind, n, k)
    errs = {}
    for r in ("rtn", "mse"):
        qw, s, z = quantize_int4(w, group_size, rounding=r)
        assert qw.shape == (n, k // 2) and s.dtype == torch.float16 and z.dtype == torch.uint8
        assert int(z.max()) <= 15 and (s.float() > 0).all()
        w_hat = dequantize_int4(qw, s, z, group_size)
        errs[r] = (w - w_hat).pow(2).reshape(n, k // group_size, group_size).sum(-1)        # [N, G]
    assert (errs["mse"] <= errs["rtn"] * (1 + 1e-6)).all()
    gain = 10 * torch.log10(errs["rtn"].sum() / errs["mse"].sum())
    print(f"int4 g{group_size} {kind}: mse rounding gains {float(gain):.2f} dB of weight SQNR")
    assert gain > 0.2                                                # measured 0.3-0.5 dB (Gaussian) and more


@pytest.mark.parametrize("kind", ["gauss", "heavy"])
def test_int8_mse_never_worse_than_rtn_per_row(kind):
    w = _weights(kind, 32, 512)
    errs = {}
    for r in ("rtn", "mse"):
        q, s = quantize_int8(w, rounding=r)
        assert q.dtype == torch.int8 and s.shape == (32,) and int(q.abs().max()) <= 127
        errs[r] = (w - dequantize_int8(q, s)).pow(2).sum(1)
    assert (errs["mse"] <= errs["rtn"] * (1 + 1e-6)).all()
    assert errs["mse"].sum() < errs["rtn"].sum()


def test_mse_zero_groups_and_bad_rounding():
    w = torch.zeros(2, 64)
    w[1, :32] = 0.25
    for r in ("rtn", "mse"):
        qw, s, z = quantize_int4(w, 32, rounding=r)
        w_hat = dequantize_int4(qw, s, z, 32)
        assert torch.equal(w_hat[0], w[0]) and torch.equal(w_hat[1, 32:], w[1, 32:])   # zero groups stay exact
        assert (w_hat[1, :32] - 0.25).abs().max() < 1e-3                           # a constant group: ~exact
        q, s8 = quantize_int8(w, rounding=r)
        assert torch.equal(dequantize_int8(q, s8)[0], w[0])
    with pytest.raises(ValueError, match="'rounding'"):
        quantize_int4(w, 32, rounding="gptq")                        # needs activations: nvlm.quant only
    with pytest.raises(ValueError, match="'rounding'"):
        quantize_int8(w, rounding="nearest")
