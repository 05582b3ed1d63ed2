"""What goes into and comes out of generation: requests, prepared prompts, results and statistics.

Shape legend:
    P   prefix tokens (chat header, tile tags, image placeholders), T prompt text tokens
    N   image tiles of one request, S tile side in pixels
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from dualtower.generation.prefix_cache import PrefixKey, image_digest, tensor_digest


@dataclass
class GenerationRequest:
    """One conversation turn: images (paths, bytes or PIL images; may be empty; a single one may be given bare)
    and the user's question."""

    images: list[Any]
    prompt: str

    def __post_init__(self) -> None:
        # One source given bare is one image: iterating a path (or bytes) would read each character as an image.
        single = isinstance(self.images, str | PathLike | bytes | bytearray | memoryview | dict | Image.Image)
        self.images = [self.images] if single else list(self.images)


@dataclass
class PreparedPrompt:
    """A tokenized request: the inference prompt (ending with the assistant header) and its tiles."""

    input_ids: Tensor  # (P + T,) int64
    tiles: Tensor  # (N, 3, S, S) float, N = 0 without images
    prefix_len: int  # P: index of the last image placeholder + 1 (0 without images)
    # Digest of the source images' pixels; tiles are a function of them, and hashing the (smaller) source is
    # several times cheaper than hashing the float tiles. None: the tiles' bytes are hashed instead.
    image_digest: str | None = None

    def __post_init__(self) -> None:
        self.input_ids = torch.as_tensor(self.input_ids, dtype=torch.long).flatten()
        if not 0 <= self.prefix_len < self.input_ids.numel():
            raise ValueError(
                f"prefix_len {self.prefix_len} leaves no prompt text in a {self.input_ids.numel()}-token prompt"
            )

    @property
    def prefix_ids(self) -> Tensor:
        return self.input_ids[: self.prefix_len]

    @property
    def text_ids(self) -> Tensor:
        return self.input_ids[self.prefix_len :]

    @functools.cached_property
    def key(self) -> PrefixKey:
        """Content key of the left-tower K/V: the same images and prefix tokens give the same K/V."""
        images = self.image_digest if self.image_digest is not None else tensor_digest(self.tiles)
        return images, tensor_digest(self.prefix_ids)


@dataclass
class GenerationResult:
    text: str  # decoded new tokens, special tokens skipped, cut before a stop string
    token_ids: list[int]  # new tokens only, up to and including the one that stopped the row
    finish_reason: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)
    logits: Tensor | None = None  # (len(token_ids), V) fp32, the logits each token was chosen from, on request


@dataclass
class GenerationStats:
    """Timings of one `generate` call; the prefix-cache counters are for that call too."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prepare_s: float = 0.0  # image loading, tiling, tokenization, hashing
    prefill_s: float = 0.0  # vision tower + left tower (misses only) + right-tower prefill + first sample
    ttft_s: float = 0.0  # call start -> first tokens of every row on the host
    decode_s: float = 0.0  # first token on the host -> last token on the host
    total_s: float = 0.0
    decode_steps: int = 0  # decode forward passes (the first token comes from the prefill)
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0
    vision_tower_runs: int = 0  # left-tower calls that ran the vision tower
    vision_tiles: int = 0  # tiles those calls encoded
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens of all rows per second of the whole call."""
        return self.generated_tokens / self.total_s if self.total_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding."""
        decoded = self.generated_tokens - self.requests
        return decoded / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"requests={self.requests} prompt_tokens={self.prompt_tokens} generated_tokens={self.generated_tokens} "
            f"ttft={1e3 * self.ttft_s:.1f}ms prefill={1e3 * self.prefill_s:.1f}ms "
            f"decode={1e3 * self.decode_s:.1f}ms ({self.decode_steps} steps, {self.ms_per_step:.2f} ms/step) "
            f"tokens/s={self.tokens_per_s:.1f} decode_tokens/s={self.decode_tokens_per_s:.1f} "
            f"prefix_cache hits={self.prefix_cache_hits} misses={self.prefix_cache_misses} "
            f"vision_tower_runs={self.vision_tower_runs}"
        )

    def as_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "extra"}
        data.update(
            ms_per_step=self.ms_per_step, tokens_per_s=self.tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s
        )
        data.update(self.extra)
        return data


def prepare_requests(requests: list[GenerationRequest], tokenizer: Any, model_cfg: Any) -> list[PreparedPrompt]:
    """Load and tile the images and build each inference prompt with the data pipeline's own code."""
    from dualtower.data.document import document_from_prompt
    from dualtower.data.images import ImageProcessor, load_image

    processor = ImageProcessor(model_cfg)
    prepared = []
    for request in requests:
        images = [load_image(image) for image in request.images]
        document = document_from_prompt(images, request.prompt, processor, tokenizer, model_cfg)
        tiles = _tiles_of(document, model_cfg)
        prepared.append(PreparedPrompt(document.input_ids, tiles, document.prefix_len, image_digest(images)))
    return prepared


def check_positions(prompts: Sequence[PreparedPrompt], max_new_tokens: int, limit: int) -> None:
    """Refuse, before any work, a prompt that with max_new_tokens would go past the model's `limit` positions."""
    for index, length in enumerate(prompt.input_ids.numel() for prompt in prompts):
        if length + max_new_tokens > limit:
            raise ValueError(
                f"request {index}: {length} prompt tokens + max_new_tokens {max_new_tokens} exceed the model's "
                f"{limit} positions (lm.max_position_embeddings); shorten the prompt or lower max_new_tokens"
            )


def _tiles_of(document: Any, model_cfg: Any) -> Tensor:
    tiles = document.tiles
    if isinstance(tiles, list | tuple):
        tiles = torch.cat(list(tiles)) if tiles else None
    if tiles is None:
        size = model_cfg.tile_size
        return torch.zeros(0, 3, size, size)
    return tiles
