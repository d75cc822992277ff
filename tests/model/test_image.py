"""Image loading and dynamic tiling (nvlm/image.py, spec §4)."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm.image import (
    DEFAULT_MAX_PIXELS,
    candidate_grids,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    load_image,
    preprocess,
    tiles_to_tensor,
)

# ---------------------------------------------------------------------------------------------------------------
# Independent reference: InternVL's published preprocessing (VLMEvalKit vlmeval/vlm/nvlm.py, InternVL README),
# copied as published, with torchvision's ToTensor + Normalize written out in numpy float32.
# ---------------------------------------------------------------------------------------------------------------


def ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_target_ratios(min_num, max_num):
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def ref_dynamic_preprocess(image, min_num=1, max_num=6, image_size=448, use_thumbnail=True):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = ref_target_ratios(min_num, max_num)
    target_aspect_ratio = ref_find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size
    )
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images, target_aspect_ratio


def ref_normalise(tiles):
    """torchvision ToTensor (uint8 -> fp32 / 255, HWC -> CHW) + Normalize(ImageNet), in numpy float32."""
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
    out = []
    for tile in tiles:
        x = np.asarray(tile).astype(np.float32).transpose(2, 0, 1) / np.float32(255)
        out.append((x - mean) / std)
    return np.stack(out)


def noise_image(width, height, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode=mode)


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Candidate grids and selection
# ---------------------------------------------------------------------------------------------------------------


def test_candidate_grids_spec_order():
    # spec §4.2: CPython's set iteration order, stably sorted by area.
    assert candidate_grids(1, 6) == [
        (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4),
        (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6), (3, 2),
    ]  # fmt: skip


@pytest.mark.parametrize("min_num,max_num", [(1, 1), (1, 12), (2, 6), (4, 9)])
def test_candidate_grids_other_ranges(min_num, max_num):
    grids = candidate_grids(min_num, max_num)
    expected = {(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if min_num <= i * j <= max_num}
    assert set(grids) == expected and len(grids) == len(expected)
    areas = [i * j for i, j in grids]
    assert areas == sorted(areas)


# (width, height) -> (cols, rows). S = 448, 1..6 tiles.
GRID_TABLE = [
    ((1, 1), (1, 1)),
    ((448, 448), (1, 1)),
    ((633, 633), (1, 1)),  # 400,689 px <= 401,408: stays one tile
    ((634, 634), (2, 2)),  # 401,956 px > 401,408: exact 1:1 tie goes to 2x2
    ((633, 634), (1, 1)),  # not exactly square: 1:1 and 2:2 tie, area 401,322 too small
    ((700, 600), (2, 2)),  # 7:6 is closest to 1; tie with 2:2 and area 420,000 > 401,408
    ((600, 560), (1, 1)),
    ((896, 448), (2, 1)),
    ((448, 896), (1, 2)),
    ((1344, 896), (3, 2)),
    ((1000, 400), (3, 1)),  # 2.5 exactly between 2:1 and 3:1; 400,000 > 0.5*448^2*3 = 301,056
    ((500, 200), (2, 1)),  # same ratio, 100,000 px: keeps 2:1
    ((1250, 1000), (3, 2)),  # 1.25: ties 1:1, 2:2, 3:2; 1,250,000 > 602,112 takes 3:2
    ((750, 600), (2, 2)),  # 1.25 with 450,000 px: 2:2 (> 401,408) but not 3:2 (<= 602,112)
    ((625, 500), (1, 1)),  # 1.25 with 312,500 px: 1:1
    ((1400, 800), (3, 2)),  # 1.75 between 2:1 and 3:2; 1,120,000 > 602,112
    ((700, 400), (2, 1)),  # 1.75 with 280,000 px
    ((3500, 1000), (4, 1)),  # 3.5 between 3:1 and 4:1; 3,500,000 > 401,408
    ((350, 100), (3, 1)),
    ((200, 500), (1, 3)),  # 0.4: |0.4 - 1/3| = 0.067 beats |0.4 - 1/2| = 0.1
    ((100000, 10), (6, 1)),
    ((10, 100000), (1, 6)),
    ((5000, 1000), (5, 1)),
    ((1, 3), (1, 3)),
]


@pytest.mark.parametrize("size,grid", GRID_TABLE, ids=[f"{w}x{h}" for (w, h), _ in GRID_TABLE])
def test_grid_table(size, grid):
    w, h = size
    # The table itself is checked against the published algorithm, so a wrong row cannot pass silently.
    ref = ref_find_closest_aspect_ratio(w / h, ref_target_ratios(1, 6), w, h, 448)
    assert find_closest_aspect_ratio(w / h, candidate_grids(1, 6), w, h, 448) == grid == ref


def test_square_threshold_is_the_candidates_area():
    grids = candidate_grids(1, 6)
    # aspect ratio exactly 1, area exactly 0.5 * 448^2 * 4 = 401,408: not more, so 1 tile.
    assert find_closest_aspect_ratio(1.0, grids, 401_408, 1, 448) == (1, 1)
    assert find_closest_aspect_ratio(1.0, grids, 401_409, 1, 448) == (2, 2)
    # 6 tiles' worth of area does not matter for 1:1 (3:2 is not a tie at ratio 1).
    assert find_closest_aspect_ratio(1.0, grids, 10**9, 1, 448) == (2, 2)


# ---------------------------------------------------------------------------------------------------------------
# Tiles: order, thumbnail, pixels
# ---------------------------------------------------------------------------------------------------------------


def test_tile_order_is_row_major_and_thumbnail_last():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    img = Image.new("RGB", (3 * 448, 2 * 448))
    for k, colour in enumerate(colours):  # block k at column k % 3, row k // 3
        img.paste(colour, (k % 3 * 448, k // 3 * 448, (k % 3 + 1) * 448, (k // 3 + 1) * 448))
    tiles, grid = dynamic_preprocess(img)
    assert grid == (3, 2) and len(tiles) == 7
    for k, colour in enumerate(colours):
        a = np.asarray(tiles[k])
        assert (a == np.array(colour, dtype=np.uint8)).all(), k
    assert np.array_equal(np.asarray(tiles[6]), np.asarray(img.resize((448, 448), Image.Resampling.BICUBIC)))


def test_thumbnail_only_with_several_tiles():
    tiles, grid = dynamic_preprocess(Image.new("RGB", (300, 300)))
    assert grid == (1, 1) and len(tiles) == 1
    tiles, grid = dynamic_preprocess(Image.new("RGB", (896, 448)))
    assert grid == (2, 1) and len(tiles) == 3
    tiles, grid = dynamic_preprocess(Image.new("RGB", (896, 448)), use_thumbnail=False)
    assert len(tiles) == 2
    tiles, grid = dynamic_preprocess(Image.new("RGB", (5000, 100)), max_num=1)
    assert grid == (1, 1) and len(tiles) == 1


@pytest.mark.parametrize(
    "size,kw",
    [
        ((1, 1), {}),
        ((300, 200), {}),
        ((1000, 400), {}),
        ((57, 700), {}),
        ((900, 900), {}),
        ((1300, 950), {}),
        ((100000, 10), {}),
        ((640, 480), {"max_num": 12}),
        ((400, 300), {"image_size": 224, "min_num": 2, "max_num": 4}),
    ],
)
def test_pixels_match_reference(size, kw):
    img = noise_image(*size, seed=size[0])
    pixel_values, grid = preprocess(img, **kw)
    ref_tiles, ref_grid = ref_dynamic_preprocess(img, **kw)
    expected = torch.from_numpy(ref_normalise(ref_tiles))
    s = kw.get("image_size", 448)
    assert grid == ref_grid
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (len(ref_tiles), 3, s, s)
    assert torch.equal(pixel_values, expected)  # bit-exact


def test_tiles_to_tensor_values():
    tile = Image.new("RGB", (4, 4), (255, 0, 128))
    x = tiles_to_tensor([tile])
    assert x.shape == (1, 3, 4, 4)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="tiles"):
        tiles_to_tensor([])
    with pytest.raises(ValueError, match=r"tiles\[1\]"):
        tiles_to_tensor([tile, Image.new("RGB", (5, 4))])


@pytest.mark.parametrize(
    "kw,match",
    [({"min_num": 0}, "min_num"), ({"max_num": 0}, "max_num"), ({"min_num": 3, "max_num": 2}, "min_num"),
     ({"image_size": 0}, "image_size")],
)  # fmt: skip
def test_tiling_argument_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        dynamic_preprocess(Image.new("RGB", (10, 10)), **kw)


def test_tiling_rejects_bad_images():
    with pytest.raises(ValueError, match="PIL.Image"):
        dynamic_preprocess(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="zero size"):
        dynamic_preprocess(Image.new("RGB", (0, 4)))


def test_non_rgb_input_is_converted():
    img = noise_image(50, 40, mode="L")
    pv, grid = preprocess(img)
    pv_rgb, _ = preprocess(img.convert("RGB"))
    assert torch.equal(pv, pv_rgb)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
def test_rgb_image_loads_like_reference(tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    noise_image(37, 23, seed=3).save(path, fmt)
    got = load_image(path)
    with Image.open(path) as ref:
        expected = ref.convert("RGB")
    assert got.mode == "RGB" and got.size == (37, 23)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    # Every source kind gives the same image.
    data = path.read_bytes()
    for src in (str(path), data, bytearray(data), io.BytesIO(data), Image.open(path)):
        assert np.array_equal(np.asarray(load_image(src)), np.asarray(expected))


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.png"
    img.save(path, exif=exif)
    got = load_image(path)
    assert got.size == (20, 40)
    assert np.array_equal(np.asarray(got), np.rot90(np.asarray(img), k=-1))  # clockwise
    assert np.asarray(got)[0, 0].tolist() == [255, 0, 0] and np.asarray(got)[-1, 0].tolist() == [0, 0, 255]


def test_transparency_composited_on_white():
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    a[0, 0] = (10, 20, 30, 255)  # opaque: kept
    a[0, 1] = (0, 0, 0, 0)  # fully transparent black: white
    a[0, 2] = (0, 0, 0, 128)  # half transparent black: mid grey
    got = np.asarray(load_image(encode(Image.fromarray(a, "RGBA"), "PNG")))
    assert got[0, 0].tolist() == [10, 20, 30]
    assert got[0, 1].tolist() == [255, 255, 255] and got[1, 1].tolist() == [255, 255, 255]
    assert all(120 <= v <= 135 for v in got[0, 2])
    # LA
    la = Image.fromarray(np.array([[[50, 255], [0, 0]]], dtype=np.uint8), "LA")
    assert np.asarray(load_image(encode(la, "PNG"))).tolist() == [[[50, 50, 50], [255, 255, 255]]]
    # palette with a transparent index
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    got = load_image(encode(p, "PNG", transparency=0))
    assert np.asarray(got).tolist() == [[[255, 255, 255], [200, 10, 10]]]
    # an opaque palette image is a plain convert('RGB')
    assert np.asarray(load_image(encode(p, "PNG"))).tolist() == [[[0, 0, 0], [200, 10, 10]]]


def test_sixteen_bit_scaled_not_clipped():
    a = np.array([[0, 257 * 100, 65535, 30000]], dtype=np.uint16)
    data = encode(Image.fromarray(a), "PNG")
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I")  # Pillow reads it as a 16-bit mode
    got = np.asarray(load_image(data))
    assert got.shape == (1, 4, 3)
    assert got[0, :, 0].tolist() == [0, 100, 255, round(30000 / 257)]
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr"])
def test_other_modes_become_rgb(mode):
    src = noise_image(9, 7, mode="L" if mode in ("L", "1") else "RGB").convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "PNG"
    data = encode(src, fmt)
    got = load_image(data)
    with Image.open(io.BytesIO(data)) as im:
        expected = im.convert("RGB")
    assert got.mode == "RGB" and got.size == (9, 7)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    if mode == "1":
        assert set(np.unique(np.asarray(got)).tolist()) <= {0, 255}


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    with pytest.raises(ValueError, match="notes.txt.*not an image"):
        load_image(path)
    with pytest.raises(ValueError, match="not an image"):
        load_image(b"GIF89a but not really")
    with pytest.raises(ValueError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="image source"):
        load_image(12345)


def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg.*empty"):
        load_image(path)
    with pytest.raises(ValueError, match="empty"):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_fails_at_load(tmp_path, fmt):
    data = encode(noise_image(200, 150, seed=1), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut"):
        load_image(path)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_zero_sized_pil_image():
    with pytest.raises(ValueError, match="zero size"):
        load_image(Image.new("RGB", (0, 10)))


def png_header_only(width, height):
    """A PNG that declares width x height in its IHDR, followed by a scrap of IDAT and no IEND."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns above its own 89.5 MP
