"""NVLM-X / NVLM-H: gated cross-attention from the decoder's text to image tokens (spec §7, issue 4).

No public code or weights exist for these two architectures; what the paper leaves open is decided here and
written down (each choice marked DECIDED).

Block (one after every ``config.xattn_every``-th decoder layer; 10 for 72B), Flamingo gating::

    x = x + tanh(alpha) * o_proj(XAttn(q_proj(RMSNorm(x)), k_proj(mem), v_proj(mem)))   [rows with no image: + 0]
    x = x + tanh(beta)  * FFN(RMSNorm(x)) * row_has_image                              (if config.xattn_ffn)

alpha, beta: learned scalars ``[1]``, initialised to 0, so a fresh block is the identity and the model starts as
its decoder. XAttn is Qwen2-shaped (DECIDED): GQA with the decoder's head layout (64 query / 8 KV heads, head_dim
128 at 72B), q/k/v with bias, o_proj without (so tanh(alpha) and the row mask commute with o_proj and are applied
inside ``nvlm_kernels.gated_cross_attention``'s epilogue), no RoPE (memory has no positions), no norm on the
memory. The FFN is a Qwen2 SwiGLU MLP of the decoder's size (see ``NVLMConfig.xattn_ffn`` for the default).
Rows whose range is empty (text before any image) get exactly zero from both halves, so their hidden state is
bit-for-bit the decoder's.

Memory (per batch row, ``[M, hidden]``) and the per-token ranges ``kv_start <= m < kv_end`` come from an
:class:`XAttnLayout`, which ``NVLMProcessor(mode="X"|"H")`` returns as ``inputs["xattn_layout"]``:

* NVLM-X: the decoder sequence holds text and the tile-tag *text* only (no ``<|vision_pad|>``). Memory = every tile
  of every image (thumbnail included), in prompt order, ``num_image_token`` tokens each, through the one-layer
  projector ``mlp1`` = pixel shuffle + LayerNorm(12800) + Linear(12800 -> 8192, no bias). DECIDED: the LayerNorm is
  kept (as in D's mlp1.0; the raw ViT features are not normalised) and the Linear has no bias (NVLM trains with
  Megatron's --disable-bias-linear; the LayerNorm's bias already gives the affine offset).
  Mask: the tokens of ``<tile_k>`` (and ``<tile_global_thumbnail>``) see only that tile; every other token sees all
  tiles of the images whose tags precede it (``<Image>`` sees only earlier images, ``</Image>`` and later text see
  this one too); tokens before the first image see nothing.
* NVLM-H: the decoder holds the text and, as in NVLM-D, ``<Image><tile_global_thumbnail>`` + 256 x
  ``<|vision_pad|>`` + ``</Image>`` per image, the pads overwritten by the thumbnail through D's 2-layer ``mlp1``.
  Memory = for each image, for each regular tile k: the embeddings (``embed_tokens``) of the ``<tile_k>`` tag's
  tokens, then tile k's 256 tokens through the same ``mlp1`` (spec §7: "same MLP"). A single-tile image is only
  its thumbnail and adds no memory. Mask: a token sees all regular tiles of the images whose thumbnail tag is at or
  before it (the thumbnail tag, its pads and ``</Image>`` see their own image); earlier tokens see nothing.

In both modes the processor tokenises each tile tag on its own (DECIDED: as Megatron, which trained NVLM, does;
spec §9), so every token belongs to exactly one tag or to ordinary text and the ranges are exact.

Generation: the memory's K/V of every block are computed once at prefill and kept in the ``KVCache``
(``xattn_keys`` / ``xattn_values`` / ``memory_lengths``); later chunks and decode steps reuse them, every new token
seeing its row's whole memory (it follows all images).

Checkpoint layout (our own; NVLM-X/H have no published checkpoint). Everything NVLM-D has keeps its name and
shape, except that NVLM-X's ``mlp1`` is the one-layer projector::

    vision_model.*                                         as NVLM-D (InternViT-6B, 32 padded heads)
    mlp1.0.weight, mlp1.0.bias         [12800]             LayerNorm (D and H and X)
    mlp1.1.weight                      [29568, 12800]      D, H  (mlp1.3.weight [8192, 29568] follows)
    mlp1.1.weight                      [8192, 12800]       X     (no mlp1.3)
    language_model.*                                       as NVLM-D (Qwen2-72B), plus per block N = 0..9:
    language_model.model.xattn_layers.N.input_layernorm.weight             [8192]
    language_model.model.xattn_layers.N.cross_attn.q_proj.weight / .bias   [8192, 8192] / [8192]
    language_model.model.xattn_layers.N.cross_attn.k_proj.weight / .bias   [1024, 8192] / [1024]
    language_model.model.xattn_layers.N.cross_attn.v_proj.weight / .bias   [1024, 8192] / [1024]
    language_model.model.xattn_layers.N.cross_attn.o_proj.weight           [8192, 8192]
    language_model.model.xattn_layers.N.attn_gate                          [1]   alpha (raw; tanh applied)
    language_model.model.xattn_layers.N.post_attention_layernorm.weight    [8192]           } only with
    language_model.model.xattn_layers.N.mlp.{gate,up}_proj.weight          [29568, 8192]    } xattn_ffn
    language_model.model.xattn_layers.N.mlp.down_proj.weight               [8192, 29568]    }
    language_model.model.xattn_layers.N.mlp_gate                           [1]   beta         }

Block N sits after decoder layer ``(N + 1) * xattn_every - 1``. ``config.json``: the NVLM-D layout plus
``"arch": "X" | "H"``, ``"xattn_every"``, ``"xattn_ffn"``, ``model_type`` / ``architectures`` ``NVLM_X`` / ``NVLM_H``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

import nvlm_kernels
from nvlm.config import LLMConfig, NVLMConfig
from nvlm.decoder import Qwen2AttentionProjections

#: ``XAttnLayout.memory`` segment: a tile index into ``pixel_values`` (its ``num_image_token`` projected tokens),
#: or a list of token ids (their ``embed_tokens`` rows; NVLM-H's tile tags).
Segment = int | list


# ----------------------------------------------------------------------------------------------------------------
# Layout of the images for one batch
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class XAttnLayout:
    """Where the images of a batch go in NVLM-X/H (built by ``NVLMProcessor(mode=...)``).

    kv_start, kv_end: ``[B, L]`` int32, token (b, i) attends memory tokens ``kv_start <= m < kv_end`` of row b.
    memory: per batch row, the memory segments in order (:data:`Segment`).
    decoder_tiles: tile indices (into ``pixel_values``) whose features overwrite the ``<|vision_pad|>`` positions,
    in order (NVLM-H: the thumbnails; NVLM-X: none).
    """

    kv_start: torch.Tensor
    kv_end: torch.Tensor
    memory: list[list[Segment]]
    decoder_tiles: list[int] = field(default_factory=list)

    @classmethod
    def batch(cls, layouts: list[XAttnLayout], num_tiles: list[int]) -> XAttnLayout:
        """One layout for the rows of ``layouts`` (same prompt length L) whose ``pixel_values`` are concatenated
        in order; ``num_tiles[i]``: tiles of layout i (tile indices are shifted by the tiles before them)."""
        memory, decoder_tiles, offset = [], [], 0
        for lay, n in zip(layouts, num_tiles, strict=True):
            memory += [[s + offset if isinstance(s, int) else list(s) for s in row] for row in lay.memory]
            decoder_tiles += [t + offset for t in lay.decoder_tiles]
            offset += n
        lengths = {lay.kv_start.shape[1] for lay in layouts}
        if len(lengths) != 1:
            raise ValueError(f"XAttnLayout.batch: argument 'layouts' must share one prompt length, got "
                             f"{sorted(lengths)}")
        return cls(torch.cat([lay.kv_start for lay in layouts]), torch.cat([lay.kv_end for lay in layouts]),
                   memory, decoder_tiles)

    def memory_lengths(self, tokens_per_tile: int) -> list[int]:
        return [sum(tokens_per_tile if isinstance(s, int) else len(s) for s in row) for row in self.memory]

    def tiles(self) -> list[int]:
        """Every tile index the layout uses (memory tiles, then decoder tiles)."""
        return [s for row in self.memory for s in row if isinstance(s, int)] + list(self.decoder_tiles)

    def extend(self, n: int, tokens_per_tile: int) -> XAttnLayout:
        """The layout of the same prompt followed by ``n`` more tokens, which (following every image) see their
        row's whole memory: what a KV-cached generation gives the generated tokens."""
        lengths = torch.tensor(self.memory_lengths(tokens_per_tile), dtype=torch.int32)
        b = self.kv_start.shape[0]
        start = torch.cat([self.kv_start, torch.zeros(b, n, dtype=torch.int32)], dim=1)
        end = torch.cat([self.kv_end, lengths[:, None].expand(b, n)], dim=1)
        return XAttnLayout(start, end, [list(r) for r in self.memory], list(self.decoder_tiles))

    def validate(self, input_ids: torch.Tensor, num_tiles: int, tokens_per_tile: int) -> None:
        """ValueError naming what does not fit ``input_ids [B, L]`` and ``num_tiles`` tiles."""
        b, n = input_ids.shape
        for name, r in (("kv_start", self.kv_start), ("kv_end", self.kv_end)):
            if not isinstance(r, torch.Tensor) or tuple(r.shape) != (b, n) or r.dtype != torch.int32:
                got = f"{tuple(r.shape)} {r.dtype}" if isinstance(r, torch.Tensor) else type(r).__name__
                raise ValueError(f"NVLM: 'xattn_layout.{name}' must be a [B, L] = ({b}, {n}) int32 tensor, got {got}")
        if len(self.memory) != b:
            raise ValueError(f"NVLM: 'xattn_layout.memory' has {len(self.memory)} rows, 'input_ids' {b}")
        used = self.tiles()
        if sorted(used) != list(range(num_tiles)):
            raise ValueError(f"NVLM: 'xattn_layout' must use each of the {num_tiles} tiles of 'pixel_values' exactly "
                             f"once, it uses {sorted(used)}")
        lengths = torch.tensor(self.memory_lengths(tokens_per_tile), dtype=torch.int32)
        start, end = self.kv_start.cpu(), self.kv_end.cpu()
        bad = (start < 0) | (start > end) | (end > lengths[:, None])
        if bool(bad.any()):
            row, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"NVLM: 'xattn_layout' token (b={row}, i={i}) has range [{int(start[row, i])}, "
                             f"{int(end[row, i])}) outside its row's memory of {int(lengths[row])} tokens")


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------
class ProjectorX(nn.Sequential):
    """NVLM-X ``mlp1``: pixel shuffle + LayerNorm(4C, eps 1e-5) -> Linear(4C -> hidden, no bias); keys ``mlp1.0``
    (LayerNorm), ``mlp1.1`` (Linear). ``x [T, P, C] -> [T, P/4, hidden]``."""

    def __init__(self, config: NVLMConfig):
        width = config.projector_input_size                        # 12800
        super().__init__(nn.LayerNorm(width, eps=1e-5), nn.Linear(width, config.llm.hidden_size, bias=False))
        self.ps_version = config.ps_version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln = self[0]
        # (the op itself falls back to its differentiable reference when autograd records, e.g. training)
        return self[1](nvlm_kernels.pixel_shuffle_layernorm(x, ln.weight, ln.bias, ln.eps, version=self.ps_version))


