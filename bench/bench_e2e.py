"""End-to-end benchmark: the ``tiny-d`` model, and a 72B-shaped slice whose figures scale to NVLM-D-72B.

tiny-d (always; random weights, one 224 px tile, bf16 vs int8 vs int4-g32 on every decoder/vision/projector Linear
that ``nvlm.quant.quantize_`` selects):
* ``e2e image_encode``: ``model.extract_feature(pixel_values)`` (ViT + pixel shuffle + projector)
* ``e2e ttft``: time to first token = prefill of the prompt with the image (vision included), ``logits_to_keep=1``
* ``e2e decode_token``: one decode step with the KV cache (cache length held fixed so every call is the same work)
  Notes carry tokens/s and weight bytes; int8/int4 rows carry the speed-up over bf16 from the same run.

72B-shaped slice (full run only; ``--quick`` skips it: building and quantising 0.9 B parameters takes minutes on a
2-core machine): one full-size Qwen2-72B decoder layer (8192 <-> 29568, GQA 64/8) decoding one token against a
2048-token KV cache, and one full-size InternViT-6B block (3200 <-> 12800, 32 padded heads) on one 1025-token tile.
Decode is weight-bandwidth bound, so its row reports GB/s over the layer's weight + KV bytes against the measured
DRAM read bandwidth, and the note scales it to the 80-layer model (ms/token, tokens/s). The vision row reports
TFLOP/s against the measured matmul peak and scales to 45 blocks x 7 tiles.

Peak memory: ``torch.cuda.max_memory_allocated`` per configuration on a GPU; on CPU the weight bytes are reported
(process RSS mixes every configuration of the run and is left out).
"""

from __future__ import annotations

import contextlib

import torch

from bench import harness, shapes

OP = "e2e"
PROMPT_TEXT_TOKENS = 32          # text tokens around the image in the tiny prompt
SLICE_CTX = 2048                 # KV-cache length of the 72B decode slice


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _quant_configs(group_size: int):
    from nvlm.quant import Int4WeightOnly, Int8WeightOnly

    return {"bf16": None, "int8": Int8WeightOnly(), f"int4-g{group_size}": Int4WeightOnly(group_size=group_size)}


