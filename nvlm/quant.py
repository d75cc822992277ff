"""Weight-only quantisation: torchao's API on the surface, gpt-fast's module swap underneath.

    quantize_(model, Int4WeightOnly(group_size=128))      # or Int8WeightOnly(), BnbNF4(), BnbInt8(), "int4", ...

swaps every selected ``nn.Linear`` for a :class:`QuantLinear` in place. Its buffers already have the packed shapes
of the format in ``nvlm_kernels/packing.py`` (the one definition)::

    int8: qweight int8 [N, K], scale [N]                            w = q * scale
    int4: qweight uint8 [N, K/2], scales [N, K/g], zeros uint8 [N, K/g]   w = (q - z) * s

so a model built on the meta device can be quantised first and filled while streaming a checkpoint
(``QuantLinear.set_weight_from_float``, called by ``nvlm.loading``), and a saved quantised state dict reloads with
``load_state_dict(assign=True)`` (keys ``<name>.qweight``, ``<name>.scale`` | ``<name>.scales`` + ``<name>.zeros``,
``<name>.bias``). ``forward`` calls ``nvlm_kernels.w8a16_linear`` / ``w4a16_linear`` (GEMV for small M, GEMM for large
M, backend chosen by ``nvlm_kernels.dispatch``).

Default selection (``filter_fn=None``): every ``nn.Linear`` (for NVLM: decoder, projector ``mlp1`` and vision tower),
except ``lm_head`` (kept in the compute dtype unless ``include_lm_head=True``) and names listed in
``modules_not_converted``; Linears whose K does not fit the format (int4: K a multiple of the group size) are left
as they are and reported. Embeddings and norms are not Linears, so they are never touched.

Rounding (``Int8WeightOnly(rounding=...)`` / ``Int4WeightOnly(rounding=...)``; the stored format never changes):

* ``"rtn"`` (default): round to nearest with min/max (int4) or absmax (int8) scales (``nvlm_kernels.packing``).
* ``"mse"``: data-free per-group (int8: per-row) clipping search minimising the weights' squared error
  (``packing`` docstring). Works while streaming a checkpoint.
* ``"gptq"``: GPTQ (Frantar et al. 2022): columns are quantised left to right and each column's rounding error is
  spread over the not-yet-quantised columns through the inverse Hessian ``H = 2 X^T X / n`` of the layer's
  inputs, so the layer's *output* error on the calibration inputs is minimised. Needs a float model and
  ``quantize_(model, config, calibration=fn)`` where ``fn(model)`` runs a few forward passes (prompts, images);
  the Hessians of all selected Linears are collected in that one pass over the float model (not layer by layer,
  which GPTQ's reference does; simpler, and each H is exact for the float model). Group scales/zeros are chosen
  (with the ``"mse"`` search) from the error-compensated weights when the column loop enters a group, like
  GPTQ's ``act_order=False, static_groups=False``, so the checkpoint is an ordinary one of the same format.

``BnbNF4`` / ``BnbInt8`` swap in bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` instead, so users can compare
against a well-known alternative; they need a materialised model and a working bitsandbytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import nvlm_kernels
from nvlm_kernels import packing

_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: Elements of a weight quantised at once by ``set_weight_from_float`` (whole rows): bounds the fp32 temporaries of
#: the quantisers (~5 chunk-sized ones, 4 MiB each) to ~20 MiB whatever the layer, so that loading's peak host memory
#: stays the finished model plus about one bf16 tensor (a 29568 x 8192 weight is never copied whole to fp32).
_CHUNK_ELEMENTS = 1 << 20
ROUNDINGS = ("rtn", "mse", "gptq")
#: GPTQ: dampening added to H's diagonal (fraction of its mean; GPTQ's ``percdamp``) and columns per lazy block.
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
class _WeightOnlyBase:
    """Shared checks and serialisation of our two formats (fields are declared per class so that
    ``Int4WeightOnly(64)`` means group size 64, as in torchao)."""

    def __post_init__(self):
        self.modules_not_converted = tuple(self.modules_not_converted)
        if self.scale_dtype not in _DTYPE_NAMES:
            raise ValueError(f"{type(self).__name__}: argument 'scale_dtype' must be one of {sorted(_DTYPE_NAMES)}, "
                             f"got {self.scale_dtype!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"{type(self).__name__}: argument 'rounding' must be one of {ROUNDINGS}, "
                             f"got {self.rounding!r}")

    def to_dict(self) -> dict:
        """The ``quantization_config`` block of ``config.json``."""
        return {"quant_method": "nvlm", "method": self.method, "bits": self.bits, "group_size": self.group_size,
                "scale_dtype": self.scale_dtype, "rounding": self.rounding, "include_lm_head": self.include_lm_head,
                "modules_not_converted": list(self.modules_not_converted)}


@dataclass
class Int8WeightOnly(_WeightOnlyBase):
    """int8 per output channel, symmetric (``w = q * scale``)."""

    include_lm_head: bool = False
    modules_not_converted: tuple[str, ...] = ()     # module names (or name prefixes) to leave unquantised
    scale_dtype: str = "float16"                     # dtype of the stored scales (packing.py default)
    rounding: str = "rtn"                            # "rtn" | "mse" | "gptq" (module docstring)
    method = "int8_weight_only"
    bits = 8
    group_size = None


@dataclass
class Int4WeightOnly(_WeightOnlyBase):
    """int4 group-wise with an integer zero point (``w = (q - z) * s``), groups of 32, 64 or 128 along K."""

    group_size: int = 128
    include_lm_head: bool = False
    modules_not_converted: tuple[str, ...] = ()
    scale_dtype: str = "float16"
    rounding: str = "rtn"                            # "rtn" | "mse" | "gptq" (module docstring)
    method = "int4_weight_only"
    bits = 4

    def __post_init__(self):
        super().__post_init__()
        if self.group_size not in packing.INT4_GROUP_SIZES:
            raise ValueError(f"Int4WeightOnly: argument 'group_size' must be one of {packing.INT4_GROUP_SIZES}, "
                             f"got {self.group_size!r}")


@dataclass
class BnbNF4:
    """bitsandbytes NF4 (``Linear4bit``, block size 64): an alternative backend, for comparison."""

    compute_dtype: str = "bfloat16"
    include_lm_head: bool = False
    modules_not_converted: tuple[str, ...] = ()
    method = "bnb_nf4"
    bits = 4
    group_size = 64

    def to_dict(self) -> dict:
        return {"quant_method": "bitsandbytes", "method": self.method, "bits": 4, "group_size": 64,
                "compute_dtype": self.compute_dtype, "include_lm_head": self.include_lm_head,
                "modules_not_converted": list(self.modules_not_converted)}


@dataclass
class BnbInt8:
    """bitsandbytes LLM.int8() (``Linear8bitLt``, outlier threshold 6.0): an alternative backend, for comparison."""

    threshold: float = 6.0
    include_lm_head: bool = False
    modules_not_converted: tuple[str, ...] = ()
    method = "bnb_int8"
    bits = 8
    group_size = None

    def to_dict(self) -> dict:
        return {"quant_method": "bitsandbytes", "method": self.method, "bits": 8, "group_size": None,
                "threshold": self.threshold, "include_lm_head": self.include_lm_head,
                "modules_not_converted": list(self.modules_not_converted)}


_CONFIGS = {c.method: c for c in (Int8WeightOnly, Int4WeightOnly, BnbNF4, BnbInt8)}
_NAMES = {"int8": Int8WeightOnly, "int4": Int4WeightOnly, "bnb-nf4": BnbNF4, "bnb-int8": BnbInt8}


def config_from_dict(d: dict):
    """Inverse of ``<config>.to_dict()`` (reads a ``quantization_config`` block; unknown keys are ignored)."""
    if not isinstance(d, dict) or d.get("method") not in _CONFIGS:
        got = d.get("method") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"quantization_config: key 'method' must be one of {sorted(_CONFIGS)}, got {got!r}")
    cls = _CONFIGS[d["method"]]
    if d.get("bits") is not None and d["bits"] != cls.bits:
        raise ValueError(f"quantization_config: method {d['method']!r} has bits={cls.bits}, got bits={d['bits']}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names and v is not None}
    if "modules_not_converted" in kwargs:
        kwargs["modules_not_converted"] = tuple(kwargs["modules_not_converted"])
    return cls(**kwargs)


for _cls in (Int8WeightOnly, Int4WeightOnly, BnbNF4, BnbInt8):
    _cls.from_dict = staticmethod(config_from_dict)


def resolve_config(config):
    """A config object, a ``quantization_config`` dict, or a CLI name (int8 | int4 | bnb-nf4 | bnb-int8)."""
    if isinstance(config, str):
        if config not in _NAMES:
            raise ValueError(f"quantize_: unknown quantisation {config!r}; known: {sorted(_NAMES)}")
        return _NAMES[config]()
    if isinstance(config, dict):
        return config_from_dict(config)
    if not isinstance(config, tuple(_CONFIGS.values())):
        raise ValueError(f"quantize_: argument 'config' must be one of Int8WeightOnly, Int4WeightOnly, BnbNF4, "
                         f"BnbInt8 (or a name / dict), got {type(config).__name__}")
    return config


# ----------------------------------------------------------------------------------------------------------------
# QuantLinear
# ----------------------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A Linear layer with int8 or int4 weights (format: ``nvlm_kernels.packing``) and a float bias.

    Buffers: ``qweight``, ``scale`` (int8) or ``scales`` + ``zeros`` (int4), ``bias`` (compute dtype) or None.
    Scale buffers keep their dtype under ``model.to(dtype)`` (re-rounding fp16 scales to bf16 would change the
    weights); ``bias`` follows the model dtype like any float tensor.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 group_size: int | None = None, device=None, dtype: torch.dtype | None = None,
                 scale_dtype: torch.dtype = torch.float16, rounding: str = "rtn"):
        super().__init__()
        if rounding not in ROUNDINGS:
            raise ValueError(f"QuantLinear: argument 'rounding' must be one of {ROUNDINGS}, got {rounding!r}")
        self.rounding = rounding     # how set_weight_from_float / set_weight_gptq choose the codes
        if bits not in (4, 8):
            raise ValueError(f"QuantLinear: argument 'bits' must be 4 or 8, got {bits!r}")
        if bits == 4:
            packing.check_group_size(group_size, in_features, "QuantLinear")
        elif group_size is not None:
            raise ValueError(f"QuantLinear: int8 is per output channel; argument 'group_size' must be None, "
                             f"got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n, k = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.empty((n, k), dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty((n,), dtype=scale_dtype, device=device))
        else:
            self.register_buffer("qweight", torch.empty((n, k // 2), dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty((n, k // group_size), dtype=scale_dtype, device=device))
            self.register_buffer("zeros", torch.empty((n, k // group_size), dtype=torch.uint8, device=device))
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("bias", torch.empty((n,), dtype=dtype, device=device) if bias else None)

    @property
    def scale_dtype(self) -> torch.dtype:
        return (self.scale if self.bits == 8 else self.scales).dtype

    def _scale_names(self) -> tuple[str, ...]:
        return ("scale",) if self.bits == 8 else ("scales",)

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self._scale_names()}
        super()._apply(fn, recurse)
        for name, old in kept.items():  # device moves apply, dtype casts do not
            new = getattr(self, name)
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Int8WeightOnly | Int4WeightOnly,
                    hessian: torch.Tensor | None = None) -> QuantLinear:
        """A QuantLinear for ``linear``; quantises its weight unless it is on the meta device (then the buffers are
        empty meta tensors of the packed shapes, to be filled by ``set_weight_from_float`` or a state dict).
        ``rounding="gptq"`` needs ``hessian [K, K]`` (``X^T X`` of the layer's calibration inputs) for a real
        weight."""
        config = resolve_config(config)
        if not isinstance(config, (Int8WeightOnly, Int4WeightOnly)):
            raise ValueError(f"QuantLinear.from_linear: argument 'config' must be Int8WeightOnly or Int4WeightOnly, "
                             f"got {type(config).__name__}")
        w = linear.weight
        has_bias = linear.bias is not None
        q = cls(linear.in_features, linear.out_features, bias=has_bias, bits=config.bits,
                group_size=config.group_size, device=w.device,
                dtype=linear.bias.dtype if has_bias else w.dtype, scale_dtype=_DTYPE_NAMES[config.scale_dtype],
                rounding=config.rounding)
        if not w.is_meta:
            if hessian is not None:
                q.set_weight_gptq(w.detach(), hessian, linear.bias.detach() if has_bias else None)
            else:
                q.set_weight_from_float(w.detach(), linear.bias.detach() if has_bias else None)
        return q

    @torch.no_grad()
    def set_weight_from_float(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantise a float ``weight [out_features, in_features]`` into this layer (on ``weight``'s device), a block
        of rows at a time, so no full fp32 copy of the weight is ever made. ``bias [out_features]`` (optional) is
        stored in the current bias dtype. Replaces meta buffers with real ones. Uses ``self.rounding`` ("rtn" or
        "mse"); a "gptq" layer needs :meth:`set_weight_gptq` (a Hessian) instead."""
        if self.rounding == "gptq":
            raise ValueError("QuantLinear.set_weight_from_float: rounding='gptq' needs calibration activations; use "
                             "set_weight_gptq(weight, hessian) or quantize_(model, config, calibration=...) on a "
                             "loaded float model")
        self._fill(weight, bias, None)

    @torch.no_grad()
    def set_weight_gptq(self, weight: torch.Tensor, hessian: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantise ``weight [out_features, in_features]`` with GPTQ for the input Hessian ``hessian [K, K]``
        (any positive multiple of ``X^T X``; module docstring). Group scales/zeros use the "mse" search."""
        k = self.in_features
        if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
            shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
            raise ValueError(f"QuantLinear.set_weight_gptq: argument 'hessian' must have shape ({k}, {k}), got {shape}")
        self._fill(weight, bias, hessian)

    @torch.no_grad()
    def set_weight_from_row_blocks(self, blocks, device=None) -> None:
        """Like :meth:`set_weight_from_float` for a weight that arrives in row blocks: ``blocks`` yields
        ``(r0, rows [r, in_features] float)`` covering rows ``0..out_features`` in order (``nvlm.loading`` reads
        them straight from the file, so no whole float weight is ever held). Buffers go to ``device`` (default:
        the first block's device)."""
        if self.rounding == "gptq":
            raise ValueError("QuantLinear.set_weight_from_row_blocks: rounding='gptq' needs the whole weight and a "
                             "Hessian; use set_weight_gptq")
        n, k = self.out_features, self.in_features
        done = 0
        for r0, block in blocks:
            if not isinstance(block, torch.Tensor) or block.dim() != 2 or block.shape[1] != k or r0 != done \
                    or r0 + block.shape[0] > n or not block.is_floating_point():
                desc = f"{block.dtype} {tuple(block.shape)}" if isinstance(block, torch.Tensor) else type(block)
                raise ValueError(f"QuantLinear.set_weight_from_row_blocks: block at row {r0} must be float rows "
                                 f"{done}.. of a ({n}, {k}) weight, got {desc}")
            if done == 0:
                self._alloc_buffers(device or block.device)
            rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
            for c0 in range(0, block.shape[0], rows):
                self._quantize_rows(r0 + c0, block[c0:c0 + rows], None)
            done = r0 + block.shape[0]
        if done != n:
            raise ValueError(f"QuantLinear.set_weight_from_row_blocks: the blocks cover {done} of {n} rows")

    def _alloc_buffers(self, device: torch.device) -> None:
        """Fresh storage on ``device`` for the packed buffers (meta buffers or ones on another device)."""
        names = ("qweight", *self._scale_names(), *(("zeros",) if self.bits == 4 else ()))
        for name in names:
            old = self._buffers[name]
            if old.is_meta or old.device != device:
                self._buffers[name] = torch.empty(old.shape, dtype=old.dtype, device=device)

    def _quantize_rows(self, r0: int, chunk: torch.Tensor, hessian: torch.Tensor | None) -> None:
        """Quantise the float rows ``chunk [r, K]`` into rows ``r0..r0+r`` of the packed buffers."""
        r1 = r0 + chunk.shape[0]
        rounding = "mse" if self.rounding == "mse" else "rtn"
        if hessian is not None:
            out = gptq_quantize(chunk, hessian, self.bits, self.group_size, self.scale_dtype)
        elif self.bits == 8:
            out = packing.quantize_int8(chunk, scale_dtype=self.scale.dtype, rounding=rounding)
        else:
            out = packing.quantize_int4(chunk, self.group_size, scale_dtype=self.scales.dtype, rounding=rounding)
        if self.bits == 8:
            self.qweight[r0:r1], self.scale[r0:r1] = out
        else:
            self.qweight[r0:r1], self.scales[r0:r1], self.zeros[r0:r1] = out

    def _fill(self, weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor | None) -> None:
        n, k = self.out_features, self.in_features
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (n, k):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"QuantLinear.set_weight_from_float: argument 'weight' must have shape ({n}, {k}), "
                             f"got {shape}")
        if not weight.is_floating_point() or weight.is_meta:
            raise ValueError(f"QuantLinear.set_weight_from_float: argument 'weight' must be a materialised float "
                             f"tensor, got {weight.dtype} on {weight.device}")
        device = weight.device
        self._alloc_buffers(device)
        # GPTQ factorises H once per weight, so it takes all rows at once (it runs on a materialised model anyway)
        rows = n if hessian is not None else max(1, _CHUNK_ELEMENTS // max(k, 1))
        for r0 in range(0, n, rows):
            self._quantize_rows(r0, weight[r0:r0 + rows], hessian)
        if bias is not None:
            if self.bias is None:
                raise ValueError("QuantLinear.set_weight_from_float: this layer has no bias, argument 'bias' given")
            if tuple(bias.shape) != (n,):
                raise ValueError(f"QuantLinear.set_weight_from_float: argument 'bias' must have shape ({n},), got "
                                 f"{tuple(bias.shape)}")
            self._buffers["bias"] = bias.detach().to(device=device, dtype=self.bias.dtype).clone()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out_features, in_features]`` this layer computes with."""
        if self.bits == 8:
            return packing.dequantize_int8(self.qweight, self.scale, dtype)
        return packing.dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        if self.bits == 8:
            op = getattr(nvlm_kernels, "w8a16_linear", None)
            if op is not None:
                return op(x, self.qweight, self.scale, bias)
        else:
            op = getattr(nvlm_kernels, "w4a16_linear", None)
            if op is not None:
                return op(x, self.qweight, self.scales, self.zeros, self.group_size, bias)
        # nvlm_kernels without the quant_linear op (older install): dequantise and use F.linear.
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}{g}, scale_dtype={self.scale_dtype}, rounding={self.rounding}")


# ----------------------------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  scale_dtype: torch.dtype = torch.float16, damp: float = GPTQ_DAMP, block: int = GPTQ_BLOCK):
    """GPTQ of ``weight [N, K]`` for the input Hessian ``hessian [K, K]`` (``X^T X`` up to a positive factor).

    Returns the packed format of ``packing``: int8 ``(qweight [N, K], scale [N])`` or int4
    ``(qweight [N, K/2], scales [N, K/g], zeros [N, K/g])``. Follows GPTQ's reference (``gptq.py``,
    ``act_order=False``): Cholesky factor ``U`` of ``(H + damp I)^-1`` (upper), columns quantised in blocks of
    ``block``; column ``j``'s error ``(w_j - q_j) / U_jj`` is subtracted from the later columns of the block times
    ``U_j,j+1:``, and the block's errors from the columns after it. int8's per-row scales come from the whole
    weight ("mse" search) before the loop; int4's group scales/zeros from the updated weights when the loop enters
    the group (``group_size`` must divide ``block``). Inputs that never fire (zero ``H_jj``, e.g. ViT dummy heads)
    get weight 0, as in the reference.
    """
    n, k = weight.shape
    if bits == 4:
        packing.check_group_size(group_size, k, "nvlm.quant.gptq_quantize")
        if block % group_size:
            raise ValueError(f"nvlm.quant.gptq_quantize: argument 'block'={block} must be a multiple of "
                             f"group_size={group_size}")
    w = weight.float().clone()                                             # [N, K], updated in place
    h = hessian.to(device=w.device, dtype=torch.float64).clone()           # [K, K]; float64: K^3 solve, tiny cost
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as e:   # not positive definite even after dampening: tell the caller what to do
        raise ValueError(f"nvlm.quant.gptq_quantize: the Hessian is not positive definite after dampening "
                         f"({e}); use more calibration inputs or a larger 'damp'") from None
    u = u.float()                                                          # [K, K] upper triangular

    if bits == 8:
        _, scale = packing.quantize_int8(w, scale_dtype=scale_dtype, rounding="mse")
        s8 = scale.float()                                                 # [N]
        codes = torch.empty((n, k), dtype=torch.float32, device=w.device)
    else:
        groups = k // group_size
        scales = torch.empty((n, groups), dtype=scale_dtype, device=w.device)
        zeros = torch.empty((n, groups), dtype=torch.float32, device=w.device)
        codes = torch.empty((n, k), dtype=torch.float32, device=w.device)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1 = w[:, b0:b1]                                                   # [N, B] view: updates land in w
        err1 = torch.empty_like(w1)
        u1 = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if bits == 4 and col % group_size == 0:                        # enter a group: its params from now-w
                gi = col // group_size
                s, z = packing.int4_params(w1[:, i:i + group_size].unsqueeze(1), scale_dtype, "mse")
                scales[:, gi], zeros[:, gi] = s[:, 0], z[:, 0]
            x = w1[:, i]                                                   # [N]
            if bits == 8:
                q = torch.round(x / s8).clamp_(-127, 127)
                deq = q * s8
            else:
                sf, zf = scales[:, col // group_size].float(), zeros[:, col // group_size]
                q = (torch.round(x / sf) + zf).clamp_(0, 15)
                deq = (q - zf) * sf
            codes[:, col] = q
            e = (x - deq) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, b1:] -= err1 @ u[b0:b1, b1:]
    if bits == 8:
        return codes.to(torch.int8), scale
    return packing.pack_int4(codes.to(torch.uint8)), scales, zeros.to(torch.uint8)


class _HessianRecorder(nn.Module):
    """Stands in for a float Linear during calibration: accumulates ``x^T x`` of its inputs, then runs it.

    A wrapper rather than a hook because NVLM's modules bypass a plain ``nn.Linear`` for speed (the ViT's qkv and
    proj slice ``weight`` and call ``F.linear``); any other module type is called whole, as a QuantLinear will be.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.hessian: torch.Tensor | None = None      # [K, K] fp32
        self.rows = 0

    @property
    def weight(self):
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.detach().reshape(-1, self.in_features).float()              # [rows, K]
        if self.hessian is None:
            self.hessian = torch.zeros((self.in_features,) * 2, device=xf.device)
        self.hessian.addmm_(xf.t(), xf)
        self.rows += xf.shape[0]
        return self.linear(x)


