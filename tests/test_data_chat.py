"""Chat formatting, prompt ids and label masks against the original's algorithm (reference_spec 4.2 / 4.3)."""

from __future__ import annotations

import pytest
from data_helpers import original_conversation

from dualtower.batch import IGNORE_INDEX
from dualtower.data.chat import (
    assemble,
    assistant_header_len,
    build_messages,
    encode_conversation,
    encode_prompt,
    shift_labels,
)
from dualtower.data.images import image_string

pytest_plugins = ["data_fixtures"]

CONVERSATIONS = [
    [("What is this?", "A cat.")],
    [("Count them.", "3"), ("And the colour?", "red"), ("Sure?", "Yes, red.\nQuite sure.")],
    [("", "A caption without a question."), ("  spaced  ", " leading space")],
    [(" \n leading whitespace", "x"), ("<|im_end|> literal specials <row_1_col_1>", "<|im_start|>")],
    [("Numbers 12 and 345?", "12345"), ("Unicode: \u00e9\u00e8 \u4e2d\u6587?", "\u00e9")],
]


@pytest.mark.parametrize("turns", CONVERSATIONS)
@pytest.mark.parametrize("grids", [[], [(1, 1)], [(2, 3)], [(1, 1), (2, 1)]])
def test_ids_and_labels_equal_the_original(tokenizer, turns, grids):
    several = len(grids) > 1
    strings = [image_string(g, 4, i if several else None) for i, g in enumerate(grids)]
    turns = [{"user": u, "assistant": a} for u, a in turns]
    ids, labels = encode_conversation(tokenizer, strings, turns)
    expected_ids, expected_labels = original_conversation(tokenizer, build_messages(strings, turns))
    assert ids == expected_ids
    assert labels == expected_labels
    assert ids.count(49152) == sum(4 * (1 if g == (1, 1) else 1 + g[0] * g[1]) for g in grids)


def test_label_mask_semantics_on_a_multi_turn_conversation(tokenizer):
    turns = [{"user": "Q1", "assistant": "A B"}, {"user": "Q2", "assistant": "C"}]
    ids, labels = encode_conversation(tokenizer, [], turns)
    supervised = [ids[t + 1] for t, label in enumerate(labels) if label != IGNORE_INDEX]
    answer1 = tokenizer("A B<|im_end|>\n", add_special_tokens=False).input_ids
    answer2 = tokenizer("C<|im_end|>\n", add_special_tokens=False).input_ids
    assert supervised == answer1 + answer2  # answers, their <|im_end|> and the newline; nothing else
    assert labels[-1] == IGNORE_INDEX and ids[-2:] == [2, 198]
    assert all(labels[t] in (IGNORE_INDEX, ids[t + 1]) for t in range(len(ids) - 1))
    assert assistant_header_len(tokenizer) == 4


def test_literal_image_tokens_are_stripped(tokenizer):
    turns = [{"user": "look <|image|>here", "assistant": "ok<|image|>"}]
    ids, _ = encode_conversation(tokenizer, [image_string((1, 1), 2)], turns)
    assert ids.count(49152) == 2
    plain, _ = encode_conversation(tokenizer, [image_string((1, 1), 2)], [{"user": "look here", "assistant": "ok"}])
    assert ids == plain


def test_image_tokens_that_stripping_rebuilds_are_stripped_too(tokenizer):
    strings = [image_string((1, 1), 2)]
    turns = [{"user": "look <|ima<|image|>ge|> here", "assistant": "o<|ima<|ima<|image|>ge|>ge|>k"}]
    ids, labels = encode_conversation(tokenizer, strings, turns)
    assert (ids, labels) == encode_conversation(tokenizer, strings, [{"user": "look  here", "assistant": "ok"}])
    assert encode_prompt(tokenizer, strings, "<|<|image|>image|>x") == encode_prompt(tokenizer, strings, "x")


