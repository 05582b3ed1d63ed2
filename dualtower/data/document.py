"""One training or prompt document: token ids, shifted labels, image tiles and the dual-tower split point.

Shape legend:
    L   tokens of the document (prefix + text)
    n   image tiles of the document (0 without images)
    S   tile side

Building a document from a raw sample is where bad input is handled: every problem either converts the input
(image modes, missing images left out, stripped placeholder text, repaired unicode, dropped empty turns,
truncated conversations; counted in `events`) or raises SampleError with a short machine-readable reason
(counted as a drop by the loader).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from dualtower.batch import IGNORE_INDEX
from dualtower.data.chat import assemble, encode_prompt, encode_segments, strip_image_tokens
from dualtower.data.images import (
    ImageLoadError,
    ImageProcessor,
    decode_image,
    image_string,
    load_image,
    num_tiles,
    to_rgb,
)
from dualtower.model.config import IMAGE_TOKEN, ModelConfig

DROP_REASONS = (
    "bad_schema",  # not a mapping, or `texts` of the wrong type
    "no_turns",  # no turn with an answer
    "no_images",  # no image and text-only samples are not allowed
    "bad_image",  # undecodable image
    "image_too_small",  # a side below min_image_side (1x1 placeholders)
    "too_many_images",
    "too_many_tiles",  # more tiles than a row holds
    "too_long",  # the image prefix alone does not fit the token limit
    "no_supervised_tokens",
    "image_placeholders",  # <|image|> tokens do not match tiles x tokens per tile (e.g. an image file changed)
    "unreadable",  # the source could not read the row (loader only)
    "error",  # anything else raised while building the document (loader only; logged with its message)
)


class SampleError(ValueError):
    """A sample that is skipped; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Document:
    input_ids: Tensor  # (L,) int64
    labels: Tensor  # (L,) int64, label[t] = input_ids[t + 1] where supervised, else IGNORE_INDEX
    tiles: Tensor  # (n, 3, S, S) float32, images in order, each global tile first
    prefix_len: int  # index of the last <|image|> + 1; 0 without images
    grids: tuple[tuple[int, int], ...] = ()  # (rows, cols) per image

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    @property
    def text_len(self) -> int:
        return self.num_tokens - self.prefix_len

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class DocumentLimits:
    max_tokens: int | None = None  # longer conversations lose trailing turns, then get cut
    max_tiles: int | None = None
    max_images: int | None = None
    min_image_side: int = 1
    allow_text_only: bool = True


@dataclass
class PreparedDocument:
    """A checked document without pixels: what the packing buffer holds (tiles of 512-px images would take
    ~3 MB each). `images` are the raw sources, already decoded once to validate them; `materialize` makes the
    tiles."""

    input_ids: Tensor  # (L,) int64
    labels: Tensor  # (L,) int64
    prefix_len: int
    grids: tuple[tuple[int, int], ...]
    images: list[Any]  # raw image sources (PIL, bytes, {bytes, path} dicts, paths)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_tiles(self) -> int:
        return sum(num_tiles(grid) for grid in self.grids)

    def materialize(self, processor: ImageProcessor) -> Document:
        """The Document with its tiles (decodes the images again; raises ImageLoadError if one went bad)."""
        return Document(self.input_ids, self.labels, _tiles(processor, [load_image(i) for i in self.images]),
                        self.prefix_len, self.grids)

    def layout(self) -> Document:
        """The Document with empty (n, 3, 0, 0) tiles: the tile count without pixels, for length statistics."""
        return Document(self.input_ids, self.labels, torch.empty(self.num_tiles, 3, 0, 0), self.prefix_len, self.grids)


def document_from_sample(
    sample: Any,
    processor: ImageProcessor,
    tokenizer: Any,
    model_cfg: ModelConfig,
    *,
    limits: DocumentLimits | None = None,
    events: Counter | None = None,
    with_pixels: bool = True,
) -> Document:
    """A Cauldron-schema sample ({"images": [...], "texts": [{"user", "assistant"}]}) -> Document.

    `with_pixels=False` skips the resize and split: tiles is then an empty (n, 3, 0, 0) tensor that only
    carries the tile count (for length statistics and packing studies).
    """
    prepared = prepare_document(sample, processor, tokenizer, model_cfg, limits=limits, events=events)
    return prepared.materialize(processor) if with_pixels else prepared.layout()


