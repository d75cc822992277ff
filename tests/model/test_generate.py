"""Decoding (nvlm.generate): KV-cache decoding equals full recomputation, scores, stop tokens, sampling, and the
logits processors against transformers' own."""

import pytest
import torch

from nvlm.config import NVLMConfig
from nvlm.generate import apply_repetition_penalty, apply_top_k, apply_top_p, generate
from nvlm.testing import hf_qwen2_model, random_model

IMG = 1011


@pytest.fixture(scope="module")
def model():
    cfg = NVLMConfig.preset("tiny-d")
    cfg.img_context_token_id = IMG
    return random_model(cfg, seed=6)


def image_prompt(model, batch=1):
    n = model.config.num_image_token
    rows = [torch.cat([torch.randint(0, 1000, (4,)), torch.full((n,), IMG), torch.randint(0, 1000, (5,))])
            for _ in range(batch)]
    return torch.stack(rows), torch.randn(batch, 3, 224, 224)


def test_cached_decoding_equals_full_recompute(model):
    ids, px = image_prompt(model, batch=2)
    out = generate(model, ids, px, max_new_tokens=12, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, ids.shape[1] + 12)
    assert len(out.scores) == 12 and all(s.shape == (2, model.config.llm.vocab_size) for s in out.scores)
    seq = ids
    with torch.no_grad():
        prompt_embeds = model.embed(ids, px)       # image features once; the decoder reruns the whole sequence
        for step in range(12):                     # no cache
            embeds = torch.cat([prompt_embeds, model.get_input_embeddings()(seq[:, ids.shape[1]:])], dim=1)
            logits = model.language_model(embeds)[:, -1].float()
            assert torch.allclose(logits, out.scores[step], rtol=1e-4, atol=1e-4)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        last = model(seq[:, :-1], px).logits[:, -1].float()   # and once through the full model forward
    assert torch.equal(seq, out.sequences)
    assert torch.allclose(last, out.scores[-1], rtol=1e-4, atol=1e-4)


def test_matches_transformers_generate_text_only(model):
    """Greedy with repetition penalty, text only: same tokens as transformers' generate on the same decoder."""
    ids = torch.randint(0, 1000, (1, 8))
    ours = generate(model, ids, max_new_tokens=10, repetition_penalty=1.3)
    hf = hf_qwen2_model(model).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                        repetition_penalty=1.3, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, hf)


def test_stop_tokens_and_padding(model):
    ids, px = image_prompt(model, batch=2)
    free = generate(model, ids, px, max_new_tokens=8)
    new = free[:, ids.shape[1]:]
    stop = int(new[0, 2])                        # row 0 emits it at step 2 (maybe earlier)
    first0 = int((new[0] == stop).nonzero()[0])
    out = generate(model, ids, px, max_new_tokens=8, stop_token_ids=[stop], pad_token_id=1000)
    gen = out[:, ids.shape[1]:]
    assert torch.equal(gen[0, :first0 + 1], new[0, :first0 + 1])
    hits1 = (new[1] == stop).nonzero()
    if len(hits1) == 0:                          # row 1 never stops: runs to max_new_tokens, row 0 padded
        assert gen.shape[1] == 8 and torch.equal(gen[1], new[1])
        assert (gen[0, first0 + 1:] == 1000).all()
    else:
        assert gen.shape[1] == max(first0, int(hits1[0])) + 1


def test_eos_stops_early(model):
    ids, px = image_prompt(model)
    free = generate(model, ids, px, max_new_tokens=6)
    eos = int(free[0, ids.shape[1] + 1])
    out = generate(model, ids, px, max_new_tokens=6, eos_token_id=eos)
    first = int((free[0, ids.shape[1]:] == eos).nonzero()[0])
    assert out.shape[1] == ids.shape[1] + first + 1 and int(out[0, -1]) == eos


def test_streaming_callback(model):
    ids = torch.randint(0, 1000, (1, 5))
    seen = []
    out = generate(model, ids, max_new_tokens=5, callback=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, dim=1), out[:, 5:])


def test_seeded_sampling(model):
    ids = torch.randint(0, 1000, (1, 5))
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.9)
    a = generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    c = generate(model, ids, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, ids, max_new_tokens=10)
    top1 = generate(model, ids, max_new_tokens=10, do_sample=True, top_k=1, generator=torch.Generator())
    assert torch.equal(greedy, top1)


def test_processors_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.randn(3, 50) * 3
    seen = torch.randint(0, 50, (3, 7))
    assert torch.equal(apply_repetition_penalty(scores, seen, 1.7),
                       RepetitionPenaltyLogitsProcessor(1.7)(seen, scores.clone()))
    assert torch.equal(apply_top_k(scores, 5), TopKLogitsWarper(5)(seen, scores.clone()))
    assert torch.equal(apply_top_p(scores, 0.8), TopPLogitsWarper(0.8)(seen, scores.clone()))
    assert torch.isinf(apply_top_k(scores, 5)).sum() == 3 * 45


@pytest.mark.parametrize("kw,name", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_arguments(model, kw, name):
    with pytest.raises(ValueError, match=name):
        generate(model, torch.zeros(1, 3, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.zeros(3, dtype=torch.long))
