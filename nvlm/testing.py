"""Random NVLM checkpoints in the published layout, for tests, demos and benchmarks (no download needed).

All three architectures: ``make_checkpoint(path, "tiny-x")`` / ``"tiny-h"`` / ``"nvlm-x-72b"``... write NVLM-X/H in
our own layout (``nvlm.xattn`` docstring), with non-zero cross-attention gates so the blocks matter.

``make_checkpoint(path)`` writes what ``nvidia/NVLM-D-72B`` ships, at a preset's size: ``model-0000i-of-0000n
.safetensors`` shards + ``model.safetensors.index.json``, ``config.json`` in the HF layout (``llm_config.model_type``
"llama" with ``attention_bias``, as published), zero dummy ViT heads, and the test tokenizer
(``nvlm.tokenizer``: ``tokenizer.json`` + ``tokenizer_config.json``). Weights are random but scaled (1/sqrt(fan-in)
linears, norms near 1) so activations stay O(1) through the tower and the decoder.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from nvlm.config import NVLMConfig


def init_random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter of a (CPU) NVLM deterministically from ``seed``; dummy ViT heads are zero."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight" and p.dim() >= 2:                  # Linear / Conv / Embedding
                fan_in = p[0].numel()
                std = 1.0 if name.endswith("embed_tokens.weight") else 1.0 / math.sqrt(fan_in)
                p.copy_(normal(p.shape, std))
            elif leaf == "bias":
                p.copy_(normal(p.shape, 0.02))
            elif leaf in ("ls1", "ls2"):                          # layer scale: large enough that blocks matter
                p.copy_(normal(p.shape, 0.1, 0.5))
            elif leaf in ("class_embedding", "position_embedding"):
                p.copy_(normal(p.shape, 0.5))
            elif leaf in ("attn_gate", "mlp_gate"):               # NVLM-X/H gates: non-zero so the blocks matter
                p.copy_(normal(p.shape, 0.3, 0.5))
            else:                                                 # RMSNorm / LayerNorm weights
                p.copy_(normal(p.shape, 0.1, 1.0))
        zero_dummy_heads(model)
    return model


def zero_dummy_heads(model: nn.Module) -> None:
    """Zero the padded ViT heads as Megatron's converter does: q/k/v rows, q/k-norm entries, proj input columns."""
    v = model.config.vision
    real, padded = v.hidden_size, v.padded_hidden_size
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            attn = layer.attn
            for i in range(3):
                attn.qkv.weight[i * padded + real:(i + 1) * padded] = 0
            attn.q_norm.weight[real:] = 0
            attn.k_norm.weight[real:] = 0
            attn.proj.weight[:, real:] = 0


