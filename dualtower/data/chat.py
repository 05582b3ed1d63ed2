"""ChatML conversations -> token ids and shifted labels, exactly as the original (reference_spec 4.2 / 4.3).

A conversation is `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message (no system prompt, no BOS); all image
strings go in front of the first user message; literal `<|image|>` inside texts is removed first
(repeatedly, so that removing one cannot join the text around it into another). Only
assistant messages are supervised, from after their `<|im_start|>assistant\\n` header through `<|im_end|>` and
the trailing newline. Labels are shifted: label[t] = token[t + 1], the last label is IGNORE_INDEX.

Every message starts with the special token `<|im_start|>`, where the tokenizer always splits, so tokenizing the
messages one by one and concatenating equals tokenizing the whole rendered conversation (the original
tokenizes both ways and relies on that too). The same holds after the last `<|image|>`, which lets the long
run of image placeholders be tokenized once per distinct image string and cached.
"""

from __future__ import annotations

import weakref
from typing import Any

from dualtower.batch import IGNORE_INDEX
from dualtower.model.config import IMAGE_TOKEN

Segment = tuple[list[int], list[bool]]  # one message: token ids, supervised flags
_header_len_cache: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_image_head_cache: weakref.WeakKeyDictionary[Any, dict[str, list[int]]] = weakref.WeakKeyDictionary()
_USER_HEADER = "<|im_start|>user\n"


def render_message(role: str, content: str) -> str:
    """One message in the original's template (dualtower.tokenizer.CHAT_TEMPLATE)."""
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def generation_header() -> str:
    return "<|im_start|>assistant\n"


def strip_image_tokens(text: str) -> str:
    """`text` without `<|image|>`, removed until none is left: one pass turns "<|ima<|image|>ge|>" into one."""
    while IMAGE_TOKEN in text:
        text = text.replace(IMAGE_TOKEN, "")
    return text


def encodable(text: str) -> str:
    """`text` as UTF-8-encodable Unicode: paired surrogates (JSON escapes) joined, lone ones (undecodable argv
    bytes) replaced by U+FFFD; the tokenizer rejects surrogates with an opaque TypeError."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def build_messages(image_strings: list[str], turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Alternating user/assistant messages; the image strings prefix the first user message."""
    messages = []
    for turn in turns:
        messages.append({"role": "user", "content": strip_image_tokens(encodable(turn["user"]))})
        messages.append({"role": "assistant", "content": strip_image_tokens(encodable(turn["assistant"]))})
    if messages and image_strings:
        messages[0]["content"] = "".join(image_strings) + messages[0]["content"]
    return messages


def assistant_header_len(tokenizer: Any) -> int:
    """Tokens of `<|im_start|>assistant\\n` (4 with SmolLM2), measured like the original's `_get_prefix_len`."""
    if tokenizer not in _header_len_cache:
        marker = "xzyvd"
        rendered = render_message("assistant", marker)
        header = rendered[: rendered.find(marker)]
        _header_len_cache[tokenizer] = len(tokenizer(header, add_special_tokens=False).input_ids)
    return _header_len_cache[tokenizer]


def encode_conversation(
    tokenizer: Any, image_strings: list[str], turns: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """(input_ids, shifted labels) of a conversation with its images first."""
    return assemble(encode_segments(tokenizer, image_strings, turns))


def encode_segments(
    tokenizer: Any, image_strings: list[str], turns: list[dict[str, str]]
) -> list[Segment]:
    """Per message: (token ids, supervised flags). Concatenated they are the whole conversation."""
    messages = build_messages([], turns)
    if not messages:
        raise ValueError("a conversation needs at least one turn")
    rendered = [render_message(m["role"], m["content"]) for m in messages]
    if image_strings:  # the first user message: cached image head + its own text
        rendered[0] = rendered[0].removeprefix(_USER_HEADER)
    encoded = tokenizer(rendered, add_special_tokens=False).input_ids
    if image_strings:
        encoded[0] = _image_head(tokenizer, "".join(image_strings)) + encoded[0]
    header_len = assistant_header_len(tokenizer)
    segments = []
    for message, ids in zip(messages, encoded, strict=True):
        is_answer = message["role"] == "assistant"
        segments.append((ids, [is_answer and i >= header_len for i in range(len(ids))]))
    return segments


def _image_head(tokenizer: Any, images: str) -> list[int]:
    """Ids of `<|im_start|>user\n` + image strings, cached: scanning thousands of placeholders is slow.

    Splicing is exact: every image string ends with the special token `<|image|>`, where the tokenizer splits,
    so what follows it is tokenized on its own either way.
    """
    cache = _image_head_cache.setdefault(tokenizer, {})
    if images not in cache:
        if len(cache) >= 4096:
            cache.clear()
        cache[images] = tokenizer(_USER_HEADER + images, add_special_tokens=False).input_ids
    return cache[images]


def assemble(segments: list[Segment], max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Concatenate message segments (cut at `max_tokens` when given) into (input_ids, shifted labels)."""
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")  # a negative slice would cut the end
    input_ids = [tok for ids, _ in segments for tok in ids][:max_tokens]
    supervised = [flag for _, flags in segments for flag in flags][:max_tokens]
    return input_ids, shift_labels(input_ids, supervised)


def shift_labels(input_ids: list[int], supervised: list[bool]) -> list[int]:
    """label[t] = input_ids[t + 1] where token t + 1 is supervised, else IGNORE_INDEX; the last is IGNORE_INDEX."""
    if not input_ids:  # no token, no label: the last-label IGNORE_INDEX exists only when a token does
        return []
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids[1:], supervised[1:], strict=True)]
    return [*labels, IGNORE_INDEX]


def encode_prompt(tokenizer: Any, image_strings: list[str], prompt: str) -> list[int]:
    """A single user turn (images first) followed by the assistant header, ready for generation."""
    text = render_message("user", strip_image_tokens(encodable(prompt))) + generation_header()
    if not image_strings:
        return tokenizer(text, add_special_tokens=False).input_ids
    tail = tokenizer(text.removeprefix(_USER_HEADER), add_special_tokens=False).input_ids
    return _image_head(tokenizer, "".join(image_strings)) + tail
