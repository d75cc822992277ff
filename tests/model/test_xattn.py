"""NVLM-X / NVLM-H (nvlm/xattn.py): gate-0 equivalences, kernel vs reference, KV-cached generation, mask rules,
checkpoints, quantisation. CPU, fp32, tiny presets."""

import copy

import pytest
import torch
from PIL import Image

import nvlm_kernels
from nvlm.config import NVLMConfig
from nvlm.decoder import Qwen2ForCausalLM
from nvlm.model import NVLM
from nvlm.processor import NVLMProcessor
from nvlm.testing import make_checkpoint, random_model
from nvlm.tokenizer import build_tokenizer
from nvlm.xattn import GatedCrossAttentionBlock, set_xattn_impl

TOK = build_tokenizer()
PAD = TOK.token_to_id("<|vision_pad|>")
N = 64  # image tokens per tile of the tiny presets (224 px / 14 -> 16 x 16 patches -> 8 x 8 after the shuffle)


def image(seed: int, w: int = 448, h: int = 224) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def models():
    out = {}
    for arch in "XH":
        m = random_model(f"tiny-{arch.lower()}", seed=1)
        m.config.img_context_token_id = PAD
        out[arch] = m
    return out


def inputs(arch: str, text: str = "What is in the picture?", images=None):
    proc = NVLMProcessor(TOK, image_size=224, mode=arch)
    return proc(images=[image(0)] if images is None else images, text=text)


def run(model, inp, **kw):
    with torch.no_grad():
        return model(inp["input_ids"], inp["pixel_values"], xattn_layout=inp["xattn_layout"], **kw).logits


def capture_blocks(model):
    """Forward hooks recording (input h, k, v, kv_start, kv_end, output h) of every cross-attention block."""
    records, handles = [], []
    for block in model.language_model.model.xattn_layers:
        handles.append(block.register_forward_hook(lambda mod, args, out: records.append((*args, out))))
    return records, handles


def plain_decoder(model):
    """Qwen2 without cross-attention holding the same decoder weights."""
    dec = Qwen2ForCausalLM(model.config.llm)
    sd = {k: v for k, v in model.language_model.state_dict().items() if ".xattn_layers." not in k}
    dec.load_state_dict(sd, strict=True)
    return dec.eval()


