"""A small, deterministic Qwen2-like tokenizer for tests and tiny checkpoints.

The real NVLM-D-72B ships Qwen2's byte-level BPE (151,643 BPE tokens + 22 added tokens, spec §5). Tests cannot
download it, so `build_tokenizer()` trains a tokenizer with the same *structure* on a small corpus embedded here:

- normalizer NFC; pre-tokenizer = Qwen2's split regex (Isolated) followed by ByteLevel without prefix space;
  ByteLevel decoder and post-processor; BPE without unk / byte fallback; no BOS is added.
- vocabulary: the 256 byte symbols + BPE merges, 1000 BPE tokens in all (`BPE_VOCAB_SIZE`), then the Qwen2.5 list
  of added tokens appended after it (`<|endoftext|>` = 1000, `<|im_start|>` = 1001, `<|im_end|>` = 1002, ...,
  `<|vision_pad|>` = 1011, ...). Code must look special ids up by name (`token_to_id`), never hard-code them: the
  real tokenizer numbers them 151643.. instead.
- the image tag strings `<Image>`, `</Image>`, `<tile_1>`..`<tile_6>`, `<tile_global_thumbnail>` are ordinary
  text, split by BPE into a few tokens, as in Qwen2 (e.g. `<Image><tile_1>` -> `<Image` `><` `tile` `_` `1` `>`).

Determinism: the corpus is a fixed string and the `tokenizers` BPE trainer breaks count ties by token ids, so
`build_tokenizer().to_str()` is byte-identical across runs and processes (tested).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = [
    "BPE_VOCAB_SIZE",
    "QWEN2_SPLIT_PATTERN",
    "SPECIAL_TOKENS",
    "NON_SPECIAL_ADDED_TOKENS",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "save_tokenizer",
    "training_corpus",
]

# Qwen2's pre-tokenizer regex, verbatim from its tokenizer.json: contractions, letter runs with one optional
# leading non-letter, single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BPE_VOCAB_SIZE = 1000  # 256 byte symbols + 744 merges

# Qwen2.5's added tokens in id order (151643..151656 are special, 151657..151664 are ordinary added tokens).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
NON_SPECIAL_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

SYSTEM_MESSAGE = "Follow the user's instruction and answer questions."

# ChatML with the paper's system message as default (spec §5); equals NVLMProcessor.build_prompt for one user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_MESSAGE + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_PROSE = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe the image in detail. What is shown in this picture? Please answer the question.
Answer the question using a single word or phrase. Look at the image and answer yes or no.
Is there a cat in the image? Yes, there is. Is there a dog? No, there is not.
How many objects are there? Count the objects and give the number. The answer is 3.
Read the text in the image. What does the sign say? The sign says STOP.
Which colour is the largest shape? Where is the small circle? It is on the left, next to the big square.
The photo shows a red car parked on a street near a green tree under a blue sky.
Follow the user's instruction and answer questions. You are a helpful assistant.
I can't see it. It's a triangle. They're both blue. We've counted them. I'm sure. You'll see. He'd know.
The chart has a title, an x axis and a y axis. The table has rows and columns. The document is a page of text.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 25 32 42 64 100 128 256 448 512 1000 1024 2024 3.14 0.5
In the morning the people of the small town walked along the river to the market, where farmers sold fresh
bread, apples, cheese, fish and flowers. Children played games in the park while their parents talked about the
weather, the news and the price of vegetables. Later that afternoon a storm arrived from the mountains; thunder
rolled across the valley, heavy rain filled the streets, and everyone hurried home before the bridge was closed.
Scientists measure temperature, pressure and speed with careful instruments, then write reports that explain
their results to other researchers. A good experiment is simple, repeatable and clearly documented.
The kitchen has a wooden table, four chairs, a window with white curtains, a clock on the wall and a plant.
On the desk there is a laptop, a keyboard, a mouse, a cup of coffee, two books, a phone and a pair of glasses.
The train leaves the station at seven o'clock and arrives in the city about an hour later, just after eight.
Animals in the picture: a horse, a cow, a sheep, a bird, an elephant, a giraffe, a zebra, a lion and a bear.
People are wearing hats, jackets, shirts, trousers, dresses and shoes; one person is holding an umbrella.
The building is tall and modern, made of glass and steel, with many windows reflecting the evening light.
Vehicles: bicycle, motorcycle, bus, truck, boat, airplane. Places: beach, forest, desert, garden, kitchen, office.
Questions often ask who, what, when, where, why, which and how; answers should be short, correct and polite.
Left, right, top, bottom, middle, centre, above, below, behind, in front of, inside, outside, between, around.
Big, small, large, tiny, long, short, wide, narrow, bright, dark, light, heavy, empty, full, open, closed.
First, second, third, fourth, fifth, sixth, seventh, eighth, ninth, tenth; once, twice, half, double, none, all.
"""

_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey", "gray")
_SHAPES = ("circle", "square", "triangle", "rectangle", "star", "line", "dot", "box", "ball", "cube", "heart")
_COUNTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
_TILE_TAGS = tuple(f"<tile_{k}>" for k in range(1, 7)) + ("<tile_global_thumbnail>",)


def training_corpus() -> list[str]:
    """The fixed training corpus: prose, counting/colour/shape sentences, ChatML and image-tag text."""
    lines = _PROSE.splitlines()
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            n = (i + j) % len(_COUNTS)
            lines.append(f"There are {_COUNTS[n]} {colour} {shape}s. Is the {shape} {colour}? Yes. {n} {shape}s.")
            lines.append(f"What colour is the {shape}? The {shape} is {colour}. Is it {_COLOURS[i - 1]}? No.")
        lines.append(f"How many {colour} objects are there? There are {_COUNTS[i]}, so the answer is {i}.")
    lines.append(" ".join(_COUNTS) + ". " + " ".join(str(k) for k in range(30)))
    # ChatML turns as the processor writes them (the special tokens themselves are added after training).
    for q in ("Describe the image.", "What is in the picture?", "How many circles are there?"):
        lines.append(f"system\n{SYSTEM_MESSAGE}\nuser\n<image>\n{q}\nassistant\nThe answer is yes.\n")
    # Image tags exactly as they appear in expanded prompts (between runs of <|vision_pad|>), several times so
    # that BPE learns a few multi-character pieces for them, as Qwen2 has.
    for n in range(1, 7):
        tags = list(_TILE_TAGS[: n - 1]) + ["<tile_global_thumbnail>"] if n > 1 else ["<tile_global_thumbnail>"]
        lines.append("<Image>" + "".join(tags) + "</Image>\nWhat is this?")
        lines.extend(tags)
    return lines


def build_tokenizer() -> Tokenizer:
    """Train the test tokenizer (deterministic; ~0.1 s). Returns a `tokenizers.Tokenizer`."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    # Added tokens go after the BPE vocabulary, in Qwen2.5's order; normalized=False like Qwen's tokenizer.json.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED_TOKENS])
    return tok


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> None:
    """Write tokenizer.json and a Qwen2-style tokenizer_config.json (eos `<|im_end|>`, pad `<|endoftext|>`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"), pretty=True)
    added = {}
    for token_id, added_token in sorted(tok.get_added_tokens_decoder().items()):
        added[str(token_id)] = {
            "content": added_token.content,
            "lstrip": added_token.lstrip,
            "normalized": added_token.normalized,
            "rstrip": added_token.rstrip,
            "single_word": added_token.single_word,
            "special": added_token.special,
        }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
