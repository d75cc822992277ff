"""Synthetic tasks for the small trained NVLM-D (``nvlm train``): generated on the fly, deterministic from a seed.

Vision-language task ("tiles"): a wide or tall image whose aspect ratio maps to a grid of 2..6 tiles (cols x rows,
``GRIDS``). Each tile holds at most one small coloured shape (``COLOURS`` x ``SHAPES``, 24..64 px on a 112-px tile,
so as small as ~1/5 of a tile side); at least one shape per image. Questions, with 1-3 token answers::

    What colour is the shape in tile 3?      -> purple       (tiles numbered row-major from 1, as the <tile_k> tags)
    What shape is in tile 2?                 -> triangle
    How many shapes are there?               -> 4
    What shape is on the left?               -> circle       (one-row images: tile 1 / last tile; one-column
    What colour is the shape on the bottom?  -> red           images: top / bottom)

Why it needs the high-resolution tiling: the thumbnail squeezes the whole image into one 112-px tile, so on a 6x1
image a 24-px shape becomes ~4 px wide (shape lost, colours smeared) and "tile k" can only be told apart by where
its tokens sit; the regular tiles show each shape at full resolution right after its ``<tile_k>`` tag.

Images are drawn at ``scale`` 1, 2 or 4 times the tile grid (so the processor's bicubic resize sees sharp and
anti-aliased edges alike) with no anti-aliasing; ``patch_labels`` gives the per-patch colour/shape classes of every
tile the processor makes (regular tiles + thumbnail), for the vision pre-training stage (0a).

Text-only task ("text", stage 0b and the text mix of stage 2): ``What is 3 plus 4?`` -> 7, ``What is 9 minus 5?``
-> 4, ``Which is bigger, 6 or 2?`` -> 6, ``How many words are in: red star blue?`` -> 3, ``Which word is a colour:
circle or green?`` -> green, ``What is the last word in: cat red square?`` -> square. The colour/shape answers and
the copy task matter: in stage 1 the frozen decoder can only say what stage 0b taught it (without them a first
version's stage-1 loss stayed at 6.7 and the model ended at chance on images). Training also uses ``tile_lookup``
(``TRAIN_TEXT_KINDS``): the image questions asked of ``<tile_k> x x red circle x ...`` descriptions. Laid out
over 16 slots per tile like the image tokens (and half of each stage-0b batch), it took the projector-only stage 1
to 44% on dev images; a first version with the two words right after each tag (1/8 of the batch) reached 21%.
``tile_listing`` asks the same descriptions ``LISTING_QUESTION`` ("List the tiles."), answered with
``LISTING_ITEMS`` random tiles' contents: many supervised lookups per sample, where a question supervises one
(``tile_listing`` says why; images get the same question in stages 1-2). ``image_dialogue`` adds follow-up
questions about the same image (``scene_questions``) for multi-turn training.

Held-out sets: ``eval_set("tiles" | "text", n, seed=EVAL_SEED)``; training streams use other seeds, and a
sample's full description (grid, objects, question) is a pure function of its ``random.Random`` stream.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS", "SHAPES", "GRIDS", "TILE", "EVAL_SEED", "Obj", "Scene", "Sample",
    "sample_scene", "render", "patch_labels", "image_sample", "scene_questions", "image_dialogue", "text_sample",
    "eval_set", "describe", "LISTING_QUESTION", "tile_listing", "side_words",
]

TILE = 112                      # tile side the small model consumes (config force_image_size)
PATCH = 14
COLOURS = {                     # name -> RGB (jittered by +-12 per channel when drawn)
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 220),
    "yellow": (235, 205, 30),
    "purple": (145, 60, 185),
    "orange": (245, 135, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
#: (cols, rows) grids of 2..6 tiles; an image of exactly this aspect ratio is tiled this way by nvlm.image.
GRIDS = ((2, 1), (1, 2), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (3, 2), (2, 3), (5, 1), (1, 5), (6, 1), (1, 6))
SCALES = (1, 2, 4)
MIN_SIZE, MAX_SIZE = 24, 64    # shape bounding-box side in tile pixels
EVAL_SEED = 1234
QUESTION_KINDS = ("colour_tile", "shape_tile", "count", "side_shape", "side_colour")
TEXT_KINDS = ("add", "sub", "max", "words", "pick_colour", "pick_shape", "last_word")
#: what stages 0b and 2 train on: the held-out text skills plus ``tile_lookup`` (the image questions asked of a
#: description in words; not in the held-out text set, which measures the general text skills)
TRAIN_TEXT_KINDS = (*TEXT_KINDS, "tile_lookup", "tile_listing")
#: a training-only prompt that supervises many tile lookups per sample (``tile_listing``); answered e.g.
#: ``3 red circle, 1 none, 3 red circle, ...`` (LISTING_ITEMS tiles picked at random)
LISTING_QUESTION = "List the tiles."
LISTING_ITEMS = 12
_WORDS = ("red", "blue", "green", "circle", "square", "star", "cat", "dog", "tree", "house", "book", "sun")


@dataclass
class Obj:
    shape: str
    colour: str
    cx: float                   # centre in tile pixels, relative to its tile's top-left corner
    cy: float
    size: float                 # bounding-box side in tile pixels
    rgb: tuple[int, int, int]


@dataclass
class Scene:
    cols: int
    rows: int
    objects: list               # one Obj or None per tile, row-major (tile k = objects[k-1])
    background: tuple[int, int, int]
    scale: int                  # drawn at (TILE*cols*scale) x (TILE*rows*scale)

    @property
    def num_tiles(self) -> int:
        return self.cols * self.rows

    @property
    def count(self) -> int:
        return sum(o is not None for o in self.objects)


@dataclass
class Sample:
    kind: str                   # one of QUESTION_KINDS or TEXT_KINDS
    question: str
    answer: str
    image: Image.Image | None = None
    scene: Scene | None = field(default=None, repr=False)
    #: later turns about the same image, ``(question, answer)`` each (``image_dialogue``); the first turn is
    #: ``question``/``answer``
    follow_ups: list = field(default_factory=list, repr=False)


def _jitter(rng: random.Random, rgb, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def sample_scene(rng: random.Random, force_tiles: tuple[int, ...] = ()) -> Scene:
    """A random scene; tiles listed in ``force_tiles`` (0-based, negative counts from the end) are never empty."""
    cols, rows = rng.choice(GRIDS)
    n = cols * rows
    forced = {t % n for t in force_tiles}
    objects = []
    for t in range(n):
        if t not in forced and rng.random() < 0.3:
            objects.append(None)
            continue
        # log-uniform size: as many small shapes as big ones
        size = math.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE)))
        half = size / 2 + 3
        colour = rng.choice(COLOUR_NAMES)
        objects.append(Obj(shape=rng.choice(SHAPES), colour=colour, cx=rng.uniform(half, TILE - half),
                           cy=rng.uniform(half, TILE - half), size=size, rgb=_jitter(rng, COLOURS[colour], 12)))
    if all(o is None for o in objects):      # at least one shape
        t = rng.randrange(n)
        size = rng.uniform(MIN_SIZE, MAX_SIZE)
        colour = rng.choice(COLOUR_NAMES)
        objects[t] = Obj(rng.choice(SHAPES), colour, TILE / 2, TILE / 2, size, _jitter(rng, COLOURS[colour], 12))
    background = _jitter(rng, (244, 244, 238), 8)
    return Scene(cols, rows, objects, background, rng.choice(SCALES))


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, ox: float, oy: float, s: int, fill) -> None:
    """Draw ``obj`` of a tile whose top-left corner is (ox, oy) tile pixels, at scale ``s``."""
    x0, y0 = (ox + obj.cx - obj.size / 2) * s, (oy + obj.cy - obj.size / 2) * s
    x1, y1 = (ox + obj.cx + obj.size / 2) * s, (oy + obj.cy + obj.size / 2) * s
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # upward triangle filling its box
        draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)


def render(scene: Scene, labels: bool = False):
    """The RGB image of ``scene`` (and, with ``labels=True``, an int map [H, W]: 0 = background, k = tile k's shape)."""
    s = scene.scale
    w, h = TILE * scene.cols * s, TILE * scene.rows * s
    img = Image.new("RGB", (w, h), scene.background)
    draw = ImageDraw.Draw(img)
    lab = Image.new("L", (w, h), 0) if labels else None
    ldraw = ImageDraw.Draw(lab) if labels else None
    for t, obj in enumerate(scene.objects):
        if obj is None:
            continue
        ox, oy = TILE * (t % scene.cols), TILE * (t // scene.cols)
        _draw(draw, obj, ox, oy, s, obj.rgb)
        if labels:
            _draw(ldraw, obj, ox, oy, s, t + 1)
    return (img, np.asarray(lab, dtype=np.int64)) if labels else img


def patch_labels(scene: Scene, label_map: np.ndarray, min_cover: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch classes of every tile the processor makes for ``scene`` (regular tiles row-major, then the
    thumbnail): ``colour [T, P]`` (0 = background, 1 + index in COLOUR_NAMES) and ``shape [T, P]`` (0 = background,
    1 + index in SHAPES), P = (TILE / PATCH)^2. A patch takes the class of the shape covering most of it if that
    shape covers at least ``min_cover`` of its area (the regular tiles and the thumbnail are exact integer
    down-scalings of the drawing, so coverage is a block mean of ``label_map``)."""
    n = scene.num_tiles
    onehot = (label_map[None] == np.arange(n + 1)[:, None, None]).astype(np.float32)   # [n+1, H, W]
    g = TILE // PATCH

    def cover(block_h: int, block_w: int, part: np.ndarray) -> np.ndarray:     # part [n+1, g*bh, g*bw]
        return part.reshape(n + 1, g, block_h, g, block_w).mean(axis=(2, 4)).reshape(n + 1, g * g)

    s = scene.scale
    covers = []
    for t in range(n):
        r, c = divmod(t, scene.cols)
        side = TILE * s
        part = onehot[:, r * side:(r + 1) * side, c * side:(c + 1) * side]
        covers.append(cover(PATCH * s, PATCH * s, part))
    if n > 1:
        covers.append(cover(PATCH * s * scene.rows, PATCH * s * scene.cols, onehot))
    colour_cls = np.array([0] + [1 + COLOUR_NAMES.index(o.colour) if o else 0 for o in scene.objects])
    shape_cls = np.array([0] + [1 + SHAPES.index(o.shape) if o else 0 for o in scene.objects])
    colours, shapes = [], []
    for cov in covers:                                  # [n+1, P]
        cov = cov.copy()
        cov[0] = 0.0
        best = cov.argmax(0)                            # index of the object covering most of each patch
        best[cov.max(0) < min_cover] = 0
        colours.append(colour_cls[best])
        shapes.append(shape_cls[best])
    return np.stack(colours), np.stack(shapes)


def side_words(scene: Scene) -> tuple[str, str] | None:
    """The words that name the first and last tile of a one-row (left, right) or one-column (top, bottom) scene;
    None for other grids, whose tiles are only asked about by number."""
    if scene.rows == 1:
        return "left", "right"
    if scene.cols == 1:
        return "top", "bottom"
    return None


def image_sample(rng: random.Random, kinds: tuple[str, ...] = QUESTION_KINDS, labels: bool = False) -> Sample:
    """One image question. With ``labels=True`` the sample also carries ``label_map`` for ``patch_labels``."""
    kind = rng.choice(kinds)
    side = None
    if kind.startswith("side"):
        # one-row or one-column grids only; the asked-about end tile always holds a shape
        first = rng.random() < 0.5
        force = (0,) if first else (-1,)
        while True:
            scene = sample_scene(rng, force_tiles=force)
            if side_words(scene) is not None:
                break
        side = side_words(scene)[0 if first else 1]
        obj = scene.objects[0 if first else -1]
        if kind == "side_shape":
            question, answer = f"What shape is on the {side}?", obj.shape
        else:
            question, answer = f"What colour is the shape on the {side}?", obj.colour
    else:
        scene = sample_scene(rng)
        if kind == "count":
            question, answer = "How many shapes are there?", str(scene.count)
        else:
            k = rng.choice([t for t, o in enumerate(scene.objects) if o is not None])
            obj = scene.objects[k]
            if kind == "colour_tile":
                question, answer = f"What colour is the shape in tile {k + 1}?", obj.colour
            else:
                question, answer = f"What shape is in tile {k + 1}?", obj.shape
    if labels:
        img, label_map = render(scene, labels=True)
        sample = Sample(kind, question, answer, img, scene)
        sample.label_map = label_map
        return sample
    return Sample(kind, question, answer, render(scene), scene)


def scene_questions(scene: Scene) -> list[tuple[str, str]]:
    """Every question of ``QUESTION_KINDS`` that has an answer for ``scene``, as ``(question, answer)``."""
    out = [("How many shapes are there?", str(scene.count))]
    for k, obj in enumerate(scene.objects):
        if obj is not None:
            out += [(f"What colour is the shape in tile {k + 1}?", obj.colour),
                    (f"What shape is in tile {k + 1}?", obj.shape)]
    sides = side_words(scene)
    if sides is not None:
        for side, obj in zip(sides, (scene.objects[0], scene.objects[-1])):
            if obj is not None:
                out += [(f"What shape is on the {side}?", obj.shape),
                        (f"What colour is the shape on the {side}?", obj.colour)]
    return out


def image_dialogue(rng: random.Random, turns: int) -> Sample:
    """A multi-turn training sample: the first turn is exactly ``image_sample(rng)`` (so it has the held-out set's
    distribution), followed by up to ``turns - 1`` other questions about the same image in random order. One image
    then supervises several answers for one vision-tower pass and one copy of its tokens in the sequence."""
    sample = image_sample(rng)
    others = [qa for qa in scene_questions(sample.scene) if qa[0] != sample.question]
    rng.shuffle(others)
    sample.follow_ups = others[:max(0, turns - 1)]
    return sample


def text_sample(rng: random.Random, kinds: tuple[str, ...] = TEXT_KINDS) -> Sample:
    kind = rng.choice(kinds)
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return Sample(kind, f"What is {a} plus {b}?", str(a + b))
    if kind == "sub":
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        return Sample(kind, f"What is {a} minus {b}?", str(a - b))
    if kind == "max":
        a, b = rng.sample(range(10), 2)
        return Sample(kind, f"Which is bigger, {a} or {b}?", str(max(a, b)))
    if kind in ("pick_colour", "pick_shape"):
        # the decoder learns to say the colour and shape words here, before it ever sees an image
        colour, shape = rng.choice(COLOUR_NAMES), rng.choice(SHAPES)
        pair = [colour, shape] if rng.random() < 0.5 else [shape, colour]
        what, answer = ("colour", colour) if kind == "pick_colour" else ("shape", shape)
        return Sample(kind, f"Which word is a {what}: {pair[0]} or {pair[1]}?", answer)
    if kind in ("tile_lookup", "tile_listing"):
        return _tile_lookup(rng, listing=kind == "tile_listing")
    n = rng.randint(1, 6)
    words = [rng.choice(_WORDS + COLOUR_NAMES + SHAPES) for _ in range(n)]
    if kind == "last_word":   # copying a word from the context: what stage 1 needs from the frozen decoder
        return Sample(kind, f"What is the last word in: {' '.join(words)}?", words[-1])
    return Sample(kind, f"How many words are in: {' '.join(words)}?", str(n))


_SLOTS = (TILE // PATCH // 2) ** 2      # image tokens per tile after the pixel shuffle (16 at 112 px)


def _tile_lookup(rng: random.Random, listing: bool = False) -> Sample:
    """The image questions asked of a description in words laid out like the image tokens: each ``<tile_k>`` tag is
    followed by 16 word slots (one per image token of a tile), ``x`` for background and the shape's colour and name
    repeated over a short run at a random place, e.g. ``<tile_1> x x red circle red circle x ... <tile_2> x x ...``.
    A pretrained LLM can already find what follows a tag in its context; this from-scratch decoder learns it here,
    in text, over the same 16-token span an image tile fills, so stage 1 only has to teach the projector to write
    into the tiles' slots what the decoder already reads."""
    n = rng.randint(2, 6)
    objects = [None if rng.random() < 0.3 else (rng.choice(COLOUR_NAMES), rng.choice(SHAPES)) for _ in range(n)]
    if all(o is None for o in objects):
        objects[rng.randrange(n)] = (rng.choice(COLOUR_NAMES), rng.choice(SHAPES))
    text = "<Image>"                     # written like the image: a tag right after the previous tile's last slot
    for k, obj in enumerate(objects):
        slots = ["x"] * _SLOTS
        if obj is not None:
            run = 2 * rng.randint(1, 3)
            first = rng.randrange(_SLOTS - run + 1)
            slots[first:first + run] = list(obj) * (run // 2)
        text += f"<tile_{k + 1}> " + " ".join(slots)
    text += "</Image>"
    if listing:                          # the same description, asked LISTING_QUESTION (tile_listing)
        return Sample("tile_listing", f"{text}\n{LISTING_QUESTION}", tile_listing(objects, rng))
    kind = rng.choice(("colour_tile", "shape_tile", "count"))
    if kind == "count":
        return Sample("tile_lookup", f"{text}\nHow many shapes are there?", str(sum(o is not None for o in objects)))
    k = rng.choice([t for t, o in enumerate(objects) if o is not None])
    if kind == "colour_tile":
        return Sample("tile_lookup", f"{text}\nWhat colour is the shape in tile {k + 1}?", objects[k][0])
    return Sample("tile_lookup", f"{text}\nWhat shape is in tile {k + 1}?", objects[k][1])


def tile_listing(objects: list, rng: random.Random, items: int = LISTING_ITEMS,
                 sides: tuple[str, str] | None = None) -> str:
    """The answer to ``LISTING_QUESTION`` (a training-only prompt): ``items`` tiles picked at random, with
    repeats, each as its number and what it holds, e.g. ``3 red circle, 1 none, 3 red circle, 2 blue square``.

    Why it exists: a question about one tile supervises one lookup per sample, and with that the from-scratch
    decoder never learned to find a tile by its tag. It only ever learned to name some shape present in the image
    (about 57% right, the rate of guessing a present shape). A listing supervises ``items`` lookups per sample, and
    each lookup's tile number is the token just before it.
    - On a small test (<= 3 tiles of 6 slots, colour questions only, decoder alone), tile questions reached 99%
      after 400 steps with half the samples listings; without listings they were at 77% and 69% after 400 and
      800 steps.
    - On the full text task (2-6 tiles of 16 slots), 800 steps of batches half questions and half listings
      reached 73% on tile questions. 600 steps of the earlier stage-0b mix (half questions, half other text)
      reached 56%, and 1200-3000 steps of it stayed below 63% in earlier sessions.
    - The random tile numbers cannot be predicted, so training does not score them (``nvlm.train``).
    ``objects`` is one ``(colour, shape)`` pair, ``Obj`` or None per tile, in tile order. With ``sides`` (the
    side words of a one-row or one-column scene, e.g. ``("left", "right")``) an item may also name the first or
    last tile by its side, e.g. ``right blue square``, so the side questions get dense supervision too."""
    def what(obj) -> str:
        if obj is None:
            return "none"
        return f"{obj.colour} {obj.shape}" if isinstance(obj, Obj) else f"{obj[0]} {obj[1]}"

    names = [(str(k + 1), objects[k]) for k in range(len(objects))]
    if sides is not None:
        names += [(sides[0], objects[0]), (sides[1], objects[-1])]
    return ", ".join(f"{name} {what(obj)}" for name, obj in (rng.choice(names) for _ in range(items)))


def eval_set(task: str, n: int, seed: int = EVAL_SEED) -> list[Sample]:
    """The held-out set: ``n`` samples of ``task`` ("tiles" or "text") from ``seed`` (training never uses it)."""
    if task not in ("tiles", "text"):
        raise ValueError(f"eval_set: argument 'task' must be 'tiles' or 'text', got {task!r}")
    rng = random.Random(f"eval-{task}-{seed}")
    make = image_sample if task == "tiles" else text_sample
    return [make(rng) for _ in range(n)]


def describe(sample: Sample) -> str:
    """One line for logs: grid, objects and the question/answer."""
    if sample.scene is None:
        return f"{sample.question} -> {sample.answer}"
    s = sample.scene
    objs = " ".join(f"{o.colour[0]}{o.shape[0]}{o.size:.0f}" if o else "--" for o in s.objects)
    return f"{s.cols}x{s.rows} x{s.scale} [{objs}] {sample.question} -> {sample.answer}"