def zero_gates(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for block in m.language_model.model.xattn_layers:
            block.attn_gate.zero_()
            block.mlp_gate.zero_()
    return m


# ----------------------------------------------------------------------------------------------------------------
# Configs, presets, processor
# ----------------------------------------------------------------------------------------------------------------
def block_params(h: int, i: int, hq: int, hkv: int, d: int, ffn: bool) -> int:
    attn = h * hq * d + hq * d + 2 * (h * hkv * d + hkv * d) + hq * d * h + h + 1     # q, k, v (+bias), o, norm, alpha
    return attn + (3 * h * i + h + 1 if ffn else 0)                                  # SwiGLU, norm, beta


@pytest.mark.parametrize("arch", ["X", "H"])
def test_72b_presets_on_meta(arch):
    cfg = NVLMConfig.preset(f"nvlm-{arch.lower()}-72b")
    assert cfg.num_xattn_layers == 10
    with torch.device("meta"):
        model = NVLM(cfg)
    sd = model.state_dict()
    total = sum(t.numel() for t in sd.values())
    d_total = 79_379_593_344                                 # spec §2 / §8: NVLM-D-72B as stored
    blocks = 10 * block_params(8192, 29568, 64, 8, 128, True)
    assert sum(t.numel() for k, t in sd.items() if ".xattn_layers." in k) == blocks
    if arch == "X":   # one-layer projector (LayerNorm + 12800 -> 8192, no bias) instead of D's 2-layer mlp1
        assert tuple(sd["mlp1.1.weight"].shape) == (8192, 12800) and "mlp1.3.weight" not in sd
        assert total == d_total - 620_717_056 + (2 * 12800 + 12800 * 8192) + blocks
    else:
        assert total == d_total + blocks
    assert tuple(sd["language_model.model.xattn_layers.9.cross_attn.k_proj.weight"].shape) == (1024, 8192)
    assert tuple(sd["language_model.model.xattn_layers.0.attn_gate"].shape) == (1,)


@pytest.mark.parametrize("arch", ["X", "H"])
def test_config_round_trip_and_validation(arch):
    cfg = NVLMConfig.preset(f"tiny-{arch.lower()}")
    d = cfg.to_dict()
    assert d["arch"] == arch and d["model_type"] == f"NVLM_{arch}" and d["xattn_every"] == 1
    back = NVLMConfig.from_json(d)
    assert back.to_dict() == d and back.num_xattn_layers == 2
    assert "xattn_every" not in NVLMConfig.preset("nvlm-d-72b").to_dict()      # the published D layout is kept
    d["xattn_every"] = 3                                                       # > num_hidden_layers (2)
    with pytest.raises(ValueError, match="xattn_every"):
        NVLMConfig.from_json(d)


def test_processor_x_layout():
    inp = inputs("X")
    ids, lay = inp["input_ids"][0].tolist(), inp["xattn_layout"]
    assert PAD not in ids and inp["num_tiles"] == [3]                           # 2x1 grid + thumbnail
    assert lay.memory == [[0, 1, 2]] and lay.decoder_tiles == []
    start, end = lay.kv_start[0].tolist(), lay.kv_end[0].tolist()
    for k, tag in enumerate(["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"]):
        rows = [i for i in range(len(ids)) if (start[i], end[i]) == (k * N, (k + 1) * N)]
        assert TOK.decode([ids[i] for i in rows]) == tag                        # the tag's own tokens, stand-alone
        assert rows == list(range(rows[0], rows[0] + len(rows)))
    first_tag = min(i for i in range(len(ids)) if end[i] == N)
    assert all(s == e == 0 for s, e in zip(start[:first_tag], end[:first_tag]))   # before the image: nothing
    assert TOK.decode(ids[:first_tag]).endswith("<Image>")
    last_tag = max(i for i in range(len(ids)) if start[i] == 2 * N)
    assert all((s, e) == (0, 3 * N) for s, e in zip(start[last_tag + 1:], end[last_tag + 1:]))  # </Image> onwards


def test_processor_h_layout():
    inp = inputs("H")
    ids, lay = inp["input_ids"][0].tolist(), inp["xattn_layout"]
    assert ids.count(PAD) == N and lay.decoder_tiles == [2]                     # the thumbnail, as in NVLM-D
    tags = lay.memory[0][0::2]
    assert lay.memory[0][1::2] == [0, 1] and [TOK.decode(t) for t in tags] == ["<tile_1>", "<tile_2>"]
    size = sum(len(t) for t in tags) + 2 * N
    first_pad = ids.index(PAD)
    thumb = [i for i in range(first_pad) if lay.kv_end[0, i] == size]
    assert TOK.decode([ids[i] for i in thumb]) == "<tile_global_thumbnail>"
    assert bool((lay.kv_end[0, :thumb[0]] == 0).all()) and bool((lay.kv_end[0, thumb[0]:] == size).all())
    single = inputs("H", images=[image(1, 224, 224)])["xattn_layout"]          # one tile: thumbnail only, no memory
    assert single.memory == [[]] and single.decoder_tiles == [0]


# ----------------------------------------------------------------------------------------------------------------
# Exact equivalences with all gates at 0
# ----------------------------------------------------------------------------------------------------------------
def test_x_gates_zero_equals_plain_decoder(models):
    model = zero_gates(models["X"])
    inp = inputs("X")
    with torch.no_grad():
        ref = plain_decoder(model)(model.get_input_embeddings()(inp["input_ids"]))
    assert torch.equal(run(model, inp), ref)


def test_h_gates_zero_equals_d_with_thumbnail_only(models):
    model = zero_gates(models["H"])
    inp = inputs("H")
    cfg_d = copy.deepcopy(model.config)
    cfg_d.arch = "D"
    d_model = NVLM(cfg_d).eval()
    d_model.load_state_dict({k: v for k, v in model.state_dict().items() if ".xattn_layers." not in k}, strict=True)
    thumbs = inp["pixel_values"][inp["xattn_layout"].decoder_tiles]
    with torch.no_grad():
        ref = d_model(inp["input_ids"], thumbs).logits
    assert torch.equal(run(model, inp), ref)


# ----------------------------------------------------------------------------------------------------------------
# Non-zero gates
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["X", "H"])
def test_kernel_op_matches_reference_path(models, arch):
    model = models[arch]
    inp = inputs(arch)
    assert all(b.attn_gate.item() != 0 and b.mlp_gate.item() != 0 for b in model.language_model.model.xattn_layers)
    records, handles = capture_blocks(model)
    try:
        logits = run(model, inp)                                        # automatic backend (CPU: SDPA path)
    finally:
        for h in handles:
            h.remove()
    set_xattn_impl(model, "reference")
    try:
        ref_logits = run(model, inp)
        assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
        for j, (block, (h, k, v, start, end, out)) in enumerate(zip(model.language_model.model.xattn_layers,
                                                                     records)):
            assert bool((end > start).any()) and bool((end == start).any())   # both kinds of rows are exercised
            with torch.no_grad():
                ref = block(h, k, v, start, end)
            scale = (ref - h).abs().max()
            assert scale > 0
            assert (out - ref).abs().max() <= 1e-5 * scale + 1e-6
            if j == 0:   # the Triton kernel too (interpreted on CPU: slow, so one block; the blocks share code)
                block.impl = "kernel"
                with torch.no_grad(), nvlm_kernels.force_backend("triton"):
                    tri = block(h, k, v, start, end)
                block.impl = "reference"
                assert (tri - ref).abs().max() <= 1e-5 * scale + 1e-6
    finally:
        set_xattn_impl(model, "kernel")


