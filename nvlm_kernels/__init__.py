"""nvlm-kernels: kernels for NVLM 1.0 (tiled ViT attention, pixel shuffle + LayerNorm, gated cross-attention,
weight-only int8/int4 linear). Each op is a ``torch.library`` custom op with a pure-PyTorch ``<op>_ref`` beside it;
``nvlm_kernels.dispatch`` picks the backend."""

import importlib.util

import torch

from nvlm_kernels import _ext, dispatch
from nvlm_kernels.dispatch import force_backend
from nvlm_kernels.gated_xattn import gated_cross_attention, gated_cross_attention_ref
from nvlm_kernels.pixel_shuffle import (
    pixel_shuffle,
    pixel_shuffle_layernorm,
    pixel_shuffle_layernorm_ref,
    pixel_shuffle_ref,
)
from nvlm_kernels.quant_linear import (
    w4a16_linear,
    w4a16_linear_ref,
    w8a16_linear,
    w8a16_linear_ref,
)
from nvlm_kernels.tiled_attention import tiled_attention, tiled_attention_ref

__version__ = "0.1.0"

__all__ = [
    "backends",
    "force_backend",
    "gated_cross_attention",
    "gated_cross_attention_ref",
    "pixel_shuffle",
    "pixel_shuffle_layernorm",
    "pixel_shuffle_layernorm_ref",
    "pixel_shuffle_ref",
    "tiled_attention",
    "tiled_attention_ref",
    "w4a16_linear",
    "w4a16_linear_ref",
    "w8a16_linear",
    "w8a16_linear_ref",
]


def backends() -> dict:
    """What this install has: compiled CPU kernels, compiled CUDA kernels, a CUDA device, Triton, flash-attn."""
    return {
        "compiled_cpu_kernels": _ext.LOADED and _ext.has_kernel("pixel_shuffle", "CPU"),
        "cpu_isa": _ext.cpu_capability(),
        "compiled_cuda_kernels": _ext.built_with_cuda() and _ext.has_kernel("pixel_shuffle", "CUDA"),
        "cuda_device": torch.cuda.is_available(),
        "triton": dispatch.triton_available(),
        "triton_interpreter": dispatch.triton_interpreted(),
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "extension_error": _ext.LOAD_ERROR,
    }
