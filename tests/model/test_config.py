"""NVLMConfig: parsing the published config.json layout, validation errors, presets, derived sizes."""

import copy
import json

import pytest

from nvlm.config import PRESETS, NVLMConfig, register_preset

# The published nvidia/NVLM-D-72B config.json as described in spec §1 (keys we know of; values per the spec).
REAL_72B = {
    "architectures": ["NVLM_D"],
    "auto_map": {"AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
                 "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
                 "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model"},
    "model_type": "NVLM_D",
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 448,
    "select_layer": -1,
    "ps_version": "v2",
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 6,
    "use_thumbnail": True,
    "template": "chatml",
    "image_tag_type": "nvlm",
    "torch_dtype": "bfloat16",
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "llama", "attention_bias": True, "mlp_bias": False,
        "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 32768, "bos_token_id": 151643,
        "eos_token_id": 151645, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 152064,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    },
    "vision_config": {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 3200,
        "num_attention_heads": 25, "intermediate_size": 12800, "num_hidden_layers": 45, "image_size": 448,
        "patch_size": 14, "num_channels": 3, "qk_normalization": True, "qkv_bias": False, "norm_type": "rms_norm",
        "layer_norm_eps": 1e-06, "hidden_act": "gelu", "initializer_factor": 0.1, "drop_path_rate": 0.0,
        "dropout": 0.0, "attention_dropout": 0.0, "use_flash_attn": True,
    },
}


def test_parse_published_72b_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REAL_72B))
    for source in (tmp_path / "config.json", tmp_path, REAL_72B):
        cfg = NVLMConfig.from_json(source)
        assert cfg.arch == "D"
        assert cfg.llm.model_type == "llama"          # kept as published; the network built is Qwen2
        assert (cfg.llm.hidden_size, cfg.llm.num_key_value_heads, cfg.llm.head_dim) == (8192, 8, 128)
        assert cfg.vision.num_dummy_heads == 7           # not in the file: derived for the 25-head InternViT-6B
        assert cfg.vision.padded_hidden_size == 4096
        assert cfg.num_image_token == 256
        assert cfg.projector_input_size == 12800
        assert cfg.img_context_token_id is None          # set from the tokenizer, never hard-coded


def test_round_trip_writes_the_same_layout():
    cfg = NVLMConfig.from_json(REAL_72B)
    out = cfg.to_dict()
    # Every published key comes back with its value; we only add num_dummy_heads (derived) to vision_config.
    for key, value in REAL_72B.items():
        if key in ("vision_config", "llm_config"):
            for k, v in value.items():
                assert out[key][k] == v, (key, k)
        else:
            assert out[key] == value, key
    assert out["vision_config"]["num_dummy_heads"] == 7
    assert NVLMConfig.from_json(out) == cfg


def test_preset_matches_published_config():
    preset = NVLMConfig.preset("nvlm-d-72b")
    real = NVLMConfig.from_json(REAL_72B)
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "rope_theta", "vocab_size", "eos_token_id", "bos_token_id"):
        assert getattr(preset.llm, name) == getattr(real.llm, name), name
    for name in ("hidden_size", "num_attention_heads", "num_dummy_heads", "intermediate_size", "num_hidden_layers",
                 "image_size", "patch_size", "layer_norm_eps"):
        assert getattr(preset.vision, name) == getattr(real.vision, name), name
    assert (preset.select_layer, preset.ps_version, preset.max_dynamic_patch) == (-1, "v2", 6)


def test_tiny_preset():
    cfg = NVLMConfig.preset("tiny-d")
    assert cfg.num_image_token == 64                     # (224/14)^2 / 4
    assert cfg.vision.num_padded_heads == 3
    assert NVLMConfig.from_json(cfg.to_dict()) == cfg
    assert NVLMConfig.preset("tiny-d") is not NVLMConfig.preset("tiny-d")  # fresh copy each call


def test_register_preset():
    @register_preset("tiny-d-test-only")
    def _make():
        cfg = NVLMConfig.preset("tiny-d")
        cfg.select_layer = -2
        return cfg

    try:
        assert NVLMConfig.preset("tiny-d-test-only").num_vision_layers_used == 1
    finally:
        del PRESETS["tiny-d-test-only"]
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        NVLMConfig.preset("nope")


def test_explicit_num_dummy_heads_and_rope_parameters():
    d = copy.deepcopy(REAL_72B)
    d["vision_config"]["num_dummy_heads"] = 3
    del d["llm_config"]["rope_theta"]
    d["llm_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    cfg = NVLMConfig.from_json(d)
    assert cfg.vision.num_dummy_heads == 3 and cfg.llm.rope_theta == 5000.0
    assert cfg.to_dict()["llm_config"]["rope_parameters"]["rope_theta"] == 5000.0


def _broken(path, value):
    d = copy.deepcopy(REAL_72B)
    *parents, last = path
    node = d
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


@pytest.mark.parametrize("path,value,message", [
    (("vision_config",), KeyError, "'vision_config' is missing"),
    (("llm_config",), KeyError, "'llm_config' is missing"),
    (("llm_config", "hidden_size"), KeyError, "'llm_config.hidden_size' is missing"),
    (("vision_config", "num_attention_heads"), KeyError, "'vision_config.num_attention_heads' is missing"),
    (("llm_config", "vocab_size"), "big", "'llm_config.vocab_size' must be int"),
    (("llm_config", "num_key_value_heads"), 7, "'llm_config.num_key_value_heads'"),
    (("llm_config", "hidden_act"), "gelu", "'llm_config.hidden_act'"),
    (("llm_config", "tie_word_embeddings"), True, "'llm_config.tie_word_embeddings'"),
    (("llm_config", "mlp_bias"), True, "'llm_config.mlp_bias'"),
    (("llm_config", "rope_scaling"), {"type": "yarn", "factor": 4.0}, "'llm_config.rope_scaling'"),
    (("vision_config", "hidden_size"), 3201, "'vision_config.hidden_size'"),
    (("vision_config", "norm_type"), "layer_norm", "'vision_config.norm_type'"),
    (("vision_config", "qk_normalization"), False, "'vision_config.qk_normalization'"),
    (("vision_config", "image_size"), [448, 224], "'vision_config.image_size'"),
    (("downsample_ratio",), 0.25, "'downsample_ratio'"),
    (("ps_version",), "v3", "'ps_version'"),
    (("select_layer",), -46, "'select_layer'"),
    (("select_layer",), 0, "'select_layer'"),
    (("force_image_size",), 450, "'force_image_size'"),
    (("model_type",), "llava", "'model_type'"),
    (("torch_dtype",), "int8", "'torch_dtype'"),
])
def test_invalid_fields_name_the_key(path, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        NVLMConfig.from_json(_broken(path, value))


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        NVLMConfig.from_json(tmp_path / "nothing.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        NVLMConfig.from_json(tmp_path)
