"""Autoregressive decoding: one prefill over the prompt (image features computed once), then one token at a time
through the KV cache.

Logits processing follows transformers' order and definitions so results can be compared with ``model.generate``
there: repetition penalty (over prompt + generated tokens) -> [sampling only] temperature -> top-k -> top-p. Greedy
takes the argmax of the processed scores; sampling draws from their softmax with the given ``torch.Generator``.
A sequence that emitted an eos/stop token is finished and padded with ``pad_token_id`` until all are finished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass
class GenerateOutput:
    sequences: torch.Tensor                          # [B, L + new] prompt followed by generated tokens
    scores: tuple[torch.Tensor, ...] | None = None   # per step [B, V] fp32: processed scores (transformers' `scores`)
    logits: tuple[torch.Tensor, ...] | None = None   # per step [B, V] fp32: raw logits (transformers' `logits`)


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: logits of seen tokens /penalty if > 0, *penalty if < 0."""
    picked = torch.gather(scores, 1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seen, picked)


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, top_k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter (transformers' TopPLogitsWarper): drop the least likely tokens whose total mass <= 1 - top_p."""
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False                  # always keep the most likely token
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def _ids(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    if isinstance(x, Iterable):
        return [int(i) for i in x]
    raise ValueError(f"generate: token ids must be an int or a list of ints, got {x!r}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
             stop_token_ids: list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, callback: Callable[[torch.Tensor], None] | None = None,
             output_scores: bool = False, output_logits: bool = False, return_dict_in_generate: bool = False):
    """Generate up to ``max_new_tokens`` tokens after ``input_ids [B, L]`` (all rows the same length, no padding).

    ``model(input_ids, pixel_values, past_key_values=..., use_cache=True, logits_to_keep=1)`` must return an object
    with ``.logits [B, 1, V]`` and ``.past_key_values`` (``nvlm.model.NVLM`` does).
    ``eos_token_id`` / ``stop_token_ids``: generation of a row ends after it emits any of them (the token is kept).
    ``callback(tokens [B])`` is called after every step (streaming). Returns ``sequences [B, L + n]`` or, with
    ``return_dict_in_generate=True``, a :class:`GenerateOutput` (``scores`` when ``output_scores=True``).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0 \
            or input_ids.dtype != torch.long:
        desc = (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor)
                else type(input_ids).__name__)
        raise ValueError(f"generate: argument 'input_ids' must be a non-empty [B, L] int64 tensor, got {desc}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: argument 'max_new_tokens' must be >= 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"generate: argument 'temperature' must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: argument 'top_p' must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"generate: argument 'top_k' must be >= 0 (0 = off), got {top_k}")
    if not repetition_penalty > 0:
        raise ValueError(f"generate: argument 'repetition_penalty' must be > 0, got {repetition_penalty}")

    stops = _ids(eos_token_id) + _ids(stop_token_ids)
    stop_t = torch.tensor(stops, dtype=torch.long, device=input_ids.device)
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    batch = input_ids.shape[0]
    sequences = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []

    cache = None
    step_input, step_pixels = input_ids, pixel_values
    for _ in range(max_new_tokens):
        out = model(step_input, step_pixels, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()                                      # [B, V]
        scores = logits
        if repetition_penalty != 1.0:
            scores = apply_repetition_penalty(scores, sequences, repetition_penalty)
        if do_sample:
            if temperature != 1.0:
                scores = scores / temperature
            if top_k:
                scores = apply_top_k(scores, top_k)
            if top_p < 1.0:
                scores = apply_top_p(scores, top_p)
            probs = scores.softmax(dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        if output_scores:
            scores_out.append(scores)
        if output_logits:
            logits_out.append(logits)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        if callback is not None:
            callback(next_tokens)
        if len(stops):
            finished |= torch.isin(next_tokens, stop_t)
            if bool(finished.all()):
                break
        step_input, step_pixels = next_tokens[:, None], None

    if not return_dict_in_generate:
        return sequences
    return GenerateOutput(sequences=sequences, scores=tuple(scores_out) if output_scores else None,
                          logits=tuple(logits_out) if output_logits else None)
