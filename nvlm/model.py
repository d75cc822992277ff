"""NVLM-D: InternViT -> pixel shuffle + mlp1 -> image embeddings written over the ``<|vision_pad|>`` positions of
the Qwen2 decoder's input (spec §3 "Merge").

``input_ids [B, L]`` + ``pixel_values [T, 3, S, S]`` (tiles of all images in prompt order, thumbnail last per image)
-> ``logits [B, L, V]``. The ``T * num_image_token`` projected vectors replace, in order (row-major over B, L), the
embeddings of the positions holding ``config.img_context_token_id``. Everything else is plain Qwen2 with 1-D
positions over the whole sequence.

NVLM-X and NVLM-H (``config.arch`` "X" / "H") are the same class: image tokens reach the decoder through gated
cross-attention blocks (``nvlm.xattn``; its docstring has the design and the checkpoint layout). Their forward
takes ``xattn_layout`` (an ``nvlm.xattn.XAttnLayout``, from ``NVLMProcessor(mode="X"|"H")``) with the images.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from nvlm.config import NVLMConfig
from nvlm.decoder import KVCache, Qwen2ForCausalLM
from nvlm.projector import Projector
from nvlm.vision import InternVisionModel
from nvlm.xattn import ProjectorX, XAttnContext, XAttnLayout

_GENERATE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> its generate lock
_GENERATE_LOCKS_GUARD = threading.Lock()


def _generate_lock(model: nn.Module) -> threading.RLock:
    """The per-model lock that serialises ``NVLM.generate`` calls (kept outside the module so ``copy.deepcopy`` and
    pickling of the model still work; re-entrant so a streaming callback may call ``generate`` again)."""
    with _GENERATE_LOCKS_GUARD:
        lock = _GENERATE_LOCKS.get(model)
        if lock is None:
            lock = _GENERATE_LOCKS[model] = threading.RLock()
        return lock


@dataclass
class NVLMOutput:
    logits: torch.Tensor                      # [B, L, V] (or the last logits_to_keep positions)
    past_key_values: KVCache | None = None


class NVLM(nn.Module):
    def __init__(self, config: NVLMConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.vision_model = InternVisionModel(config.vision, config.num_vision_layers_used)
        self.mlp1 = ProjectorX(config) if config.arch == "X" else Projector(config)
        xattn_every = config.xattn_every if config.arch in ("X", "H") else 0
        self.language_model = Qwen2ForCausalLM(config.llm, xattn_every, config.xattn_ffn)
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
                logits_to_keep: int = 0, xattn_layout: XAttnLayout | None = None) -> NVLMOutput:
        """``input_ids [B, L]`` (+ ``pixel_values [T, 3, S, S]``) -> ``NVLMOutput(logits [B, L, V], cache)``.

        ``use_cache=True`` without a cache starts a new one; with ``past_key_values`` the tokens continue it
        (positions from the cache length). ``logits_to_keep=k`` computes the lm_head for the last k positions only.
        NVLM-X/H: ``xattn_layout`` places the images (required with ``pixel_values``, which must come in the first
        chunk); later chunks and decode steps read the cached cross-attention K/V and see all images.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"NVLM: argument 'input_ids' must be a [B, L] tensor, got {shape}")
        if past_key_values is None and use_cache:
            past_key_values = self.language_model.new_cache()
        first_chunk = past_key_values is None or past_key_values.get_seq_length() == 0
        if self.config.arch != "D":
            return self._forward_xattn(input_ids, pixel_values, past_key_values, first_chunk, logits_to_keep,
                                       xattn_layout)
        if xattn_layout is not None:
            raise ValueError("NVLM: argument 'xattn_layout' is for NVLM-X/H; this model is NVLM-D")
        embeds = self.embed(input_ids, pixel_values, first_chunk=first_chunk)
        logits = self.language_model(embeds, past_key_values, logits_to_keep=logits_to_keep)
        return NVLMOutput(logits=logits, past_key_values=past_key_values)

    # -- NVLM-X / NVLM-H -------------------------------------------------------------------------------------------
    def _forward_xattn(self, input_ids, pixel_values, cache, first_chunk, logits_to_keep, layout) -> NVLMOutput:
        cfg = self.config
        token = cfg.img_context_token_id
        n_pads = int((input_ids == token).sum()) if token is not None else 0
        embeds = self.get_input_embeddings()(input_ids)                         # [B, L, H]
        context = None
        if pixel_values is not None:
            if not first_chunk:
                raise ValueError(f"NVLM-{cfg.arch}: 'pixel_values' must come with the first chunk (the "
                                 f"cross-attention memory is built once, at prefill)")
            if layout is None:
                raise ValueError(f"NVLM-{cfg.arch}: 'pixel_values' needs 'xattn_layout' (NVLMProcessor(mode="
                                 f"{cfg.arch!r}) returns it as inputs['xattn_layout'])")
            embeds, context, lengths = self._prefill_images(input_ids, embeds, pixel_values, layout, n_pads)
            if cache is not None and context is not None:
                cache.set_xattn(context.keys, context.values, lengths)
        else:
            if layout is not None and layout.tiles():
                raise ValueError(f"NVLM-{cfg.arch}: 'xattn_layout' places {len(layout.tiles())} tiles but "
                                 f"'pixel_values' is None")
            if n_pads and first_chunk:
                raise ValueError(f"NVLM-{cfg.arch}: 'input_ids' hold {n_pads} image-context tokens (id {token}) but "
                                 f"'pixel_values' is None")
            if cache is not None and cache.memory_lengths is not None:    # continue a prompt that had images
                b, n = input_ids.shape
                start = torch.zeros(b, n, dtype=torch.int32, device=input_ids.device)
                end = cache.memory_lengths.to(input_ids.device)[:, None].expand(b, n).contiguous()
                context = XAttnContext(cache.xattn_keys, cache.xattn_values, start, end)
        logits = self.language_model(embeds, cache, logits_to_keep=logits_to_keep, xattn=context)
        return NVLMOutput(logits=logits, past_key_values=cache)

    def _prefill_images(self, input_ids, embeds, pixel_values, layout: XAttnLayout, n_pads: int):
        """Decoder embeddings with the decoder tiles merged (H), the blocks' memory K/V and the ranges."""
        cfg = self.config
        s = cfg.image_size
        if pixel_values.dim() != 4 or pixel_values.shape[-1] != s or pixel_values.shape[-2] != s:
            raise ValueError(f"NVLM: argument 'pixel_values' must be [T, 3, {s}, {s}], got {tuple(pixel_values.shape)}")
        n_tok = cfg.num_image_token
        layout.validate(input_ids, pixel_values.shape[0], n_tok)
        expected = len(layout.decoder_tiles) * n_tok
        if n_pads != expected:
            raise ValueError(f"NVLM-{cfg.arch}: 'input_ids' hold {n_pads} image-context tokens but 'xattn_layout' "
                             f"puts {len(layout.decoder_tiles)} tiles x {n_tok} tokens = {expected} in the decoder")
        device = embeds.device
        if layout.decoder_tiles:     # NVLM-H thumbnails: written over the <|vision_pad|> positions, as in NVLM-D
            idx = torch.tensor(layout.decoder_tiles, device=pixel_values.device)
            feats = self.extract_feature(pixel_values[idx]).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            embeds = embeds.masked_scatter((input_ids == cfg.img_context_token_id).unsqueeze(-1), feats)
        mem_tiles = [t for row in layout.memory for t in row if isinstance(t, int)]
        lengths = layout.memory_lengths(n_tok)
        if not mem_tiles and max(lengths, default=0) == 0:
            return embeds, None, None                               # nothing to attend to: blocks are identities
        tile_feats = {}
        if mem_tiles:
            idx = torch.tensor(mem_tiles, device=pixel_values.device)
            feats = self.extract_feature(pixel_values[idx]).to(embeds.dtype)      # [T_mem, n_tok, H]
            tile_feats = {t: feats[i] for i, t in enumerate(mem_tiles)}
        embed_tokens = self.get_input_embeddings()
        b, m = input_ids.shape[0], max(lengths)
        memory = embeds.new_zeros(b, m, embeds.shape[-1])                 # rows padded to the longest memory
        for r, row in enumerate(layout.memory):
            pos = 0
            for seg in row:
                if isinstance(seg, int):
                    part = tile_feats[seg]
                else:
                    part = embed_tokens(torch.tensor(seg, dtype=torch.long, device=device))
                memory[r, pos:pos + part.shape[0]] = part
                pos += part.shape[0]
        keys, values = [], []
        for block in self.language_model.model.xattn_layers:
            k, v = block.memory_kv(memory)
            keys.append(k)
            values.append(v)
        context = XAttnContext(keys, values, layout.kv_start.to(device), layout.kv_end.to(device))
        return embeds, context, torch.tensor(lengths, dtype=torch.int32, device=device)

    # -- generation ------------------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 xattn_layout: XAttnLayout | None = None, **kwargs):
        """See :func:`nvlm.generate.generate` for the arguments; ``xattn_layout`` (NVLM-X/H) goes to the prefill.

        Context: a prompt longer than ``config.llm.max_position_embeddings`` raises ``ValueError``; otherwise
        ``max_new_tokens`` is capped so that prompt + answer fit the context (a longer answer is cut there).
        Threads: calls on one model from several threads run one at a time (a per-model lock), so each returns
        exactly what it would alone.
        """
        from nvlm.generate import generate

        if "eos_token_id" not in kwargs:
            kwargs["eos_token_id"] = self._default_eos()
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            context = self.config.llm.max_position_embeddings
            if input_ids.shape[1] > context:
                raise ValueError(f"NVLM.generate: the prompt is {input_ids.shape[1]} tokens long, more than the "
                                 f"model context of {context} tokens; shorten it or use fewer/smaller images")
            room = context - input_ids.shape[1]
            if isinstance(kwargs.get("max_new_tokens"), int) and kwargs["max_new_tokens"] > room:
                kwargs["max_new_tokens"] = room
        if xattn_layout is None:
            step = self
        else:
            def step(ids, pixels, past_key_values=None, **kw):   # the layout belongs to the prompt only
                return self(ids, pixels, past_key_values=past_key_values,
                            xattn_layout=xattn_layout if past_key_values is None else None, **kw)

        with _generate_lock(self):
            return generate(step, input_ids, pixel_values, **kwargs)

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
        out = self.generate(input_ids, pixel_values, xattn_layout=inputs.get("xattn_layout"), **gen)
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
                        device: str | torch.device = "cpu", quantization=None, progress: bool = True,
                        tp_size: int = 1, tp_group=None) -> NVLM:
        """Stream a published-layout checkpoint folder (see :func:`nvlm.loading.load_pretrained`).

        ``tp_size > 1``: this rank's tensor-parallel part (``nvlm.tp``; under torchrun, one call per rank, in an
        initialised process group ``tp_group`` or the default one of ``tp_size`` ranks)."""
        if tp_size != 1 or tp_group is not None:
            from nvlm.tp import load_pretrained_tp

            return load_pretrained_tp(path, tp_size, dtype=dtype, device=device, quantization=quantization,
                                      progress=progress, group=tp_group)
        from nvlm.loading import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, quantization=quantization, progress=progress)

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3,
                        num_shards: int | None = None, overwrite: bool = False):
        """Write sharded safetensors + index + config.json (+ tokenizer files) atomically; returns the folder.
        See :func:`nvlm.loading.save_pretrained`."""
        from nvlm.loading import save_pretrained

        if getattr(self, "tp_size", 1) != 1:   # a rank holds slices: its state dict is not a checkpoint
            raise ValueError(f"save_pretrained: this model is tensor-parallel rank {self.tp_rank} of {self.tp_size} "
                             f"and holds only its slices; save from a single-process model")
        return save_pretrained(self, path, max_shard_bytes=max_shard_bytes, num_shards=num_shards,
                               overwrite=overwrite)