def collect_hessians(model: nn.Module, names: list[str], calibration: Callable[[nn.Module], object]
                     ) -> dict[str, torch.Tensor]:
    """``{name: sum over calibration rows of x^T x}`` (fp32 ``[K, K]``) of the inputs of the Linears ``names``,
    from one call of ``calibration(model)`` (which runs the forward passes) under ``torch.no_grad``."""
    recorders = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        recorders[name] = (parent, attr, _HessianRecorder(getattr(parent, attr)))
        setattr(parent, attr, recorders[name][2])
    try:
        with torch.no_grad():
            calibration(model)
    finally:
        for parent, attr, rec in recorders.values():
            setattr(parent, attr, rec.linear)
    hessians = {n: rec.hessian for n, (_, _, rec) in recorders.items()}
    rows = {n: rec.rows for n, (_, _, rec) in recorders.items()}
    unused = [n for n in names if not rows.get(n)]
    if unused:
        hint = "; give it images too" if unused[0].startswith(("vision_model.", "mlp1.")) else ""
        raise ValueError(f"quantize_: the calibration function never ran module {unused[0]!r} ({len(unused)} "
                         f"module(s) unused): rounding='gptq' needs inputs for every quantised Linear{hint}")
    return hessians


# ----------------------------------------------------------------------------------------------------------------
# quantize_
# ----------------------------------------------------------------------------------------------------------------
def _skipped_by_name(fqn: str, config) -> bool:
    if fqn.split(".")[-1] == "lm_head" and not config.include_lm_head:
        return True
    return any(fqn == p or fqn.startswith(p + ".") for p in config.modules_not_converted)


