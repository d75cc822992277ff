"""NVLM-D: InternViT -> pixel shuffle + mlp1 -> image embeddings written over the ``<|vision_pad|>`` positions of
the Qwen2 decoder's input (spec §3 "Merge").

``input_ids [B, L]`` + ``pixel_values [T, 3, S, S]`` (tiles of all images in prompt order, thumbnail last per image)
-> ``logits [B, L, V]``. The ``T * num_image_token`` projected vectors replace, in order (row-major over B, L), the
embeddings of the positions holding ``config.img_context_token_id``. Everything else is plain Qwen2 with 1-D
positions over the whole sequence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from nvlm.config import NVLMConfig
from nvlm.decoder import KVCache, Qwen2ForCausalLM
from nvlm.projector import Projector
from nvlm.vision import InternVisionModel


@dataclass
class NVLMOutput:
    logits: torch.Tensor                      # [B, L, V] (or the last logits_to_keep positions)
    past_key_values: KVCache | None = None


class NVLM(nn.Module):
    def __init__(self, config: NVLMConfig):
        super().__init__()
        config.validate()
        if config.arch != "D":
            raise ValueError(f"NVLM: config 'arch' {config.arch!r} is not implemented by nvlm.model.NVLM (only 'D')")
        self.config = config
        self.vision_model = InternVisionModel(config.vision, config.num_vision_layers_used)
        self.mlp1 = Projector(config)
        self.language_model = Qwen2ForCausalLM(config.llm)
        self.processor = None          # an NVLMProcessor when loaded from a folder with a tokenizer
        self.source_path = None        # folder loaded from (save_pretrained copies tokenizer files from there)

    # -- parts -----------------------------------------------------------------------------------------------------
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [T, 3, S, S] -> [T, num_image_token, llm hidden]``."""
        if pixel_values.dim() != 4 or pixel_values.shape[-1] != self.config.image_size \
                or pixel_values.shape[-2] != self.config.image_size:
            s = self.config.image_size
            raise ValueError(f"NVLM: argument 'pixel_values' must be [T, 3, {s}, {s}], got {tuple(pixel_values.shape)}")
        h = self.vision_model(pixel_values)                     # [T, 1+P, C]
        return self.mlp1(h[:, 1:])                              # drop CLS -> shuffle+LN -> MLP: [T, P/4, hidden]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.model.embed_tokens

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              first_chunk: bool = True) -> torch.Tensor:
        """Token embeddings ``[B, L, H]`` with the image-context positions replaced by image features."""
        embeds = self.get_input_embeddings()(input_ids)
        token = self.config.img_context_token_id
        if pixel_values is None:
            if first_chunk and token is not None and bool((input_ids == token).any()):
                n = int((input_ids == token).sum())
                raise ValueError(f"NVLM: 'input_ids' hold {n} image-context tokens (id {token}) but 'pixel_values' "
                                 f"is None")
            return embeds
        if token is None:
            raise ValueError("NVLM: config 'img_context_token_id' is None; load a tokenizer (from_pretrained sets it "
                             "from '<|vision_pad|>') or set it before passing 'pixel_values'")
        mask = input_ids == token                               # [B, L]
        n_tokens, n_tiles = int(mask.sum()), pixel_values.shape[0]
        expected = n_tiles * self.config.num_image_token
        if n_tokens != expected:
            raise ValueError(f"NVLM: 'input_ids' hold {n_tokens} image-context tokens (id {token}) but "
                             f"'pixel_values' has {n_tiles} tiles x {self.config.num_image_token} tokens = {expected}")
        features = self.extract_feature(pixel_values).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(mask.unsqueeze(-1), features)  # in order, row-major over [B, L]

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                logits_to_keep: int = 0) -> NVLMOutput:
        """``input_ids [B, L]`` (+ ``pixel_values [T, 3, S, S]``) -> ``NVLMOutput(logits [B, L, V], cache)``.

        ``use_cache=True`` without a cache starts a new one; with ``past_key_values`` the tokens continue it
        (positions from the cache length). ``logits_to_keep=k`` computes the lm_head for the last k positions only.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"NVLM: argument 'input_ids' must be a [B, L] tensor, got {shape}")
        if past_key_values is None and use_cache:
            past_key_values = self.language_model.new_cache()
        first_chunk = past_key_values is None or past_key_values.get_seq_length() == 0
        embeds = self.embed(input_ids, pixel_values, first_chunk=first_chunk)
        logits = self.language_model(embeds, past_key_values, logits_to_keep=logits_to_keep)
        return NVLMOutput(logits=logits, past_key_values=past_key_values)

    # -- generation ------------------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs):
        """See :func:`nvlm.generate.generate` for the arguments."""
        from nvlm.generate import generate

        if "eos_token_id" not in kwargs:
            kwargs["eos_token_id"] = self._default_eos()
        return generate(self, input_ids, pixel_values, **kwargs)

    def _default_eos(self):
        """Stop ids: the processor's (``<|im_end|>``, plus ``<|endoftext|>`` when it lists it), else the config's."""
        if self.processor is not None:
            stops = getattr(self.processor, "stop_token_ids", None) or getattr(self.processor, "eos_token_id", None)
            if stops is not None:
                return stops
        return self.config.llm.eos_token_id

    def chat(self, image_or_images=None, question: str = "", **gen) -> str:
        """One user turn: image(s) (a path, a PIL image or a list of them; None for text only) + question -> reply.

        ``gen`` goes to :meth:`generate` (defaults: greedy, ``max_new_tokens=1024``, eos = the tokenizer's).
        """
        if self.processor is None:
            raise ValueError("NVLM.chat needs a processor: load with NVLM.from_pretrained(folder) from a folder "
                             "holding tokenizer.json, or set model.processor")
        if image_or_images is None:
            images = []
        elif isinstance(image_or_images, (list, tuple)):
            images = list(image_or_images)
        else:
            images = [image_or_images]
        inputs = self.processor(images=images, text=question)
        device = self.get_input_embeddings().weight.device
        input_ids = inputs["input_ids"].to(device)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            pixel_values = pixel_values.to(device, self.vision_model.embeddings.patch_embedding.weight.dtype)
        gen.setdefault("max_new_tokens", 1024)
        out = self.generate(input_ids, pixel_values, **gen)
        out = getattr(out, "sequences", out)
        new_tokens = out[0, input_ids.shape[1]:].tolist()
        eos = gen.get("eos_token_id", self._default_eos())
        eos = {eos} if isinstance(eos, int) else set(eos or [])
        while new_tokens and new_tokens[-1] in eos:  # the stop token is not part of the reply
            new_tokens.pop()
        return self.processor.decode(new_tokens)

    # -- loading / saving ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", quantization=None, progress: bool = True) -> NVLM:
        """Stream a published-layout checkpoint folder (see :func:`nvlm.loading.load_pretrained`)."""
        from nvlm.loading import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, quantization=quantization, progress=progress)

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3,
                        num_shards: int | None = None, overwrite: bool = False):
        """Write sharded safetensors + index + config.json (+ tokenizer files) atomically; returns the folder.
        See :func:`nvlm.loading.save_pretrained`."""
        from nvlm.loading import save_pretrained

        return save_pretrained(self, path, max_shard_bytes=max_shard_bytes, num_shards=num_shards,
                               overwrite=overwrite)
