"""``model.generate`` from several threads on one model. Decision: it works, and calls on ONE model run one at a
time (a per-model re-entrant lock in ``NVLM.generate``), so each thread gets exactly what it would get alone; two
different models still run in parallel. Why a lock rather than relying on the code being stateless today: the
Triton interpreter and future caches are not thread-safe, and two concurrent prefills on one GPU would only double
the activation memory for no speed-up."""

import threading
import time

import pytest
import torch
from PIL import Image

import nvlm.generate
from nvlm.model import NVLM

QUESTIONS = [(Image.new("RGB", (300, 200), (200, 30, 30)), "What colour?"),
             (Image.new("RGB", (64, 64), (10, 200, 90)), "Describe the image."),
             (None, "Tell me a story about a cat.")]


@pytest.fixture(scope="module")
def model(checkpoint):
    return NVLM.from_pretrained(checkpoint, progress=False)


def run_threads(fns):
    """Start all of ``fns`` at the same moment; return their results (re-raising any error)."""
    barrier = threading.Barrier(len(fns))
    results, errors = [None] * len(fns), []

    def worker(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"
    if errors:
        raise errors[0]
    return results


def test_two_threads_get_the_sequential_results(model):
    sequential = [model.chat(img, q, max_new_tokens=4) for img, q in QUESTIONS]
    again = run_threads([lambda img=img, q=q: model.chat(img, q, max_new_tokens=4) for img, q in QUESTIONS])
    assert again == sequential
    # and with sampling, each thread with its own seeded generator
    inputs = model.processor(images=[QUESTIONS[0][0]], text="What colour?")
    ids, px = inputs["input_ids"], inputs["pixel_values"].bfloat16()

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(ids, px, max_new_tokens=4, do_sample=True, temperature=1.5, generator=g)

    alone = [sample(s) for s in (1, 2)]
    together = run_threads([lambda s=s: sample(s) for s in (1, 2)])
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def _track(monkeypatch):
    """Wrap nvlm.generate.generate to record how many calls are inside it at once (with a pause to widen races)."""
    real = nvlm.generate.generate
    state = {"active": 0, "max": 0}
    lock = threading.Lock()

    def tracked(*args, **kwargs):
        with lock:
            state["active"] += 1
            state["max"] = max(state["max"], state["active"])
        try:
            time.sleep(0.2)
            return real(*args, **kwargs)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(nvlm.generate, "generate", tracked)
    return state


def test_calls_on_one_model_are_serialised(model, monkeypatch):
    state = _track(monkeypatch)
    ids = torch.randint(0, 1000, (1, 8))
    run_threads([lambda: model.generate(ids, max_new_tokens=2)] * 3)
    assert state["max"] == 1


def test_different_models_run_in_parallel(model, checkpoint, monkeypatch):
    other = NVLM.from_pretrained(checkpoint, progress=False)
    state = _track(monkeypatch)
    ids = torch.randint(0, 1000, (1, 8))
    run_threads([lambda: model.generate(ids, max_new_tokens=2), lambda: other.generate(ids, max_new_tokens=2)])
    assert state["max"] == 2                                  # the lock is per model, not global


def test_streaming_callback_may_call_generate_again(model):
    """Re-entrant: a callback running on the generating thread can call generate on the same model."""
    ids = torch.randint(0, 1000, (1, 8))
    inner = []

    def callback(tokens):
        if not inner:
            inner.append(model.generate(ids, max_new_tokens=1))

    (out,) = run_threads([lambda: model.generate(ids, max_new_tokens=3, callback=callback)])
    assert out.shape[1] <= 11 and inner[0].shape == (1, 9)