def _fits(linear: nn.Linear, config) -> bool:
    if isinstance(config, Int4WeightOnly):
        return linear.in_features % config.group_size == 0
    return True


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library raising at import
        raise RuntimeError(f"quantize_: BnbNF4/BnbInt8 need a working bitsandbytes ({type(e).__name__}: {e}); "
                           f"use Int8WeightOnly / Int4WeightOnly instead") from None
    return bnb


def _to_bnb(linear: nn.Linear, config) -> nn.Module:
    bnb = _bnb()
    w = linear.weight
    if w.is_meta:
        raise ValueError("quantize_: BnbNF4/BnbInt8 need a materialised model (bitsandbytes quantises on .to(device)); "
                         "load the float weights first")
    has_bias = linear.bias is not None
    try:
        if isinstance(config, BnbNF4):
            m = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=_DTYPE_NAMES[config.compute_dtype], quant_type="nf4",
                                  device="meta")
            m.weight = bnb.nn.Params4bit(w.detach().clone(), requires_grad=False, quant_type="nf4")
        else:
            m = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=config.threshold, device="meta")
            m.weight = bnb.nn.Int8Params(w.detach().clone(), requires_grad=False, has_fp16_weights=False)
        if has_bias:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m.to(w.device)  # bitsandbytes quantises here
    except Exception as e:
        raise RuntimeError(f"quantize_: bitsandbytes cannot quantise on {w.device} here ({type(e).__name__}: {e})"
                           ) from None


