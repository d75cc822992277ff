"""Configuration of NVLM 1.0 models: the vision tower (InternViT), the language model (Qwen2) and the glue.

``NVLMConfig.from_json`` reads the published ``config.json`` of ``nvidia/NVLM-D-72B`` (nested ``vision_config`` and
``llm_config``; spec §1) and ``to_dict`` writes the same layout back, keeping keys it does not model (``auto_map``,
``use_flash_attn``, ...) untouched so a load/save round trip preserves the file. Two quirks of the real file:

* ``llm_config.model_type`` reads ``"llama"`` (with ``attention_bias: true``) but the network is Qwen2: q/k/v have a
  bias, o_proj has none. We always build Qwen2 and keep the string as found.
* The vision tower is stored with 32 heads although InternViT-6B has 25: 7 zero "dummy" heads pad it for 8-way
  tensor parallelism. Whether the JSON names this is unconfirmed (spec §10.3), so ``num_dummy_heads`` is read when
  present and otherwise derived (7 for the 3200-wide, 25-head InternViT-6B, 0 otherwise).

Named presets live in ``PRESETS`` (``NVLMConfig.preset(name)``); add one with ``@register_preset("name")``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ARCHS = ("D", "X", "H")
#: top-level ``model_type`` / ``architectures[0]`` written for each arch; the published D checkpoint says NVLM_D.
ARCH_MODEL_TYPES = {"D": "NVLM_D", "X": "NVLM_X", "H": "NVLM_H"}

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _err(where: str, key: str, msg: str) -> ValueError:
    return ValueError(f"NVLM config: '{where}{key}' {msg}")


def _take(d: dict, key: str, kind, where: str, default=dataclasses.MISSING):
    """``d[key]`` checked against ``kind`` (a type or tuple of types); ``default`` when absent (else required)."""
    if key not in d or d[key] is None:
        if default is dataclasses.MISSING:
            raise _err(where, key, "is missing")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:  # bool is an int subclass: reject True where an int is due
        raise _err(where, key, f"must be {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise _err(where, key, f"must be {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _positive(value: int, where: str, key: str) -> int:
    if value <= 0:
        raise _err(where, key, f"must be positive, got {value}")
    return value


def _check_sizes(cfg, where: str, extra_keys: tuple[str, ...]) -> None:
    """The transformer sizes every tower has (positive, heads dividing the width) and ``extra_keys`` positive."""
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", *extra_keys):
        _positive(getattr(cfg, key), where, key)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise _err(where, "hidden_size", f"({cfg.hidden_size}) must be divisible by num_attention_heads "
                                         f"({cfg.num_attention_heads})")


def _square(value, where: str, key: str) -> int:
    """HF writes image/patch sizes as an int or a [h, w] pair; NVLM tiles are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise _err(where, key, f"must be an int or a square [n, n] pair, got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _err(where, key, f"must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Vision tower: InternViT
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    hidden_size: int = 3200                 # real channels (25 heads x 128)
    num_attention_heads: int = 25           # real heads
    intermediate_size: int = 12800
    num_hidden_layers: int = 45
    image_size: int = 448                   # size the position-embedding table was trained at
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    num_dummy_heads: int = 7                # zero heads padding the stored attention to 32 heads
    qk_normalization: bool = True
    qkv_bias: bool = False
    norm_type: str = "rms_norm"
    hidden_act: str = "gelu"
    extra: dict = field(default_factory=dict)  # keys we do not model, written back unchanged

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_padded_heads(self) -> int:
        return self.num_attention_heads + self.num_dummy_heads

    @property
    def padded_hidden_size(self) -> int:
        """Width of each of q, k, v as stored (4096 for NVLM-D-72B)."""
        return self.num_padded_heads * self.head_dim

    @property
    def grid(self) -> int:
        """Patches per side of the position-embedding table (32 at 448/14)."""
        return self.image_size // self.patch_size

    def validate(self) -> None:
        w = "vision_config."
        _check_sizes(self, w, ("image_size", "patch_size", "num_channels"))
        if self.num_dummy_heads < 0:
            raise _err(w, "num_dummy_heads", f"must be >= 0, got {self.num_dummy_heads}")
        if self.image_size % self.patch_size:
            raise _err(w, "image_size", f"({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.norm_type != "rms_norm":
            raise _err(w, "norm_type", f"must be 'rms_norm' (InternViT-6B), got {self.norm_type!r}")
        if not self.qk_normalization:
            raise _err(w, "qk_normalization", "must be true (InternViT-6B); false is not supported")
        if self.qkv_bias:
            raise _err(w, "qkv_bias", "must be false (InternViT-6B); a qkv bias is not supported")
        if self.hidden_act != "gelu":
            raise _err(w, "hidden_act", f"must be 'gelu' (exact erf GELU), got {self.hidden_act!r}")

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        w = "vision_config."
        if not isinstance(d, dict):
            raise ValueError(f"NVLM config: 'vision_config' must be an object, got {type(d).__name__}")
        hidden = _positive(_take(d, "hidden_size", int, w), w, "hidden_size")
        heads = _positive(_take(d, "num_attention_heads", int, w), w, "num_attention_heads")
        # Not confirmed to be in the published JSON (spec §10.3): vLLM hard-codes 7 for InternViT-6B in NVLM-D.
        default_dummy = 7 if (hidden, heads) == (3200, 25) else 0
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        cfg = cls(
            hidden_size=hidden,
            num_attention_heads=heads,
            intermediate_size=_take(d, "intermediate_size", int, w),
            num_hidden_layers=_take(d, "num_hidden_layers", int, w),
            image_size=_square(_take(d, "image_size", (int, list), w), w, "image_size"),
            patch_size=_square(_take(d, "patch_size", (int, list), w), w, "patch_size"),
            num_channels=_take(d, "num_channels", int, w, 3),
            layer_norm_eps=_take(d, "layer_norm_eps", float, w, 1e-6),
            num_dummy_heads=_take(d, "num_dummy_heads", int, w, default_dummy),
            qk_normalization=_take(d, "qk_normalization", bool, w, True),
            qkv_bias=_take(d, "qkv_bias", bool, w, False),
            norm_type=_take(d, "norm_type", str, w, "rms_norm"),
            hidden_act=_take(d, "hidden_act", str, w, "gelu"),
            extra={k: v for k, v in d.items() if k not in known},
        )
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        out = copy.deepcopy(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        return out


# ----------------------------------------------------------------------------------------------------------------
# Language model: Qwen2 (serialised with model_type "llama")
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LLMConfig:
    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    bos_token_id: int | None = 151643
    eos_token_id: int | list | None = 151645
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    model_type: str = "llama"               # as published; the network is Qwen2 regardless
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        w = "llm_config."
        _check_sizes(self, w, ("vocab_size", "num_key_value_heads", "max_position_embeddings"))
        if self.head_dim % 2:
            raise _err(w, "num_attention_heads", f"gives an odd head_dim {self.head_dim}; RoPE needs an even one")
        if self.num_attention_heads % self.num_key_value_heads:
            raise _err(w, "num_key_value_heads", f"({self.num_key_value_heads}) must divide num_attention_heads "
                                                 f"({self.num_attention_heads})")
        if self.rope_theta <= 0:
            raise _err(w, "rope_theta", f"must be positive, got {self.rope_theta}")
        if self.hidden_act != "silu":
            raise _err(w, "hidden_act", f"must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.tie_word_embeddings:
            raise _err(w, "tie_word_embeddings", "must be false (NVLM unties lm_head); tied weights are not supported")
        if self.extra.get("mlp_bias"):
            raise _err(w, "mlp_bias", "must be false (Qwen2 MLP has no bias)")
        if self.extra.get("rope_scaling") not in (None, {}):
            raise _err(w, "rope_scaling", f"is not supported (plain RoPE only), got {self.extra['rope_scaling']!r}")
        if self.extra.get("head_dim") not in (None, self.head_dim):
            raise _err(w, "head_dim", f"must equal hidden_size / num_attention_heads = {self.head_dim}, "
                                      f"got {self.extra['head_dim']!r}")

    @classmethod
    def from_dict(cls, d: dict) -> LLMConfig:
        w = "llm_config."
        if not isinstance(d, dict):
            raise ValueError(f"NVLM config: 'llm_config' must be an object, got {type(d).__name__}")
        heads = _take(d, "num_attention_heads", int, w)
        theta = d.get("rope_theta")
        rope_parameters = d.get("rope_parameters")  # transformers >= 5 spelling
        if theta is None and isinstance(rope_parameters, dict):
            if rope_parameters.get("rope_type", "default") != "default":
                raise _err(w, "rope_parameters", f"only rope_type 'default' is supported, got {rope_parameters!r}")
            theta = rope_parameters.get("rope_theta")
        if theta is None:
            theta = 1_000_000.0  # Megatron --rotary-base 1000000 / Qwen2-72B (spec §1)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise _err(w, "rope_theta", f"must be a number, got {theta!r}")
        eos = d.get("eos_token_id")
        if eos is not None and not isinstance(eos, (int, list)):
            raise _err(w, "eos_token_id", f"must be an int or a list of ints, got {eos!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        cfg = cls(
            vocab_size=_take(d, "vocab_size", int, w),
            hidden_size=_take(d, "hidden_size", int, w),
            intermediate_size=_take(d, "intermediate_size", int, w),
            num_hidden_layers=_take(d, "num_hidden_layers", int, w),
            num_attention_heads=heads,
            num_key_value_heads=_take(d, "num_key_value_heads", int, w, heads),
            rms_norm_eps=_take(d, "rms_norm_eps", float, w, 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=_take(d, "max_position_embeddings", int, w, 32768),
            bos_token_id=_take(d, "bos_token_id", int, w, None),
            eos_token_id=eos,
            hidden_act=_take(d, "hidden_act", str, w, "silu"),
            tie_word_embeddings=_take(d, "tie_word_embeddings", bool, w, False),
            model_type=_take(d, "model_type", str, w, "llama"),
            extra={k: v for k, v in d.items() if k not in known},
        )
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        out = copy.deepcopy(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        if "rope_parameters" in out and isinstance(out["rope_parameters"], dict):
            out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": self.rope_theta}
        return out


# ----------------------------------------------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class NVLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    arch: str = "D"
    downsample_ratio: float = 0.5
    force_image_size: int | None = 448      # tile size fed to the ViT (None: vision.image_size)
    select_layer: int = -1                  # InternVL hidden_states index: -1 = last layer
    ps_version: str = "v2"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    template: str | None = "chatml"
    image_tag_type: str | None = "nvlm"
    torch_dtype: str = "bfloat16"
    #: id of ``<|vision_pad|>``; ``from_pretrained`` sets it from the tokenizer by name (never hard-coded here).
    img_context_token_id: int | None = None
    #: NVLM-X/H only (ignored for D and not written to a D config.json): one gated cross-attention block after
    #: every ``xattn_every``-th decoder layer, ``num_hidden_layers // xattn_every`` blocks (8 -> 10 for 72B, paper).
    xattn_every: int = 8
    #: NVLM-X/H only: each cross-attention block also has its own tanh(beta)-gated SwiGLU FFN (Qwen2-sized).
    #: Default True: the paper calls its layers "similar to Flamingo" and Flamingo's GATED XATTN-DENSE block (like
    #: Llama-3.2-Vision's cross-attention layer, the other public design of this kind) is attention + gated FFN;
    #: it costs 7.27B parameters at 72B (10 x 727M). False gives the attention-only block (1.51B at 72B).
    xattn_ffn: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # The published file names its class in both places; keep them in ``extra`` so dict round trips are exact.
        if self.arch in ARCH_MODEL_TYPES:
            self.extra.setdefault("architectures", [ARCH_MODEL_TYPES[self.arch]])
            self.extra.setdefault("model_type", ARCH_MODEL_TYPES[self.arch])

    # -- derived --------------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Tile side the model consumes (InternVL: ``force_image_size or vision_config.image_size``)."""
        return self.force_image_size or self.vision.image_size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.vision.patch_size) ** 2

    @property
    def num_image_token(self) -> int:
        """Image tokens per tile after pixel shuffle: (448/14)^2 * 0.5^2 = 256."""
        return int(self.num_patches * self.downsample_ratio**2)

    @property
    def projector_input_size(self) -> int:
        return self.vision.hidden_size * int(round(1 / self.downsample_ratio)) ** 2

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.torch_dtype]

    @property
    def num_xattn_layers(self) -> int:
        """Gated cross-attention blocks (NVLM-X/H): one after decoder layers xattn_every-1, 2*xattn_every-1, ..."""
        return self.llm.num_hidden_layers // self.xattn_every if self.arch in ("X", "H") else 0

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise _err("", "arch", f"must be one of {ARCHS}, got {self.arch!r}")
        self.vision.validate()
        self.llm.validate()
        if self.downsample_ratio != 0.5:
            raise _err("", "downsample_ratio", f"must be 0.5 (the pixel-shuffle kernels merge 2x2), "
                                               f"got {self.downsample_ratio}")
        if self.ps_version not in ("v1", "v2"):
            raise _err("", "ps_version", f"must be 'v1' or 'v2', got {self.ps_version!r}")
        if self.image_size % self.vision.patch_size or (self.image_size // self.vision.patch_size) % 2:
            raise _err("", "force_image_size", f"({self.image_size}) must give an even number of "
                                               f"{self.vision.patch_size}-px patches per side")
        n = self.vision.num_hidden_layers
        if self.select_layer == 0 or not -n <= self.select_layer <= n:
            raise _err("", "select_layer", f"must be in [{-n}, -1] or [1, {n}] for {n} vision layers "
                                           f"(0 would select the embeddings), got {self.select_layer}")
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise _err("", "max_dynamic_patch", f"needs 1 <= min_dynamic_patch ({self.min_dynamic_patch}) <= "
                                                f"max_dynamic_patch ({self.max_dynamic_patch})")
        if self.torch_dtype not in _DTYPES:
            raise _err("", "torch_dtype", f"must be one of {sorted(_DTYPES)}, got {self.torch_dtype!r}")
        if self.arch in ("X", "H") and (isinstance(self.xattn_every, bool) or not isinstance(self.xattn_every, int)
                                        or not 1 <= self.xattn_every <= self.llm.num_hidden_layers):
            raise _err("", "xattn_every", f"must be an int in [1, num_hidden_layers={self.llm.num_hidden_layers}], "
                                          f"got {self.xattn_every!r}")
        if not isinstance(self.xattn_ffn, bool):
            raise _err("", "xattn_ffn", f"must be true or false, got {self.xattn_ffn!r}")
        if self.img_context_token_id is not None and not 0 <= self.img_context_token_id < self.llm.vocab_size:
            raise _err("", "img_context_token_id", f"({self.img_context_token_id}) is outside the vocabulary "
                                                   f"(size {self.llm.vocab_size})")

    @property
    def num_vision_layers_used(self) -> int:
        """ViT blocks actually run: hidden_states[select_layer] with hidden_states[0] = embeddings (InternVL)."""
        n = self.vision.num_hidden_layers
        return n + 1 + self.select_layer if self.select_layer < 0 else self.select_layer

    # -- (de)serialisation -----------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path_or_dict: str | os.PathLike | dict) -> NVLMConfig:
        """Parse a published-layout ``config.json`` (a path to the file or its folder, or the parsed dict)."""
        if isinstance(path_or_dict, dict):
            d = path_or_dict
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise ValueError(f"NVLM config: file {str(p)!r} does not exist")
            try:
                d = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"NVLM config: file {str(p)!r} is not valid JSON: {e}") from None
            if not isinstance(d, dict):
                raise ValueError(f"NVLM config: file {str(p)!r} must hold a JSON object")
        arch = d.get("arch")
        if arch is None:
            model_type = d.get("model_type")
            by_type = {v: k for k, v in ARCH_MODEL_TYPES.items()}
            if model_type not in by_type:
                raise _err("", "model_type", f"must be one of {sorted(by_type)} (or give 'arch'), got {model_type!r}")
            arch = by_type[model_type]
        known = {f.name for f in dataclasses.fields(cls)} - {"vision", "llm", "extra"}
        cfg = cls(
            vision=VisionConfig.from_dict(_take(d, "vision_config", dict, "")),
            llm=LLMConfig.from_dict(_take(d, "llm_config", dict, "")),
            arch=arch,
            downsample_ratio=_take(d, "downsample_ratio", float, "", 0.5),
            force_image_size=_take(d, "force_image_size", int, "", None),
            select_layer=_take(d, "select_layer", int, "", -1),
            ps_version=_take(d, "ps_version", str, "", "v2"),
            min_dynamic_patch=_take(d, "min_dynamic_patch", int, "", 1),
            max_dynamic_patch=_take(d, "max_dynamic_patch", int, "", 6),
            use_thumbnail=_take(d, "use_thumbnail", bool, "", True),
            dynamic_image_size=_take(d, "dynamic_image_size", bool, "", True),
            template=_take(d, "template", str, "", None),
            image_tag_type=_take(d, "image_tag_type", str, "", None),
            torch_dtype=_take(d, "torch_dtype", str, "", "bfloat16"),
            img_context_token_id=_take(d, "img_context_token_id", int, "", None),
            xattn_every=_take(d, "xattn_every", int, "", 8),
            xattn_ffn=_take(d, "xattn_ffn", bool, "", True),
            extra={k: v for k, v in d.items() if k not in known and k not in ("vision_config", "llm_config")},
        )
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        """The published ``config.json`` layout (nested ``vision_config`` / ``llm_config``)."""
        out = copy.deepcopy(self.extra)
        if self.arch != "D":  # the published D file has no "arch" key; X/H have no published file
            out["arch"] = self.arch
        for f in dataclasses.fields(self):
            if f.name in ("vision", "llm", "extra", "arch"):
                continue
            if f.name in ("xattn_every", "xattn_ffn") and self.arch == "D":
                continue  # the published D file has no such keys
            value = getattr(self, f.name)
            if value is None and f.name in ("img_context_token_id", "template", "image_tag_type"):
                continue
            out[f.name] = value
        out["vision_config"] = self.vision.to_dict()
        out["llm_config"] = self.llm.to_dict()
        return out

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # -- presets ---------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> NVLMConfig:
        if name not in PRESETS:
            raise ValueError(f"NVLM config: unknown preset {name!r}; known: {sorted(PRESETS)}")
        cfg = PRESETS[name]()
        cfg.validate()
        return cfg


PRESETS: dict[str, Callable[[], NVLMConfig]] = {}


def register_preset(name: str):
    """Decorator: ``@register_preset("tiny-x")`` on a zero-argument function returning an ``NVLMConfig``."""
    def wrap(fn: Callable[[], NVLMConfig]) -> Callable[[], NVLMConfig]:
        PRESETS[name] = fn
        return fn
    return wrap


_LLM_EXTRA_72B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_bias": True,   # Llama-only key in the published file; Qwen2 semantics (no o_proj bias) apply
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
}


@register_preset("nvlm-d-72b")
def _nvlm_d_72b() -> NVLMConfig:
    """nvidia/NVLM-D-72B (spec §1-2): InternViT-6B (45 layers, 25+7 heads) + mlp1 + Qwen2-72B-Instruct."""
    return NVLMConfig(
        vision=VisionConfig(extra={"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                                   "use_flash_attn": True, "initializer_factor": 0.1, "drop_path_rate": 0.0,
                                   "dropout": 0.0, "attention_dropout": 0.0}),
        llm=LLMConfig(extra=dict(_LLM_EXTRA_72B)),
        arch="D",
    )


#: Size of the vocabulary of tiny presets: nvlm.tokenizer.build_tokenizer()'s size rounded up to a multiple of 64.
TINY_VOCAB_SIZE = 1024


@register_preset("tiny-d")
def _tiny_d() -> NVLMConfig:
    """NVLM-D at test size (real sizes in comments); runs in milliseconds on 2 CPU cores."""
    return NVLMConfig(
        vision=VisionConfig(
            hidden_size=128,            # 3200
            num_attention_heads=2,      # 25 (head_dim 64; 128 in the real model)
            num_dummy_heads=1,          # 7
            intermediate_size=256,      # 12800
            num_hidden_layers=2,        # 45
            image_size=224,             # 448 -> 16x16 patches -> 64 tokens per tile after the shuffle (256)
            patch_size=14,
        ),
        llm=LLMConfig(
            vocab_size=TINY_VOCAB_SIZE,  # 152064
            hidden_size=64,             # 8192
            intermediate_size=128,      # 29568
            num_hidden_layers=2,        # 80
            num_attention_heads=4,      # 64 (head_dim 16; 128 in the real model)
            num_key_value_heads=2,      # 8
            max_position_embeddings=4096,
            bos_token_id=None,          # set from the test tokenizer by nvlm.testing.make_checkpoint
            eos_token_id=None,
            extra={"architectures": ["Qwen2ForCausalLM"], "attention_bias": True, "mlp_bias": False},
        ),
        arch="D",
        force_image_size=224,           # 448
        max_dynamic_patch=6,
        use_thumbnail=True,
        ps_version="v2",
    )


def _with_arch(config: NVLMConfig, arch: str, xattn_every: int) -> NVLMConfig:
    """``config`` turned into NVLM-X or NVLM-H (same ViT, tiling and Qwen2 backbone; spec §7)."""
    config.arch = arch
    config.xattn_every = xattn_every
    config.xattn_ffn = True
    config.extra["architectures"] = [ARCH_MODEL_TYPES[arch]]
    config.extra["model_type"] = ARCH_MODEL_TYPES[arch]
    return config


@register_preset("nvlm-x-72b")
def _nvlm_x_72b() -> NVLMConfig:
    """NVLM-X-72B (paper only, spec §7): the decoder holds text + tile-tag text; 10 gated cross-attention blocks
    (one after every 8th of the 80 layers) read the image tokens through a one-layer projector 12800 -> 8192."""
    return _with_arch(_nvlm_d_72b(), "X", 8)


@register_preset("nvlm-h-72b")
def _nvlm_h_72b() -> NVLMConfig:
    """NVLM-H-72B (paper only, spec §7): thumbnail tokens in the decoder through D's 2-layer mlp1; the regular
    tiles (each after its tile-tag embeddings) are the memory of 10 gated cross-attention blocks."""
    return _with_arch(_nvlm_d_72b(), "H", 8)


@register_preset("tiny-x")
def _tiny_x() -> NVLMConfig:
    """NVLM-X at test size: tiny-d's shapes, a cross-attention block after each of the 2 decoder layers."""
    return _with_arch(_tiny_d(), "X", 1)


@register_preset("tiny-h")
def _tiny_h() -> NVLMConfig:
    """NVLM-H at test size: tiny-d's shapes, a cross-attention block after each of the 2 decoder layers."""
    return _with_arch(_tiny_d(), "H", 1)


@register_preset("small-d")
def _small_d() -> NVLMConfig:
    """The small NVLM-D trained by ``nvlm train`` (nvlm/assets/nvlm-d-small): 112-px tiles (16 image tokens per
    tile after the shuffle, <= 112 per image), every Linear's K a multiple of 128 so int4 (group 128) quantises all
    of them; ~5.5 M parameters (~11 MB in bf16)."""
    return NVLMConfig(
        vision=VisionConfig(
            hidden_size=256,            # 3200
            num_attention_heads=4,      # 25 (head_dim 64)
            num_dummy_heads=0,          # 7: no tensor-parallel padding at this size (keeps proj K = 256)
            intermediate_size=512,      # 12800
            num_hidden_layers=3,        # 45
            image_size=112,             # 448 -> 8x8 patches -> 16 tokens per tile after the shuffle (256)
            patch_size=14,
        ),
        llm=LLMConfig(
            vocab_size=TINY_VOCAB_SIZE,  # 152064
            hidden_size=256,            # 8192
            intermediate_size=512,      # 29568
            num_hidden_layers=4,        # 80
            num_attention_heads=4,      # 64 (head_dim 64)
            num_key_value_heads=2,      # 8
            max_position_embeddings=1024,
            bos_token_id=None,          # set from the tokenizer by nvlm.train
            eos_token_id=None,
            extra={"architectures": ["Qwen2ForCausalLM"], "attention_bias": True, "mlp_bias": False},
        ),
        arch="D",
        force_image_size=112,           # 448
        max_dynamic_patch=6,
        use_thumbnail=True,
        ps_version="v2",
    )