class CrossAttention(Qwen2AttentionProjections):
    """Qwen2-shaped attention projections for text queries over image memory (no RoPE)."""


class GatedCrossAttentionBlock(nn.Module):
    """One gated cross-attention block (module docstring). ``impl``: ``"kernel"`` calls
    ``nvlm_kernels.gated_cross_attention`` (backend chosen by ``nvlm_kernels.dispatch``), ``"reference"`` calls
    ``nvlm_kernels.gated_cross_attention_ref`` (dense-mask fp32 PyTorch; tests compare the two). Training works
    with either: under autograd ``gated_cross_attention`` itself takes its differentiable SDPA path."""

    def __init__(self, cfg: LLMConfig, ffn: bool = True):
        super().__init__()
        from nvlm.decoder import Qwen2MLP, RMSNorm

        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.attn_gate = nn.Parameter(torch.zeros(1))             # alpha: tanh(0) = 0, the block starts as identity
        if ffn:
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.mlp = Qwen2MLP(cfg)
            self.mlp_gate = nn.Parameter(torch.zeros(1))          # beta
        else:
            self.mlp = None
        self.impl = "kernel"

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``memory [B, M, H] -> k, v [B, Hkv, M, D]`` (views of the projections; last stride 1)."""
        a = self.cross_attn
        b, m, _ = memory.shape
        k = a.k_proj(memory).view(b, m, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(memory).view(b, m, a.num_kv_heads, a.head_dim).transpose(1, 2)
        return k, v

    def forward(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor,
                kv_end: torch.Tensor) -> torch.Tensor:
        """``h [B, L, H]``, memory ``k, v [B, Hkv, M, D]``, ranges ``[B, L]`` int32 -> ``h [B, L, H]``."""
        a = self.cross_attn
        b, n, _ = h.shape
        q = a.q_proj(self.input_layernorm(h)).view(b, n, a.num_heads, a.head_dim).transpose(1, 2)  # [B, Hq, L, D]
        gate = self.attn_gate.to(q.dtype)
        if self.impl == "reference":
            o = nvlm_kernels.gated_cross_attention_ref(q, k, v, gate, kv_start, kv_end)
        elif self.impl == "kernel":   # ranges were validated once per prefill: skip the per-call device sync
            o = nvlm_kernels.gated_cross_attention(q, k, v, gate, kv_start, kv_end, check_ranges=False)
        else:
            raise ValueError(f"GatedCrossAttentionBlock: 'impl' must be 'kernel' or 'reference', got {self.impl!r}")
        # o [B, L, Hq, D] is already tanh(alpha)-gated and exactly 0 on rows without image; o_proj has no bias.
        h = h + a.o_proj(o.reshape(b, n, a.num_heads * a.head_dim))
        if self.mlp is not None:
            f = self.mlp(self.post_attention_layernorm(h)) * torch.tanh(self.mlp_gate).to(h.dtype)
            h = h + torch.where((kv_end > kv_start)[..., None], f, 0.0)   # rows without image: + exactly 0
        return h


@dataclass
class XAttnContext:
    """What the decoder's cross-attention blocks read in one forward: per block K/V, and the ranges."""

    keys: list[torch.Tensor]          # per block [B, Hkv, M, D]
    values: list[torch.Tensor]
    kv_start: torch.Tensor            # [B, L] int32
    kv_end: torch.Tensor


def set_xattn_impl(model: nn.Module, impl: str) -> None:
    """Switch every cross-attention block of ``model`` to ``"kernel"`` or ``"reference"``."""
    if impl not in ("kernel", "reference"):
        raise ValueError(f"set_xattn_impl: argument 'impl' must be 'kernel' or 'reference', got {impl!r}")
    for m in model.modules():
        if isinstance(m, GatedCrossAttentionBlock):
            m.impl = impl
