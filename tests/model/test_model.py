"""The whole NVLM-D forward against an independent chain: transformers' InternVLVisionModel -> InternVL's
view/permute pixel shuffle -> a torch.nn projector -> transformers' Qwen2ForCausalLM via inputs_embeds."""

import pytest
import torch
import torch.nn as nn

import nvlm_kernels
from nvlm.config import NVLMConfig
from nvlm.testing import hf_qwen2_model, hf_vision_model, random_model

IMG = 1011  # image-context id of this test's config (set by hand here; from_pretrained reads it from the tokenizer)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def internvl_pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """InternVL's ``pixel_shuffle`` (modeling_internvl_chat.py), on [N, w, h, c]."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def reference_logits(model, input_ids, pixel_values):
    cfg = model.config
    vit = hf_vision_model(model)
    feats = vit(pixel_values=pixel_values).last_hidden_state[:, 1:]                 # drop CLS: [T, P, C]
    t, p, c = feats.shape
    side = int(p**0.5)
    feats = internvl_pixel_shuffle(feats.reshape(t, side, side, c), 0.5, cfg.ps_version).reshape(t, -1, 4 * c)
    ln = nn.LayerNorm(4 * c, eps=1e-5)
    fc1 = nn.Linear(4 * c, cfg.llm.intermediate_size, bias=False)
    fc2 = nn.Linear(cfg.llm.intermediate_size, cfg.llm.hidden_size, bias=False)
    ln.load_state_dict(model.mlp1[0].state_dict())
    fc1.load_state_dict(model.mlp1[1].state_dict())
    fc2.load_state_dict(model.mlp1[3].state_dict())
    img = fc2(nn.functional.gelu(fc1(ln(feats)))).reshape(-1, cfg.llm.hidden_size)  # [T*tokens, H]
    qwen = hf_qwen2_model(model)
    embeds = qwen.get_input_embeddings()(input_ids).clone()
    mask = input_ids == IMG
    embeds[mask] = img                                                              # in order, row-major
    return qwen(inputs_embeds=embeds).logits


def prompt(num_tiles: int, tokens: int, before: int = 5, after: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(num_tiles)
    text = lambda n: torch.randint(0, 1000, (n,), generator=g)
    parts = [text(before)]
    for _ in range(num_tiles):
        parts += [text(3), torch.full((tokens,), IMG)]
    parts.append(text(after))
    return torch.cat(parts)[None]


@pytest.fixture(scope="module")
def model():
    cfg = NVLMConfig.preset("tiny-d")
    cfg.img_context_token_id = IMG
    return random_model(cfg, seed=5)


@pytest.mark.parametrize("ps_version", ["v2", "v1"])
def test_matches_independent_reference(model, ps_version):
    model.config.ps_version = model.mlp1.ps_version = ps_version
    try:
        ids = prompt(3, model.config.num_image_token)                               # [1, 5 + 3*(3+64) + 7]
        px = torch.randn(3, 3, 224, 224)
        with torch.no_grad():
            ours = model(ids, px).logits
            ref = reference_logits(model, ids, px)
    finally:
        model.config.ps_version = model.mlp1.ps_version = "v2"
    assert ours.shape == ref.shape == (1, ids.shape[1], model.config.llm.vocab_size)
    assert rel_err(ours, ref) < 1e-4


def test_image_tokens_spread_over_a_batch(model):
    """Two rows, one tile each: features go to the image positions in row-major order."""
    n = model.config.num_image_token
    ids = torch.cat([prompt(1, n, before=4, after=6), prompt(1, n, before=4, after=6).roll(1, dims=1)])
    px = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model(ids, px).logits
        ref = reference_logits(model, ids, px)
    assert rel_err(ours, ref) < 1e-4


def test_extract_feature_shape_and_kernels(model, monkeypatch):
    used = []
    for name in ("tiled_attention", "pixel_shuffle_layernorm"):
        real = getattr(nvlm_kernels, name)
        monkeypatch.setattr(nvlm_kernels, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or _r(*a, **k))
    with torch.no_grad():
        out = model.extract_feature(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 64, model.config.llm.hidden_size)
    assert used.count("tiled_attention") == model.config.vision.num_hidden_layers
    assert used.count("pixel_shuffle_layernorm") == 1


def test_image_token_count_mismatch(model):
    ids = prompt(2, model.config.num_image_token)
    with pytest.raises(ValueError, match=r"128 image-context tokens.*3 tiles x 64 tokens = 192"):
        model(ids, torch.randn(3, 3, 224, 224))
    with pytest.raises(ValueError, match="pixel_values' is None"):
        model(ids)


def test_no_context_token_id():
    m = random_model("tiny-d", seed=0)
    assert m.config.img_context_token_id is None
    with pytest.raises(ValueError, match="img_context_token_id"):
        m(torch.zeros(1, 64, dtype=torch.long), torch.randn(1, 3, 224, 224))


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="pixel_values"):
        model.extract_feature(torch.randn(1, 3, 448, 448))


def test_text_only_and_cache(model):
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        nxt = model(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True)
    assert nxt.past_key_values is out.past_key_values and len(out.past_key_values) == 9
    assert rel_err(torch.cat([out.logits, nxt.logits], 1), full) < 1e-5


def test_ps_version_matters(model):
    ids, px = prompt(1, model.config.num_image_token), torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        v2 = model(ids, px).logits
        model.mlp1.ps_version = "v1"
        try:
            v1 = model(ids, px).logits
        finally:
            model.mlp1.ps_version = "v2"
    assert rel_err(v1, v2) > 1e-2
