"""Edge inputs of the generation request path: single sources, odd images, mixed and ragged batches, the
smallest max_new_tokens, and stop strings that span tokens."""

from __future__ import annotations

import pytest
from PIL import Image
from test_generation import varied_debug_model

from dualtower.generation import GenerationRequest, Generator, SamplingConfig
from dualtower.generation.stopping import StopTracker


@pytest.fixture(scope="module")
def tokenizer():
    from dualtower.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return varied_debug_model()


def test_a_memoryview_is_one_image_source() -> None:
    """load_image reads a memoryview as one encoded image; the request iterated it into one int per byte."""
    data = memoryview(b"\x89PNG\r\n")
    assert GenerationRequest(data, "q").images == [data]


def odd_images() -> list[Image.Image]:
    palette = Image.new("P", (5, 9), 3)
    palette.putpalette([40, 90, 200] * 256)
    return [
        Image.new("RGBA", (37, 11), (10, 200, 30, 0)),
        Image.new("L", (1, 1), 77),
        palette,
        Image.new("1", (3, 3), 1),
        Image.new("RGB", (1, 1), (1, 2, 3)),
    ]


def test_a_batch_mixing_odd_images_and_text_only_prompts_equals_one_by_one(model, tokenizer) -> None:
    images = odd_images()
    requests = [GenerationRequest([image], "What?") for image in images]
    requests += [GenerationRequest([], ""), GenerationRequest([], "x " * 40), GenerationRequest(images[:2], "")]
    greedy = SamplingConfig(max_new_tokens=4)
    batched = Generator(model, tokenizer, prefix_cache_bytes=0).generate(requests, greedy)
    alone = Generator(model, tokenizer, prefix_cache_bytes=0)
    for request, result in zip(requests, batched, strict=True):
        assert alone.generate([request], greedy)[0].token_ids == result.token_ids
        assert len(result.token_ids) == 4 or result.finish_reason == "eos"


def test_the_prefix_cache_keys_by_pixels_not_by_object(model, tokenizer) -> None:
    engine = Generator(model, tokenizer)
    greedy = SamplingConfig(max_new_tokens=2)
    first = engine.generate([GenerationRequest(Image.new("RGB", (20, 20), (5, 5, 5)), "q")], greedy)
    again = engine.generate([GenerationRequest(Image.new("RGB", (20, 20), (5, 5, 5)), "q")], greedy)
    assert (engine.stats.prefix_cache_hits, engine.stats.vision_tower_runs) == (1, 0)
    assert again[0].token_ids == first[0].token_ids
    engine.generate([GenerationRequest(Image.new("RGB", (20, 20), (5, 5, 6)), "q")], greedy)
    assert (engine.stats.prefix_cache_misses, engine.stats.vision_tower_runs) == (1, 1)


def test_max_new_tokens_one_runs_no_decode_step(model, tokenizer) -> None:
    engine = Generator(model, tokenizer, eos_token_ids=())
    requests = [GenerationRequest(odd_images()[0], "a"), GenerationRequest([], "b")]
    results = engine.generate(requests, SamplingConfig(max_new_tokens=1))
    assert [len(r.token_ids) for r in results] == [1, 1] and {r.finish_reason for r in results} == {"length"}
    assert engine.stats.decode_steps == 0
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SamplingConfig(max_new_tokens=0)


def track(tokenizer, tokens: list[int], stops: tuple[str, ...], chunk: int) -> tuple[object, str]:
    streamed: list[str] = []
    tracker = StopTracker(tokenizer, 1, 64, [2], stops, on_text=lambda row, text: streamed.append(text))
    for start in range(0, len(tokens), chunk):
        tracker.update([tokens[start : start + chunk]])
    tracker.finish()
    return tracker.results()[0], "".join(streamed)


def test_stop_strings_spanning_tokens_cut_at_the_earliest_whatever_the_chunking(tokenizer) -> None:
    tokens = tokenizer.encode(" hello world. The end\n\nmore text")
    # "o w" spans " hello" | " world"; "end\n" spans " end" | "\n\n"; the earlier one wins.
    for stops in (("end\n", "o w"), ("o w", "end\n"), ("o w",)):
        for chunk in (1, 2, 5, len(tokens)):
            result, streamed = track(tokenizer, tokens, stops, chunk)
            assert result.text == " hell" and result.finish_reason == "stop" and streamed == " hell"
            assert "o w" in tokenizer.decode(result.token_ids) and "o w" not in tokenizer.decode(result.token_ids[:-1])
    result, streamed = track(tokenizer, tokens, ("end\n", "zzz"), 3)
    assert result.text == " hello world. The " == streamed and result.finish_reason == "stop"
