"""nvlm.plan against spec §8 (sizes computed from the published shapes) and the design targets.

The spec's figures are recomputed here independently of the planner, from the shape table of spec §2 (not from
our model code), and compared with what the planner counts on a meta-device NVLM after ``quantize_``.
"""

import json

import pytest

pytest.importorskip("nvlm.model")

from nvlm.config import NVLMConfig  # noqa: E402
from nvlm.plan import GPUS, format_plan, plan  # noqa: E402

# ---- spec §2 shapes (out, in) of every Linear weight, and the other tensors' sizes --------------------------------
LLM_LAYER_LINEARS = [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192),        # q, k, v, o
                     (29568, 8192), (29568, 8192), (8192, 29568)]                    # gate, up, down
LLM_LAYER_OTHER = 8192 + 1024 + 1024 + 8192 + 8192                                   # q/k/v bias, 2 norms
VIT_LAYER_LINEARS = [(12288, 3200), (3200, 4096), (12800, 3200), (3200, 12800)]     # qkv, proj, fc1, fc2
VIT_LAYER_OTHER = 3200 + 12800 + 3200 + 2 * 3200 + 2 * 3200 + 2 * 4096           # 3 biases, ls1/2, norm1/2, q/k-norm
VIT_EMBED = 3200 + 3200 * 3 * 14 * 14 + 3200 + 1025 * 3200                           # cls, conv w+b, positions
PROJ_LINEARS = [(29568, 12800), (8192, 29568)]
PROJ_OTHER = 2 * 12800                                                               # LayerNorm
VOCAB = 152064 * 8192                                                                # embed_tokens, lm_head


def _linears():
    return LLM_LAYER_LINEARS * 80 + VIT_LAYER_LINEARS * 45 + PROJ_LINEARS


def _total_params():
    lin = sum(n * k for n, k in _linears())
    return lin + 80 * LLM_LAYER_OTHER + 8192 + 45 * VIT_LAYER_OTHER + VIT_EMBED + PROJ_OTHER + 2 * VOCAB


def _spec_bytes(bits, lm_head_quantised, zero_bytes=2):
    """Spec §8 convention: quantised Linear weights + 16-bit scale (+ zero), everything else bf16."""
    lins = _linears() + ([(152064, 8192)] if lm_head_quantised else [])
    quantised = sum(n * k for n, k in lins)
    if bits == 8:
        qbytes = sum(n * k + 2 * n for n, k in lins)
    else:
        qbytes = sum(n * k // 2 + (2 + zero_bytes) * n * (k // 128) for n, k in lins)
    return qbytes + 2 * (_total_params() - quantised)


def test_spec_parameter_counts():
    p = plan("nvlm-d-72b", quant="bf16")
    assert _total_params() == 79_379_593_344 == p.total_params
    assert p.params["vision"] == 6_052_672_640
    assert p.params["projector"] == 620_717_056
    assert p.params["decoder"] + p.params["embeddings"] + p.params["lm_head"] == 72_706_203_648
    assert p.params["embeddings"] == p.params["lm_head"] == 1_245_708_288
    assert p.weights_bytes == 2 * 79_379_593_344
    assert round(p.weights_bytes / 1e9, 2) == 158.76 and round(p.weights_bytes / 2**30, 2) == 147.86


@pytest.mark.parametrize("quant,lm_head,gb,gib", [
    ("int8", False, 81.90, 76.27), ("int8", True, 80.65, 75.11),
    ("int4", False, 45.84, 42.69), ("int4", True, 44.01, 40.99)])
def test_spec_quantised_table(quant, lm_head, gb, gib):
    """spec §8's table (int4 with fp16 zeros there), from the independent count and from the planner."""
    bits = 8 if quant == "int8" else 4
    spec = _spec_bytes(bits, lm_head)
    assert (round(spec / 1e9, 2), round(spec / 2**30, 2)) == (gb, gib)
    p = plan("nvlm-d-72b", quant=quant, include_lm_head=lm_head)
    if quant == "int8":
        assert p.weights_bytes == spec
    else:
        assert p.weights_bytes_fp16_zero == spec
        assert p.weights_bytes == _spec_bytes(4, lm_head, zero_bytes=1)        # our format: uint8 zeros
        assert round(p.weights_bytes / 1e9, 2) == (45.24 if not lm_head else 43.40)


def test_kv_cache_and_headline():
    int4 = plan("nvlm-d-72b", quant="int4", gpu="h100-80gb", context=32768)
    assert int4.kv_bytes_per_token == 80 * 2 * 8 * 128 * 2 == 320 * 1024
    assert int4.kv_cache_bytes == 32768 * 320 * 1024
    assert int4.fits_one_gpu and int4.gpus_needed == 1 and int4.kv_tokens_one_gpu >= 32768
    int8_h200 = plan("nvlm-d-72b", quant="int8", gpu="h200")
    int8_h100 = plan("nvlm-d-72b", quant="int8", gpu="h100-80gb")
    assert int8_h200.fits_one_gpu and int8_h200.gpus_needed == 1
    assert not int8_h100.fits_one_gpu and int8_h100.gpus_needed == 2
    bf16 = plan("nvlm-d-72b", quant="bf16", gpu="h100-80gb")
    assert not bf16.fits_one_gpu and bf16.gpus_needed > 2 and bf16.kv_tokens_one_gpu == 0
    # the KV room is what is left next to weights and headroom
    assert int4.kv_tokens_one_gpu == (GPUS["h100-80gb"] - int4.weights_bytes - int4.activation_bytes) \
        // int4.kv_bytes_per_token
    assert plan("nvlm-d-72b", quant="int4", batch=4).kv_cache_bytes == 4 * int4.kv_cache_bytes


def test_to_dict_and_table(tmp_path):
    p = plan("nvlm-d-72b", quant="int4")
    d = json.loads(json.dumps(p.to_dict()))
    assert d["weights_bytes"] == p.weights_bytes and d["gpus_needed"] == 1 and d["total_params"] == p.total_params
    text = format_plan(p)
    assert "fits ONE h100-80gb" in text and "45.24 GB" in text and "45.84 GB" in text
    # a config.json path works like a preset
    NVLMConfig.preset("tiny-d").to_json(tmp_path / "config.json")
    small = plan(tmp_path, quant="int8")
    assert small.total_params == plan("tiny-d").total_params and small.fits_one_gpu


def test_bad_arguments():
    with pytest.raises(ValueError, match="'quant'"):
        plan("nvlm-d-72b", quant="int3")
    with pytest.raises(ValueError, match="'gpu'"):
        plan("nvlm-d-72b", gpu="v100")
    with pytest.raises(ValueError, match="'model'"):
        plan("no-such-model")
    with pytest.raises(ValueError, match="'group_size'"):
        plan("nvlm-d-72b", quant="int4", group_size=100)
    with pytest.raises(ValueError, match="'context'"):
        plan("nvlm-d-72b", context=0)
