"""Chat formatting, prompt ids and label masks against the original's algorithm (reference_spec 4.2 / 4.3)."""

from __future__ import annotations

import pytest
from data_helpers import original_conversation

from dualtower.batch import IGNORE_INDEX
from dualtower.data.chat import assistant_header_len, build_messages, encode_conversation, encode_prompt
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
