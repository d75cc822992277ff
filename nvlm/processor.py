"""NVLM-D processor: images + question -> `input_ids` with image slots, `pixel_values` (spec §4, §5).

Prompt (ChatML, the paper's SFT template; one user turn):

    <|im_start|>system\\nFollow the user's instruction and answer questions.<|im_end|>\\n
    <|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n

Each `<image>` placeholder (one per image, in order) is expanded to

    <Image> <tile_1> P..P <tile_2> P..P ... <tile_n> P..P <tile_global_thumbnail> P..P </Image>

where P..P is `tokens_per_tile` (= (S / patch)^2 * downsample^2 = 256 for NVLM-D-72B) copies of `<|vision_pad|>`,
the n regular tiles are tagged `<tile_1>`..`<tile_n>` and the thumbnail `<tile_global_thumbnail>`; an image that is
a single tile has no thumbnail and its one tile is tagged `<tile_global_thumbnail>`. The tags are ordinary text
(a few BPE tokens each); only `<|vision_pad|>` ids are image slots, which the model overwrites in order.

Tokenisation gives the same ids as encoding the fully expanded prompt in one pass with the tokenizer (special
tokens split out first, the text between them byte-level BPE'd), with one deliberate difference: text the caller
did not write as structure can never become a special token. Concretely the prompt is kept as a list of pieces -
special-token ids placed by this module, and text - and each maximal run of text is encoded with a copy of the
tokenizer that has no special tokens. A question containing the literal string `<|vision_pad|>` or `<|im_end|>`
is therefore tokenised as those characters, so it cannot add image slots or close the user turn.

Two kinds of `text`:
- a bare question (the default; also any text that does not *start* with `<|im_start|>`): wrapped in the template
  above. Without any `<image>` placeholder, `<image>\\n` is put before the question once per image (HF `chat()`);
  otherwise the placeholders are expanded in place. Every character of the question is plain text.
- an already formatted ChatML prompt (text starting with `<|im_start|>`, or `formatted=True`): the caller is
  trusted with the turn structure, so `<|im_start|>`, `<|im_end|>` and `<|endoftext|>` in it are special tokens;
  all other special-token strings (`<|vision_pad|>` included) stay plain text. Placeholders are never added.

The number of `<image>` placeholders must equal the number of images. An empty question is allowed when there is
at least one image (the prompt is then just the image); with no image and no text `__call__` raises.

Modes (`mode=`, default "D"; `from_pretrained` takes it from config.json's `arch`): "D" as above. "X" and "H"
(NVLM-X / NVLM-H, see `nvlm.xattn`) write the image text without image slots and return the cross-attention
layout (`inputs["xattn_layout"]`, an `nvlm.xattn.XAttnLayout`) beside `input_ids`:

    X: <Image> <tile_1> <tile_2> ... <tile_global_thumbnail> </Image>          (tags only; tiles go to the memory)
    H: <Image> <tile_global_thumbnail> P..P </Image>                           (thumbnail slots, as in D)

In these modes each tile tag is BPE-encoded on its own (Megatron's convention), so every token is either a tag's
or ordinary text and the per-token ranges are exact; `<Image>` / `</Image>` stay in their surrounding text runs.

Special ids are looked up by name in the tokenizer (`<|im_end|>` 151645, `<|vision_pad|>` 151654 in the real
Qwen2 tokenizer; other numbers in the test tokenizer), never hard-coded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from nvlm.image import DEFAULT_MAX_PIXELS, load_image, preprocess

__all__ = [
    "NVLMProcessor",
    "SYSTEM_MESSAGE",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN",
    "tile_tags",
    "expand_image_placeholder",
]

SYSTEM_MESSAGE = "Follow the user's instruction and answer questions."  # paper App. E
IMAGE_PLACEHOLDER = "<image>"  # in prompts; one per image
IMAGE_TOKEN = "<|vision_pad|>"  # image slot (img_context_token)
IMAGE_START, IMAGE_END = "<Image>", "</Image>"
THUMBNAIL_TAG = "<tile_global_thumbnail>"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
_CHATML_CONTROL = (IM_START, IM_END, END_OF_TEXT)  # honoured in caller-formatted prompts

# A prompt under construction: text (str) and special-token ids (list[int]) in order.
Piece = str | list


def tile_tags(num_tiles: int) -> list[str]:
    """Tags of an image of `num_tiles` tiles (thumbnail included): `<tile_1>`.. `<tile_{n-1}>` + thumbnail tag."""
    if num_tiles < 1:
        raise ValueError(f"num_tiles must be >= 1, got {num_tiles}")
    return [f"<tile_{k}>" for k in range(1, num_tiles)] + [THUMBNAIL_TAG]


def expand_image_placeholder(num_tiles: int, tokens_per_tile: int, image_token: str = IMAGE_TOKEN) -> str:
    """The text an `<image>` placeholder becomes (for display and one-pass comparisons)."""
    body = "".join(tag + image_token * tokens_per_tile for tag in tile_tags(num_tiles))
    return IMAGE_START + body + IMAGE_END


def _side(value, key: str) -> int:
    """An int, or a [n, n] list as some configs store image sizes."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"config key {key!r} must be square, got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config key {key!r} must be a positive integer, got {value!r}")
    return value


