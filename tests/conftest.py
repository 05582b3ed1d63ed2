"""Shared test setup: the Triton interpreter on CPU, markers, seeding, the fused sampler fixture."""

from __future__ import annotations

import os

import torch

# The Triton interpreter must be chosen before triton (and so dualtower_kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def fused():
    """The fused CUDA sampler, loaded prebuilt or built with nvcc; skips where neither is possible."""
    from dualtower.generation import csrc_sampler

    try:
        csrc_sampler.load_extension()
    except RuntimeError as error:
        if csrc_sampler.find_nvcc() is not None:
            raise  # nvcc is there, so a failed build is a failure
        pytest.skip(f"no usable prebuilt library (DUALTOWER_CSRC_LIBRARY) and no nvcc: {error}")
    return csrc_sampler.fused_sample
