"""Image processing against the original's rules: grids, tile counts, token counts, image strings, pixels."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from data_helpers import png_bytes
from PIL import Image
from torch.nn.functional import interpolate

from dualtower.data.images import (
    ImageLoadError,
    ImageProcessor,
    image_string,
    image_token_count,
    load_image,
    num_tiles,
    resized_hw,
)
from dualtower.model.config import ImageConfig, flavor

pytest_plugins = ["data_fixtures"]

# (width, height) -> (rows, cols) at P-CAULDRON (512-px tiles, long side always 2048), and the token count of
# the image string at 64 tokens per tile: 65 per tile incl. its tag, plus the global tile when not 1x1.
CAULDRON_TABLE = [
    ((840, 630), (4, 4), 1105),  # 4:3: 630 * (2048 / 840) / 512 = 3.0000000000000004 -> ceil 4 (the quirk)
    ((640, 480), (3, 4), 845),  # 4:3 but 480 * 3.2 / 512 = 3 exactly
    ((1024, 1024), (4, 4), 1105),
    ((1, 1), (4, 4), 1105),  # upscaled like everything else
    ((2048, 1024), (2, 4), 585),
    ((1024, 2048), (4, 2), 585),
    ((4000, 900), (1, 4), 325),
    ((20000, 10), (1, 4), 325),  # huge aspect ratio: the short side never drops below one tile
    ((300, 1000), (4, 2), 585),
]


@pytest.mark.parametrize(("size", "grid", "tokens"), CAULDRON_TABLE)
def test_grid_and_token_table_at_135m(size, grid, tokens, cfg_135m):
    processor = ImageProcessor(cfg_135m)
    assert processor.grid_for(*size) == grid
    assert image_token_count(grid, 64) == tokens
    assert num_tiles(grid) == (1 if grid == (1, 1) else 1 + grid[0] * grid[1])


def test_the_840x630_quirk_is_float64_order():
    exact = math.ceil(630 * 2048 / 840 / 512)  # 3 in exact arithmetic
    assert exact == 3
    assert resized_hw(630, 840, 512, 2048, True) == (2048, 2048)


@pytest.mark.parametrize(
    ("size", "max_side", "to_max", "expected_hw"),
    [
        ((700, 300), 512, False, (512, 512)),  # P-OCR: every image becomes one 512x512 tile
        ((100, 80), 512, False, (512, 512)),
        ((1000, 700), 2048, False, (1024, 1024)),  # long -> next multiple of 512; short ceil(700 * 1.024 / 512)
        ((3000, 600), 2048, False, (512, 2048)),
        ((600, 3000), 1024, False, (1024, 512)),
    ],
)
def test_resize_rule_without_resize_to_max(size, max_side, to_max, expected_hw):
    assert resized_hw(size[1], size[0], 512, max_side, to_max) == expected_hw


def test_one_tile_grid_is_65_tokens():
    cfg = flavor("135m")
    cfg.image = ImageConfig(max_img_size=512, resize_to_max_side_len=False)
    processor = ImageProcessor(cfg)
    assert processor.grid_for(700, 300) == (1, 1)
    assert image_token_count((1, 1), 64) == 65
    assert image_string((1, 1), 64) == "<|global_image|>" + "<|image|>" * 64


def test_image_string_format_and_token_count(tokenizer):
    text = image_string((1, 2), 3, index=1)
    assert text == (
        "<image: 1><|global_image|><|image|><|image|><|image|>"
        "<row_1_col_1><|image|><|image|><|image|><row_1_col_2><|image|><|image|><|image|>"
    )
    ids = tokenizer(image_string((3, 4), 64), add_special_tokens=False).input_ids
    assert len(ids) == 845 == image_token_count((3, 4), 64)
    assert ids.count(49152) == 13 * 64 and ids[0] == 49153
    assert ids[65] == tokenizer.convert_tokens_to_ids("<row_1_col_1>")
    assert ids[-65] == tokenizer.convert_tokens_to_ids("<row_3_col_4>")


def _reference_tiles(image: Image.Image, tile: int, max_side: int) -> torch.Tensor:
    """The original pipeline written out: PIL bicubic, ToTensor, row-major split, global tile first."""
    new_h, new_w = resized_hw(image.height, image.width, tile, max_side, True)
    resized = image.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
    x = torch.tensor(np.array(resized)).permute(2, 0, 1).float().div(255)
    rows, cols = new_h // tile, new_w // tile
    tiles = [x[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)]
    if rows * cols == 1:
        return torch.stack(tiles)
    whole = interpolate(x[None], size=(tile, tile), mode="bilinear", align_corners=False, antialias=True)
    return torch.cat([whole, torch.stack(tiles)])


@pytest.mark.parametrize("size", [(200, 90), (90, 200), (130, 130), (40, 10)])
def test_pixels_equal_the_reference(size, debug_cfg):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = ImageProcessor(debug_cfg).process(image)
    expected = _reference_tiles(image, 128, 256)
    assert out.tiles.dtype == torch.float32 and out.tiles.shape == expected.shape
    assert torch.equal(out.tiles, expected)
    assert out.num_tiles == num_tiles(out.grid)


def test_normalization_is_configurable(debug_cfg):
    image = Image.new("RGB", (128, 128), (255, 0, 51))
    plain = ImageProcessor(debug_cfg).process(image).tiles
    assert plain.min() >= 0 and plain.max() <= 1
    debug_cfg = flavor("debug")
    debug_cfg.image.mean, debug_cfg.image.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    normalized = ImageProcessor(debug_cfg).process(image).tiles
    torch.testing.assert_close(normalized, (plain - 0.5) / 0.5)
    assert normalized[0, 0].max() == 1.0 and normalized[0, 1].min() == -1.0


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "CMYK", "YCbCr", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    source = Image.new("RGB", (12, 8), (200, 100, 50))
    image = source.convert(mode) if mode not in ("I;16", "I", "F") else Image.new(mode, (12, 8), 40000)
    loaded = load_image(image)
    assert loaded.mode == "RGB" and loaded.size == (12, 8)
    if mode in ("I;16", "I", "F"):  # 16-bit range scaled, not clipped to white
        assert loaded.getpixel((0, 0)) == (156, 156, 156)


def test_load_from_bytes_path_pathlike_and_dict(tmp_path):
    image = Image.new("RGB", (5, 7), (1, 2, 3))
    data = png_bytes(image)
    (tmp_path / "x.png").write_bytes(data)
    class Location:  # any os.PathLike, as GenerationRequest accepts one as an image source
        def __fspath__(self) -> str:
            return str(tmp_path / "x.png")

    for source in (data, memoryview(data), tmp_path / "x.png", str(tmp_path / "x.png"), Location(),
                   {"bytes": data, "path": None}, {"bytes": None, "path": str(tmp_path / "x.png")}):
        assert load_image(source).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("bad", [b"", b"not an image", png_bytes(Image.new("RGB", (64, 64)))[:60], 17, {}])
def test_undecodable_input_raises_one_line(bad):
    with pytest.raises(ImageLoadError) as info:
        load_image(bad)
    assert "\n" not in str(info.value)


def test_grayscale_png_16_bit_from_bytes():
    array = np.full((4, 4), 65535, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_truncated_image_raises_even_when_pil_is_permissive(monkeypatch):
    """lmms-eval switches PIL's global LOAD_TRUNCATED_IMAGES on at import; a truncated file must still fail."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    truncated = png_bytes(Image.new("RGB", (40, 30), (9, 9, 9)))[:50]
    with pytest.raises(ImageLoadError):
        load_image(truncated)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_tile_tags_are_row_major_like_the_tiles(tokenizer):
    """Tags follow the tiles' row-major order: on a 2x2 grid r1c2 comes before r2c1."""
    assert image_string((2, 2), 1) == (
        "<|global_image|><|image|><row_1_col_1><|image|><row_1_col_2><|image|>"
        "<row_2_col_1><|image|><row_2_col_2><|image|>"
    )
    ids = tokenizer(image_string((3, 4), 64), add_special_tokens=False).input_ids
    tags = [ids[65 * (k + 1)] for k in range(12)]
    assert tags == [tokenizer.convert_tokens_to_ids(f"<row_{k // 4 + 1}_col_{k % 4 + 1}>") for k in range(12)]


def test_std_only_normalization_is_applied(debug_cfg):
    image = Image.new("RGB", (128, 128), (255, 0, 51))
    plain = ImageProcessor(debug_cfg).process(image).tiles
    std_only = flavor("debug")
    std_only.image.mean, std_only.image.std = (0.0, 0.0, 0.0), (0.5, 0.5, 0.5)
    scaled = ImageProcessor(std_only).process(image).tiles
    torch.testing.assert_close(scaled, plain / 0.5)
    assert scaled[0, 0].max() == 2.0 and scaled[0, 2].max() == pytest.approx(0.4, abs=1e-6)
