"""Pixel shuffle of ViT tiles (downsample 0.5), alone or fused with the projector's LayerNorm.

Maths (spec §3). ``x: [T, N, C]`` holds each tile's ``s x s`` patch grid row-major (``N = s*s``, ``s`` even;
``s = 32``, ``C = 3200`` in NVLM-D-72B). The output ``[T, N/4, 4C]`` merges each 2x2 block of patches::

    ps_version v2: out[t, (s/2)*i + j] = concat(X[2i, 2j], X[2i, 2j+1], X[2i+1, 2j], X[2i+1, 2j+1])
    ps_version v1: the same channel blocks, token index (s/2)*j + i (transposed token order)

``pixel_shuffle_layernorm`` then applies ``LayerNorm(4C)`` to each output row with fp32 statistics, in one pass
over memory instead of InternVL's view/permute/contiguous copies followed by a separate LayerNorm.

Backends: ``cpu`` (csrc/cpu/pixel_shuffle.cpp), ``cuda`` (csrc/cuda/pixel_shuffle.cu), ``triton`` (below) and
``ref`` (the InternVL view/permute code, kept verbatim as the independent reference).
"""

import math

import torch
import torch.nn.functional as F

from nvlm_kernels import _ext, dispatch

_VERSIONS = {"v1": 1, "v2": 2, 1: 1, 2: 2}


def _version_number(version) -> int:
    if version not in _VERSIONS:
        raise ValueError(f"nvlm_kernels.pixel_shuffle: argument 'version' must be 'v1' or 'v2', got {version!r}")
    return _VERSIONS[version]


def _check_input(x: torch.Tensor, name: str = "x") -> int:
    """Validate ``x: [T, N, C]`` and return the grid side ``s``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"nvlm_kernels.pixel_shuffle: argument '{name}' must be a tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"nvlm_kernels.pixel_shuffle: argument '{name}' must be [T, N, C], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"nvlm_kernels.pixel_shuffle: argument '{name}' must be float32/float16/bfloat16, "
                         f"got {x.dtype}")
    n = x.shape[1]
    side = math.isqrt(n)
    if side * side != n or side % 2 != 0 or side == 0:
        raise ValueError(f"nvlm_kernels.pixel_shuffle: argument '{name}' must have N = s*s tokens with s even, "
                         f"got N={n}")
    return side


# ----------------------------------------------------------------------------------------------------------------
# Reference (pure PyTorch): InternVL's own sequence of views and permutes, so it is independent of the closed form
# that the kernels implement.
# ----------------------------------------------------------------------------------------------------------------
def pixel_shuffle_ref(x: torch.Tensor, version="v2") -> torch.Tensor:
    """``[T, N, C] -> [T, N/4, 4C]`` exactly as InternVL/NVLM ``pixel_shuffle(scale_factor=0.5)``."""
    v = _version_number(version)
    side = _check_input(x)
    t, _, c = x.shape
    h = x.reshape(t, side, side, c)                                   # [T, r, c, C]
    h = h.view(t, side, side // 2, c * 2)                             # merge column pairs
    h = h.permute(0, 2, 1, 3).contiguous()                            # [T, c/2, r, 2C]
    h = h.view(t, side // 2, side // 2, c * 4)                        # merge row pairs
    if v == 2:
        h = h.permute(0, 2, 1, 3).contiguous()                        # back to row-major token order
    return h.reshape(t, side * side // 4, c * 4)


def pixel_shuffle_layernorm_ref(x, weight, bias, eps: float = 1e-5, version="v2") -> torch.Tensor:
    """``LayerNorm(4C)(pixel_shuffle(x))`` with fp32 statistics, output in ``x.dtype``."""
    y = pixel_shuffle_ref(x, version)
    out = F.layer_norm(y.float(), (y.shape[-1],), weight.float(), bias.float(), eps)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------
_IMPLEMENTED = ("cpu", "cuda", "ref")


def pixel_shuffle(x: torch.Tensor, *, version="v2") -> torch.Tensor:
    """Pixel shuffle ``x: [T, N, C] -> [T, N/4, 4C]`` (see module docstring)."""
    v = _version_number(version)
    _check_input(x)
    backend = dispatch.select("pixel_shuffle", x.device, _IMPLEMENTED)
    if backend in ("cpu", "cuda"):
        return torch.ops.nvlm_kernels.pixel_shuffle(x.contiguous(), v)
    return pixel_shuffle_ref(x, v)


def _check_ln_params(x, weight, bias):
    width = 4 * x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor) or p.shape != (width,):
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"nvlm_kernels.pixel_shuffle_layernorm: argument '{name}' must have shape ({width},), "
                             f"got {shape}")
        if p.device != x.device:
            raise ValueError(f"nvlm_kernels.pixel_shuffle_layernorm: argument '{name}' is on {p.device}, "
                             f"'x' on {x.device}")


def pixel_shuffle_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
                            version="v2") -> torch.Tensor:
    """``LayerNorm(pixel_shuffle(x))`` in one pass. ``weight, bias: [4C]``; fp32 statistics; output ``x.dtype``."""
    v = _version_number(version)
    _check_input(x)
    _check_ln_params(x, weight, bias)
    backend = dispatch.select("pixel_shuffle_layernorm", x.device, _IMPLEMENTED)
    if backend in ("cpu", "cuda"):
        return torch.ops.nvlm_kernels.pixel_shuffle_layernorm(x.contiguous(), weight.contiguous(),
                                                              bias.contiguous(), float(eps), v)
    return pixel_shuffle_layernorm_ref(x, weight, bias, eps, v)


# ----------------------------------------------------------------------------------------------------------------
# Fakes (shape/dtype only) for the compiled ops, so torch.compile and opcheck can trace them.
# ----------------------------------------------------------------------------------------------------------------
if _ext.LOADED:

    @torch.library.register_fake("nvlm_kernels::pixel_shuffle")
    def _pixel_shuffle_fake(x, version):
        t, n, c = x.shape
        return x.new_empty((t, n // 4, 4 * c))

    @torch.library.register_fake("nvlm_kernels::pixel_shuffle_layernorm")
    def _pixel_shuffle_layernorm_fake(x, weight, bias, eps, version):
        t, n, c = x.shape
        return x.new_empty((t, n // 4, 4 * c))
