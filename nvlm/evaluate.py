"""``nvlm eval --model PATH [--quant Q] [--no-tile-tags] [--blank W]``: accuracy of a checkpoint on the held-out sets.

Accuracy is exact match of the greedy answer: one teacher-forced forward pass per batch, and a sample counts as
right iff the argmax at every answer position (answer tokens and the closing ``<|im_end|>``) is the reference
token. That is exactly "greedy decoding returns the reference answer and stops", computed without a decode loop.

Held-out sets: ``nvlm.tasks.eval_set("tiles", n)`` (image questions) and ``eval_set("text", n)`` (text-only).
With ``--quant`` other than bf16 the logits SQNR against the bf16 model on the first ``--sqnr-samples`` image
samples is printed too (all non-pad positions). ``--blank thumbnail`` / ``--blank tiles`` is an ablation of the
input, not of training: each image's thumbnail (or its regular tiles) is replaced by a blank tile of the image's
background colour, which shows which part of the image the model answers each kind of question from.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from nvlm import tasks
from nvlm.train import IGNORE, collate, without_tile_tags


@torch.inference_mode()
def _logits(model, processor, samples):
    ids, labels, pixel_values = collate(processor, samples)
    if pixel_values is not None:
        pixel_values = pixel_values.to(model.vision_model.embeddings.patch_embedding.weight.dtype)
    return model(ids, pixel_values).logits.float(), ids, labels


def score(model, processor, samples: list[tasks.Sample], batch_size: int = 16) -> dict:
    """``{"accuracy", "n", "by_kind": {kind: accuracy}}`` of greedy exact match (module docstring)."""
    right, by_kind = [], defaultdict(list)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        logits, ids, labels = _logits(model, processor, chunk)
        pred = logits[:, :-1].argmax(-1)                     # [B, L-1]: prediction for position t+1
        target = labels[:, 1:]
        mask = target != IGNORE
        ok = ((pred == target) | ~mask).all(dim=1)
        for s, good in zip(chunk, ok.tolist()):
            right.append(good)
            by_kind[s.kind].append(good)
    return {"accuracy": sum(right) / len(right), "n": len(right),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}


class BlankedTiles:
    """``processor`` whose images come with their thumbnail (``which="thumbnail"``) or their regular tiles
    (``which="tiles"``) replaced by one blank tile: a plain image of the image's most common colour (the background
    of the synthetic task), tiled by the same processor. Everything else (prompt, tags, token counts) is unchanged.
    An image of one tile has no thumbnail and is left as is."""

    WHICH = ("thumbnail", "tiles")

    def __init__(self, processor, which: str):
        if which not in self.WHICH:
            raise ValueError(f"nvlm eval: argument '--blank' must be one of {self.WHICH}, got {which!r}")
        self.processor, self.which = processor, which

    def __getattr__(self, name):            # everything but __call__ is the wrapped processor's
        return getattr(self.processor, name)

    def __call__(self, images=None, text: str = "", **kwargs):
        from PIL import Image

        out = self.processor(images=images, text=text, **kwargs)
        if not images:
            return out
        if len(images) != 1:
            raise ValueError("nvlm eval --blank: one image per prompt (the held-out samples have one)")
        pixel_values = out["pixel_values"]                       # [T, 3, S, S]: regular tiles, then the thumbnail
        if pixel_values.shape[0] > 1:
            image = images[0].convert("RGB")
            _, background = max(image.getcolors(image.width * image.height))
            plain = Image.new("RGB", (self.processor.image_size,) * 2, background)
            blank = self.processor(images=[plain], text="")["pixel_values"][0]
            if self.which == "thumbnail":
                pixel_values[-1] = blank
            else:
                pixel_values[:-1] = blank
        return out


def logits_sqnr(reference, model, processor, samples: list[tasks.Sample], batch_size: int = 16) -> float:
    """SQNR (dB) of ``model``'s logits against ``reference``'s on the non-pad positions of ``samples``."""
    from nvlm.quant import sqnr_db

    refs, outs = [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        ref, ids, _ = _logits(reference, processor, chunk)
        out, _, _ = _logits(model, processor, chunk)
        keep = ids != processor.pad_token_id
        refs.append(ref[keep])
        outs.append(out[keep])
    return sqnr_db(torch.cat(refs), torch.cat(outs))


def load(path, quant: str | None):
    from nvlm.model import NVLM

    quantization = None if quant in (None, "bf16", "none") else quant
    if quantization is not None and quantization.startswith("bnb"):
        # bitsandbytes quantises materialised weights (nvlm.quant._to_bnb), not while streaming: load, then swap
        from nvlm.quant import quantize_

        model = NVLM.from_pretrained(path, progress=False)
        quantize_(model, quantization)
    else:
        model = NVLM.from_pretrained(path, quantization=quantization, progress=False)
    if model.processor is None:
        raise ValueError(f"nvlm eval: {str(path)!r} has no tokenizer.json; the model needs its tokenizer")
    return model.eval()


def evaluate(path, quant: str = "bf16", n_tiles: int = 400, n_text: int = 200, sqnr_samples: int = 64,
             tile_tags: bool = True, blank: str | None = None) -> dict:
    """Held-out accuracy (and logits SQNR vs bf16 when quantised). ``tile_tags=False`` scores a checkpoint of the
    tile-tag ablation (``nvlm train --no-tile-tags``) with the prompts it was trained on: images without tags.
    ``blank="thumbnail"`` / ``"tiles"``: the image questions with that part of each image blanked (``BlankedTiles``).
    ``n_text=0`` skips the text-only set."""
    if n_tiles < 1 or n_text < 0:
        raise ValueError(f"nvlm eval: needs at least 1 image sample and 0 or more text samples "
                         f"(arguments '--n' and '--n-text'), got {n_tiles} and {n_text}")
    model = load(path, quant)
    processor = model.processor if tile_tags else without_tile_tags(model.processor)
    tiles = tasks.eval_set("tiles", n_tiles)
    result = {"model": str(path), "quant": quant, "tile_tags": tile_tags, "blank": blank,
              "tiles": score(model, BlankedTiles(processor, blank) if blank else processor, tiles)}
    if n_text:
        result["text"] = score(model, processor, tasks.eval_set("text", n_text))
    if quant not in ("bf16", "none", None) and sqnr_samples:
        result["logits_sqnr_db_vs_bf16"] = logits_sqnr(load(path, None), model, processor, tiles[:sqnr_samples])
    return result


def run(args) -> int:
    from nvlm.train import DEFAULT_OUT

    torch.set_num_threads(args.threads)
    r = evaluate(args.model or DEFAULT_OUT, args.quant, args.n, args.n_text, args.sqnr_samples,
                 tile_tags=not args.no_tile_tags, blank=args.blank)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"model {r['model']}  quant {r['quant']}" + ("" if r["tile_tags"] else "  (images without tile tags)")
          + (f"  (images with their {r['blank']} blanked)" if r["blank"] else ""))
    for task in ("tiles", "text"):
        if task not in r:
            continue
        s = r[task]
        kinds = "  ".join(f"{k} {v:.3f}" for k, v in s["by_kind"].items())
        print(f"  {task:<6} accuracy {s['accuracy'] * 100:6.2f}%  (n={s['n']})  {kinds}")
    if "logits_sqnr_db_vs_bf16" in r:
        print(f"  logits SQNR vs bf16: {r['logits_sqnr_db_vs_bf16']:.1f} dB")
    return 0


def main(argv=None) -> int:
    from nvlm.cli import eval_arguments

    p = argparse.ArgumentParser(prog="nvlm eval", description=__doc__.splitlines()[0])
    eval_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