class NVLMProcessor:
    """Turns images + text into NVLM-D inputs; decodes generated ids.

    Args:
        tokenizer: a `tokenizers.Tokenizer`, or the path of a tokenizer.json.
        image_size: tile side S (config `force_image_size`, else `vision_config.image_size`).
        patch_size, downsample_ratio: give `tokens_per_tile` = (S / patch_size)^2 * downsample_ratio^2.
        min_dynamic_patch, max_dynamic_patch, use_thumbnail: tiling (spec §4).
        template: config `template`, kept for reference; the format is always ChatML (see module docstring).
        max_context: longest prompt accepted (llm_config.max_position_embeddings).
        system_message: text of the system turn; None or "" leaves the system turn out.
        max_pixels: decompression-bomb cap passed to `nvlm.image.load_image`.
        mode: "D" (NVLM-D image slots), "X" or "H" (cross-attention layouts; module docstring).
    """

    def __init__(
        self,
        tokenizer: Tokenizer | str | os.PathLike,
        *,
        image_size: int = 448,
        patch_size: int = 14,
        downsample_ratio: float = 0.5,
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 6,
        use_thumbnail: bool = True,
        template: str | None = "chatml",
        max_context: int = 32768,
        system_message: str | None = SYSTEM_MESSAGE,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        mode: str = "D",
    ):
        if mode not in ("D", "X", "H"):
            raise ValueError(f"mode must be 'D', 'X' or 'H', got {mode!r}")
        self.mode = mode
        if isinstance(tokenizer, (str, os.PathLike)):
            path = os.fspath(tokenizer)
            try:
                tokenizer = Tokenizer.from_file(path)
            except Exception as e:  # tokenizers raises its own Exception type
                raise ValueError(f"cannot read tokenizer file {path!r}: {e}") from e
        if not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"tokenizer must be a tokenizers.Tokenizer or a tokenizer.json path, got {tokenizer!r}")
        self.tokenizer = tokenizer

        self.image_size = _side(image_size, "image_size")
        self.patch_size = _side(patch_size, "patch_size")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        merged = self.image_size // self.patch_size * float(downsample_ratio)  # tokens per side after the shuffle
        if not downsample_ratio > 0 or merged < 1 or merged != int(merged):
            raise ValueError(
                f"downsample_ratio ({downsample_ratio}) must turn the {self.image_size // self.patch_size} patches "
                f"per side into a whole number of tokens"
            )
        self.downsample_ratio = float(downsample_ratio)
        self.tokens_per_tile = int(merged) ** 2
        for key, value in (("min_dynamic_patch", min_dynamic_patch), ("max_dynamic_patch", max_dynamic_patch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if min_dynamic_patch > max_dynamic_patch:
            raise ValueError(f"min_dynamic_patch ({min_dynamic_patch}) exceeds max_dynamic_patch ({max_dynamic_patch})")
        self.min_dynamic_patch, self.max_dynamic_patch = min_dynamic_patch, max_dynamic_patch
        self.use_thumbnail = bool(use_thumbnail)
        self.template = template
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
            raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
        self.max_context = max_context
        self.max_pixels = max_pixels

        self.image_token_id = self._require(IMAGE_TOKEN)
        self.im_start_id = self._require(IM_START)
        self.eos_token_id = self._require(IM_END)  # generation stops here (llm_config eos 151645)
        self.pad_token_id = tokenizer.token_to_id(END_OF_TEXT)
        self.stop_token_ids = [self.eos_token_id] + ([self.pad_token_id] if self.pad_token_id is not None else [])
        self._control_ids = {t: i for t in _CHATML_CONTROL if (i := tokenizer.token_to_id(t)) is not None}
        self._control_re = re.compile("(" + "|".join(re.escape(t) for t in self._control_ids) + ")")

        self.system_message = system_message or None
        if self.system_message is not None:
            bad = [s for s in (IMAGE_PLACEHOLDER, *self._control_ids) if s in self.system_message]
            if bad:
                raise ValueError(f"system_message must not contain {bad}")
        self._plain = self._plain_text_tokenizer(tokenizer)
        #: False writes an image as `<Image>` + image slots + `</Image>` with no `<tile_k>` / thumbnail tags (the
        #: paper's tile-tag ablation; `nvlm train --no-tile-tags`). NVLM-D models are trained with the tags.
        self.use_tile_tags = True

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> NVLMProcessor:
        """Read `path`/tokenizer.json and `path`/config.json (NVLM-D layout); keyword arguments override."""
        folder = Path(path)
        tok_path, cfg_path = folder / "tokenizer.json", folder / "config.json"
        for p in (tok_path, cfg_path):
            if not p.is_file():
                raise ValueError(f"NVLMProcessor.from_pretrained: file {str(p)!r} does not exist")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"config file {str(cfg_path)!r} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"config file {str(cfg_path)!r} must hold a JSON object")
        vision = cfg.get("vision_config") or {}
        llm = cfg.get("llm_config") or cfg.get("text_config") or {}
        image_size = cfg.get("force_image_size") or vision.get("image_size", 448)
        kwargs = dict(
            image_size=_side(image_size, "force_image_size / vision_config.image_size"),
            patch_size=_side(vision.get("patch_size", 14), "vision_config.patch_size"),
            downsample_ratio=cfg.get("downsample_ratio", 0.5),
            min_dynamic_patch=cfg.get("min_dynamic_patch", 1),
            max_dynamic_patch=cfg.get("max_dynamic_patch", 6),
            use_thumbnail=cfg.get("use_thumbnail", True),
            template=cfg.get("template", "chatml"),
            max_context=llm.get("max_position_embeddings", 32768),
        )
        arch = cfg.get("arch") or {"NVLM_X": "X", "NVLM_H": "H"}.get(cfg.get("model_type"), "D")
        if arch in ("X", "H"):
            kwargs["mode"] = arch
        if cfg.get("dynamic_image_size") is False:  # InternVL: one tile, the whole image resized to S x S
            kwargs.update(min_dynamic_patch=1, max_dynamic_patch=1)
        kwargs.update(overrides)
        return cls(str(tok_path), **kwargs)

    def _require(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token!r} token, which NVLM-D needs")
        return token_id

    @staticmethod
    def _plain_text_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
        """A copy of `tokenizer` without special added tokens (and never with the ChatML/image ones), so that text
        run through it is byte-level BPE only. Ordinary added tokens (Qwen2.5's `<tool_call>`...) stay, as the
        one-pass tokenisation would produce them."""
        data = json.loads(tokenizer.to_str())
        keep = [
            t
            for t in data.get("added_tokens", [])
            if not t.get("special", False) and t["content"] not in (*_CHATML_CONTROL, IMAGE_TOKEN)
        ]
        data["added_tokens"] = keep
        return Tokenizer.from_str(json.dumps(data))

    # -- prompt ------------------------------------------------------------------------------------------------

    def build_prompt(self, question: str, num_images: int = 0) -> str:
        """The ChatML prompt (placeholders not yet expanded) that `__call__` builds for a bare question."""
        return "".join(p if isinstance(p, str) else self.tokenizer.decode(p, skip_special_tokens=False)
                       for p in self._bare_pieces(question, num_images))

    def _bare_pieces(self, question: str, num_images: int) -> list[Piece]:
        if not isinstance(question, str):
            raise ValueError(f"text must be a str, got {type(question).__name__}")
        found = question.count(IMAGE_PLACEHOLDER)
        if found == 0 and num_images:
            question = (IMAGE_PLACEHOLDER + "\n") * num_images + question
        elif found != num_images:
            raise ValueError(
                f"the question has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were given; "
                f"use one placeholder per image, or none to put every image before the question"
            )
        start, end = [self.im_start_id], [self.eos_token_id]
        pieces: list[Piece] = []
        if self.system_message:
            pieces += [start, "system\n" + self.system_message, end, "\n"]
        pieces += [start, "user\n" + question, end, "\n", start, "assistant\n"]
        return pieces

    def _formatted_pieces(self, text: str, num_images: int) -> list[Piece]:
        found = text.count(IMAGE_PLACEHOLDER)
        if found != num_images:
            raise ValueError(
                f"the formatted prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) "
                f"were given; a formatted prompt needs exactly one placeholder per image"
            )
        pieces: list[Piece] = []
        for k, part in enumerate(self._control_re.split(text)):
            if k % 2:  # the captured separators: ChatML control tokens written by the caller
                pieces.append([self._control_ids[part]])
            elif part:
                pieces.append(part)
        return pieces

    def _expand(self, pieces: list[Piece], num_tiles: list[int]) -> list[Piece]:
        """Replace the `<image>` placeholders of the text pieces, in order, by tags + image-slot ids."""
        out: list[Piece] = []
        tiles = iter(num_tiles)
        pad = [self.image_token_id] * self.tokens_per_tile
        for piece in pieces:
            if not isinstance(piece, str):
                out.append(piece)
                continue
            for k, part in enumerate(piece.split(IMAGE_PLACEHOLDER)):
                if k:  # a placeholder stood before this part
                    out.append(IMAGE_START)
                    n = next(tiles)
                    if self.use_tile_tags:
                        for tag in tile_tags(n):
                            out += [tag, pad]
                    else:
                        out.append(pad * n)
                    out.append(IMAGE_END)
                out.append(part)
        return out

    def _encode(self, pieces: list[Piece]) -> list[int]:
        """Ids of the pieces: each maximal run of text is BPE-encoded in one go (as a one-pass tokenisation would
        see it between two special tokens), with the plain-text tokenizer."""
        ids: list[int] = []
        run: list[str] = []
        for piece in [*pieces, []]:
            if isinstance(piece, str):
                run.append(piece)
                continue
            if run:
                text = "".join(run)
                if text:
                    ids += self._plain.encode(text, add_special_tokens=False).ids
                run = []
            ids += piece
        return ids

    # -- main entry -----------------------------------------------------------------------------------------------

    def __call__(self, images=None, text: str = "", *, max_num: int | None = None, formatted: bool | None = None):
        """Process one prompt.

        Args:
            images: None / [] (text only), one image, or a list of images; each a path, bytes, binary file or
                PIL image (loaded with `nvlm.image.load_image`).
            text: a bare question, or a formatted ChatML prompt (see module docstring). None counts as "".
            max_num: most tiles per image for this call (default `max_dynamic_patch`).
            formatted: True/False forces how `text` is read; None: formatted iff it starts with `<|im_start|>`.

        Returns a dict: `input_ids` LongTensor [1, L]; `pixel_values` float32 [T, 3, S, S] (all images' tiles in
        order, each image's thumbnail after its tiles) or None; `image_grids` list of (cols, rows) per image;
        `num_tiles` list of tiles per image (thumbnail included).
        """
        text = "" if text is None else text
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        max_num = self.max_dynamic_patch if max_num is None else max_num
        if isinstance(max_num, bool) or not isinstance(max_num, int) or max_num < self.min_dynamic_patch:
            raise ValueError(f"max_num must be an integer >= min_dynamic_patch ({self.min_dynamic_patch}), "
                             f"got {max_num!r}")
        if not images and not text.strip():
            raise ValueError("nothing to process: no images and an empty text")

        if formatted is None:
            formatted = text.lstrip().startswith(IM_START)
        if formatted:
            pieces = self._formatted_pieces(text, len(images))
        else:
            pieces = self._bare_pieces(text, len(images))

        tensors, grids, num_tiles = [], [], []
        for src in images:
            img = load_image(src, max_pixels=self.max_pixels)
            pixel_values, grid = preprocess(img, self.min_dynamic_patch, max_num, self.image_size, self.use_thumbnail)
            tensors.append(pixel_values)
            grids.append(grid)
            num_tiles.append(pixel_values.shape[0])

        layout = None
        if self.mode == "D":
            ids = self._encode(self._expand(pieces, num_tiles))
            expected = sum(num_tiles) * self.tokens_per_tile
        else:
            ids, layout = self._encode_xattn(pieces, num_tiles)
            expected = len(layout.decoder_tiles) * self.tokens_per_tile
        slots = ids.count(self.image_token_id)
        if slots != expected:  # cannot happen unless the tokenizer's BPE itself produces the image token
            raise ValueError(f"the prompt holds {slots} {IMAGE_TOKEN} tokens but the images need {expected}")
        if len(ids) > self.max_context:
            raise ValueError(
                f"the prompt is {len(ids)} tokens long, more than the model context of {self.max_context} tokens "
                f"({expected} of them image tokens); use fewer or smaller images (max_num) or a shorter text"
            )
        out = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "pixel_values": torch.cat(tensors) if tensors else None,
            "image_grids": grids,
            "num_tiles": num_tiles,
        }
        if layout is not None:
            out["xattn_layout"] = layout
        return out

    def _encode_xattn(self, pieces: list[Piece], num_tiles: list[int]):
        """NVLM-X/H: ids of the pieces with the images written as in the module docstring, and the
        `nvlm.xattn.XAttnLayout` (ranges over one row's memory; tiles numbered in `pixel_values` order)."""
        from nvlm.xattn import XAttnLayout

        ids: list[int] = []
        ranges: list[tuple[int, int]] = []
        memory: list = []
        decoder_tiles: list[int] = []
        seen = 0          # memory end of the images before the current position: ordinary text sees [0, seen)
        size = 0          # memory length so far
        run: list[str] = []
        n = self.tokens_per_tile

        def emit(new_ids: list[int], lo: int, hi: int) -> None:
            ids.extend(new_ids)
            ranges.extend([(lo, hi)] * len(new_ids))

        def flush() -> None:
            text = "".join(run)
            run.clear()
            if text:
                emit(self._plain.encode(text, add_special_tokens=False).ids, 0, seen)

        def tag_ids(tag: str) -> list[int]:
            return self._plain.encode(tag, add_special_tokens=False).ids

        tiles = iter(num_tiles)
        first_tile = 0
        for piece in pieces:
            if not isinstance(piece, str):
                flush()
                emit(list(piece), 0, seen)
                continue
            for k, part in enumerate(piece.split(IMAGE_PLACEHOLDER)):
                if k:  # a placeholder stood before this part
                    count = next(tiles)
                    tags = tile_tags(count)
                    run.append(IMAGE_START)
                    flush()
                    if self.mode == "X":          # every tile in the memory; tag k's tokens see tile k only
                        for t, tag in enumerate(tags):
                            emit(tag_ids(tag), size, size + n)
                            memory.append(first_tile + t)
                            size += n
                        seen = size
                    else:                         # H: regular tiles (after their tag embeddings) in the memory
                        for t, tag in enumerate(tags[:-1]):
                            tag_tok = tag_ids(tag)
                            memory += [tag_tok, first_tile + t]
                            size += len(tag_tok) + n
                        seen = size
                        emit(tag_ids(tags[-1]), 0, seen)
                        emit([self.image_token_id] * n, 0, seen)
                        decoder_tiles.append(first_tile + count - 1)
                    first_tile += count
                    run.append(IMAGE_END)
                run.append(part)
        flush()
        r = torch.tensor(ranges, dtype=torch.int32).reshape(1, -1, 2)
        layout = XAttnLayout(r[..., 0].contiguous(), r[..., 1].contiguous(), [memory], decoder_tiles)
        return ids, layout

    # -- decoding -------------------------------------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (list of ints, or a 1-D / [1, L] tensor)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D or [1, L], got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
