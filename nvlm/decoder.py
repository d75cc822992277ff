"""Qwen2 decoder (the NVLM-D language model) with a KV cache.

``embeds [B, L, H] -> logits [B, L, V]``. Per layer (pre-norm):

    h = h + o_proj(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))      n = RMSNorm(h); q/k/v biased, o not
    h = h + down_proj(silu(gate_proj(m)) * up_proj(m))                      m = RMSNorm(h)
    logits = lm_head(RMSNorm(h))                                            lm_head untied

GQA (64 query / 8 KV heads in 72B), RoPE theta from the config, rotate-half on all head dims, causal attention over
the whole sequence (image tokens included). RMSNorm: fp32 statistic, cast to the input dtype, then * weight.

Keys (under ``language_model.``): ``model.embed_tokens``, ``model.layers.N.{self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}``, ``model.norm``, ``lm_head``.

NVLM-X/H (``xattn_every > 0``): ``model.xattn_layers.N`` (``nvlm.xattn.GatedCrossAttentionBlock``) runs after
decoder layer ``(N + 1) * xattn_every - 1`` when the forward is given an ``XAttnContext`` (image memory K/V and
per-token ranges); without one (no image) the blocks are skipped, which equals running them (every row empty).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nvlm.config import LLMConfig
from nvlm.vision import rms_norm


class KVCache:
    """Keys and values of every layer, ``[B, Hkv, S, D]``, grown in chunks so decoding does not copy per token."""

    def __init__(self, num_layers: int, chunk: int = 256):
        self.chunk = chunk
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        # NVLM-X/H: the image memory's K/V of every cross-attention block ([B, Hkv, M, D]), computed once at
        # prefill, and each row's memory length [B] int32 (decode tokens see [0, length)). None: no image.
        self.xattn_keys: list[torch.Tensor] | None = None
        self.xattn_values: list[torch.Tensor] | None = None
        self.memory_lengths: torch.Tensor | None = None

    def set_xattn(self, keys: list[torch.Tensor], values: list[torch.Tensor], memory_lengths: torch.Tensor) -> None:
        self.xattn_keys, self.xattn_values, self.memory_lengths = list(keys), list(values), memory_lengths

    def get_seq_length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    def __len__(self) -> int:
        return self.get_seq_length()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v [B, Hkv, S_new, D]``; return all keys and values so far, ``[B, Hkv, S_total, D]``."""
        start = self.lengths[layer]
        end = start + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[2] < end:
            cap = -(-end // self.chunk) * self.chunk
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        self.lengths[layer] = end
        return buf_k[:, :, :end], buf_v[:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """``positions [L] -> cos, sin [L, head_dim]`` (fp32 maths, then cast), the transformers Qwen2 convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]   # [L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                      # [L, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, D]``, ``cos/sin [L, D]``."""
    return x * cos + _rotate_half(x) * sin


class Qwen2AttentionProjections(nn.Module):
    """q/k/v (with bias) and o (without) of a Qwen2 attention with GQA; shared by self- and cross-attention."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)


class Qwen2Attention(Qwen2AttentionProjections):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__(cfg)
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)       # [B, H, L, D]
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)    # [B, Hkv, L, D]
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(self.layer_idx, k, v)                                     # [B, Hkv, past+L, D]
        gqa = self.num_heads != self.num_kv_heads
        if n == 1:        # one new token sees everything before it
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        elif past == 0:   # plain causal prefill
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:             # several new tokens after a cached prefix: causal mask aligned bottom-right
            mask = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(diagonal=past)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2Attention(cfg, layer_idx)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, cache):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: LLMConfig, xattn_every: int = 0, xattn_ffn: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        if xattn_every:
            from nvlm.xattn import GatedCrossAttentionBlock

            self.xattn_layers = nn.ModuleList(GatedCrossAttentionBlock(cfg, ffn=xattn_ffn)
                                              for _ in range(cfg.num_hidden_layers // xattn_every))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig, xattn_every: int = 0, xattn_ffn: bool = True):
        super().__init__()
        self.config = cfg
        self.xattn_every = xattn_every      # 0: plain Qwen2 (NVLM-D)
        self.model = Qwen2Model(cfg, xattn_every, xattn_ffn)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def forward(self, inputs_embeds: torch.Tensor, past_key_values: KVCache | None = None,
                logits_to_keep: int = 0, xattn=None) -> torch.Tensor:
        """``inputs_embeds [B, L, H] -> logits [B, L', V]`` (``L' = logits_to_keep`` last positions, 0 = all).

        With ``past_key_values`` the new tokens take positions ``cache_len .. cache_len + L - 1`` and their keys and
        values are appended to the cache. ``xattn``: an ``nvlm.xattn.XAttnContext`` for the cross-attention blocks
        (NVLM-X/H); None skips them.
        """
        cfg = self.config
        b, n, _ = inputs_embeds.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = torch.arange(past, past + n, device=inputs_embeds.device)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, inputs_embeds.dtype)
        h = inputs_embeds
        every = self.xattn_every if xattn is not None else 0
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, past_key_values)
            if every and (i + 1) % every == 0:
                j = (i + 1) // every - 1
                h = self.model.xattn_layers[j](h, xattn.keys[j], xattn.values[j], xattn.kv_start, xattn.kv_end)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(h))
