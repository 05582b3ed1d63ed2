"""Edges of the fused CUDA sampler: prebuilt libraries the GPU cannot run, the compile-only build's error path,
and (on a GPU) greedy's edge rows and the kept set on awkward vocabularies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualtower.generation import csrc_sampler
from dualtower.generation.sampling import SamplingConfig, make_generator, sampling_probs

needs_nvcc = pytest.mark.skipif(csrc_sampler.find_nvcc() is None, reason="nvcc not installed")


def matching_record(folder: Path, arch_list: str) -> Path:
    record = {**csrc_sampler._this_build(), "arch_list": arch_list}
    (folder / csrc_sampler.BUILT_FOR).write_text(json.dumps(record))
    return folder / f"{csrc_sampler.EXTENSION_NAME}.so"


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records libraries instead of loading them."""
    loaded: list[str] = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(csrc_sampler, "_register_fake", lambda: None)
    return loaded


def on_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_a_prebuilt_library_without_code_for_this_gpu_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loads: list[str]
) -> None:
    """The default build (9.0+PTX) has no kernel an A100 can run: loading it would fail at the first token
    ("no kernel image is available"), after the fallback to the PyTorch sampler was no longer possible."""
    library = matching_record(tmp_path, "9.0+PTX")
    on_gpu(monkeypatch, (8, 0))
    assert not csrc_sampler._load_prebuilt(library) and loads == []
    on_gpu(monkeypatch, (9, 0))
    assert csrc_sampler._load_prebuilt(library) and loads == [str(library)]


@pytest.mark.parametrize(
    ("arch_list", "capability", "runs"),
    [
        ("9.0+PTX", (9, 0), True),
        ("9.0+PTX", (10, 0), True),  # the PTX is compiled for the newer GPU when loaded
        ("9.0", (10, 0), False),  # machine code runs only within its major version
        ("9.0+PTX", (8, 9), False),
        ("8.0", (8, 6), True),  # machine code runs on a later minor version
        ("8.6", (8, 0), False),
        ("8.0;9.0", (9, 0), True),
        ("7.5 8.0 9.0", (8, 0), True),
        ("9.0a", (9, 0), True),
        ("Hopper", (8, 0), True),  # a named architecture: not refused on a guess
    ],
)
def test_which_gpus_a_build_runs_on(arch_list: str, capability: tuple[int, int], runs: bool) -> None:
    assert csrc_sampler._runs_on(arch_list, capability) is runs


@needs_nvcc
def test_a_failed_compile_reports_nvcc_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "csrc"
    broken.mkdir()
    (broken / csrc_sampler.SOURCE_NAME).write_text("this is not CUDA;\n")
    monkeypatch.setenv("DUALTOWER_CSRC_DIR", str(broken))
    with pytest.raises(RuntimeError, match="nvcc failed"):
        csrc_sampler.compile_only(tmp_path / "sampling.o")


# -- on a GPU --------------------------------------------------------------------------------------------------


GREEDY = SamplingConfig(do_sample=False)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [1, 7, 1000, 1025, 49218])
def test_greedy_on_edge_rows_equals_argmax(fused, vocab: int) -> None:
    """Rows of -inf, of NaN, with one NaN, with ties: torch.argmax takes NaN as the maximum, then the first index.
    With fewer tokens than threads, the idle threads must not win over a row of -inf."""
    rows = torch.randn(6, vocab, device="cuda")
    rows[0] = float("-inf")
    rows[1] = float("nan")
    rows[2, vocab // 2] = float("nan")
    rows[3] = 1.0
    rows[4, vocab - 1] = float("inf")
    for scores in (rows, rows.bfloat16(), rows.half()):
        assert torch.equal(fused(scores, GREEDY), scores.argmax(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [5, 40, 1023, 3001])
def test_kept_set_on_odd_vocabularies_matches_the_pytorch_rule(fused, vocab: int) -> None:
    """Tie-heavy bf16 rows whose vocabulary is no multiple of the block size, read through a strided view: the
    draws stay in the PyTorch sampler's kept set and reach every token of it with probability >= 1%."""
    generator = torch.Generator(device="cuda").manual_seed(vocab)
    logits = (torch.randn(4, vocab, device="cuda", generator=generator) * 1.5).round().bfloat16()
    draws = 2048
    rows = logits.repeat_interleave(draws, dim=0).repeat(1, 2)[:, :vocab]  # not contiguous
    for config in (
        SamplingConfig(do_sample=True, temperature=0.9, top_k=3, top_p=1.0),
        SamplingConfig(do_sample=True, temperature=1.3, top_k=0, top_p=0.6),
        SamplingConfig(do_sample=True, temperature=1.0, top_k=vocab + 1, top_p=0.9),
    ):
        probs = sampling_probs(logits, config)
        drawn = fused(rows, config, make_generator(0, rows.device)).view(4, draws)
        seen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, drawn, True)
        assert not (seen & (probs == 0)).any(), config  # nothing outside the kept set
        assert seen[probs >= 0.01].all(), config  # each missed with probability < 0.99 ** 2048 = 1e-9


@pytest.mark.gpu
def test_uniforms_on_another_device_are_rejected(fused) -> None:
    logits = torch.randn(2, 100, device="cuda")
    with pytest.raises(RuntimeError, match="uniforms"):
        torch.ops.dualtower.sample_logits(logits, torch.rand(2), 1.0, 0, 1.0)