def random_model(preset: str | NVLMConfig = "tiny-d", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``NVLM`` on the CPU (for tests comparing against other implementations)."""
    from nvlm.model import NVLM

    config = NVLMConfig.preset(preset) if isinstance(preset, str) else preset
    model = NVLM(config)
    init_random_weights(model, seed)
    return model.to(dtype).eval()


def sized_config(params: float, preset: str = "tiny-d") -> NVLMConfig:
    """``preset`` with its decoder widened and deepened to about ``params`` parameters in all (e.g. 7.5e8 for a
    1.5 GB bf16 checkpoint): hidden 2048, intermediate 5632 (both multiples of 128, so int4 g128 fits every
    decoder Linear), 16 heads / 4 KV heads, and as many layers (>= 1) as the budget allows. For memory benchmarks."""
    from nvlm.model import NVLM

    config = NVLMConfig.preset(preset)
    config.llm = dataclasses.replace(config.llm, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                                     num_key_value_heads=4, num_hidden_layers=1)
    with torch.device("meta"):
        one = sum(p.numel() for p in NVLM(config).parameters())
        config.llm = dataclasses.replace(config.llm, num_hidden_layers=2)
        per_layer = sum(p.numel() for p in NVLM(config).parameters()) - one
    config.llm = dataclasses.replace(config.llm, num_hidden_layers=max(1, 1 + round((params - one) / per_layer)))
    return config


def make_checkpoint(path: str | os.PathLike, preset: str | NVLMConfig = "tiny-d", seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16, num_shards: int = 3) -> Path:
    """Write a random checkpoint of ``preset`` in the published layout into the new folder ``path``; return it.

    ``preset``: a preset name or an ``NVLMConfig`` (copied, not modified), e.g. :func:`sized_config`'s."""
    from nvlm.loading import save_pretrained
    from nvlm.model import NVLM
    from nvlm.tokenizer import build_tokenizer, save_tokenizer

    tok = build_tokenizer()
    config = NVLMConfig.preset(preset) if isinstance(preset, str) else copy.deepcopy(preset)
    size = tok.get_vocab_size()
    config.llm.vocab_size = max(config.llm.vocab_size, -(-size // 64) * 64)   # room for every tokenizer id
    config.llm.bos_token_id = tok.token_to_id("<|endoftext|>")
    config.llm.eos_token_id = tok.token_to_id("<|im_end|>")
    config.img_context_token_id = None      # not in the published config.json: from_pretrained reads the tokenizer
    config.torch_dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    model = NVLM(config)
    init_random_weights(model, seed)
    model.to(dtype)
    out = save_pretrained(model, path, num_shards=num_shards)
    save_tokenizer(tok, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Independent references from transformers (tests and accuracy scripts; transformers is imported lazily)
# ----------------------------------------------------------------------------------------------------------------
def hf_vision_model(model):
    """transformers ``InternVLVisionModel`` holding ``model.vision_model``'s weights with the dummy heads sliced away
    (spec §2: rows 0..C-1 of each q/k/v block, first C norm entries, first C proj input columns)."""
    from transformers import InternVLVisionConfig, InternVLVisionModel

    v = model.config.vision
    real, padded = v.hidden_size, v.padded_hidden_size
    cfg = InternVLVisionConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size, attention_bias=False, use_qk_norm=True, hidden_act="gelu",
        norm_type="rms_norm", layer_norm_eps=v.layer_norm_eps, image_size=v.image_size, patch_size=v.patch_size,
        num_channels=v.num_channels,
        use_mean_pooling=True,   # InternVLVisionModel's final norm is Identity only then; InternViT-6B has none
        attn_implementation="eager",
    )
    hf = InternVLVisionModel(cfg).eval()
    ours = model.vision_model
    sd = {
        "embeddings.cls_token": ours.embeddings.class_embedding,
        "embeddings.position_embeddings": ours.embeddings.position_embedding,
        "embeddings.patch_embeddings.projection.weight": ours.embeddings.patch_embedding.weight,
        "embeddings.patch_embeddings.projection.bias": ours.embeddings.patch_embedding.bias,
    }
    for i, layer in enumerate(ours.encoder.layers):
        p = f"encoder.layer.{i}."
        qkv = layer.attn.qkv.weight
        sd.update({
            p + "attention.q_proj.weight": qkv[0:real],
            p + "attention.k_proj.weight": qkv[padded:padded + real],
            p + "attention.v_proj.weight": qkv[2 * padded:2 * padded + real],
            p + "attention.q_norm.weight": layer.attn.q_norm.weight[:real],
            p + "attention.k_norm.weight": layer.attn.k_norm.weight[:real],
            p + "attention.projection_layer.weight": layer.attn.proj.weight[:, :real],
            p + "attention.projection_layer.bias": layer.attn.proj.bias,
            p + "lambda_1": layer.ls1,
            p + "lambda_2": layer.ls2,
            p + "layernorm_before.weight": layer.norm1.weight,
            p + "layernorm_after.weight": layer.norm2.weight,
            p + "mlp.fc1.weight": layer.mlp.fc1.weight,
            p + "mlp.fc1.bias": layer.mlp.fc1.bias,
            p + "mlp.fc2.weight": layer.mlp.fc2.weight,
            p + "mlp.fc2.bias": layer.mlp.fc2.bias,
        })
    hf.load_state_dict({k: t.detach().clone() for k, t in sd.items()}, strict=True)
    return hf.to(ours.embeddings.patch_embedding.weight.dtype)


def hf_qwen2_model(model):
    """transformers ``Qwen2ForCausalLM`` holding ``model.language_model``'s weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = model.config.llm
    cfg = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False, attn_implementation="eager",
    )
    hf = Qwen2ForCausalLM(cfg).eval()
    hf.load_state_dict({k: t.detach().clone() for k, t in model.language_model.state_dict().items()}, strict=True)
    return hf.to(model.language_model.lm_head.weight.dtype)
