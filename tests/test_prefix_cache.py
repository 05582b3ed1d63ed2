"""The prefix cache's keys and byte accounting (image digests, re-putting a key) and its invalidation when the
left tower's weights change."""

from __future__ import annotations

import torch
from PIL import Image
from test_generation import make_prompt, varied_debug_model

from dualtower.generation import Generator, SamplingConfig
from dualtower.generation.prefix_cache import PrefixCache, image_digest


def test_image_digest_tells_apart_same_bytes_in_another_size_or_mode() -> None:
    wide, tall = Image.new("RGB", (4, 2), (9, 8, 7)), Image.new("RGB", (2, 4), (9, 8, 7))
    assert wide.tobytes() == tall.tobytes()  # 24 identical bytes: only the size tells them apart
    assert image_digest([wide]) != image_digest([tall])
    gray, color = Image.new("L", (6, 1), 5), Image.new("RGB", (2, 1), (5, 5, 5))
    assert gray.tobytes() == color.tobytes()  # 6 identical bytes: only the mode (and size) differ
    assert image_digest([gray]) != image_digest([color])
    assert image_digest([wide]) == image_digest([Image.new("RGB", (4, 2), (9, 8, 7))])


def test_re_putting_a_key_counts_its_bytes_once() -> None:
    first, second = torch.zeros(2, 2, 3, 1, 4), torch.ones(2, 2, 3, 1, 4)
    size = first.numel() * first.element_size()  # 96 bytes
    cache = PrefixCache(max_bytes=2 * size)
    cache.put(("img", "ids"), first)
    cache.put(("img", "ids"), second)
    assert len(cache) == 1 and cache.stats.entries == 1
    assert cache.stats.bytes_used == size and cache.stats.evictions == 0
    assert torch.equal(cache.get(("img", "ids")), second)
    # The budget holds two entries: a second key fits without evicting the re-put one.
    cache.put(("img", "other"), first)
    assert len(cache) == 2 and cache.stats.evictions == 0 and cache.stats.bytes_used == 2 * size


def test_the_cache_is_emptied_when_the_left_towers_weights_change() -> None:
    """K/V cached before an optimizer step (or a load) are those of the old weights: they must not be reused."""
    model = varied_debug_model()
    prompt = make_prompt(model, 2, 1, 6, seed=3)
    greedy = SamplingConfig(max_new_tokens=4)
    engine = Generator(model, eos_token_ids=())
    engine.generate_prepared([prompt], greedy)
    engine.generate_prepared([prompt], greedy)
    assert engine.stats.prefix_cache_hits == 1  # unchanged weights keep their entries
    with torch.no_grad():
        for parameter in model.left_decoder.parameters():
            parameter.mul_(1.5)
    after = engine.generate_prepared([prompt], greedy, return_logits=True)
    assert (engine.stats.prefix_cache_hits, engine.stats.prefix_cache_misses) == (0, 1)
    fresh = Generator(model, eos_token_ids=(), prefix_cache_bytes=0)
    expected = fresh.generate_prepared([prompt], greedy, return_logits=True)
    assert torch.equal(after[0].logits, expected[0].logits)


def test_image_digest_tells_apart_palette_images_with_the_same_indices() -> None:
    """A "P" image's bytes are palette indices: two pictures of different colours share them."""
    red, blue = Image.new("P", (3, 2), 0), Image.new("P", (3, 2), 0)
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)
    assert red.tobytes() == blue.tobytes() and red.convert("RGB").tobytes() != blue.convert("RGB").tobytes()
    assert image_digest([red]) != image_digest([blue])
    same = Image.new("P", (3, 2), 0)
    same.putpalette([255, 0, 0] * 256)
    assert image_digest([red]) == image_digest([same])


def test_lru_eviction_drops_the_least_recently_used_entry_and_an_oversized_one_is_not_cached() -> None:
    entry = torch.zeros(4)  # 16 bytes
    cache = PrefixCache(max_bytes=3 * 16)
    for name in "abc":
        cache.put((name, ""), entry)
    assert cache.get(("a", "")) is entry  # "a" becomes the most recently used: "b" is now the oldest
    cache.put(("d", ""), entry)
    assert list(cache._entries) == [("c", ""), ("a", ""), ("d", "")] and cache.stats.evictions == 1
    cache.put(("big", ""), torch.zeros(13))  # 52 bytes: over the whole budget, and nothing is evicted for it
    assert ("big", "") not in cache and len(cache) == 3 and cache.stats.bytes_used == 48
    assert cache.get(("b", "")) is None and (cache.stats.hits, cache.stats.misses) == (1, 1)
