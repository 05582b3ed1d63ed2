"""Images -> tiles and image strings, identical to the original (nanoVLM `DynamicResize` + `GlobalAndSplitImages`).

Shape legend:
    S   tile side (model_cfg.tile_size: 512 for 135m/360m, 128 for debug)
    H,W resized image height/width, multiples of S
    n   tiles of one image: 1 for a 1x1 grid, else 1 global tile + rows * cols

Pipeline: decode -> RGB -> resize (PIL bicubic) to multiples of S -> [0, 1] float -> split row-major into S x S
tiles; when the grid is not 1x1, a global tile (the whole resized image downscaled to S x S by antialiased
bilinear interpolation of the float tensor, like torchvision's tensor `resize`) goes first. Normalization
(mean/std of ImageConfig) is applied last; the default keeps [0, 1] like the original.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor
from torch.nn.functional import interpolate

from dualtower.model.config import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, MAX_GRID_SIDE, ModelConfig


class ImageLoadError(ValueError):
    """An image could not be decoded or converted; the message is one line."""


@dataclass
class ProcessedImage:
    tiles: Tensor  # (n, 3, S, S) float32
    grid: tuple[int, int]  # (rows, cols) of the split, before the global tile

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]


def resized_hw(height: int, width: int, tile: int, max_side: int, resize_to_max_side: bool) -> tuple[int, int]:
    """Target (height, width), both multiples of `tile`, in the original's float64 order of operations.

    The long side becomes `max_side` (or the next multiple of `tile`, capped at `max_side`); the short side is
    `ceil(short * scale / tile) * tile` with `scale = target_long / long`. Keeping this order reproduces the
    original's rounding quirks: 840x630 -> 2048x2048 (4x4 tiles) because 630 * (2048 / 840) / 512 > 3.
    """
    long, short = (width, height) if width >= height else (height, width)
    target_long = max_side if resize_to_max_side else min(max_side, math.ceil(long / tile) * tile)
    scale = target_long / long
    target_short = max(math.ceil(short * scale / tile) * tile, tile)
    return (target_short, target_long) if width >= height else (target_long, target_short)


def num_tiles(grid: tuple[int, int]) -> int:
    """Tiles of one image: the grid plus a global tile, except a 1x1 grid which is its own global tile."""
    rows, cols = grid
    return 1 if rows * cols == 1 else 1 + rows * cols


def image_string(grid: tuple[int, int], tokens_per_tile: int, index: int | None = None) -> str:
    """The text that stands for one image: `[<image: index>]<|global_image|>` + placeholders, then per tile
    `<row_r_col_c>` + placeholders (tiles only when the grid is not 1x1).

    `index` is given only when the sample has several images; it is 0-based, as the original's enumerate().
    """
    rows, cols = grid
    if rows > MAX_GRID_SIDE or cols > MAX_GRID_SIDE:
        raise ValueError(f"grid {grid} exceeds the {MAX_GRID_SIDE}x{MAX_GRID_SIDE} row/col tags")
    placeholders = IMAGE_TOKEN * tokens_per_tile
    parts = [] if index is None else [f"<image: {index}>"]
    parts += [GLOBAL_IMAGE_TOKEN, placeholders]
    if rows * cols > 1:
        parts += [f"<row_{r}_col_{c}>{placeholders}" for r in range(1, rows + 1) for c in range(1, cols + 1)]
    return "".join(parts)


def image_token_count(grid: tuple[int, int], tokens_per_tile: int) -> int:
    """Tokens of `image_string(grid, ...)` without the `<image: k>` prefix: one tag + placeholders per tile."""
    return num_tiles(grid) * (tokens_per_tile + 1)


def load_image(source: str | os.PathLike | bytes | Image.Image | dict[str, Any]) -> Image.Image:
    """Decode `source` (a path, encoded bytes, a PIL image, or an HF `{bytes, path}` dict) into an RGB image."""
    return to_rgb(decode_image(source))


def decode_image(source: str | os.PathLike | bytes | Image.Image | dict[str, Any]) -> Image.Image:
    """Decode without converting the mode; raises ImageLoadError with a one-line message."""
    try:
        image = _open(source)
        _load_strictly(image)
        return image
    except ImageLoadError:
        raise
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, bomb errors, ...)
        message = str(error).splitlines()[0] if str(error) else ""
        raise ImageLoadError(f"cannot decode image: {type(error).__name__}: {message}"[:300]) from error


def _load_strictly(image: Image.Image) -> None:
    """Decode every pixel, failing on truncated files even if another library (lmms-eval does, at import)
    has switched PIL's process-wide LOAD_TRUNCATED_IMAGES on: a half-grey image is lost data, not a sample."""
    permissive = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = permissive


