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
#: Rows of a weight quantised at once by ``set_weight_from_float``: bounds the fp32 temporaries to ~64 MiB whatever the
#: layer (a 29568 x 8192 bf16 weight is never copied whole to fp32).
_CHUNK_ELEMENTS = 1 << 24


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

    def to_dict(self) -> dict:
        """The ``quantization_config`` block of ``config.json``."""
        return {"quant_method": "nvlm", "method": self.method, "bits": self.bits, "group_size": self.group_size,
                "scale_dtype": self.scale_dtype, "include_lm_head": self.include_lm_head,
                "modules_not_converted": list(self.modules_not_converted)}


@dataclass
class Int8WeightOnly(_WeightOnlyBase):
    """int8 per output channel, symmetric (``w = q * scale``)."""

    include_lm_head: bool = False
    modules_not_converted: tuple[str, ...] = ()     # module names (or name prefixes) to leave unquantised
    scale_dtype: str = "float16"                     # dtype of the stored scales (packing.py default)
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
                 scale_dtype: torch.dtype = torch.float16):
        super().__init__()
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
    def from_linear(cls, linear: nn.Linear, config: Int8WeightOnly | Int4WeightOnly) -> QuantLinear:
        """A QuantLinear for ``linear``; quantises its weight unless it is on the meta device (then the buffers are
        empty meta tensors of the packed shapes, to be filled by ``set_weight_from_float`` or a state dict)."""
        config = resolve_config(config)
        if not isinstance(config, (Int8WeightOnly, Int4WeightOnly)):
            raise ValueError(f"QuantLinear.from_linear: argument 'config' must be Int8WeightOnly or Int4WeightOnly, "
                             f"got {type(config).__name__}")
        w = linear.weight
        has_bias = linear.bias is not None
        q = cls(linear.in_features, linear.out_features, bias=has_bias, bits=config.bits,
                group_size=config.group_size, device=w.device,
                dtype=linear.bias.dtype if has_bias else w.dtype, scale_dtype=_DTYPE_NAMES[config.scale_dtype])
        if not w.is_meta:
            q.set_weight_from_float(w.detach(), linear.bias.detach() if has_bias else None)
        return q

    @torch.no_grad()
    def set_weight_from_float(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantise a float ``weight [out_features, in_features]`` into this layer (on ``weight``'s device), a block
        of rows at a time, so no full fp32 copy of the weight is ever made. ``bias [out_features]`` (optional) is
        stored in the current bias dtype. Replaces meta buffers with real ones."""
        n, k = self.out_features, self.in_features
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (n, k):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"QuantLinear.set_weight_from_float: argument 'weight' must have shape ({n}, {k}), "
                             f"got {shape}")
        if not weight.is_floating_point() or weight.is_meta:
            raise ValueError(f"QuantLinear.set_weight_from_float: argument 'weight' must be a materialised float "
                             f"tensor, got {weight.dtype} on {weight.device}")
        device = weight.device
        names = ("qweight", *self._scale_names(), *(("zeros",) if self.bits == 4 else ()))
        for name in names:  # fresh storage on the weight's device (meta buffers or another device)
            old = self._buffers[name]
            if old.is_meta or old.device != device:
                self._buffers[name] = torch.empty(old.shape, dtype=old.dtype, device=device)
        rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
        for r0 in range(0, n, rows):
            chunk = weight[r0:r0 + rows]
            if self.bits == 8:
                q, s = packing.quantize_int8(chunk, scale_dtype=self.scale.dtype)
                self.qweight[r0:r0 + rows] = q
                self.scale[r0:r0 + rows] = s
            else:
                q, s, z = packing.quantize_int4(chunk, self.group_size, scale_dtype=self.scales.dtype)
                self.qweight[r0:r0 + rows] = q
                self.scales[r0:r0 + rows] = s
                self.zeros[r0:r0 + rows] = z
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
                f"bits={self.bits}{g}, scale_dtype={self.scale_dtype}")


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


def quantize_(model: nn.Module, config, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swap the selected ``nn.Linear`` modules of ``model`` in place (see module docstring) and return ``model``.

    ``config``: ``Int8WeightOnly()``, ``Int4WeightOnly(group_size)``, ``BnbNF4()``, ``BnbInt8()``, a
    ``quantization_config`` dict, or a name (``"int8" | "int4" | "bnb-nf4" | "bnb-int8"``).
    ``filter_fn(module, fqn) -> bool`` (torchao's signature) replaces the default selection; a Linear it selects
    that the format cannot hold (int4: K not a multiple of the group size) raises ``ValueError``.
    Works on meta-device models (``Int8WeightOnly``/``Int4WeightOnly`` only). Sets ``model.quantization_config``
    to the ``config.json`` block, with ``modules_not_converted`` = every Linear left in float.
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
    for fqn in selected:
        parent_name, _, attr = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        new = _to_bnb(linear, config) if bnb_config else QuantLinear.from_linear(linear, config)
        setattr(parent, attr, new)
    block = config.to_dict()
    block["modules_not_converted"] = sorted(set(block["modules_not_converted"]) | set(left))
    model.quantization_config = block
    return model


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(|ref|^2 / |ref - approx|^2)`` in dB (torchao's ``compute_error``)."""
    return packing.sqnr_db(reference, approx)
