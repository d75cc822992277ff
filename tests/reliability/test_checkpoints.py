"""Bad checkpoints fail early with a ValueError naming the file, the key and expected vs found; a failed load or an
interrupted save never leaves anything that looks like a checkpoint. Cases already covered in
tests/model/test_loading.py are listed in tests/reliability/__init__.py and not repeated here."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from nvlm import cli, loading
from nvlm.model import NVLM
from nvlm.quant import Int4WeightOnly

from .helpers import INDEX, edit_json, rewrite_shard, tree_digest, weight_map

KEY = "language_model.model.layers.1.self_attn.k_proj.bias"          # [32] in tiny-d
SHARD3 = "model-00003-of-00003.safetensors"


def load(folder, **kw):
    return NVLM.from_pretrained(folder, progress=False, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Damaged files
# ----------------------------------------------------------------------------------------------------------------
def _cut(n):
    return lambda data: data[:n(len(data))]


def _flip_header(data):
    out = bytearray(data)
    out[8:24] = b"#" * 16                  # the JSON header starts at byte 8
    return bytes(out)


@pytest.mark.parametrize("damage", [
    pytest.param(lambda data: b"", id="zero-bytes"),
    pytest.param(_cut(lambda n: 5), id="shorter-than-length-prefix"),
    pytest.param(_cut(lambda n: 40), id="cut-inside-header"),
    pytest.param(_cut(lambda n: n // 2), id="cut-in-half"),
    pytest.param(_cut(lambda n: n - 1), id="last-byte-missing"),
    pytest.param(lambda data: data + b"\0" * 7, id="trailing-garbage"),
    pytest.param(_flip_header, id="corrupt-header"),
    pytest.param(lambda data: b"\xff" * 8 + data[8:], id="absurd-header-length"),
    pytest.param(lambda data: b"GIF89a" + bytes(range(256)) * 4, id="not-safetensors"),
])
def test_damaged_shard_names_the_file_and_changes_nothing(ckpt, damage):
    shard = ckpt / SHARD3
    shard.write_bytes(damage(shard.read_bytes()))
    before = tree_digest(ckpt)
    with pytest.raises(ValueError, match=rf"shard '.*{SHARD3}' cannot be read as safetensors"):
        load(ckpt)
    assert tree_digest(ckpt) == before                    # a failed load writes nothing anywhere


def test_pickle_disguised_as_safetensors_is_not_unpickled(ckpt, monkeypatch):
    """A pickle renamed to .safetensors is rejected by the safetensors parser; pickle is never called."""
    calls = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    with open(ckpt / SHARD3, "wb") as f:
        pickle.dump({KEY: [0.0] * 32}, f)
    with pytest.raises(ValueError, match=rf"'.*{SHARD3}' cannot be read as safetensors"):
        load(ckpt)
    assert calls == []


def test_pickle_only_folder_is_refused_without_unpickling(ckpt, monkeypatch):
    for p in ckpt.glob("model*"):
        p.unlink()
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({KEY: [0.0] * 32}, f)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    with pytest.raises(ValueError, match="'pytorch_model.bin' is a pickle-based format; only safetensors"):
        load(ckpt)


@pytest.mark.parametrize("name", ["model-00004-of-00003.safetensors", "elsewhere.safetensors"])
def test_index_names_an_absent_file(ckpt, name):
    edit_json(ckpt / INDEX, lambda d: d["weight_map"].update({KEY: name}))
    with pytest.raises(ValueError, match=rf"shard '.*{name}' is missing \(listed in {INDEX} for 1 keys, e.g. "
                                         rf"'{KEY}'\)"):
        load(ckpt)


@pytest.mark.parametrize("name, match", [
    ("../model-00001-of-00003.safetensors", "maps to an invalid file"),
    ("/etc/passwd", "maps to an invalid file"),
    ("weights.npz", "not a .safetensors file"),
    ("pytorch_model.pt", "pickle-based format"),
])
def test_index_names_a_file_outside_or_of_the_wrong_kind(ckpt, name, match):
    edit_json(ckpt / INDEX, lambda d: d["weight_map"].update({KEY: name}))
    with pytest.raises(ValueError, match=rf"key '{KEY}'.*{match}|{match}.*'{KEY}'|'{KEY}'\) is a {match}"):
        load(ckpt)


@pytest.mark.parametrize("text, match", [("{not json", "is not valid JSON"), ('{"metadata": {}}', "no 'weight_map'"),
                                         ("[]", "no 'weight_map'")])
def test_bad_index_file(ckpt, text, match):
    (ckpt / INDEX).write_text(text)
    with pytest.raises(ValueError, match=rf"index '.*{INDEX}' .*{match}"):
        load(ckpt)


# ----------------------------------------------------------------------------------------------------------------
# Wrong dtype; config disagreeing with the weights
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, st_name", [(torch.int32, "I32"), (torch.bool, "BOOL"), (torch.uint8, "U8")])
def test_float_weight_stored_as_integers(ckpt, dtype, st_name):
    name = rewrite_shard(ckpt, KEY, lambda t: t.update({KEY: torch.zeros(32, dtype=dtype)}))
    with pytest.raises(ValueError, match=rf"key '{KEY}' in '.*{name}' has dtype {st_name}, expected a "
                                         rf"floating-point dtype"):
        load(ckpt)


def test_float_weight_in_another_float_dtype_is_cast(ckpt):
    """Not an error: the published shards mix bf16 and fp32 (spec §2); values are read as stored, then cast."""
    exact = torch.linspace(-1, 1, 32, dtype=torch.float64)
    rewrite_shard(ckpt, KEY, lambda t: t.update({KEY: exact}))
    model = load(ckpt, dtype=torch.float32)
    assert torch.equal(model.get_parameter(KEY), exact.float())


@pytest.mark.parametrize("edit, match", [
    # hidden size 64 -> 96: the first tensor checked already disagrees; the message says which and how
    (lambda c: c["llm_config"].update(hidden_size=96),
     r"key '.*' in '.*model-0000\d-of-00003.safetensors' has shape \[\d+(, \d+)*\], expected \[\d+(, \d+)*\]"),
    (lambda c: c["llm_config"].update(vocab_size=2048),
     r"key 'language_model\.(model\.embed_tokens|lm_head)\.weight' in '.*' has shape \[1024, 64\], expected "
     r"\[2048, 64\]"),
    (lambda c: c["llm_config"].update(num_hidden_layers=3),
     rf"'.*{INDEX}' lacks key 'language_model\.model\.layers\.2\..*' \(expected shape"),
    (lambda c: c["llm_config"].update(num_hidden_layers=1),
     r"key 'language_model\.model\.layers\.1\..*' \(in 'model-0000\d-of-00003.safetensors'\) is not a parameter "
     r"of NVLM-D"),
    (lambda c: c["vision_config"].update(intermediate_size=512),
     r"key 'vision_model\.encoder\.layers\.\d\.mlp\.fc\d\.(weight|bias)' in '.*' has shape \[\d+(, \d+)?\], "
     r"expected \[\d+(, \d+)?\]"),
])
def test_config_disagreeing_with_the_weights(ckpt, edit, match):
    edit_json(ckpt / "config.json", edit)
    with pytest.raises(ValueError, match=match):
        load(ckpt)


# ----------------------------------------------------------------------------------------------------------------
# Quantised checkpoints
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4_checkpoint(checkpoint, tmp_path_factory):
    model = load(checkpoint, quantization=Int4WeightOnly(group_size=32))
    return model.save_pretrained(tmp_path_factory.mktemp("q") / "int4-g32")


@pytest.fixture
def qckpt(int4_checkpoint, tmp_path):
    return shutil.copytree(int4_checkpoint, tmp_path / "q")


def _set_quant(**fields):
    return lambda c: c["quantization_config"].update(fields)


@pytest.mark.parametrize("edit, match", [
    (_set_quant(method="int3_weight_only"), r"key 'method' must be one of .*, got 'int3_weight_only'"),
    (_set_quant(method=None), r"key 'method' must be one of .*, got None"),
    (_set_quant(group_size=100), r"argument 'group_size' must be one of \(32, 64, 128\), got 100"),
    (_set_quant(bits=3), r"method 'int4_weight_only' has bits=4, got bits=3"),
    (lambda c: c.update(quantization_config="int4"), r"it must be a JSON object, got str"),
])
def test_quantised_checkpoint_with_unusable_config(qckpt, edit, match):
    edit_json(qckpt / "config.json", edit)
    with pytest.raises(ValueError, match=rf"checkpoint '.*config.json' has an unusable 'quantization_config': "
                                         rf".*{match}"):
        load(qckpt)


def test_quantised_checkpoint_with_a_group_size_its_tensors_do_not_have(qckpt):
    """A valid group size that disagrees with the stored scales (g64 declared, g32 stored) is a shape error."""
    edit_json(qckpt / "config.json", _set_quant(group_size=64))
    with pytest.raises(ValueError, match=r"key '.*\.(?:scales|zeros)' in '.*' has shape \[(\d+), (\d+)\], expected "
                                         r"\[\1, \d+\]"):
        load(qckpt)


def test_quantised_weights_with_the_wrong_integer_dtype(qckpt):
    """int4 packed weights are uint8: an int8 tensor of the same shape would silently change every weight."""
    key = next(k for k in weight_map(qckpt) if k.endswith(".qweight"))
    name = rewrite_shard(qckpt, key, lambda t: t.update({key: t[key].view(torch.int8)}))
    with pytest.raises(ValueError, match=rf"key '{key}' in '.*{name}' has dtype I8, expected torch.uint8 dtype"):
        load(qckpt)


def test_float_checkpoint_declared_quantised(ckpt):
    """config.json claims int4 but the shards hold float weights: named key, nothing loaded."""
    edit_json(ckpt / "config.json", lambda c: c.update(quantization_config=Int4WeightOnly(group_size=32).to_dict()))
    with pytest.raises(ValueError, match=r"key '.*\.weight' \(in 'model-0000\d-of-00003.safetensors'\) is not a "
                                         r"parameter"):
        load(ckpt)


# ----------------------------------------------------------------------------------------------------------------
# Not a checkpoint
# ----------------------------------------------------------------------------------------------------------------
def test_folders_that_are_not_checkpoints(tmp_path, checkpoint):
    with pytest.raises(ValueError, match=r"checkpoint folder '.*nowhere' does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"checkpoint folder '.*file.txt' is a file, not a folder"):
        load(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"'.*empty' is not an NVLM checkpoint folder: it has no config.json"):
        load(empty)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(ValueError, match="is not an NVLM checkpoint folder"):
        load(photos)
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(checkpoint / "config.json", config_only)
    with pytest.raises(ValueError, match=rf"'.*config-only' has neither {INDEX} nor model.safetensors"):
        load(config_only)
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(ValueError, match="model_type.*bert"):
        load(other)


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes: save_pretrained and `nvlm quantize`
# ----------------------------------------------------------------------------------------------------------------
def _fail_on_call(n, exc):
    calls = []

    def save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == n:
            raise exc
        return save_file(tensors, filename, metadata=metadata)

    return save


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError("No space left on device")], ids=["ctrl-c", "disk"])
def test_interrupted_save_leaves_nothing(checkpoint, tmp_path, monkeypatch, exc):
    model = load(checkpoint)
    monkeypatch.setattr(loading, "save_file", _fail_on_call(2, exc))
    with pytest.raises(type(exc)):
        model.save_pretrained(tmp_path / "out", num_shards=3)
    assert list(tmp_path.iterdir()) == []                   # neither out/ nor a hidden .out.partial-* folder


def test_save_interrupted_after_the_shards_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    """All shards written, then the config fails: still no folder (the rename is the very last step)."""
    model = load(checkpoint)
    monkeypatch.setattr(loading, "_dtype_name", lambda state: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "out", num_shards=3)
    assert list(tmp_path.iterdir()) == []


def test_killed_save_never_looks_complete(checkpoint, tmp_path, monkeypatch):
    """A process killed mid-save cannot clean up (simulated: cleanup disabled). What it leaves is a hidden
    '.out.partial-<pid>' folder; 'out' itself does not exist, so nothing can load it as a checkpoint."""
    model = load(checkpoint)
    monkeypatch.setattr(loading, "save_file", _fail_on_call(3, KeyboardInterrupt()))
    monkeypatch.setattr(loading.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "out", num_shards=3)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.partial-")
    assert not (tmp_path / left[0] / INDEX).exists()        # the index is written after every shard
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "out")


def test_interrupted_overwrite_keeps_the_old_checkpoint(checkpoint, tmp_path, monkeypatch):
    model = load(checkpoint)
    out = model.save_pretrained(tmp_path / "out", num_shards=2)
    before = tree_digest(out)
    monkeypatch.setattr(loading, "save_file", _fail_on_call(1, OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out, num_shards=3, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert tree_digest(out) == before


def test_nvlm_quantize_interrupted_leaves_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "int8"
    monkeypatch.setattr(loading, "save_file", _fail_on_call(1, OSError("No space left on device")))
    assert cli.main(["quantize", "--model", str(checkpoint), "--out", str(out), "--quant", "int8"]) == 2
    err = capsys.readouterr().err                           # the progress bar, then the one-line error
    assert err.endswith("\nnvlm: error: No space left on device\n") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(loading, "save_file", _fail_on_call(1, KeyboardInterrupt()))
    assert cli.main(["quantize", "--model", str(checkpoint), "--out", str(out), "--quant", "int8"]) == 130
    err = capsys.readouterr().err
    assert err.endswith("\nnvlm: interrupted\n") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()                                       # and uninterrupted, it works
    assert cli.main(["quantize", "--model", str(checkpoint), "--out", str(out), "--quant", "int8"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "int8_weight_only"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]


def test_nvlm_quantize_from_a_bad_checkpoint_writes_nothing(ckpt, tmp_path, capsys):
    (ckpt / SHARD3).write_bytes(b"")
    before = tree_digest(ckpt)
    out = tmp_path / "dest" / "int4"
    assert cli.main(["quantize", "--model", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nvlm: error: checkpoint shard ") and SHARD3 in err
    assert not out.exists() and not (tmp_path / "dest").exists()
    assert tree_digest(ckpt) == before