def _open(source: Any) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        if source.get("bytes"):
            return _open(source["bytes"])
        if source.get("path"):
            return _open(source["path"])
        raise ImageLoadError("image dict has neither bytes nor path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    if isinstance(source, (str, os.PathLike)):
        return Image.open(Path(os.fspath(source)))
    raise ImageLoadError(f"unsupported image type {type(source).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the original (PIL `convert("RGB")`, alpha dropped), except that 16/32-bit and float images are
    rescaled to 8 bits first instead of being clipped to white. Raises ImageLoadError if PIL cannot convert."""
    if image.mode == "RGB":
        return image
    try:
        if image.mode.startswith(("I", "F")):
            values = np.asarray(image, dtype=np.float64)
            high = values.max(initial=0.0)
            if high > 255:  # 16-bit data: map the full range onto 8 bits
                values = values * (255.0 / (65535.0 if high <= 65535 else high))
            image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ImageLoadError(f"cannot convert a {image.mode} image to RGB: {error}"[:300]) from error


class ImageProcessor:
    """Resize + split + normalize as configured by a ModelConfig (tile size, max side, resize rule, mean/std)."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        self.tile = model_cfg.tile_size
        self.max_side = model_cfg.image.max_img_size
        self.resize_to_max_side = model_cfg.image.resize_to_max_side_len
        self.tokens_per_tile = model_cfg.image_tokens_per_tile
        if math.ceil(self.max_side / self.tile) > MAX_GRID_SIDE:
            raise ValueError(
                f"image.max_img_size {self.max_side} allows grids beyond the {MAX_GRID_SIDE}x{MAX_GRID_SIDE} row/col "
                f"tags at {self.tile}-px tiles"
            )
        mean, std = model_cfg.image.mean, model_cfg.image.std
        self._normalize = any(m != 0.0 for m in mean) or any(s != 1.0 for s in std)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize rule."""
        new_h, new_w = resized_hw(height, width, self.tile, self.max_side, self.resize_to_max_side)
        return new_w, new_h

    def grid_for(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) for an image of this size, without touching pixels."""
        new_w, new_h = self.resized_size(width, height)
        return new_h // self.tile, new_w // self.tile

    def process(self, image: Image.Image) -> ProcessedImage:
        image = to_rgb(image)
        new_w, new_h = self.resized_size(*image.size)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        # uint8 -> [0, 1] float32 (the same correctly rounded division as ToTensor's .float().div(255)) and the
        # row-major split run in numpy, single-threaded: torch's intra-op threads only contend on small images.
        chw = np.divide(np.asarray(image).transpose(2, 0, 1), np.float32(255), dtype=np.float32)  # (3, H, W)
        rows, cols = new_h // self.tile, new_w // self.tile
        first = 1 if rows * cols > 1 else 0
        tiles = torch.empty(first + rows * cols, 3, self.tile, self.tile)
        self._split_into(chw, tiles[first:].numpy(), rows, cols)
        if first:
            whole = torch.from_numpy(chw)[None]
            tiles[0] = interpolate(whole, size=(self.tile, self.tile), mode="bilinear", align_corners=False,
                                   antialias=True)[0]
        if self._normalize:
            tiles = tiles.sub_(self._mean).div_(self._std)
        return ProcessedImage(tiles=tiles, grid=(rows, cols))

    def _split_into(self, chw: np.ndarray, out: np.ndarray, rows: int, cols: int) -> None:
        """(3, H, W) -> out (rows * cols, 3, S, S), row-major tiles."""
        s = self.tile
        out.reshape(rows, cols, 3, s, s)[...] = chw.reshape(3, rows, s, cols, s).transpose(1, 3, 0, 2, 4)