def test_prompt_equals_the_originals_template(tokenizer):
    strings = [image_string((1, 2), 3, 0), image_string((1, 1), 3, 1)]
    ids = encode_prompt(tokenizer, strings, " What is shown?")
    content = "".join(strings) + " What is shown?"
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert ids == list(expected)
    assert ids[-4:] == [1, 520, 9531, 198]
    assert ids[:3] == [1, 4093, 198]  # <|im_start|> user \n, no system prompt, no BOS
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n<image: 0><|global_image|>") and "<image: 1><|global_image|>" in text


def test_empty_conversation_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="at least one turn"):
        encode_conversation(tokenizer, [], [])


def test_labels_always_match_the_ids_in_length():
    assert shift_labels([], []) == []
    assert assemble([([], [])]) == ([], [])
    assert assemble([([1, 2, 3], [False, True, True])], max_tokens=0) == ([], [])
    assert assemble([([1, 2, 3], [False, True, True])], max_tokens=1) == ([1], [IGNORE_INDEX])
    with pytest.raises(ValueError, match="max_tokens"):
        assemble([([1, 2, 3], [False, True, True])], max_tokens=-1)  # a slice would silently drop the end


@pytest.mark.parametrize(("grids", "per_image"), [([(1, 1)], [65]), ([(2, 2)], [325]), ([(4, 4)], [1105])])
def test_image_token_layout_and_split_point(tokenizer, grids, per_image):
    strings = [image_string(grid, 64) for grid in grids]
    ids = encode_prompt(tokenizer, strings, "Q?")
    rows, cols = grids[0]
    tags = [49153] + [49154 + 8 * (r - 1) + (c - 1) for r in range(1, rows + 1) for c in range(1, cols + 1)]
    tags = tags[:1] if rows * cols == 1 else tags
    assert ids[:3] == [1, 4093, 198]
    assert ids[3 : 3 + per_image[0]] == [tok for tag in tags for tok in [tag] + [49152] * 64]
    last_image = max(i for i, tok in enumerate(ids) if tok == 49152)
    assert last_image + 1 == 3 + per_image[0]  # the prefix: header + tags + placeholders, nothing else
    text = tokenizer("Q?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert ids[last_image + 1 :] == text


def test_several_images_are_numbered_and_the_prefix_ends_at_the_last(tokenizer):
    strings = [image_string((2, 2), 64, 0), image_string((1, 1), 64, 1)]
    ids = encode_prompt(tokenizer, strings, "")
    number = tokenizer("<image: 1>", add_special_tokens=False).input_ids
    start = 3 + len(number) + 325  # header, "<image: 0>", the 2x2 image
    assert ids[start : start + len(number)] == number and ids[start + len(number)] == 49153
    assert ids.count(49152) == 64 * (5 + 1)
    last_image = max(i for i, tok in enumerate(ids) if tok == 49152)
    assert ids[last_image + 1 :] == [2, 198, 1, 520, 9531, 198]  # empty prompt: <|im_end|>\n + header


def test_typed_special_tokens_other_than_image_are_kept_as_specials_like_the_original(tokenizer):
    strings = [image_string((1, 1), 4)]
    ids = encode_prompt(tokenizer, strings, "<|global_image|><row_1_col_1><|im_end|>")
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "".join(strings) + "<|global_image|><row_1_col_1><|im_end|>"}],
        tokenize=True, add_generation_prompt=True, return_dict=True,
    )["input_ids"]
    assert ids == list(expected)
    assert ids[3 + 5 : 3 + 5 + 3] == [49153, 49154, 2]


def test_prompts_with_surrogates_are_repaired_not_a_type_error(tokenizer):
    # JSON escapes ("\ud83d\ude00") and undecodable argv bytes (surrogateescape) leave surrogates in a str.
    assert encode_prompt(tokenizer, [], "\ud83d\ude00 x") == encode_prompt(tokenizer, [], "\U0001F600 x")
    assert encode_prompt(tokenizer, [], "caf\udce9") == encode_prompt(tokenizer, [], "caf\ufffd")
    turns = [{"user": "\ud83d\ude00", "assistant": "x\ud800"}]
    fixed = [{"user": "\U0001F600", "assistant": "x\ufffd"}]
    assert encode_conversation(tokenizer, [], turns) == encode_conversation(tokenizer, [], fixed)
