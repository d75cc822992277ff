"""Streaming load / atomic save (nvlm.loading) of checkpoints in the published layout (nvlm.testing)."""

import importlib.util
import json
import shutil

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from nvlm import loading
from nvlm.config import NVLMConfig
from nvlm.model import NVLM
from nvlm.testing import make_checkpoint

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=7)


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    """A private copy to damage."""
    return shutil.copytree(checkpoint, tmp_path / "copy")


def read_all(folder):
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    out = {}
    for name in sorted(set(weight_map.values())):
        out.update(load_file(str(folder / name)))
    return weight_map, out


def load(folder, **kw):
    return NVLM.from_pretrained(folder, progress=False, **kw)


def test_published_layout(checkpoint):
    files = sorted(p.name for p in checkpoint.iterdir())
    assert files == ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", INDEX, "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["llm_config"]["model_type"] == "llama" and config["llm_config"]["attention_bias"] is True
    assert "img_context_token_id" not in config                  # the published file has none: tokenizer gives it
    weight_map, tensors = read_all(checkpoint)
    assert set(weight_map) == set(tensors)
    qkv = tensors["vision_model.encoder.layers.0.attn.qkv.weight"]
    assert qkv.dtype == torch.bfloat16 and qkv.shape == (576, 128)
    assert (qkv[128:192] == 0).all() and (qkv[512:576] == 0).all() and (qkv[0:128] != 0).any()
    index = json.loads((checkpoint / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_round_trip_is_byte_identical(checkpoint, tmp_path):
    model = load(checkpoint)
    assert model.config.img_context_token_id == 1011            # '<|vision_pad|>' looked up in tokenizer.json
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    out = model.save_pretrained(tmp_path / "saved")
    _, a = read_all(checkpoint)
    _, b = read_all(out)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / fname).read_bytes() == (checkpoint / fname).read_bytes()
    reloaded = NVLMConfig.from_json(out)
    assert reloaded == model.config


def test_processor_attached_and_chat(checkpoint):
    if importlib.util.find_spec("nvlm.processor") is None:
        pytest.skip("nvlm.processor not available")
    from PIL import Image

    model = load(checkpoint)
    assert model.processor is not None
    image = Image.new("RGB", (300, 200), (120, 30, 200))
    reply = model.chat(image, "What colour is it?", max_new_tokens=4)
    inputs = model.processor(images=[image], text="What colour is it?")
    ids = model.generate(inputs["input_ids"], inputs["pixel_values"].bfloat16(), max_new_tokens=4)
    new = [t for t in ids[0, inputs["input_ids"].shape[1]:].tolist() if t not in model.processor.stop_token_ids]
    assert isinstance(reply, str) and reply == model.processor.decode(new)


def test_loaded_model_owns_its_memory(ckpt):
    """Tensors are read into memory of their own, not views of a file mapping: overwriting the checkpoint in place
    after loading must not change the model."""
    model = load(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for shard in ckpt.glob("model-*.safetensors"):
        size = shard.stat().st_size
        with open(shard, "r+b") as f:
            f.write(b"\0" * size)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dtype_argument_and_per_tensor_file_dtype(ckpt):
    # One tensor stored in fp32 (the published shards are not all bf16, spec §2): read as found, then cast.
    weight_map = json.loads((ckpt / INDEX).read_text())["weight_map"]
    key = "mlp1.0.weight"
    shard = ckpt / weight_map[key]
    tensors = load_file(str(shard))
    exact = torch.randn(tensors[key].shape)
    tensors[key] = exact
    save_file(tensors, str(shard), metadata={"format": "pt"})
    bf16 = load(ckpt)
    assert bf16.mlp1[0].weight.dtype == torch.bfloat16
    assert torch.equal(bf16.mlp1[0].weight, exact.bfloat16())
    fp32 = load(ckpt, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert torch.equal(fp32.mlp1[0].weight, exact)


def _rewrite(folder, key, fn):
    """Apply fn(tensors dict) to the shard holding key; return the shard's name."""
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    name = weight_map[key]
    tensors = load_file(str(folder / name))
    fn(tensors)
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    return name


def _edit_index(folder, fn):
    index = json.loads((folder / INDEX).read_text())
    fn(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


KEY = "language_model.model.layers.1.self_attn.k_proj.bias"


def test_missing_key(ckpt):
    _rewrite(ckpt, KEY, lambda t: t.pop(KEY))
    _edit_index(ckpt, lambda m: m.pop(KEY))
    with pytest.raises(ValueError, match=rf"{INDEX}.* lacks key '{KEY}' \(expected shape \[32\]\)"):
        load(ckpt)


def test_key_missing_from_its_shard(ckpt):
    name = _rewrite(ckpt, KEY, lambda t: t.pop(KEY))
    with pytest.raises(ValueError, match=rf"{name}' lacks key '{KEY}'"):
        load(ckpt)


def test_unexpected_key(ckpt):
    extra = "language_model.model.layers.1.self_attn.o_proj.bias"      # Qwen2 has none: must not be accepted
    name = _rewrite(ckpt, KEY, lambda t: t.update({extra: torch.zeros(64, dtype=torch.bfloat16)}))
    _edit_index(ckpt, lambda m: m.update({extra: name}))
    with pytest.raises(ValueError, match=rf"key '{extra}' \(in '{name}'\) is not a parameter"):
        load(ckpt)


def test_key_in_shard_but_not_in_index(ckpt):
    extra = "vision_model.encoder.layers.0.attn.qkv.bias"
    name = _rewrite(ckpt, KEY, lambda t: t.update({extra: torch.zeros(576, dtype=torch.bfloat16)}))
    with pytest.raises(ValueError, match=rf"{name}' holds key '{extra}'"):
        load(ckpt)


def test_wrong_shape(ckpt):
    name = _rewrite(ckpt, KEY, lambda t: t.update({KEY: torch.zeros(33, dtype=torch.bfloat16)}))
    with pytest.raises(ValueError, match=rf"'{KEY}' in '.*{name}' has shape \[33\], expected \[32\]"):
        load(ckpt)


def test_missing_shard(ckpt):
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard '.*model-00002-of-00003.safetensors' is missing"):
        load(ckpt)


def test_truncated_shard(ckpt):
    shard = ckpt / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"shard '.*model-00003-of-00003.safetensors' cannot be read"):
        load(ckpt)


def test_pickle_files_refused(ckpt):
    torch.save({KEY: torch.zeros(32)}, ckpt / "pytorch_model.bin")
    _edit_index(ckpt, lambda m: m.update({KEY: "pytorch_model.bin"}))
    with pytest.raises(ValueError, match=rf"'pytorch_model.bin' \(key '{KEY}'\) is a pickle-based format"):
        load(ckpt)
    for p in ckpt.glob("model*"):
        p.unlink()
    with pytest.raises(ValueError, match="'pytorch_model.bin' is a pickle-based format"):
        load(ckpt)


def test_single_file_checkpoint(checkpoint, tmp_path):
    model = load(checkpoint)
    out = model.save_pretrained(tmp_path / "one", num_shards=1)
    (out / INDEX).unlink()
    (out / "model-00001-of-00001.safetensors").rename(out / "model.safetensors")
    again = load(out)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_garbage_in_dummy_heads_changes_nothing(ckpt):
    """Non-zero dummy rows/columns are accepted and ignored (dummy heads are never computed; spec §2)."""
    model = load(ckpt, dtype=torch.float32)
    p = "vision_model.encoder.layers.1.attn."

    def garbage(key, fn):
        def edit(t):
            w = t[key].clone()
            fn(w)
            t[key] = w
        _rewrite(ckpt, key, edit)

    garbage(p + "qkv.weight", lambda w: [w[i * 192 + 128:(i + 1) * 192].fill_(7.0) for i in range(3)])
    garbage(p + "q_norm.weight", lambda w: w[128:].fill_(-5.0))
    garbage(p + "k_norm.weight", lambda w: w[128:].fill_(3.0))
    garbage(p + "proj.weight", lambda w: w[:, 128:].fill_(-3.0))
    noisy = load(ckpt, dtype=torch.float32)
    for name in ("qkv", "q_norm", "k_norm", "proj"):
        key = p + name + ".weight"
        assert not torch.equal(noisy.get_parameter(key), model.get_parameter(key))
    px = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(noisy.extract_feature(px), model.extract_feature(px))


def test_save_is_atomic(checkpoint, tmp_path, monkeypatch):
    model = load(checkpoint)
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(loading, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out", num_shards=3)
    assert list(tmp_path.iterdir()) == []                       # neither the target nor a partial folder
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "out", num_shards=3)
    with pytest.raises(ValueError, match="already exists"):
        model.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "out", overwrite=True)    # default shard size: one shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "model-00001-of-00001.safetensors").is_file()
    assert not (tmp_path / "out" / "model-00002-of-00003.safetensors").exists()


def test_quantise_on_arrival_hook():
    """_assign_tensor hands a float weight to a quantised linear's set_weight_from_float instead of storing it."""

    class FakeQuantLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.received = None
            self.bias = nn.Parameter(torch.empty(32, device="meta"))

        def set_weight_from_float(self, weight, bias=None):
            self.received = weight

    with torch.device("meta"):
        model = NVLM(NVLMConfig.preset("tiny-d"))
    attn = model.language_model.model.layers[0].self_attn
    attn.k_proj = FakeQuantLinear()
    w, b = torch.randn(32, 64), torch.randn(32)
    loading._assign_tensor(model, "language_model.model.layers.0.self_attn.k_proj.weight", w, FakeQuantLinear)
    loading._assign_tensor(model, "language_model.model.layers.0.self_attn.k_proj.bias", b, FakeQuantLinear)
    assert attn.k_proj.received is w and torch.equal(attn.k_proj.bias, b)
    loading._assign_tensor(model, "language_model.model.norm.weight", torch.ones(64), FakeQuantLinear)
    assert not model.language_model.model.norm.weight.is_meta
    with pytest.raises(ValueError, match="no parameter"):
        loading._assign_tensor(model, "language_model.model.norm.nothing", torch.ones(64))


def test_quantise_while_streaming_and_reload(checkpoint, tmp_path):
    if importlib.util.find_spec("nvlm.quant") is None:
        with pytest.raises(NotImplementedError, match="nvlm.quant"):
            load(checkpoint, quantization=object())
        pytest.skip("nvlm.quant not available")
    from nvlm.quant import Int8WeightOnly, QuantLinear, sqnr_db

    ref = load(checkpoint, dtype=torch.float32)
    q = load(checkpoint, dtype=torch.float32, quantization=Int8WeightOnly())
    linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert linears and not any(t.is_meta for t in q.state_dict().values())
    assert type(q.vision_model.encoder.layers[0].attn.qkv) is QuantLinear   # padded qkv: the generic path
    ids = torch.randint(0, 1000, (1, 6))
    ids = torch.cat([ids, torch.full((1, 64), q.config.img_context_token_id)], dim=1)
    px = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = ref(ids, px).logits, q(ids, px).logits
    assert sqnr_db(a, b) > 30
    out = q.save_pretrained(tmp_path / "int8")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == q.quantization_config[
        "method"]
    again = load(out, dtype=torch.float32)                        # no flag needed: config.json says int8
    sd_q, sd_a = q.state_dict(), again.state_dict()
    assert sd_q.keys() == sd_a.keys()
    assert all(sd_q[k].dtype == sd_a[k].dtype and torch.equal(sd_q[k], sd_a[k]) for k in sd_q)
    with pytest.raises(ValueError, match="already quantised"):
        load(out, quantization=Int8WeightOnly())


def test_72b_parameter_counts():
    with torch.device("meta"):
        model = NVLM(NVLMConfig.preset("nvlm-d-72b"))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model) == 79_379_593_344
    assert count(model.vision_model) == 6_052_672_640
    assert count(model.mlp1) == 620_717_056
    assert count(model.language_model) == 72_706_203_648
    sd = model.state_dict()
    assert sd["vision_model.encoder.layers.44.attn.qkv.weight"].shape == (12288, 3200)
    assert sd["vision_model.encoder.layers.44.attn.q_norm.weight"].shape == (4096,)
    assert sd["vision_model.encoder.layers.44.attn.proj.weight"].shape == (3200, 4096)
    assert sd["vision_model.embeddings.position_embedding"].shape == (1, 1025, 3200)
    assert sd["mlp1.1.weight"].shape == (29568, 12800) and sd["mlp1.3.weight"].shape == (8192, 29568)
    assert sd["language_model.lm_head.weight"].shape == (152064, 8192)
    # ViT: 4 embedding tensors + 13 per block; mlp1: 4; LLM: embed + 12 per layer + norm + lm_head
    assert len(sd) == 4 + 45 * 13 + 4 + 1 + 80 * 12 + 1 + 1 == 1556


@pytest.mark.parametrize("rounding", ["rtn", "mse"])
def test_streamed_quantisation_reads_row_blocks_and_matches_quantize_(checkpoint, monkeypatch, rounding):
    """Quantise-while-streaming reads each float weight of a quantised Linear in row blocks (never whole: the float
    weight is not held in memory) and gives exactly what quantize_ gives on the materialised model."""
    from nvlm.quant import Int4WeightOnly, QuantLinear, quantize_

    config = Int4WeightOnly(32, rounding=rounding)
    direct = load(checkpoint, dtype=torch.float32)
    quantize_(direct, config)

    max_bytes = 1024                                    # 1 KiB blocks: every tiny-d weight takes several
    monkeypatch.setattr(loading._RowBlocks.blocks, "__defaults__", (max_bytes,))
    seen = {}
    original = QuantLinear.set_weight_from_row_blocks

    def spy(self, blocks, device=None):
        sizes = []

        def recorded():
            for r0, rows in blocks:
                sizes.append(rows.numel() * loading._ST_DTYPES["BF16"].itemsize)   # bytes read from the file
                yield r0, rows
        original(self, recorded(), device)
        seen[self] = sizes

    def refuse(self, weight, bias=None):
        raise AssertionError("a float weight of a quantised Linear was materialised whole")

    monkeypatch.setattr(QuantLinear, "set_weight_from_row_blocks", spy)
    monkeypatch.setattr(QuantLinear, "set_weight_from_float", refuse)
    streamed = load(checkpoint, dtype=torch.float32, quantization=config)
    quantised = [m for m in streamed.modules() if isinstance(m, QuantLinear)]
    assert quantised and set(seen) == set(quantised)
    for m, sizes in seen.items():
        row = m.in_features * 2
        assert max(sizes) <= max(max_bytes, row)
        assert sum(sizes) == m.in_features * m.out_features * 2          # every row exactly once
    assert any(len(s) > 1 for s in seen.values())
    a, b = direct.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert streamed.quantization_config["rounding"] == rounding


def test_gptq_is_refused_while_streaming_and_reloads_exactly(checkpoint, tmp_path):
    from nvlm.quant import Int4WeightOnly, quantize_

    with pytest.raises(ValueError, match="rounding='gptq'.*calibration"):
        load(checkpoint, quantization=Int4WeightOnly(32, rounding="gptq"))
    model = load(checkpoint, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 70), generator=g)
    ids[:, 3:67] = model.config.img_context_token_id
    px = torch.randn(2, 3, 224, 224, generator=g)
    quantize_(model, Int4WeightOnly(32, rounding="gptq"), calibration=lambda m: m(ids, px))
    out = model.save_pretrained(tmp_path / "gptq")
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["rounding"] == "gptq" and block["group_size"] == 32
    again = load(out, dtype=torch.float32)                           # no calibration needed to reload
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
