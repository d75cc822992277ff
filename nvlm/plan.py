"""Memory planner: how many bytes an NVLM model needs on a GPU, computed from its config alone.

Weights are counted exactly, by building the model on the meta device (no memory), applying the same
``nvlm.quant.quantize_`` the loader applies, and summing the state dict (what a checkpoint holds and the GPU keeps)::

    bf16: every tensor 2 bytes per value
    int8: qweight N*K + fp16 scale 2N                       (per output channel)
    int4: qweight N*K/2 + fp16 scales 2*N*K/g + uint8 zeros N*K/g   (0.5234 B/weight at g128)

Everything not a Linear weight (embeddings, norms, biases, conv, position table, layer scales) stays bf16, and so
does ``lm_head`` unless ``include_lm_head=True``. spec §8's table stores the int4 zero point as fp16 (0.53125
B/weight); :attr:`Plan.weights_bytes_fp16_zero` gives that convention so the table can be checked.

KV cache: ``layers * 2 (K, V) * kv_heads * head_dim * 2 bytes`` per token (320 KiB for Qwen2-72B), times
``context * batch``. Activation headroom is an estimate (see :func:`activation_bytes`): the larger of a decoder
prefill chunk and a 7-tile vision pass, plus a fixed 1.5 GiB for the CUDA context, library workspaces and allocator
slack. GPUs needed: the smallest tensor-parallel degree (a divisor of the KV-head count, as vLLM/TP requires) at
which weights and KV cache split evenly plus one headroom per GPU fit in the GPU's memory.

Public: :func:`plan` -> :class:`Plan` (``.to_dict()`` for ``--json``), :func:`format_plan` (the CLI table),
``GPUS``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvlm.config import NVLMConfig

#: Usable device memory as ``nvidia-smi`` reports it (MiB -> bytes).
GPUS = {
    "h100-80gb": 81559 * 2**20,     # H100 SXM5 80 GB HBM3
    "h200": 143771 * 2**20,         # H200 141 GB HBM3e
    "a100-80gb": 81920 * 2**20,     # A100 SXM4 80 GB
}
QUANTS = ("bf16", "int8", "int4")
PARTS = ("vision", "projector", "decoder", "embeddings", "lm_head")
#: CUDA context (~0.5 GiB), cuBLAS/Triton workspaces and caching-allocator slack, per GPU.
FIXED_OVERHEAD_BYTES = 3 * 2**29
#: Prompt tokens per decoder prefill step the estimate assumes (longer prompts are prefilled in chunks).
PREFILL_CHUNK = 2048
_VALUE_BYTES = 2  # bf16 activations / KV cache / unquantised weights


@dataclass
class Plan:
    model: str
    quant: str
    group_size: int | None
    include_lm_head: bool
    gpu: str
    gpu_bytes: int
    context: int
    batch: int
    params: dict[str, int]                  # parameter count per part (as stored, e.g. ViT with its dummy heads)
    weight_bytes: dict[str, int]            # bytes per part in this format (our int4 format: uint8 zeros)
    weights_bytes: int                      # sum of weight_bytes
    weights_bytes_fp16_zero: int | None     # int4 only: the same with fp16 zeros (spec §8 convention)
    kv_bytes_per_token: int
    kv_cache_bytes: int                     # context * batch tokens
    activation_bytes: int                   # headroom estimate per GPU (activation_bytes())
    total_bytes: int                        # weights + KV cache + headroom on one GPU
    gpus_needed: int | None                 # smallest tensor-parallel degree that fits (None: even the largest fails)
    fits_one_gpu: bool
    kv_tokens_one_gpu: int                  # KV-cache tokens that fit next to the weights on one GPU (0 if none)
    notes: list[str] = field(default_factory=list)
    # plan(tp=N) only: bytes on EACH of the N GPUs of nvlm.tp (decoder split, vision tower/projector/norms
    # replicated, KV heads split), and whether that fits (False also when int4 groups cannot split N ways).
    tp_size: int | None = None
    tp_weights_bytes_per_gpu: int | None = None
    tp_kv_cache_bytes_per_gpu: int | None = None
    tp_total_bytes_per_gpu: int | None = None
    tp_fits: bool | None = None

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total_params"] = self.total_params
        return d


# ----------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------
def _part_of(key: str) -> str:
    if key.startswith("vision_model."):
        return "vision"
    if key.startswith("mlp1."):
        return "projector"
    if key.startswith("language_model.model.embed_tokens."):
        return "embeddings"
    if key.startswith("language_model.lm_head."):
        return "lm_head"
    if key.startswith("language_model."):
        return "decoder"
    raise ValueError(f"plan: state-dict key {key!r} belongs to no known part of the model")


def _meta_model(config: NVLMConfig):
    from nvlm.model import NVLM

    with torch.device("meta"):
        return NVLM(config)


def _quant_config(quant: str, group_size: int, include_lm_head: bool):
    from nvlm.quant import Int4WeightOnly, Int8WeightOnly

    if quant == "int8":
        return Int8WeightOnly(include_lm_head=include_lm_head)
    return Int4WeightOnly(group_size=group_size, include_lm_head=include_lm_head)


def count_weights(config: NVLMConfig, quant: str = "bf16", group_size: int = 128, include_lm_head: bool = False
                  ) -> tuple[dict[str, int], dict[str, int], int]:
    """``(params per part, bytes per part, extra bytes if int4 zeros were fp16)`` of the model in format ``quant``.

    Counts the state dict of a meta-device model after ``quantize_``: exactly what a checkpoint stores. Cached by
    config contents (building the 72B meta model takes a few seconds on 2 cores)."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    params, nbytes, zero_extra = _count_weights_cached(key, quant, group_size if quant == "int4" else 0,
                                                       include_lm_head)
    return dict(params), dict(nbytes), zero_extra


