"""Qwen2 decoder (nvlm.decoder) against transformers' Qwen2ForCausalLM on the same random weights, and its KV cache."""

import pytest
import torch

from nvlm.decoder import KVCache
from nvlm.testing import hf_qwen2_model, random_model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-d", seed=4)


def test_matches_transformers(model):
    lm = model.language_model
    ids = torch.randint(0, lm.config.vocab_size, (2, 40))
    ours = lm(lm.model.embed_tokens(ids))
    ref = hf_qwen2_model(model)(input_ids=ids).logits
    assert ours.shape == ref.shape == (2, 40, lm.config.vocab_size)
    assert rel_err(ours, ref) < 1e-4


def test_qwen2_biases(model):
    keys = model.language_model.state_dict().keys()
    for name in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{name}.bias" in keys
    assert "model.layers.0.self_attn.o_proj.bias" not in keys               # Qwen2: no o_proj bias
    assert not any(k.startswith("model.layers.0.mlp") and k.endswith("bias") for k in keys)
    assert "lm_head.weight" in keys                                         # untied


def test_kv_cache_equals_full_recompute(model):
    lm = model.language_model
    ids = torch.randint(0, lm.config.vocab_size, (2, 21))
    full = lm(lm.model.embed_tokens(ids))                                   # [2, 21, V]
    cache = KVCache(lm.config.num_hidden_layers, chunk=4)                   # small chunk: exercises regrowth
    pieces = [lm(lm.model.embed_tokens(ids[:, :9]), cache)]                 # causal prefill
    pieces.append(lm(lm.model.embed_tokens(ids[:, 9:14]), cache))           # a chunk after a cached prefix
    for t in range(14, 21):                                                 # one token at a time
        pieces.append(lm(lm.model.embed_tokens(ids[:, t:t + 1]), cache))
    assert cache.get_seq_length() == 21
    stepped = torch.cat(pieces, dim=1)
    assert rel_err(stepped, full) < 1e-5


def test_logits_to_keep(model):
    lm = model.language_model
    ids = torch.randint(0, lm.config.vocab_size, (1, 7))
    emb = lm.model.embed_tokens(ids)
    assert torch.allclose(lm(emb, logits_to_keep=2), lm(emb)[:, -2:], atol=1e-6)
