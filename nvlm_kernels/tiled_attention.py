"""Bidirectional attention batched over all ViT tiles of all images in one launch (InternViT self-attention).

``q, k, v: [T, H, N, D]`` (T tiles, H heads, N tokens per tile = 1025 in NVLM-D-72B, D in {64, 80, 96, 128})
-> ``[T, H, N, D]``; ``out = softmax(q k^T * scale) v`` per tile and head, no mask, ``scale = D**-0.5`` unless
given. ``cu_tiles`` is reserved for variable-length tiles (not yet supported: must be None).

Backends: ``triton`` (flash attention, online softmax, for CUDA tensors) and ``ref``
(``F.scaled_dot_product_attention``, which is also the CPU path).
"""

import torch
import torch.nn.functional as F

from nvlm_kernels import dispatch

_HEAD_DIMS = (64, 80, 96, 128)


def _check(q, k, v, cu_tiles):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"nvlm_kernels.tiled_attention: argument '{name}' must be [T, H, N, D], got {shape}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"nvlm_kernels.tiled_attention: argument '{name}' must be float32/float16/bfloat16, "
                             f"got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"nvlm_kernels.tiled_attention: q, k, v must have one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("nvlm_kernels.tiled_attention: q, k, v must share dtype and device")
    if cu_tiles is not None:
        raise ValueError("nvlm_kernels.tiled_attention: argument 'cu_tiles' (variable-length tiles) is not supported yet")


def tiled_attention_ref(q, k, v, softmax_scale=None):
    """``softmax(q k^T * scale) v`` over each tile and head, via PyTorch SDPA."""
    return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale)


_IMPLEMENTED = ("ref",)


def tiled_attention(q, k, v, *, softmax_scale=None, cu_tiles=None):
    """Attention over ``[T, H, N, D]`` tiles (see module docstring)."""
    _check(q, k, v, cu_tiles)
    backend = dispatch.select("tiled_attention", q.device, _IMPLEMENTED)
    return tiled_attention_ref(q, k, v, softmax_scale)
