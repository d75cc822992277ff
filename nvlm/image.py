"""Image loading and NVLM's dynamic high-resolution tiling (spec §4).

Pipeline for one image (NVLM-D-72B: S = 448, 1..6 tiles, thumbnail on):

    load_image(src)                      path / bytes / file / PIL -> RGB PIL image (EXIF-rotated, validated)
    dynamic_preprocess(img)              -> tiles: list of S x S PIL images, grid (cols, rows)
        candidate_grids(1, 6)            the 14 grids (i cols, j rows), 1 <= i*j <= 6, in InternVL's order
        find_closest_aspect_ratio(...)   closest i/j to W/H; exact ties go to the later grid if the image is big
        resize to (S*cols, S*rows) with Pillow BICUBIC, crop row-major; + whole image resized to S x S when
        there is more than one tile (the thumbnail, last)
    tiles_to_tensor(tiles)               -> [T, 3, S, S] float32, /255 then ImageNet mean/std

`preprocess(img)` does the last two in one call. The arithmetic reproduces InternVL's published
`dynamic_preprocess` + torchvision `ToTensor`/`Normalize` bit for bit (tests compare against an independent copy),
which needs Pillow's own resampler (two-pass cubic with a = -0.5, 8-bit intermediate), not torch interpolation.

Loading differs from the reference `Image.open(p).convert('RGB')` only where that would be wrong or unsafe:
EXIF orientation is applied; transparent images are composited onto white instead of exposing whatever colour
the transparent pixels hold; 16-bit images are scaled to 8 bit instead of clipped at 255; oversized, empty,
truncated and non-image inputs raise `ValueError` naming the input. A plain RGB image is loaded exactly as
`convert('RGB')` would.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_image",
    "to_rgb",
    "candidate_grids",
    "find_closest_aspect_ratio",
    "dynamic_preprocess",
    "tiles_to_tensor",
    "preprocess",
]

# Same value as Pillow's own PIL.Image.MAX_IMAGE_PIXELS default (~89.5 MP, e.g. 9459 x 9459; a 48 MP phone photo
# passes). Decoded as RGB that is ~268 MB. Raising it above 2x Pillow's global limit also needs
# PIL.Image.MAX_IMAGE_PIXELS raised, because Pillow refuses such images itself.
DEFAULT_MAX_PIXELS = 89_478_485

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _describe(src) -> str:
    """A name for `src` in error messages."""
    if isinstance(src, (str, os.PathLike)):
        return repr(os.fspath(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(memoryview(src).cast('B'))} bytes>"
    if isinstance(src, Image.Image):
        name = getattr(src, "filename", "") or ""
        return repr(name) if name else f"<PIL.Image mode={src.mode} size={src.size}>"
    return repr(getattr(src, "name", None) or f"<{type(src).__name__}>")


def _open(src, name: str) -> Image.Image:
    """Open `src` lazily (header only) as a PIL image, mapping every failure to ValueError."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise ValueError(f"image file {name} does not exist or is not a regular file")
        if os.path.getsize(path) == 0:
            raise ValueError(f"image file {name} is empty (0 bytes)")
        fp = path
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ValueError(f"image {name} is empty (0 bytes)")
        fp = io.BytesIO(data)
    elif hasattr(src, "read"):
        fp = src
    else:
        raise ValueError(
            f"image source must be a path, bytes, a binary file object or a PIL.Image, got {type(src).__name__}"
        )
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"image {name} is larger than Pillow's hard limit ({e}); raise PIL.Image.MAX_IMAGE_PIXELS to allow it"
        ) from e
    except UnidentifiedImageError as e:
        raise ValueError(f"{name} is not an image file Pillow can read") from e
    except (OSError, SyntaxError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e


_strict_lock = threading.Lock()
_strict_users = 0
_saved_truncated_flag = False


@contextlib.contextmanager
def _strict_truncation():
    """Decode with Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` off, even if other code turned it on (Pillow
    would then fill the missing part of a truncated file with grey: a silent wrong answer). Counted, so concurrent
    loads overlap freely; the caller's setting is restored when the last one finishes."""
    global _strict_users, _saved_truncated_flag
    with _strict_lock:
        if _strict_users == 0:
            _saved_truncated_flag = ImageFile.LOAD_TRUNCATED_IMAGES
        _strict_users += 1
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        with _strict_lock:
            _strict_users -= 1
            if _strict_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_truncated_flag


def to_rgb(img: Image.Image, background: tuple[int, int, int] = _WHITE) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (returns a new image).

    - RGB: `img.convert('RGB')` (a copy), so normal images match the reference loader exactly.
    - With transparency (RGBA, LA, PA, RGBa, La, P/L/RGB with a transparency key): alpha-composited onto
      `background`, because dropping alpha shows the arbitrary colour stored under transparent pixels (often
      black, which hides black text on a transparent logo).
    - 16-bit grey (I;16*): scaled with round(v * 255 / 65535); `convert('RGB')` would clip everything >= 255.
    - I (32-bit int): as 16-bit when any value exceeds 255, else taken as 8-bit; F (float): [0, 1] scaled by 255
      when all values lie in [0, 1], else clipped to [0, 255].
    - everything else (1, L, P, CMYK, YCbCr, LAB, HSV): Pillow's `convert('RGB')`.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        a = np.asarray(img)
        if mode == "F":
            a = a.astype(np.float64)
            a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
            if a.size and a.min() >= 0.0 and a.max() <= 1.0:
                a = a * 255.0
            grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        else:
            a = a.astype(np.int64)
            if mode == "I" and (a.size == 0 or a.max() <= 255):
                grey = np.clip(a, 0, 255).astype(np.uint8)
            else:
                a = np.clip(a, 0, 65535)
                grey = ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        if mode == "La":  # premultiplied grey + alpha: Pillow only converts it to LA
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert image mode {mode!r} to RGB: {e}") from e


def load_image(
    src, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, background: tuple[int, int, int] = _WHITE
) -> Image.Image:
    """Load `src` (path, bytes, binary file object or PIL.Image) as a fully decoded RGB PIL image.

    Checks, in order: the source exists and is not empty; Pillow recognises it; the width x height read from the
    header is non-zero and at most `max_pixels` (None disables this check; checked before any pixel is decoded);
    the whole image decodes (so truncated JPEG/PNG files fail here, not later). Then EXIF orientation is applied
    and the mode converted with `to_rgb`. Every failure raises ValueError naming the input.
    """
    name = _describe(src)
    if max_pixels is not None and (isinstance(max_pixels, bool) or int(max_pixels) != max_pixels or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    opened = img = _open(src, name)
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ValueError(f"image {name} has zero size ({width}x{height})")
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(
                f"image {name} has {width}x{height} = {width * height:,} pixels, more than max_pixels = "
                f"{max_pixels:,} (decompression-bomb guard; pass a larger max_pixels to allow it)"
            )
        try:
            with _strict_truncation():
                img.load()  # decode everything now: truncated or corrupt data raises here
            img = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, EOFError, ValueError, MemoryError) as e:
            raise ValueError(f"cannot decode image {name} (truncated or corrupt?): {e}") from e
        return to_rgb(img, background)
    finally:
        if opened is not src:  # we opened it: release the file handle (the returned image is a new object)
            opened.close()


# ----------------------------------------------------------------------------------------------------------------
# Dynamic tiling
# ----------------------------------------------------------------------------------------------------------------


def candidate_grids(min_num: int = 1, max_num: int = 6) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, in InternVL's order.

    InternVL builds a Python *set* and stable-sorts it by area, so grids of equal area keep CPython's set
    iteration order (e.g. (3, 1) before (1, 3)). That order decides exact ties in `find_closest_aspect_ratio`,
    so the set is built here exactly as InternVL builds it rather than listed by hand.
    """
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(grids, key=lambda g: g[0] * g[1])


def find_closest_aspect_ratio(
    aspect_ratio: float, grids: Sequence[tuple[int, int]], width: int, height: int, image_size: int
) -> tuple[int, int]:
    """The grid whose cols/rows is closest to `aspect_ratio` (= width / height).

    Walks `grids` in order and keeps the first strictly closer one. On an exact tie with the best so far, the
    later grid wins iff the image area exceeds half of *that candidate's* tiled area (0.5 * S^2 * cols * rows),
    so big images get more tiles. A square image therefore picks 2x2 iff width * height > 401,408 (S = 448).
    """
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def _check_tiling_args(img, min_num: int, max_num: int, image_size: int) -> None:
    if not isinstance(img, Image.Image):
        raise ValueError(f"img must be a PIL.Image (use load_image first), got {type(img).__name__}")
    if img.width <= 0 or img.height <= 0:
        raise ValueError(f"img has zero size ({img.width}x{img.height})")
    for arg, value in (("min_num", min_num), ("max_num", max_num), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if min_num > max_num:
        raise ValueError(f"min_num ({min_num}) must not exceed max_num ({max_num})")


def dynamic_preprocess(
    img: Image.Image, min_num: int = 1, max_num: int = 6, image_size: int = 448, use_thumbnail: bool = True
) -> tuple[list[Image.Image], tuple[int, int]]:
    """Split `img` into cols x rows tiles of image_size^2 (row-major) plus, if more than one tile, a thumbnail.

    Returns (tiles, (cols, rows)); len(tiles) = cols*rows (+1 with the thumbnail, which comes last).
    """
    _check_tiling_args(img, min_num, max_num, image_size)
    img = to_rgb(img) if img.mode != "RGB" else img
    width, height = img.size
    cols, rows = find_closest_aspect_ratio(
        width / height, candidate_grids(min_num, max_num), width, height, image_size
    )
    # Resize the whole image to the grid, then cut it; tile k sits at column k % cols, row k // cols.
    resized = img.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for r in range(rows):
        for c in range(cols):
            box = (c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)
            tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) > 1:
        tiles.append(img.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles, (cols, rows)


def tiles_to_tensor(
    tiles: Sequence[Image.Image], mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Stack RGB tiles into [T, 3, S, S] float32: x / 255, then (x - mean) / std per channel (all in fp32,
    the same operations as torchvision's ToTensor + Normalize)."""
    if len(tiles) == 0:
        raise ValueError("tiles must contain at least one image")
    size = tiles[0].size
    for k, tile in enumerate(tiles):
        if not isinstance(tile, Image.Image) or tile.mode != "RGB" or tile.size != size:
            raise ValueError(f"tiles[{k}] must be an RGB PIL.Image of size {size}, got {tile!r}")
    # [T, H, W, 3] uint8 -> [T, 3, H, W] float32
    x = torch.from_numpy(np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])).permute(0, 3, 1, 2)
    x = x.to(torch.float32).div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub(mean_t).div(std_t).contiguous()


def preprocess(
    img: Image.Image, min_num: int = 1, max_num: int = 6, image_size: int = 448, use_thumbnail: bool = True
) -> tuple[torch.Tensor, tuple[int, int]]:
    """`dynamic_preprocess` + `tiles_to_tensor`: returns (pixel_values [T, 3, S, S] float32, (cols, rows))."""
    tiles, grid = dynamic_preprocess(img, min_num, max_num, image_size, use_thumbnail)
    return tiles_to_tensor(tiles), grid
