"""dualtower.generation.requests: prepared prompts' bounds and the position check done before any work."""

from __future__ import annotations

import pytest
import torch

from dualtower.generation.requests import PreparedPrompt, check_positions


def prompt(length: int, prefix_len: int) -> PreparedPrompt:
    return PreparedPrompt(torch.arange(length), torch.zeros(0, 3, 8, 8), prefix_len)


def test_a_prepared_prompt_keeps_at_least_one_text_token() -> None:
    ok = prompt(5, 4)
    assert ok.prefix_ids.tolist() == [0, 1, 2, 3] and ok.text_ids.tolist() == [4]
    for bad in (5, 6, -1):  # all prefix (the right tower would have nothing to read), past the end, negative
        with pytest.raises(ValueError, match="leaves no prompt text"):
            prompt(5, bad)


def test_check_positions_names_the_first_request_that_does_not_fit() -> None:
    prompts = [prompt(4, 0), prompt(9, 2), prompt(12, 0)]
    check_positions(prompts, max_new_tokens=8, limit=20)  # 12 + 8 = 20 fits exactly
    with pytest.raises(ValueError, match=r"request 1: 9 prompt tokens \+ max_new_tokens 12 exceed the model's 20"):
        check_positions(prompts, max_new_tokens=12, limit=20)


def test_a_single_image_is_one_image_not_an_iterable_of_them() -> None:
    """A bare path was iterated character by character ("cannot decode image: ... 'a'"), a bare PIL image
    raised "not iterable"; both are one image, as is any other single source load_image accepts."""
    from pathlib import Path

    from PIL import Image

    from dualtower.generation import GenerationRequest

    picture = Image.new("RGB", (4, 4))
    for single in ("cat.png", Path("cat.png"), b"\x89PNG", picture, {"path": "cat.png"}):
        assert GenerationRequest(single, "q").images == [single]
    assert GenerationRequest(("a.png", picture), "q").images == ["a.png", picture]
    assert GenerationRequest([], "q").images == []