def test_pixel_cap_checked_from_header_before_decoding():
    # The data are truncated, so reaching the decoder would give a "truncated or corrupt" error instead.
    with pytest.raises(ValueError, match="more than max_pixels"):
        load_image(png_header_only(5000, 4000), max_pixels=10_000_000)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(png_header_only(5000, 4000), max_pixels=30_000_000)
    # The default cap (Pillow's own default limit) applies without any argument.
    assert DEFAULT_MAX_PIXELS == 89_478_485
    with pytest.raises(ValueError, match="more than max_pixels"):
        load_image(png_header_only(9000, 10000))  # 90,000,000 px
    # Far beyond Pillow's own hard limit: still a ValueError, not Pillow's exception.
    with pytest.raises(ValueError, match="larger than Pillow's hard limit"):
        load_image(png_header_only(30000, 30000), max_pixels=None)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(png_header_only(10, 10), max_pixels=0)
    noise = encode(noise_image(100, 100), "PNG")
    with pytest.raises(ValueError, match="100x100 = 10,000 pixels"):
        load_image(noise, max_pixels=9_999)
    assert load_image(noise, max_pixels=10_000).size == (100, 100)


def test_extreme_images_load_and_tile():
    for size, grid in (((100000, 10), (6, 1)), ((10, 100000), (1, 6)), ((1, 1), (1, 1))):
        img = load_image(encode(noise_image(*size), "PNG"))
        pv, got = preprocess(img)
        assert got == grid
        assert pv.shape == ((grid[0] * grid[1] + (grid != (1, 1))), 3, 448, 448)
        assert torch.isfinite(pv).all()


def test_int32_and_float_modes():
    wide = Image.fromarray(np.array([[0, 257 * 7, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 7, 255]  # 16-bit range: scaled
    narrow = Image.fromarray(np.array([[0, 7, 255]], dtype=np.int32), mode="I")
    assert np.asarray(load_image(narrow))[0, :, 0].tolist() == [0, 7, 255]  # 8-bit range: as is
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]
