"""InternViT (nvlm.vision) against transformers' InternVLVisionModel on the same random weights (fp32, CPU)."""

import importlib

import pytest
import torch

import nvlm_kernels
from nvlm.config import NVLMConfig
from nvlm.testing import hf_vision_model, random_model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-d", seed=1)


def test_matches_transformers(model):
    px = torch.randn(3, 3, 224, 224)
    ours = model.vision_model(px)                                         # [T, 1 + 256, 128]
    ref = hf_vision_model(model)(pixel_values=px).last_hidden_state
    assert ours.shape == ref.shape == (3, 257, 128)
    assert rel_err(ours, ref) < 1e-4
    assert ours.std() > 0.1                                               # a live signal, not a vanishing one


@pytest.mark.parametrize("select_layer,hf_index", [(-2, -2), (1, 1)])
def test_select_layer(select_layer, hf_index):
    cfg = NVLMConfig.preset("tiny-d")
    cfg.select_layer = select_layer
    model = random_model(cfg, seed=2)
    px = torch.randn(2, 3, 224, 224)
    ours = model.vision_model(px)
    # InternVL indexes hidden_states, whose entry 0 is the embedding output.
    hf_out = hf_vision_model(model)(pixel_values=px, output_hidden_states=True)
    assert len(hf_out.hidden_states) == cfg.vision.num_hidden_layers + 1
    assert rel_err(ours, hf_out.hidden_states[hf_index]) < 1e-4
    assert rel_err(ours, hf_out.last_hidden_state) > 1e-2                 # really a different layer


def test_position_embedding_interpolated_at_other_sizes():
    """force_image_size 280 with a 224 table: bicubic resize of the 16x16 table to 20x20, as InternVL does."""
    cfg = NVLMConfig.preset("tiny-d")
    cfg.force_image_size = 280
    model = random_model(cfg, seed=3)
    px = torch.randn(2, 3, 280, 280)
    ours = model.vision_model(px)
    ref = hf_vision_model(model)(pixel_values=px).last_hidden_state
    assert ours.shape == (2, 401, 128)
    assert rel_err(ours, ref) < 1e-4


def test_padded_shapes_follow_the_checkpoint(model):
    sd = model.vision_model.state_dict()
    # tiny-d: 2 real heads x 64 + 1 dummy head -> q, k, v 192 wide each (72B: 3200 real, 4096 stored).
    assert sd["encoder.layers.0.attn.qkv.weight"].shape == (3 * 192, 128)
    assert sd["encoder.layers.0.attn.q_norm.weight"].shape == (192,)
    assert sd["encoder.layers.0.attn.k_norm.weight"].shape == (192,)
    assert sd["encoder.layers.0.attn.proj.weight"].shape == (128, 192)
    assert "encoder.layers.0.attn.qkv.bias" not in sd
    assert sd["embeddings.position_embedding"].shape == (1, 257, 128)


def test_dummy_heads_are_ignored(model):
    """Garbage in the dummy q/k/v rows, norm entries and proj columns changes nothing: dummy heads are never
    computed (the published file holds zeros there; Megatron/vLLM semantics: they contribute nothing)."""
    px = torch.randn(2, 3, 224, 224)
    before = model.vision_model(px)
    garbage = random_model("tiny-d", seed=1)
    with torch.no_grad():
        for layer in garbage.vision_model.encoder.layers:
            a = layer.attn
            a.qkv.weight[128:192].normal_(0, 10)
            a.qkv.weight[320:384].normal_(0, 10)
            a.qkv.weight[512:576].normal_(0, 10)
            a.q_norm.weight[128:].normal_(0, 10)
            a.k_norm.weight[128:].normal_(0, 10)
            a.proj.weight[:, 128:].normal_(0, 10)
    assert torch.equal(garbage.vision_model(px), before)


def test_attention_goes_through_tiled_attention(model, monkeypatch):
    calls = []
    real = nvlm_kernels.tiled_attention

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape), kw["softmax_scale"], tuple(kw["q_norm_weight"].shape),
                      tuple(kw["k_norm_weight"].shape), kw["norm_eps"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(nvlm_kernels, "tiled_attention", spy)
    model.vision_model(torch.randn(2, 3, 224, 224))
    # [T, H(real), N, D], QK-norm weights over the 128 real channels only, once per layer
    assert calls == [((2, 2, 257, 64), 64**-0.5, (128,), (128,), 1e-6)] * 2


def test_bad_pixel_values(model):
    with pytest.raises(ValueError, match="pixel_values"):
        model.vision_model(torch.randn(2, 4, 224, 224))
    with pytest.raises(ValueError, match="pixel_values"):
        model.vision_model(torch.randn(2, 3, 224, 210))


def test_matches_transformers_through_the_triton_kernel(model):
    """The same check with the Triton attention kernel forced (run by the interpreter on CPU tensors, set up by
    tests/conftest.py): the model's strided q/k/v views and fused QK-norm arguments reach the kernel correctly."""
    ta = importlib.import_module("nvlm_kernels.tiled_attention")   # the module (the package name is the function)

    usable = torch.cuda.is_available() or nvlm_kernels.dispatch.triton_interpreted()
    if "triton" not in ta._IMPLEMENTED or not usable:
        pytest.skip("no Triton attention kernel in this install")
    px = torch.randn(1, 3, 224, 224)
    with nvlm_kernels.force_backend("triton"):
        ours = model.vision_model(px)
    ref = hf_vision_model(model)(pixel_values=px).last_hidden_state
    assert rel_err(ours, ref) < 1e-4
