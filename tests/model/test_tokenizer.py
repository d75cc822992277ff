"""The test tokenizer (nvlm/tokenizer.py): Qwen2 structure, added tokens after the BPE vocab, determinism."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers

from nvlm.tokenizer import (
    BPE_VOCAB_SIZE,
    CHAT_TEMPLATE,
    NON_SPECIAL_ADDED_TOKENS,
    SPECIAL_TOKENS,
    build_tokenizer,
    save_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_deterministic_in_process(tok):
    assert build_tokenizer().to_str() == tok.to_str()


def test_deterministic_across_processes(tok, tmp_path):
    # A fresh interpreter with a different hash seed must write the very same tokenizer.json bytes.
    code = (
        "import sys; from nvlm.tokenizer import build_tokenizer, save_tokenizer; "
        "save_tokenizer(build_tokenizer(), sys.argv[1])"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], check=True, env=env, cwd=REPO)
    save_tokenizer(tok, tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        a = hashlib.sha256((tmp_path / "a" / name).read_bytes()).hexdigest()
        b = hashlib.sha256((tmp_path / "b" / name).read_bytes()).hexdigest()
        assert a == b, name


def test_vocabulary_layout(tok):
    added = list(SPECIAL_TOKENS) + list(NON_SPECIAL_ADDED_TOKENS)
    assert len(added) == 22  # Qwen2.5's list, 151643..151664 in the real tokenizer
    assert tok.get_vocab_size(with_added_tokens=False) == BPE_VOCAB_SIZE
    assert tok.get_vocab_size(with_added_tokens=True) == BPE_VOCAB_SIZE + 22
    # All 256 byte symbols are in the BPE vocabulary, so any text can be encoded.
    vocab = tok.get_vocab(with_added_tokens=False)
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    # Added tokens are appended after the BPE vocabulary, in Qwen2.5's order, with Qwen2.5's special flags.
    decoder = tok.get_added_tokens_decoder()
    for offset, content in enumerate(added):
        token_id = BPE_VOCAB_SIZE + offset
        assert tok.token_to_id(content) == token_id
        assert decoder[token_id].content == content
        assert decoder[token_id].special == (content in SPECIAL_TOKENS)


def test_qwen2_pretokenization_of_image_tags(tok):
    # vLLM's note on Qwen2: "<Image><tile" tokenizes as "<Image" "><" "tile".
    assert tok.encode("<Image><tile_1>").tokens[:3] == ["<Image", "><", "tile"]
    # Tags are ordinary text: a few BPE tokens each, none of them an added token.
    n_bpe = tok.get_vocab_size(with_added_tokens=False)
    for tag in ["<Image>", "</Image>", "<tile_global_thumbnail>"] + [f"<tile_{k}>" for k in range(1, 7)]:
        ids = tok.encode(tag).ids
        assert 2 <= len(ids) <= 6, (tag, tok.encode(tag).tokens)
        assert all(i < n_bpe for i in ids)
        assert tok.decode(ids) == tag
    # Digits are split one by one (Qwen2's \p{N} rule).
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]


def test_no_bos_and_specials_in_text(tok):
    ids = tok.encode("hello").ids
    assert tok.token_to_id("<|endoftext|>") not in ids
    enc = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert enc.ids[0] == tok.token_to_id("<|im_start|>")
    assert enc.ids[-1] == tok.token_to_id("<|im_end|>")


@pytest.mark.parametrize(
    "text",
    ["What colour is the square?", "héllo wörld — 😀 ∑x²", "  two  spaces\n\nand\ttabs ", "There are 12 red stars."],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text).ids) == text


def test_save_tokenizer(tok, tmp_path):
    save_tokenizer(tok, tmp_path)
    again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert again.to_str() == tok.to_str()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None
    assert config["added_tokens_decoder"][str(tok.token_to_id("<|vision_pad|>"))]["content"] == "<|vision_pad|>"


def test_transformers_loads_it(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == tok.token_to_id("<|im_end|>")
    assert hf.pad_token_id == tok.token_to_id("<|endoftext|>")
    text = "<|im_start|>user\n<Image><tile_1>What colour is it?</Image><|im_end|>\n"
    assert hf(text)["input_ids"] == tok.encode(text).ids
    prompt = hf.apply_chat_template(
        [{"role": "user", "content": "<image>\nHi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|im_start|>system\nFollow the user's instruction and answer questions.<|im_end|>\n"
        "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "{% for message in messages %}" in CHAT_TEMPLATE