def quantize_(model: nn.Module, config, filter_fn: Callable[[nn.Module, str], bool] | None = None,
              calibration: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """Swap the selected ``nn.Linear`` modules of ``model`` in place (see module docstring) and return ``model``.

    ``config``: ``Int8WeightOnly()``, ``Int4WeightOnly(group_size)``, ``BnbNF4()``, ``BnbInt8()``, a
    ``quantization_config`` dict, or a name (``"int8" | "int4" | "bnb-nf4" | "bnb-int8"``).
    ``filter_fn(module, fqn) -> bool`` (torchao's signature) replaces the default selection; a Linear it selects
    that the format cannot hold (int4: K not a multiple of the group size) raises ``ValueError``.
    Works on meta-device models (``Int8WeightOnly``/``Int4WeightOnly`` only). Sets ``model.quantization_config``
    to the ``config.json`` block, with ``modules_not_converted`` = every Linear left in float.
    ``calibration(model)``: runs a few forward passes of the float model; required by ``rounding="gptq"`` on a
    materialised model (module docstring), ignored otherwise.
    """
    config = resolve_config(config)
    bnb_config = isinstance(config, (BnbNF4, BnbInt8))
    selected, left = [], []
    for fqn, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if filter_fn is not None:
            take = bool(filter_fn(module, fqn))
            if take and not bnb_config and not _fits(module, config):
                raise ValueError(f"quantize_: module {fqn!r} has in_features={module.in_features}, not a multiple "
                                 f"of group_size={config.group_size}")
        else:
            take = not _skipped_by_name(fqn, config) and (bnb_config or _fits(module, config))
        (selected if take else left).append(fqn)
    hessians = {}
    if not bnb_config and config.rounding == "gptq":
        real = [f for f in selected if not model.get_submodule(f).weight.is_meta]
        if real and calibration is None:
            raise ValueError("quantize_: rounding='gptq' needs argument 'calibration' (a function that runs the "
                             "float model on a few inputs) for a materialised model")
        if real:
            hessians = collect_hessians(model, real, calibration)
    for fqn in selected:
        parent_name, _, attr = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        if bnb_config:
            new = _to_bnb(linear, config)
        else:
            new = QuantLinear.from_linear(linear, config, hessians.pop(fqn, None))
        setattr(parent, attr, new)
    block = config.to_dict()
    block["modules_not_converted"] = sorted(set(block["modules_not_converted"]) | set(left))
    model.quantization_config = block
    return model


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(|ref|^2 / |ref - approx|^2)`` in dB (torchao's ``compute_error``)."""
    return packing.sqnr_db(reference, approx)