def prepare_document(
    sample: Any,
    processor: ImageProcessor,
    tokenizer: Any,
    model_cfg: ModelConfig,
    *,
    limits: DocumentLimits | None = None,
    events: Counter | None = None,
) -> PreparedDocument:
    """Every check and the tokenization of `document_from_sample`, without making tiles."""
    limits = limits or DocumentLimits()
    events = events if events is not None else Counter()
    if not isinstance(sample, Mapping):
        raise SampleError("bad_schema", f"sample is a {type(sample).__name__}")
    turns = clean_turns(sample.get("texts"), events)
    raw_images, sizes = _check_images(sample.get("images"), limits, events)
    grids = tuple(processor.grid_for(*size) for size in sizes)
    tiles_needed = sum(num_tiles(grid) for grid in grids)
    if limits.max_tiles is not None and tiles_needed > limits.max_tiles:
        raise SampleError("too_many_tiles", f"{tiles_needed} tiles > {limits.max_tiles}")
    strings = _image_strings(list(grids), model_cfg.image_tokens_per_tile)
    segments = encode_segments(tokenizer, strings, turns)
    prefix_len = _prefix_len(segments[0][0], model_cfg.image_token_id)  # images sit in the first message
    input_ids, labels = _fit(segments, limits.max_tokens, prefix_len, events)
    check_placeholders(input_ids, tiles_needed, model_cfg)
    if not any(label != IGNORE_INDEX for label in labels):
        raise SampleError("no_supervised_tokens")
    return PreparedDocument(
        torch.tensor(input_ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64), prefix_len, grids,
        raw_images,
    )


def document_from_prompt(
    images: list[Any], prompt: str, processor: ImageProcessor, tokenizer: Any, model_cfg: ModelConfig
) -> Document:
    """An inference document: images (paths, bytes or PIL) + one user prompt + the assistant header.

    Raises ImageLoadError for an undecodable image. Labels are all IGNORE_INDEX.
    """
    loaded = [load_image(image) for image in images]
    grids = [processor.grid_for(*image.size) for image in loaded]
    input_ids = encode_prompt(tokenizer, _image_strings(grids, model_cfg.image_tokens_per_tile), prompt)
    labels = [IGNORE_INDEX] * len(input_ids)
    check_placeholders(input_ids, sum(num_tiles(grid) for grid in grids), model_cfg)
    prefix_len = _prefix_len(input_ids, model_cfg.image_token_id)
    return Document(
        torch.tensor(input_ids, dtype=torch.int64),
        torch.tensor(labels, dtype=torch.int64),
        _tiles(processor, loaded),
        prefix_len,
        tuple(grids),
    )


def check_placeholders(input_ids: list[int] | Tensor, tiles: int, model_cfg: ModelConfig) -> None:
    """Raise SampleError("image_placeholders") unless the ids hold exactly tiles x tokens-per-tile `<|image|>`.

    The model scatters one tile embedding per placeholder, so a mismatch would fail the whole batch later.
    """
    token = model_cfg.image_token_id
    found = int((input_ids == token).sum()) if isinstance(input_ids, Tensor) else input_ids.count(token)
    expected = tiles * model_cfg.image_tokens_per_tile
    if found != expected:
        raise SampleError(
            "image_placeholders", f"{found} {IMAGE_TOKEN} tokens for {tiles} tiles x {model_cfg.image_tokens_per_tile}"
        )


def clean_turns(texts: Any, events: Counter) -> list[dict[str, str]]:
    """Valid {user, assistant} turns; turns without an answer are dropped, a missing question becomes ""."""
    if texts is None:
        raise SampleError("no_turns", "no texts field")
    if isinstance(texts, Mapping):
        texts = _turns_of_columns(texts) if _is_columnar(texts) else [texts]
    if not isinstance(texts, (list, tuple)):
        raise SampleError("bad_schema", f"texts is a {type(texts).__name__}")
    turns = []
    for turn in texts:
        if not isinstance(turn, Mapping):
            events["turn_dropped"] += 1
            continue
        user, answer = _text(turn.get("user"), events), _text(turn.get("assistant"), events)
        if not strip_image_tokens(answer).strip():  # an answer of literal placeholders only is empty too
            events["turn_dropped"] += 1
            continue
        if IMAGE_TOKEN in user or IMAGE_TOKEN in answer:  # removed when the messages are built
            events["image_token_stripped"] += 1
        turns.append({"user": user, "assistant": answer})
    if not turns:
        raise SampleError("no_turns", "no turn with an answer")
    return turns


