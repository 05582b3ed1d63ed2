"""Checkpoint reading: unreadable files are CheckpointErrors that name the file, and a directory with
both a single weights file and a shard index loads the single file, as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_hub import assert_same_state, tiny_model

from dualtower.hub import CheckpointError, load_pretrained


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    tiny_model().save_pretrained(directory)
    return directory


def test_a_corrupt_weights_file_is_a_checkpoint_error_naming_it(saved: Path) -> None:
    (saved / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"cannot read .*ckpt/model\.safetensors"):
        load_pretrained(saved)


def test_a_config_that_is_not_json_is_a_checkpoint_error_naming_it(saved: Path) -> None:
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"ckpt/config\.json is not valid JSON"):
        load_pretrained(saved)


def test_a_config_that_is_not_an_object_is_a_checkpoint_error(saved: Path) -> None:
    (saved / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"ckpt/config\.json must hold a JSON object, not list"):
        load_pretrained(saved)


def test_a_shard_missing_from_the_index_is_a_checkpoint_error(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors"}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard model-00001-of-00002\.safetensors .* is missing"):
        load_pretrained(saved)


def test_a_stale_shard_index_does_not_shadow_the_saved_weights(tmp_path: Path) -> None:
    """save_pretrained into a directory that once held a sharded checkpoint of the same model: the fresh
    model.safetensors is what loads, not the leftover shards (transformers reads the single file first)."""
    directory = tmp_path / "ckpt"
    old, new = tiny_model(), tiny_model()
    old.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    save_file(tensors, directory / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors")}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    new.save_pretrained(directory)
    assert_same_state(load_pretrained(directory), new)


# -- GGUF files cut short (an interrupted download) -----------------------------------------------------------


@pytest.mark.parametrize("kept", ["header", "tensor_data"])
def test_a_truncated_gguf_file_is_reported_as_truncated(tmp_path: Path, kept: str) -> None:
    from test_hub_adapters_edges import write_gguf

    from dualtower.adapters.gguf_file import read_gguf

    path = tmp_path / "cut.gguf"
    write_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[:40] if kept == "header" else data[:-8])
    with pytest.raises(ValueError, match=r"cut\.gguf is truncated"):
        read_gguf(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["lm"].update(n_heads="4"), r"model\.lm\.n_heads expects an integer, got '4'"),
        (lambda c: c.update(vision=5), r"model\.vision expects a table, got 5"),
        (lambda c: c["image"].update(mean=[0.5, 0.5]), r"model\.image\.mean expects 3 values, got 2"),
    ],
)
def test_a_config_value_of_the_wrong_type_names_its_key(saved: Path, edit, message: str) -> None:
    config = json.loads((saved / "config.json").read_text())
    edit(config)
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_pretrained(saved)
