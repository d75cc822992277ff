"""Images from the internet, through the path users take (``NVLMProcessor`` -> ``load_image`` -> tiling): every bad
file is a ValueError naming it, every odd-but-valid one loads as the RGB image a person would see. The per-case
unit tests of ``nvlm.image`` are in tests/model/test_image.py (listed in tests/reliability/__init__.py)."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from nvlm.image import load_image, preprocess
from nvlm.processor import NVLMProcessor
from nvlm.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def proc():
    return NVLMProcessor(build_tokenizer(), image_size=224, patch_size=14)     # tiny-d geometry: 64 slots a tile


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w, h, mode="RGB", seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB").convert(mode)


def png_header_only(width, height):
    """A PNG that declares width x height in its IHDR, then a scrap of data: a decompression bomb's header."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def slots(out, proc):
    return int((out["input_ids"] == proc.image_token_id).sum())


# ----------------------------------------------------------------------------------------------------------------
# Bad files, through the processor
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, data, match", [
    ("notes.jpg", b"this is plain text, not a JPEG\n", "not an image file Pillow can read"),
    ("empty.png", b"", r"is empty \(0 bytes\)"),
    ("cut.jpg", encode(noise(120, 90), "JPEG")[:700], "cannot decode image .*truncated or corrupt"),
    ("cut.png", encode(noise(120, 90), "PNG")[:2000], "cannot decode image .*truncated or corrupt"),
    ("cut.webp", encode(noise(120, 90), "WEBP")[:300], "truncated or corrupt|not an image file|cannot read image"),
    ("header.png", b"\x89PNG\r\n\x1a\n", "not an image file Pillow can read|cannot read image"),
])
def test_bad_image_files_name_the_file(proc, tmp_path, name, data, match):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as info:
        proc(str(path), "What is it?")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fmt, cut", [("JPEG", 700), ("PNG", 2000)])
def test_truncated_file_is_refused_even_if_pillow_was_told_to_accept_it(monkeypatch, fmt, cut):
    """Libraries often set PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True globally; Pillow then fills the missing
    part with grey (a silent wrong answer). load_image refuses anyway, and restores the caller's setting."""
    data = encode(noise(120, 90), fmt)[:cut]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    with Image.open(io.BytesIO(data)) as im:                   # what Pillow alone would have done
        im.load()
        assert im.size == (120, 90)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_cap_is_configurable_through_the_processor(tmp_path):
    tok = build_tokenizer()
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(12000, 10000))            # 120 MP declared in a 100-byte file
    with pytest.raises(ValueError, match=r"bomb.png' has 12000x10000 = 120,000,000 pixels, more than max_pixels = "
                                         r"89,478,485 \(decompression-bomb guard"):
        NVLMProcessor(tok)(str(bomb), "?")                     # default cap = Pillow's default
    small = NVLMProcessor(tok, max_pixels=10_000, image_size=224)
    ok, big = encode(noise(100, 100), "PNG"), encode(noise(101, 100), "PNG")
    assert small(ok, "?")["pixel_values"].shape[0] == 1
    with pytest.raises(ValueError, match=r"101x100 = 10,100 pixels, more than max_pixels = 10,000"):
        small(big, "?")
    assert NVLMProcessor(tok, max_pixels=None, image_size=224)(big, "?")["pixel_values"].shape[0] == 1


# ----------------------------------------------------------------------------------------------------------------
# Odd but valid images
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, grid", [((1, 1), (1, 1)), ((100000, 10), (6, 1)), ((10, 100000), (1, 6)),
                                        ((3, 2000), (1, 6))])
def test_extreme_sizes_through_the_processor(proc, size, grid):
    out = proc(encode(noise(*size), "PNG"), "Describe.")
    tiles = grid[0] * grid[1] + (grid != (1, 1))               # + thumbnail when there is more than one tile
    assert out["image_grids"] == [grid] and out["num_tiles"] == [tiles]
    assert out["pixel_values"].shape == (tiles, 3, 224, 224) and torch.isfinite(out["pixel_values"]).all()
    assert slots(out, proc) == tiles * 64


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B",
                                  "F", "LA", "PA", "RGBa", "La", "RGBX"])
def test_every_pillow_mode_becomes_rgb_and_tiles(mode):
    img = Image.new(mode, (7, 5))
    rgb = load_image(img)
    assert rgb.mode == "RGB" and rgb.size == (7, 5)
    pv, grid = preprocess(rgb, 1, 1, image_size=28)
    assert grid == (1, 1) and pv.shape == (1, 3, 28, 28) and torch.isfinite(pv).all()


def test_sixteen_bit_png_from_a_file(tmp_path):
    a = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(a).save(path)
    got = np.asarray(load_image(path))[0, :, 0].tolist()
    assert got == [0, round(1000 / 257), round(32768 / 257), 255]      # scaled, not clipped at 255


def test_cmyk_jpeg_palette_gif_and_alpha_webp(tmp_path):
    red = Image.new("RGB", (8, 8), (200, 20, 20))
    cmyk = load_image(encode(red.convert("CMYK"), "JPEG", quality=95))
    assert np.abs(np.asarray(cmyk).astype(int) - [200, 20, 20]).max() < 12
    pal = red.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert np.asarray(load_image(encode(pal, "GIF"))).reshape(-1, 3).tolist()[0] == [200, 20, 20]
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))            # fully transparent black: shown as white
    assert (np.asarray(load_image(encode(clear, "WEBP", lossless=True))) == 255).all()


@pytest.mark.parametrize("orientation, expected", [
    (1, lambda a: a), (2, np.fliplr), (3, lambda a: np.rot90(a, 2)), (4, np.flipud),
    (5, lambda a: np.rot90(np.fliplr(a), 1)), (6, lambda a: np.rot90(a, -1)),
    (7, lambda a: np.rot90(np.fliplr(a), -1)), (8, lambda a: np.rot90(a, 1)),
])
def test_exif_orientation_applied_for_jpeg(orientation, expected):
    """All eight EXIF orientations, in the format phones write (JPEG). Quadrants of distinct colours survive JPEG."""
    a = np.zeros((32, 48, 3), dtype=np.uint8)
    a[:16, :24], a[:16, 24:], a[16:, :24], a[16:, 24:] = (250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    got = np.asarray(load_image(encode(Image.fromarray(a), "JPEG", quality=95, exif=exif))).astype(int)
    want = expected(a).astype(int)
    assert got.shape == want.shape
    corners = [(0, 0), (0, -1), (-1, 0), (-1, -1)]
    for r, c in corners:
        assert np.abs(got[r, c] - want[r, c]).max() < 40, (orientation, r, c)
