"""Helpers and oracles of the data-pipeline tests (tests/test_tokenizer.py, tests/test_data_*.py).

`original_conversation` re-implements the original's tokenization and label masking (reference_spec 4.3:
whole conversation through the chat template, per-message lengths for the mask, roll by one) as the oracle.

`cauldron_shaped_lengths` draws (tokens, tiles) of documents shaped like the P-CAULDRON mix of The Cauldron at
the 135m config (512-px tiles, 2048-px long side, 65 tokens per tile incl. its tag). Per config: share of rows
(proportional to its train size), turns per image, question and answer token ranges, image aspect ratios
(width / height). Numbers are approximate reads of the dataset cards and typical samples; what matters for
packing is the shape: image-dominated documents of 5..17 tiles plus a long-tailed, fine-grained text part.

| config       | rows   | turns | question tokens | answer tokens | aspects            |
|--------------|--------|-------|-----------------|---------------|--------------------|
| textcaps     | 21,953 | 1     | 8-14            | 8-40          | 4:3, 1:1, 3:4      |
| textvqa      | 21,953 | 1-4   | 6-14            | 1-6           | 4:3, 1:1, 3:4      |
| screen2words | 15,730 | 1     | 8-14            | 4-14          | 9:16               |
| vistext      |  9,969 | 1     | 10-20           | 80-400        | 16:9, 4:3          |
| iam          |  5,663 | 1     | 6-12            | 40-160        | 3:4, 4:1           |
| cocoqa       | 46,287 | 1-8   | 6-14            | 1-2           | 4:3, 1:1, 3:4      |
| visual7w     | 14,366 | 1-10  | 25-50           | 1-8           | 4:3, 1:1           |
| iconqa       | 27,307 | 1-2   | 15-45           | 1-4           | 2:1, 3:2, 1:1      |
"""

from __future__ import annotations

import io
import random
from typing import Any

from PIL import Image

from dualtower.data.images import num_tiles, resized_hw
from dualtower.model.config import ModelConfig

CAULDRON_PROFILE = {  # name: (rows, (turns lo, hi), (question lo, hi), (answer lo, hi), aspects)
    "textcaps": (21953, (1, 1), (8, 14), (8, 40), ((4, 3), (1, 1), (3, 4))),
    "textvqa": (21953, (1, 4), (6, 14), (1, 6), ((4, 3), (1, 1), (3, 4))),
    "screen2words": (15730, (1, 1), (8, 14), (4, 14), ((9, 16),)),
    "vistext": (9969, (1, 1), (10, 20), (80, 400), ((16, 9), (4, 3))),
    "iam": (5663, (1, 1), (6, 12), (40, 160), ((3, 4), (4, 1))),
    "cocoqa": (46287, (1, 8), (6, 14), (1, 2), ((4, 3), (1, 1), (3, 4))),
    "visual7w": (14366, (1, 10), (25, 50), (1, 8), ((4, 3), (1, 1))),
    "iconqa": (27307, (1, 2), (15, 45), (1, 4), ((2, 1), (3, 2), (1, 1))),
}
USER_OVERHEAD, ASSISTANT_OVERHEAD = 5, 6  # <|im_start|>user\n ... <|im_end|>\n and the assistant header + end


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample(images: list[Any], *turns: tuple[str, str]) -> dict[str, Any]:
    return {"images": images, "texts": [{"user": u, "assistant": a} for u, a in turns]}


def original_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The original's input_ids and shifted labels (d8eb080:data/datasets.py, reference_spec 4.3)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_special_tokens=False, return_dict=True)
    ids = list(ids["input_ids"])
    marker = "xzyvd"
    templated = tokenizer.apply_chat_template([{"role": "assistant", "content": marker}], tokenize=False)
    prefix_len = len(tokenizer.encode(templated[: templated.find(marker)]))
    mask, cursor = [0] * len(ids), 0
    for message in messages:
        seg = tokenizer.apply_chat_template([message], tokenize=True, add_special_tokens=False, return_dict=True)
        seg_len = len(seg["input_ids"])
        if message["role"] == "assistant":
            mask[cursor + prefix_len : cursor + seg_len] = [1] * (seg_len - prefix_len)
        cursor += seg_len
    labels = [tok if keep else -100 for tok, keep in zip(ids, mask, strict=True)]
    return ids, [*labels[1:], -100]


def cauldron_shaped_lengths(n: int, seed: int, model_cfg: ModelConfig) -> list[tuple[int, int]]:
    """(tokens, tiles) of `n` documents drawn from CAULDRON_PROFILE at `model_cfg`'s image settings."""
    rng = random.Random(seed)
    names = list(CAULDRON_PROFILE)
    weights = [CAULDRON_PROFILE[name][0] for name in names]
    tile, image = model_cfg.tile_size, model_cfg.image
    per_tile = model_cfg.image_tokens_per_tile + 1
    lengths = []
    for _ in range(n):
        _, turns, question, answer, aspects = CAULDRON_PROFILE[rng.choices(names, weights)[0]]
        aw, ah = rng.choice(aspects)
        width = rng.randint(300, 1200)
        height = max(1, round(width * ah / aw * rng.uniform(0.97, 1.03)))
        new_h, new_w = resized_hw(height, width, tile, image.max_img_size, image.resize_to_max_side_len)
        tiles = num_tiles((new_h // tile, new_w // tile))
        text = sum(
            USER_OVERHEAD + rng.randint(*question) + ASSISTANT_OVERHEAD + rng.randint(*answer)
            for _ in range(rng.randint(*turns))
        )
        lengths.append((tiles * per_tile + text, tiles))
    return lengths