def _random_init_(module: torch.nn.Module, std: float = 0.02) -> None:
    """Small random weights (norm weights stay 1), in place, in the module's dtype."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.normal_(0.0, std)


def _build(factory, device, dtype=torch.bfloat16):
    """Build ``factory()`` on the meta device, then materialise it directly in ``dtype`` on ``device`` (no fp32
    copy of a 72B-sized layer), with random weights."""
    with torch.device("meta"):
        module = factory()
    module = module.to(dtype).to_empty(device=device)
    _random_init_(module)
    # RMSNorm/LayerNorm weights and layer scales: ones, as at initialisation
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and not name.endswith("bias"):
                p.fill_(1.0)
    return module.eval()


@contextlib.contextmanager
def _peak_memory(device, out: dict):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated()


# ----------------------------------------------------------------------------------------------------------------
# tiny-d end to end
# ----------------------------------------------------------------------------------------------------------------
def _tiny_rows(quick: bool, device) -> list[harness.Row]:
    from nvlm.config import NVLMConfig
    from nvlm.model import NVLM
    from nvlm.quant import quantize_

    cfg = NVLMConfig.preset("tiny-d")
    cfg.img_context_token_id = cfg.llm.vocab_size - 1
    s = cfg.image_size
    n_img = cfg.num_image_token
    ids = torch.randint(0, cfg.llm.vocab_size - 1, (1, PROMPT_TEXT_TOKENS + n_img))
    ids[0, PROMPT_TEXT_TOKENS // 2: PROMPT_TEXT_TOKENS // 2 + n_img] = cfg.img_context_token_id
    ids = ids.to(device)
    pixels = torch.randn(1, 3, s, s).to(device=device, dtype=torch.bfloat16)
    reps = 3 if quick else 20
    min_s = 0.05 if quick else 0.5
    prompt = f"tiny-d 1 tile {s}px, prompt {ids.shape[1]} tok"

    rows, base = [], {}
    for qname, qcfg in _quant_configs(group_size=32).items():
        torch.manual_seed(0)
        model = _build(lambda: NVLM(cfg), device)
        if qcfg is not None:
            quantize_(model, qcfg)
        wbytes = _weight_bytes(model)
        mem: dict = {}
        with torch.no_grad(), _peak_memory(device, mem):
            t_img = harness.measure(model.extract_feature, args_list=[(pixels,)], reps=reps, min_time_s=min_s)
            t_ttft = harness.measure(lambda m: m(ids, pixels, use_cache=True, logits_to_keep=1),
                                     args_list=[(model,)], reps=reps, min_time_s=min_s)
            cache = model(ids, pixels, use_cache=True, logits_to_keep=1).past_key_values
            ctx = cache.get_seq_length()
            nxt = ids[:, -1:]

            def decode_step(model=model, cache=cache, ctx=ctx, nxt=nxt):
                cache.lengths = [ctx] * len(cache.lengths)     # same cache length every call: same work
                return model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)

            t_dec = harness.measure(decode_step, reps=reps * 2, min_time_s=min_s)
        mem_note = f", peak {mem['peak_bytes'] / 2**20:.0f} MiB" if "peak_bytes" in mem else ""
        note = f"weights {wbytes / 2**20:.2f} MiB{mem_note}"
        for part, t, shape, extra in (
                ("image_encode", t_img, f"tiny-d 1 tile {s}px", ""),
                ("ttft", t_ttft, prompt, ""),
                ("decode_token", t_dec, f"tiny-d ctx {ctx}", f"{1e3 / t_dec.median_ms:.0f} tok/s, ")):
            baselines = {"bf16": base[part]} if qcfg is not None else None
            rows.append(harness.make_row(f"{OP} {part}", shape, qname, "default", t, baselines=baselines,
                                         device=device, note=extra + note))
            if qcfg is None:
                base[part] = t
        del model, cache
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 72B-shaped slice: one decoder layer, one vision block
# ----------------------------------------------------------------------------------------------------------------
def _slice_rows(quick: bool, device) -> list[harness.Row]:
    from nvlm.config import NVLMConfig
    from nvlm.decoder import KVCache, Qwen2DecoderLayer, rope_cos_sin
    from nvlm.quant import quantize_
    from nvlm.vision import InternVisionEncoderLayer

    cfg = NVLMConfig.preset("nvlm-d-72b")
    llm, vis = cfg.llm, cfg.vision
    n_layers, n_blocks = llm.num_hidden_layers, vis.num_hidden_layers
    reps = 3 if device.type == "cpu" else 20
    rows = []

    # decoder layer, decode one token against a SLICE_CTX-token cache
    dec_base = None
    kv_bytes = 2 * llm.num_key_value_heads * SLICE_CTX * llm.head_dim * 2
    for qname, qcfg in _quant_configs(group_size=128).items():
        torch.manual_seed(0)
        layer = _build(lambda: Qwen2DecoderLayer(llm, 0), device)
        if qcfg is not None:
            quantize_(layer, qcfg)
        wbytes = _weight_bytes(layer)
        cache = KVCache(1)
        kv = torch.randn(1, llm.num_key_value_heads, SLICE_CTX, llm.head_dim, device=device,
                         dtype=torch.bfloat16)
        cache.update(0, kv, kv.clone())
        h = torch.randn(1, 1, llm.hidden_size, device=device, dtype=torch.bfloat16)
        cos, sin = rope_cos_sin(torch.tensor([SLICE_CTX], device=device), llm.head_dim, llm.rope_theta,
                                torch.bfloat16)

        def step(layer=layer, cache=cache, h=h, cos=cos, sin=sin):
            cache.lengths[0] = SLICE_CTX
            return layer(h, cos, sin, cache)

        mem: dict = {}
        with torch.no_grad(), _peak_memory(device, mem):
            t = harness.measure(step, reps=reps, min_time_s=0.0 if quick else 0.5)
        per_token_ms = t.median_ms * n_layers
        note = (f"x{n_layers} layers: {per_token_ms:.0f} ms/token = {1e3 / per_token_ms:.2f} tok/s (layers only); "
                f"layer weights {wbytes / 2**30:.2f} GiB")
        if "peak_bytes" in mem:
            note += f", peak {mem['peak_bytes'] / 2**30:.2f} GiB"
        rows.append(harness.make_row(f"{OP}-72b decoder_layer decode", f"M1 ctx{SLICE_CTX} 8192<->29568", qname,
                                     "default", t, bytes_moved=wbytes + kv_bytes, limit="dram_read_gbps",
                                     baselines={"bf16": dec_base} if dec_base else None, device=device, note=note))
        dec_base = dec_base or t
        del layer, cache, kv

    # vision block on one 1025-token tile
    vit_base = None
    n_tok = shapes.VIT_TOKENS
    for qname, qcfg in _quant_configs(group_size=128).items():
        torch.manual_seed(0)
        block = _build(lambda: InternVisionEncoderLayer(vis), device)
        if qcfg is not None:
            quantize_(block, qcfg)
        x = torch.randn(1, n_tok, vis.hidden_size, device=device, dtype=torch.bfloat16)
        linear_params = sum(m.in_features * m.out_features for m in block.modules() if hasattr(m, "in_features"))
        flops = 2.0 * n_tok * linear_params + 4.0 * vis.num_attention_heads * n_tok * n_tok * vis.head_dim
        mem = {}
        with torch.no_grad(), _peak_memory(device, mem):
            t = harness.measure(block, args_list=[(x,)], reps=max(2, reps // 2), min_time_s=0.0)
        full_s = t.median_ms * n_blocks * shapes.MAX_TILES / 1e3
        note = f"x{n_blocks} blocks x{shapes.MAX_TILES} tiles: {full_s:.1f} s per image"
        if "peak_bytes" in mem:
            note += f", peak {mem['peak_bytes'] / 2**30:.2f} GiB"
        rows.append(harness.make_row(f"{OP}-72b vision_block", f"1x{n_tok}x3200", qname, "default", t, flops=flops,
                                     limit="matmul_tflops", baselines={"bf16": vit_base} if vit_base else None,
                                     device=device, note=note))
        vit_base = vit_base or t
        del block
    return rows


def run(quick: bool = False) -> list[harness.Row]:
    device = _device()
    rows = _tiny_rows(quick, device)
    if not quick:
        rows += _slice_rows(quick, device)
    return rows
