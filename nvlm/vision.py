"""InternViT-6B, the NVLM vision tower (spec §2-3), with its dummy heads stored but never computed.

Per tile ``pixel_values [T, 3, S, S]`` (S = 448):

    conv 14/14 (bias) -> [T, C, S/14, S/14] -> flatten row-major -> [T, P, C] ; prepend CLS -> [T, P+1, C]
    + position embedding (bicubic-resized when S differs from the table's size, as InternVL does)
    per block:  h = h + ls1 * Attn(RMSNorm1(h)) ;  h = h + ls2 * MLP(RMSNorm2(h))
    output of block ``select_layer`` -> [T, P+1, C]   (the caller drops the CLS token)

RMSNorm (InternVL ``InternRMSNorm``): statistic in fp32, normalised value cast back to the input dtype, then
multiplied by the weight.

Attention: ``qkv`` Linear without bias; q_norm / k_norm are RMSNorms over the whole C-wide vector of a token (all
heads together, not per head); 128-dim heads, scale 128^-0.5, no mask; concat heads -> ``proj`` (with bias).
The QK norm and the attention are one call, ``nvlm_kernels.tiled_attention(q, k, v, q_norm_weight=...,
k_norm_weight=...)`` (the Triton kernel folds the norm into the QK^T product; the reference applies it first).

Dummy heads. NVLM-D-72B stores 25 real heads padded to 32 (for 8-way tensor parallelism): ``qkv.weight`` is
``[3*4096, 3200]`` with rows ``[Q(32x128); K(32x128); V(32x128)]``, ``q_norm``/``k_norm`` are ``[4096]`` and
``proj.weight`` is ``[3200, 4096]``. We keep these padded shapes (state dict == checkpoint, tensor parallelism
can split 32 heads) but compute only the real heads: the real q/k/v rows are three contiguous row blocks used as
weight views (no copy), the q/k RMS statistic runs over the 3200 real channels (Megatron and vLLM do the same),
attention runs over 25 heads and ``proj`` reads only its first 3200 input columns. Whatever the checkpoint holds
in the dummy rows/columns (zeros in the published file) is therefore ignored: dummy heads contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import nvlm_kernels
from nvlm.config import VisionConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """InternRMSNorm: ``weight * (x * rsqrt(mean(x^2) + eps))`` with the statistic in fp32, cast before scaling."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class InternRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.grid = cfg.grid                                                     # 32 patches per side in the table
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))  # [1, 1, C]
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)                  # bias=True
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid**2 + 1, cfg.hidden_size))  # [1, 1+P, C]

    def _patch_positions(self, h: int, w: int) -> torch.Tensor:
        """Position table for an ``h x w`` patch grid: ``[1, h*w, C]``."""
        table = self.position_embedding[:, 1:]                                  # [1, grid^2, C]
        if (h, w) == (self.grid, self.grid):
            return table  # InternVL bicubic-resizes to the same size here: an exact identity
        c = table.shape[-1]
        grid = table.float().reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.reshape(1, c, h * w).permute(0, 2, 1).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(w.dtype))                 # [T, C, h, w]
        t, c, h, wd = patches.shape
        patches = patches.flatten(2).transpose(1, 2)                             # [T, h*w, C] row-major
        cls = self.class_embedding.to(patches.dtype).expand(t, 1, c)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(h, wd)], dim=1)
        return torch.cat([cls, patches], dim=1) + pos.to(patches.dtype)         # [T, 1+h*w, C]


class InternAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads                # 25 real heads
        self.head_dim = cfg.head_dim                            # 128
        self.real = cfg.hidden_size                             # 3200 real channels per q/k/v
        self.padded = cfg.padded_hidden_size                    # 4096 stored channels per q/k/v
        self.eps = cfg.layer_norm_eps
        self.qkv = nn.Linear(cfg.hidden_size, 3 * self.padded, bias=False)      # [3*4096, 3200]
        self.q_norm = InternRMSNorm(self.padded, cfg.layer_norm_eps)           # [4096], first 3200 used
        self.k_norm = InternRMSNorm(self.padded, cfg.layer_norm_eps)
        self.proj = nn.Linear(self.padded, cfg.hidden_size)                     # [3200, 4096] + bias [3200]

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Real-head q, k, v: each ``[T, N, real]``."""
        r, p = self.real, self.padded
        if type(self.qkv) is nn.Linear:
            w = self.qkv.weight                                                 # rows [Q; K; V], each p wide
            return tuple(F.linear(x, w[i * p:i * p + r]) for i in range(3))  # contiguous row views, no copy
        # Any other module (e.g. a quantised linear): run it whole and drop the dummy channels.
        out = self.qkv(x)                                                       # [T, N, 3p]
        return out[..., 0:r], out[..., p:p + r], out[..., 2 * p:2 * p + r]

    def _proj(self, o: torch.Tensor) -> torch.Tensor:
        """Output projection reading only the real input columns."""
        if type(self.proj) is nn.Linear:
            return F.linear(o, self.proj.weight[:, :self.real], self.proj.bias)  # strided view, no copy
        return self.proj(F.pad(o, (0, self.padded - self.real)))               # zeros in the dummy columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, n, _ = x.shape
        q, k, v = self._qkv(x)                                                  # [T, N, real] each
        # [T, H, N, D] views with unit stride on D (the kernel takes them without a copy).
        q, k, v = (z.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for z in (q, k, v))
        # QK RMSNorm fused into the attention op: statistic per token over the real channels of all heads.
        o = nvlm_kernels.tiled_attention(q, k, v, softmax_scale=self.head_dim**-0.5,
                                         q_norm_weight=self.q_norm.weight[:self.real],
                                         k_norm_weight=self.k_norm.weight[:self.real], norm_eps=self.eps)
        o = o.transpose(1, 2).reshape(t, n, self.real)                         # [T, N, real]
        return self._proj(o)


class InternMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = InternRMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.attn = InternAttention(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.norm2 = InternRMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = InternMLP(cfg)
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h)) * self.ls1
        return h + self.mlp(self.norm2(h)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class InternVisionModel(nn.Module):
    """``pixel_values [T, 3, S, S] -> [T, 1 + (S/patch)^2, C]`` (CLS first), output of layer ``num_layers_used``.

    All ``num_hidden_layers`` blocks are built (the checkpoint stores them all); only the first
    ``num_layers_used`` run (InternVL ``select_layer``: -1 = all).
    """

    def __init__(self, cfg: VisionConfig, num_layers_used: int | None = None):
        super().__init__()
        self.config = cfg
        self.num_layers_used = cfg.num_hidden_layers if num_layers_used is None else num_layers_used
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != c.num_channels:
            raise ValueError(f"InternViT: argument 'pixel_values' must be [T, {c.num_channels}, S, S], "
                             f"got {tuple(pixel_values.shape)}")
        s = pixel_values.shape[-1]
        if pixel_values.shape[-2] != s or s % c.patch_size:
            raise ValueError(f"InternViT: argument 'pixel_values' must hold square tiles whose side is a multiple "
                             f"of {c.patch_size}, got {tuple(pixel_values.shape)}")
        h = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:self.num_layers_used]:
            h = layer(h)
        return h