@functools.lru_cache(maxsize=32)
def _count_weights_cached(config_json: str, quant: str, group_size: int, include_lm_head: bool):
    model = _meta_model(NVLMConfig.from_json(json.loads(config_json)))
    params = dict.fromkeys(PARTS, 0)
    for key, t in model.state_dict().items():
        params[_part_of(key)] += t.numel()
    if quant != "bf16":
        from nvlm.quant import quantize_

        quantize_(model, _quant_config(quant, group_size, include_lm_head))
    nbytes = dict.fromkeys(PARTS, 0)
    zero_extra = 0
    for key, t in model.state_dict().items():
        if t.is_floating_point():
            size = t.numel() * _VALUE_BYTES if not key.endswith((".scale", ".scales")) else t.numel() * t.element_size()
        else:
            size = t.numel() * t.element_size()
        if key.endswith(".zeros"):
            zero_extra += t.numel() * (2 - t.element_size())
        nbytes[_part_of(key)] += size
    return params, nbytes, zero_extra


def tp_weights_per_gpu(config: NVLMConfig, tp: int, quant: str = "bf16", group_size: int = 128,
                       include_lm_head: bool = False) -> tuple[int, str | None, int]:
    """``(weight bytes on each GPU, problem, MLP intermediate size)`` under ``nvlm.tp`` at degree ``tp``: keys
    ``nvlm.tp.shard_dim`` splits count ``1/tp``, the rest (vision tower, projector, norms, int8 scales of
    row-parallel layers) whole; int4 MLPs at their zero-padded size (``nvlm.tp.mlp_intermediate_padded``).
    ``problem``: why ``nvlm.tp`` would refuse this split (int4 groups straddling ranks), else None."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    return _tp_weights_cached(key, tp, quant, group_size if quant == "int4" else 0, include_lm_head)


@functools.lru_cache(maxsize=32)
def _tp_weights_cached(config_json: str, tp: int, quant: str, group_size: int, include_lm_head: bool):
    from nvlm.tp import MLP_RE, ROW_RE, check_int4_groups, check_tp_config, mlp_intermediate_padded, shard_dim

    config = NVLMConfig.from_json(json.loads(config_json))
    check_tp_config(config, tp)
    model = _meta_model(config)
    problem, size_i, padded_i = None, config.llm.intermediate_size, config.llm.intermediate_size
    if quant != "bf16":
        from nvlm.quant import QuantLinear, quantize_

        quantized = _meta_model(config)
        quantize_(quantized, _quant_config(quant, group_size, include_lm_head))
        if quant == "int4":
            selected = {n for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
            if any(MLP_RE.match(n) and ROW_RE.match(n) for n in selected):   # as nvlm.tp.load_pretrained_tp
                padded_i = mlp_intermediate_padded(size_i, tp, group_size)
            try:
                check_int4_groups(model, tp, group_size, selected, skip_mlp=True)
            except ValueError as e:
                problem = str(e)
        model = quantized
    total = 0
    for key, t in model.state_dict().items():
        size = t.numel() * (t.element_size() if not t.is_floating_point() or key.endswith((".scale", ".scales"))
                            else _VALUE_BYTES)
        if MLP_RE.match(key.rpartition(".")[0]):
            size = size * padded_i // size_i          # zero-padded intermediate (int4 groups per rank)
        total += size // tp if shard_dim(key) is not None else size
    return total, problem, padded_i


def kv_bytes_per_token(config: NVLMConfig) -> int:
    llm = config.llm
    return llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim * _VALUE_BYTES


def activation_bytes(config: NVLMConfig, batch: int = 1, prefill_chunk: int = PREFILL_CHUNK) -> int:
    """Peak transient memory estimate (bf16) plus :data:`FIXED_OVERHEAD_BYTES`.

    Decoder prefill of ``batch * prefill_chunk`` tokens: residual, normed input, q/k/v, attention output, gate, up,
    their product and the MLP output live at once: ``tokens * (5 H + 2 Hkv + 3 I)`` values, plus fp32 logits of
    the last position (``batch * V``). Vision: the most tiles one image makes (``max_dynamic_patch`` + thumbnail)
    through one block: input, qkv (padded), attention output, fc1 output: ``tiles * (P+1) * (3 C + 3 C_pad + I_vit)``
    values (tiled attention never materialises the score matrix)."""
    llm, vit = config.llm, config.vision
    tokens = batch * prefill_chunk
    kv_width = llm.num_key_value_heads * llm.head_dim
    decoder = tokens * (5 * llm.hidden_size + 2 * kv_width + 3 * llm.intermediate_size) * _VALUE_BYTES
    decoder += batch * llm.vocab_size * 4
    tiles = config.max_dynamic_patch + int(config.use_thumbnail)
    seq = config.num_patches + 1
    vision = tiles * seq * (3 * vit.hidden_size + 3 * vit.padded_hidden_size + vit.intermediate_size) * _VALUE_BYTES
    return max(decoder, vision) + FIXED_OVERHEAD_BYTES


# ----------------------------------------------------------------------------------------------------------------
# plan()
# ----------------------------------------------------------------------------------------------------------------
def _resolve_config(config_or_preset) -> tuple[NVLMConfig, str]:
    if isinstance(config_or_preset, NVLMConfig):
        return config_or_preset, "config"
    if isinstance(config_or_preset, (str, os.PathLike)):
        name = str(config_or_preset)
        from nvlm.config import PRESETS

        if name in PRESETS:
            return NVLMConfig.preset(name), name
        if Path(name).exists():
            return NVLMConfig.from_json(name), name
        raise ValueError(f"plan: argument 'model' {name!r} is neither a preset ({sorted(PRESETS)}) nor an existing "
                         f"config.json / checkpoint folder")
    raise ValueError(f"plan: argument 'model' must be an NVLMConfig, a preset name or a path, got "
                     f"{type(config_or_preset).__name__}")


def plan(config_or_preset, quant: str = "bf16", gpu: str = "h100-80gb", context: int = 32768, batch: int = 1,
         group_size: int = 128, include_lm_head: bool = False, tp: int | None = None) -> Plan:
    """Bytes per part, KV cache, headroom, GPUs needed and KV room of ``config_or_preset`` (an ``NVLMConfig``, a
    preset name such as ``"nvlm-d-72b"``, or a checkpoint folder / config.json) in format ``quant`` on ``gpu``.
    ``tp``: also the bytes on each GPU of an ``nvlm.tp`` tensor-parallel group of that size (``Plan.tp_*``)."""
    config, name = _resolve_config(config_or_preset)
    if quant not in QUANTS:
        raise ValueError(f"plan: argument 'quant' must be one of {QUANTS}, got {quant!r}")
    if gpu not in GPUS:
        raise ValueError(f"plan: argument 'gpu' must be one of {sorted(GPUS)}, got {gpu!r}")
    for arg, value in (("context", context), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"plan: argument '{arg}' must be a positive integer, got {value!r}")
    if quant == "int4":
        from nvlm_kernels.packing import INT4_GROUP_SIZES

        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"plan: argument 'group_size' must be one of {INT4_GROUP_SIZES}, got {group_size!r}")

    params, weight_bytes, zero_extra = count_weights(config, quant, group_size, include_lm_head)
    weights = sum(weight_bytes.values())
    per_token = kv_bytes_per_token(config)
    kv = per_token * context * batch
    act = activation_bytes(config, batch)
    capacity = GPUS[gpu]
    total = weights + kv + act

    gpus_needed = None
    kv_heads = config.llm.num_key_value_heads
    for n in (d for d in range(1, kv_heads + 1) if kv_heads % d == 0):
        if -(-(weights + kv) // n) + act <= capacity:
            gpus_needed = n
            break
    room = capacity - weights - act
    notes = []
    if quant == "int4":
        notes.append(f"int4 zero points stored as uint8; with fp16 zeros (spec §8 convention) weights would be "
                     f"{(weights + zero_extra) / 1e9:.2f} GB")
    if gpus_needed is not None and gpus_needed > 1:
        notes.append(f"{gpus_needed} GPUs = tensor-parallel degree (divides the {kv_heads} KV heads); headroom "
                     f"counted once per GPU")
    tp_fields = {}
    if tp is not None:
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"plan: argument 'tp' must be a positive integer, got {tp!r}")
        tp_weights, problem, padded_i = tp_weights_per_gpu(config, tp, quant, group_size, include_lm_head)
        tp_kv = -(-kv // tp)
        tp_total = tp_weights + tp_kv + act
        tp_fields = dict(tp_size=tp, tp_weights_bytes_per_gpu=tp_weights, tp_kv_cache_bytes_per_gpu=tp_kv,
                         tp_total_bytes_per_gpu=tp_total, tp_fits=problem is None and tp_total <= capacity)
        notes.append(f"--tp {tp} (nvlm.tp): decoder, embeddings and lm_head split {tp} ways; vision tower, "
                     f"projector and norms replicated on every GPU")
        if padded_i != config.llm.intermediate_size:
            notes.append(f"--tp {tp} int4 g{group_size}: MLP intermediate size zero-padded "
                         f"{config.llm.intermediate_size} -> {padded_i} so no group straddles two GPUs")
        if problem:
            notes.append(f"--tp {tp} refused: {problem}")
    return Plan(
        model=name, quant=quant, group_size=group_size if quant == "int4" else None,
        include_lm_head=include_lm_head, gpu=gpu, gpu_bytes=capacity, context=context, batch=batch,
        params=params, weight_bytes=weight_bytes, weights_bytes=weights,
        weights_bytes_fp16_zero=weights + zero_extra if quant == "int4" else None,
        kv_bytes_per_token=per_token, kv_cache_bytes=kv, activation_bytes=act, total_bytes=total,
        gpus_needed=gpus_needed, fits_one_gpu=total <= capacity,
        kv_tokens_one_gpu=max(0, room // per_token), notes=notes, **tp_fields)


def _gb(b: int) -> str:
    return f"{b / 1e9:8.2f} GB  {b / 2**30:8.2f} GiB"


def format_plan(p: Plan) -> str:
    """The human-readable table ``nvlm plan`` prints."""
    fmt = p.quant + (f" g{p.group_size}" if p.group_size else "")
    lines = [f"nvlm plan: {p.model}, {fmt}{' (lm_head quantised)' if p.include_lm_head else ''}, {p.gpu} "
             f"({p.gpu_bytes / 2**30:.1f} GiB), context {p.context} x batch {p.batch}",
             "",
             f"  {'part':<22}{'params':>16}  {'bytes':>26}"]
    for part in PARTS:
        lines.append(f"  {part:<22}{p.params[part]:>16,}  {_gb(p.weight_bytes[part])}")
    lines += [f"  {'weights':<22}{p.total_params:>16,}  {_gb(p.weights_bytes)}",
              f"  {'KV cache':<22}{p.context * p.batch:>9,} tokens  {_gb(p.kv_cache_bytes)}",
              f"  {'activation headroom':<22}{'':>16}  {_gb(p.activation_bytes)}",
              f"  {'total on one GPU':<22}{'':>16}  {_gb(p.total_bytes)}",
              ""]
    if p.fits_one_gpu:
        verdict = f"fits ONE {p.gpu} with the {p.context * p.batch:,}-token KV cache"
    elif p.gpus_needed is None:
        verdict = f"does not fit any tensor-parallel group of {p.gpu} (at most one GPU per KV head)"
    else:
        verdict = f"needs {p.gpus_needed} x {p.gpu}"
    lines.append(f"  => {verdict}; KV tokens that fit on one GPU next to the weights: {p.kv_tokens_one_gpu:,}")
    if p.tp_size is not None:
        lines += ["", f"  tensor parallel --tp {p.tp_size}, per GPU:",
                  f"  {'weights':<22}{'':>16}  {_gb(p.tp_weights_bytes_per_gpu)}",
                  f"  {'KV cache':<22}{'':>16}  {_gb(p.tp_kv_cache_bytes_per_gpu)}",
                  f"  {'activation headroom':<22}{'':>16}  {_gb(p.activation_bytes)}",
                  f"  {'total per GPU':<22}{'':>16}  {_gb(p.tp_total_bytes_per_gpu)}",
                  f"  => {p.tp_size} x {p.gpu}: " + ("fits" if p.tp_fits else "does NOT fit")]
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)