@pytest.mark.parametrize("arch", ["X", "H"])
def test_kv_cached_generation_equals_full_recompute(models, arch):
    model = models[arch]
    inp = inputs(arch, images=[image(2), image(3, 224, 448)], text="<image> left, <image> right: which?")
    calls = []
    handles = [b.cross_attn.k_proj.register_forward_hook(lambda *a: calls.append(1))
               for b in model.language_model.model.xattn_layers]
    try:
        out = model.generate(inp["input_ids"], inp["pixel_values"], xattn_layout=inp["xattn_layout"],
                             max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(model.language_model.model.xattn_layers)   # memory K/V once per block, at prefill
    n = inp["input_ids"].shape[1]
    full_inp = dict(inp, input_ids=out.sequences, xattn_layout=inp["xattn_layout"].extend(4, N))
    full = run(model, full_inp)[0, n - 1:n + 3]
    cached = torch.cat(out.logits)
    assert (full - cached).abs().max() <= 1e-4 * full.abs().max()
    assert torch.equal(full.argmax(-1), out.sequences[0, n:])


def test_x_tag_k_sees_only_tile_k(models):
    model = models["X"]
    inp = inputs("X")
    lay = inp["xattn_layout"]
    start, end = lay.kv_start[0], lay.kv_end[0]

    def block0_delta(pixel_values):
        records, handles = capture_blocks(model)
        try:
            logits = run(model, dict(inp, pixel_values=pixel_values))
        finally:
            for h in handles:
                h.remove()
        h_in, *_, h_out = records[0]
        return (h_out - h_in)[0], logits[0]

    base, base_logits = block0_delta(inp["pixel_values"])
    for j in range(3):                                    # perturb tile j's pixels
        pv = inp["pixel_values"].clone()
        pv[j] += 0.5 * torch.randn_like(pv[j])
        delta, logits = block0_delta(pv)
        for k in range(3):
            rows = (start == k * N) & (end == (k + 1) * N)      # tag k's tokens
            assert int(rows.sum()) >= 3
            if k == j:
                assert not torch.equal(delta[rows], base[rows])
            else:
                assert torch.equal(delta[rows], base[rows])
        # Causality on top: every position before the first token that can see tile j keeps its logits exactly.
        first = int(((start <= j * N) & (end > j * N)).nonzero()[0])
        assert torch.equal(logits[:first], base_logits[:first])
        assert not torch.equal(logits[first:], base_logits[first:])


@pytest.mark.parametrize("arch", ["X", "H"])
def test_text_before_image_gets_exactly_zero(models, arch):
    model = models[arch]
    inp = inputs(arch)
    empty = inp["xattn_layout"].kv_end[0] == 0
    n_before = int(empty.sum())
    assert n_before > 5 and bool(empty[:n_before].all())                   # the system turn and "user\n<Image>"
    records, handles = capture_blocks(model)
    try:
        logits = run(model, inp)
    finally:
        for h in handles:
            h.remove()
    for h_in, *_, h_out in records:
        assert torch.equal(h_out[0, :n_before], h_in[0, :n_before])         # block output exactly 0 there
        assert not torch.equal(h_out[0, n_before:], h_in[0, n_before:])
    with torch.no_grad():
        ref = plain_decoder(model)(model.get_input_embeddings()(inp["input_ids"]))
    assert torch.equal(logits[:, :n_before], ref[:, :n_before])
    assert not torch.equal(logits[:, n_before:], ref[:, n_before:])


@pytest.mark.parametrize("arch", ["X", "H"])
def test_batch_rows_are_independent(models, arch):
    model = models[arch]
    a = inputs(arch, images=[image(5)])                                       # 2 tiles + thumbnail
    # H: a one-tile image has the same decoder text (thumbnail only) but an empty memory -> a padded memory row.
    # X: the tags are in the decoder, so the same L needs the same tile count.
    b = inputs(arch, images=[image(6, 224, 224) if arch == "H" else image(6, 224, 448)])
    assert a["input_ids"].shape == b["input_ids"].shape
    from nvlm.xattn import XAttnLayout

    both = {"input_ids": torch.cat([a["input_ids"], b["input_ids"]]),
            "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
            "xattn_layout": XAttnLayout.batch([a["xattn_layout"], b["xattn_layout"]],
                                              [a["pixel_values"].shape[0], b["pixel_values"].shape[0]])}
    out = run(model, both)
    for row, single in enumerate((a, b)):
        ref = run(model, single)[0]
        assert (out[row] - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_text_only_prompt_is_the_decoder(models):
    model = models["X"]
    proc = NVLMProcessor(TOK, image_size=224, mode="X")
    inp = proc(text="Hello there")
    assert inp["pixel_values"] is None
    with torch.no_grad():
        ref = plain_decoder(model)(model.get_input_embeddings()(inp["input_ids"]))
    assert torch.equal(run(model, inp), ref)


@pytest.mark.filterwarnings("error:.*autograd kernel was not registered")
def test_training_reaches_the_gates():
    model = NVLM(NVLMConfig.preset("tiny-x")).train()           # fresh init: gates 0, blocks are identities
    model.config.img_context_token_id = PAD
    model.vision_model.requires_grad_(False)                    # frozen in every NVLM training stage
    inp = inputs("X")
    logits = model(inp["input_ids"], inp["pixel_values"], xattn_layout=inp["xattn_layout"]).logits
    logits.logsumexp(-1).mean().backward()
    block = model.language_model.model.xattn_layers[0]
    assert block.attn_gate.item() == 0 and block.attn_gate.grad.abs().item() > 0   # d tanh(a)/da = 1 at a = 0
    assert block.mlp_gate.grad.abs().item() > 0
    assert model.mlp1[0].weight.grad is not None                # the projector is on the autograd graph


def test_errors(models):
    model = models["X"]
    inp = inputs("X")
    with pytest.raises(ValueError, match="xattn_layout"):
        model(inp["input_ids"], inp["pixel_values"])
    with pytest.raises(ValueError, match="tiles"):
        model(inp["input_ids"], inp["pixel_values"][:2], xattn_layout=inp["xattn_layout"])
    ids = inp["input_ids"].clone()
    ids[0, -1] = PAD                                            # NVLM-X's decoder holds no image slots
    with pytest.raises(ValueError, match="image-context"):
        model(ids, inp["pixel_values"], xattn_layout=inp["xattn_layout"])
    with pytest.raises(ValueError, match="xattn_layout"):
        random_model("tiny-d")(inp["input_ids"], xattn_layout=inp["xattn_layout"])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and quantisation
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["X", "H"])
def test_checkpoint_round_trip(tmp_path, arch):
    preset = f"tiny-{arch.lower()}"
    path = make_checkpoint(tmp_path / "a", preset, seed=3, dtype=torch.float32, num_shards=2)
    model = NVLM.from_pretrained(path, progress=False)
    assert model.config.arch == arch and model.processor.mode == arch
    sd = model.state_dict()
    assert "language_model.model.xattn_layers.1.cross_attn.o_proj.weight" in sd
    assert all(b.attn_gate.item() != 0 for b in model.language_model.model.xattn_layers)
    model.save_pretrained(tmp_path / "b")
    again = NVLM.from_pretrained(tmp_path / "b", progress=False)
    assert again.config.to_dict() == model.config.to_dict()
    assert sd.keys() == again.state_dict().keys()
    assert all(torch.equal(t, again.state_dict()[k]) for k, t in sd.items())
    inp = model.processor(images=[image(4)], text="Describe.")
    assert torch.equal(run(model, inp), run(again, inp))
    reply = model.chat(image(4), "Describe.", max_new_tokens=2)
    assert isinstance(reply, str)


def test_quantize_includes_xattn_linears(models):
    from nvlm.quant import Int8WeightOnly, QuantLinear, quantize_

    model = copy.deepcopy(models["H"])
    inp = inputs("H")
    ref = run(model, inp)
    quantize_(model, Int8WeightOnly())
    for block in model.language_model.model.xattn_layers:
        assert isinstance(block, GatedCrossAttentionBlock)
        for lin in (block.cross_attn.q_proj, block.cross_attn.k_proj, block.cross_attn.v_proj,
                    block.cross_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
            assert isinstance(lin, QuantLinear)
    out = run(model, inp)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
