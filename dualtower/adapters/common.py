"""What every adapter needs: locating a checkpoint (local path or Hub repo), reading safetensors (single file or
sharded), and strict key checks whose errors name the offending keys."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# What a snapshot download fetches for a checkpoint (weights, index, configs, tokenizer files).
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
_LISTED_KEYS = 20  # keys named in an error message before "... and N more"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


def looks_like_local_path(source: str | Path) -> bool:
    """True for anything that can only be a filesystem path (not a Hub id like "owner/name")."""
    text = str(source)
    if isinstance(source, Path) or text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
        return True
    return text.endswith((".safetensors", ".json", ".gguf"))


def resolve_source(source: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local file or directory as is; otherwise a Hub repo id, downloaded (cached) with huggingface_hub."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if looks_like_local_path(source):
        raise CheckpointError(f"checkpoint path does not exist: {source}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=allow_patterns or DOWNLOAD_PATTERNS))
    except Exception as error:  # huggingface_hub raises many types (offline, 404, gated, invalid id)
        raise CheckpointError(
            f"{source!r} is not a local path, and downloading it from the Hugging Face Hub failed: {error}"
        ) from error


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}")
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def find_config(directory: Path) -> dict[str, Any]:
    return read_json(directory / CONFIG_FILE)


def _load_weights_file(path: Path) -> dict[str, Tensor]:
    """One safetensors file; a missing, truncated or foreign file is a CheckpointError that names it."""
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error type, OSError, or ValueError
        raise CheckpointError(f"cannot read {path} as safetensors: {error}") from error


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a weights file, of a shard index file, or of a directory holding model.safetensors or a
    sharded index.

    A directory with both reads model.safetensors, as transformers does: saving a single-file checkpoint
    over an old sharded one leaves the old index behind, and it must not shadow the new weights."""
    if path.is_file():
        # A shard index (any `*.index.json`) stands for its shards, like a weights file for its tensors.
        return _read_shards(path) if path.name.endswith(".index.json") else _load_weights_file(path)
    single = path / SAFETENSORS_FILE
    if single.is_file():
        return _load_weights_file(single)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        return _read_shards(index)
    raise CheckpointError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {path}")


def _read_shards(index: Path) -> dict[str, Tensor]:
    """All tensors of the shards a `model.safetensors.index.json` lists (shard paths relative to it)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no weight_map object")
    shards = sorted(set(weight_map.values()))
    logger.info("reading %d safetensors shards from %s", len(shards), index.parent)
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"shard {shard} listed in {index} is missing")
        tensors.update(_load_weights_file(index.parent / shard))
    return tensors


def describe_keys(keys: Iterable[str]) -> str:
    ordered = sorted(keys)
    shown = ", ".join(ordered[:_LISTED_KEYS])
    more = len(ordered) - _LISTED_KEYS
    return shown + (f" ... and {more} more" if more > 0 else "")


def check_keys(expected: Iterable[str], found: Iterable[str], what: str) -> None:
    """Strict match of key sets; the error lists missing and unexpected keys."""
    expected, found = set(expected), set(found)
    missing, unexpected = expected - found, found - expected
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {describe_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {describe_keys(unexpected)}")
    raise CheckpointError(f"{what} does not match the model; " + "; ".join(parts))


def check_shapes(expected: dict[str, Any], tensors: dict[str, Tensor], what: str) -> None:
    """expected: name -> shape (torch.Size or tuple); every mismatch is listed."""
    wrong = [
        f"{name}: checkpoint {tuple(tensors[name].shape)} vs model {tuple(shape)}"
        for name, shape in sorted(expected.items())
        if name in tensors and tuple(tensors[name].shape) != tuple(shape)
    ]
    if wrong:
        raise CheckpointError(f"{what} has tensors of the wrong shape: " + "; ".join(wrong[:_LISTED_KEYS]))


def strip_compile_prefix(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """torch.compile wrappers insert `_orig_mod.` into names; checkpoints saved that way still load."""
    return {name.replace("_orig_mod.", ""): tensor for name, tensor in tensors.items()}


def tied_groups(module: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they share, in state-dict order (first name = canonical)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def canonical_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Detached CPU tensors, each shared tensor once under its first name (tied head -> token_embedding), without
    the `_orig_mod.` a `torch.compile(model)` wrapper puts in front of every name."""
    state = module.state_dict()
    return strip_compile_prefix(
        {group[0]: state[group[0]].detach().cpu().contiguous() for group in tied_groups(module)}
    )


def expand_tied(module: nn.Module, tensors: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """Fill every name of a tied group from whichever one the checkpoint stores (they must agree)."""
    filled = dict(tensors)
    for group in tied_groups(module):
        present = [name for name in group if name in tensors]
        if not present:
            continue
        first = tensors[present[0]]
        for other in present[1:]:
            if not torch.equal(first, tensors[other]):
                raise CheckpointError(f"{what}: {present[0]} and {other} are tied in the model but differ")
        filled.update({name: first for name in group})
    return filled


def load_into(module: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    """Strict load: same key set (tied names may appear once), same shapes; values are copied."""
    filled = expand_tied(module, tensors, what)
    expected = {name: t.shape for name, t in module.state_dict().items()}
    check_keys(expected, filled, what)
    check_shapes(expected, filled, what)
    module.load_state_dict(filled, strict=True)