def _is_columnar(texts: Mapping) -> bool:
    """`datasets.Sequence` of a struct stores turns as columns: {"user": [...], "assistant": [...]}."""
    return any(isinstance(value, (list, tuple)) for value in texts.values())


def _turns_of_columns(texts: Mapping) -> list[dict[str, Any]]:
    columns = {key: value if isinstance(value, (list, tuple)) else [value] for key, value in texts.items()}
    count = max(len(column) for column in columns.values())
    return [{key: column[i] if i < len(column) else None for key, column in columns.items()} for i in range(count)]


def _text(value: Any, events: Counter) -> str:
    """The text of a turn as encodable Unicode (the tokenizer rejects anything else with an opaque TypeError).

    Bytes are read as UTF-8; surrogates (UTF-16 halves that JSON escapes can leave in a str) are joined into
    their character when paired, else replaced by U+FFFD. Each repair is counted as `text_repaired`.
    """
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            events["text_repaired"] += 1
            return bytes(value).decode("utf-8", "replace")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        events["text_repaired"] += 1
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _check_images(raw: Any, limits: DocumentLimits, events: Counter) -> tuple[list[Any], list[tuple[int, int]]]:
    """The raw image sources and their (width, height), each decoded once to prove it is readable."""
    if raw is None:
        raw = []
    elif not isinstance(raw, (list, tuple)):
        raw = [raw]
    present = [item for item in raw if item is not None]
    if len(present) < len(raw):  # the sample keeps its other images, but it is no longer the one in the source
        events["image_missing"] += len(raw) - len(present)
    raw = present
    if not raw and not limits.allow_text_only:
        raise SampleError("no_images")
    if limits.max_images is not None and len(raw) > limits.max_images:
        raise SampleError("too_many_images", f"{len(raw)} images > {limits.max_images}")
    sizes = []
    for item in raw:
        try:
            image = decode_image(item)
            if min(image.size) < limits.min_image_side:
                raise SampleError("image_too_small", f"{image.size[0]}x{image.size[1]}")
            if image.mode != "RGB":
                events["image_converted"] += 1
                to_rgb(image)
        except ImageLoadError as error:
            raise SampleError("bad_image", str(error)) from error
        sizes.append(image.size)
    return list(raw), sizes


def _image_strings(grids: list[tuple[int, int]], tokens_per_tile: int) -> list[str]:
    several = len(grids) > 1
    return [image_string(grid, tokens_per_tile, index if several else None) for index, grid in enumerate(grids)]


def _fit(
    segments: list[tuple[list[int], list[bool]]], max_tokens: int | None, prefix_len: int, events: Counter
) -> tuple[list[int], list[int]]:
    """Whole conversation if it fits; else the longest run of whole turns; else the first turn cut short."""
    total = sum(len(ids) for ids, _ in segments)
    if max_tokens is None or total <= max_tokens:
        return assemble(segments)
    if prefix_len >= max_tokens:
        detail = f"the images alone take {prefix_len} tokens of the {max_tokens}-token limit, leaving none for text"
        raise SampleError("too_long", detail)
    events["truncated"] += 1
    kept, length = 0, 0
    for start in range(0, len(segments), 2):  # segments alternate user, assistant
        turn_len = sum(len(ids) for ids, _ in segments[start : start + 2])
        if length + turn_len > max_tokens:
            break
        kept, length = start + 2, length + turn_len
    if kept:
        return assemble(segments[:kept])
    return assemble(segments[:2], max_tokens)


def _prefix_len(input_ids: list[int], image_token_id: int) -> int:
    for index in range(len(input_ids) - 1, -1, -1):
        if input_ids[index] == image_token_id:
            return index + 1
    return 0


def _tiles(processor: ImageProcessor, images: list[Image.Image]) -> Tensor:
    if not images:
        return torch.empty(0, 3, processor.tile, processor.tile)
    return torch.cat([processor.process(image).tiles for image in images])
