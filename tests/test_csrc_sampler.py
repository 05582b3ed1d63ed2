"""The fused CUDA sampler (csrc/sampling.cu): compiles with nvcc; on a GPU, equals greedy exactly and matches
the PyTorch sampler's distribution."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from dualtower.generation import csrc_sampler
from dualtower.generation.sampling import SamplingConfig, make_generator, sample, sampling_probs

VOCAB = 49218
needs_nvcc = pytest.mark.skipif(csrc_sampler.find_nvcc() is None, reason="nvcc not installed")


@needs_nvcc
def test_the_cuda_source_compiles(tmp_path) -> None:
    """Compile only (no link, no GPU): CI compiles it wherever nvcc exists, GPU or not (about a minute)."""
    output = csrc_sampler.compile_only(tmp_path / "sampling.o")
    assert output.stat().st_size > 0


def test_without_cuda_the_pytorch_sampler_is_used() -> None:
    assert csrc_sampler.sampler_for(torch.device("cpu")) is sample


def test_a_prebuilt_library_loads_only_for_the_torch_build_it_names(tmp_path, monkeypatch) -> None:
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(csrc_sampler, "_register_fake", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever GPU runs this: no arch check
    library = tmp_path / f"{csrc_sampler.EXTENSION_NAME}.so"
    assert not csrc_sampler._load_prebuilt(library)  # no built_for.json
    built_for = tmp_path / csrc_sampler.BUILT_FOR
    built_for.write_text('{"torch": "2.0.0+cu118", "cuda": "11.8"}')
    assert not csrc_sampler._load_prebuilt(library) and loaded == []
    this_build = {"torch": torch.__version__, "cuda": torch.version.cuda, "arch_list": "9.0"}
    built_for.write_text(json.dumps({**this_build, "source_sha256": "0" * 64}))
    assert not csrc_sampler._load_prebuilt(library) and loaded == []  # built from another sampling.cu
    digest = hashlib.sha256(csrc_sampler.source_path().read_bytes()).hexdigest()
    built_for.write_text(json.dumps({**this_build, "source_sha256": digest}))
    assert csrc_sampler._load_prebuilt(library) and loaded == [str(library)]


def test_building_the_library_needs_a_cuda_build_of_torch(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="CUDA build of torch"):
        csrc_sampler.build_library(tmp_path)


def crafted(probs: list[float], rows: int, device: str = "cuda") -> torch.Tensor:
    """Rows of a full-size vocabulary: the given probabilities first, a tail negligible at every tested temperature
    (at -40 and temperature 4, the 49k tail tokens would hold most of the mass)."""
    logits = torch.full((VOCAB,), -1.0e4)
    logits[: len(probs)] = torch.tensor([math.log(p) for p in probs])
    return logits.repeat(rows, 1).to(device)


@pytest.mark.gpu
def test_greedy_equals_argmax_exactly(fused) -> None:
    logits = torch.randn(64, VOCAB, device="cuda")
    ties = (torch.randn(64, VOCAB, device="cuda") * 3).round()  # many equal maxima: the first index wins
    for scores in (logits, ties):
        assert torch.equal(fused(scores, SamplingConfig(do_sample=False)), scores.argmax(-1))
    one = SamplingConfig(do_sample=True, temperature=0.7, top_k=1, top_p=1.0)
    assert torch.equal(fused(logits, one, make_generator(0, logits.device)), logits.argmax(-1))


# (probabilities, sampling settings, the support both samplers must keep)
CRAFTED = [
    pytest.param([0.5, 0.3, 0.15, 0.05], {"top_k": 2, "top_p": 1.0, "temperature": 1.0}, {0, 1}, id="top_k"),
    pytest.param([0.5, 0.3, 0.15, 0.05], {"top_k": 0, "top_p": 0.6, "temperature": 1.0}, {0, 1}, id="crossing"),
    pytest.param([0.5, 0.3, 0.15, 0.05], {"top_k": 0, "top_p": 0.81, "temperature": 1.0}, {0, 1, 2}, id="top_p"),
    # temperature before filtering: sharper keeps fewer, flatter keeps more
    pytest.param([0.5, 0.3, 0.15, 0.05], {"top_k": 0, "top_p": 0.7, "temperature": 0.25}, {0}, id="cold"),
    pytest.param([0.5, 0.3, 0.15, 0.05], {"top_k": 0, "top_p": 0.7, "temperature": 4.0}, {0, 1, 2}, id="hot"),
    # top-p over the renormalized top-k
    pytest.param([0.5, 0.3, 0.15, 0.05], {"top_k": 2, "top_p": 0.55, "temperature": 1.0}, {0}, id="top_k_then_p"),
    # mass strictly above each of the tied 0.2 tokens is 0.4: all kept at p = 0.5, none at 0.35
    pytest.param([0.4, 0.2, 0.2, 0.2], {"top_k": 0, "top_p": 0.5, "temperature": 1.0}, {0, 1, 2, 3}, id="ties_kept"),
    pytest.param([0.4, 0.2, 0.2, 0.2], {"top_k": 0, "top_p": 0.35, "temperature": 1.0}, {0}, id="ties_dropped"),
]


@pytest.mark.parametrize(("probs", "config", "expected"), CRAFTED)
def test_crafted_supports_hold_for_the_pytorch_sampler(probs: list[float], config: dict, expected: set[int]) -> None:
    """The expectations themselves, on the CPU: the fused test below holds the kernel to them."""
    settings = SamplingConfig(do_sample=True, **config)
    kept = sampling_probs(crafted(probs, rows=1, device="cpu"), settings)[0] > 1e-6
    assert set(torch.nonzero(kept).flatten().tolist()) == expected


@pytest.mark.gpu
@pytest.mark.parametrize(("probs", "config", "expected"), CRAFTED)
def test_support_on_crafted_logits(fused, probs: list[float], config: dict, expected: set[int]) -> None:
    logits = crafted(probs, rows=8192)
    drawn = fused(logits, SamplingConfig(do_sample=True, **config), make_generator(0, logits.device))
    assert set(drawn.unique().tolist()) == expected


@pytest.mark.gpu
def test_distribution_matches_the_pytorch_sampler(fused) -> None:
    generator = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(1, VOCAB, device="cuda", generator=generator) * 2.5
    config = SamplingConfig(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    probs = sampling_probs(logits, config)[0].double()
    support = probs > 0
    rows, rounds = 8192, 25
    counts = torch.zeros(VOCAB, dtype=torch.float64, device="cuda")
    for _ in range(rounds):
        tokens = fused(logits.expand(rows, -1), config, generator)
        counts += torch.bincount(tokens, minlength=VOCAB).double()
    assert counts[~support].sum() == 0
    expected = probs[support] * rows * rounds
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)  # a 6-sigma bound on the chi-square statistic


@pytest.mark.gpu
def test_a_seed_reproduces_the_draws(fused) -> None:
    # Many rows, repeated: the top-p boundary must not depend on the order in which threads add masses.
    logits = torch.randn(1024, VOCAB, device="cuda")
    config = SamplingConfig(do_sample=True, temperature=1.0, top_k=0, top_p=0.95)
    first = fused(logits, config, make_generator(5, logits.device))
    for _ in range(8):
        assert torch.equal(fused(logits, config, make_generator(5, logits.device)), first)


@pytest.mark.gpu
def test_the_engine_with_the_fused_sampler_matches_greedy(fused) -> None:
    from dualtower.generation import Generator, PreparedPrompt
    from dualtower.model import DualTowerVLM

    torch.manual_seed(0)
    model = DualTowerVLM.from_flavor("debug", device="cuda").requires_grad_(False)
    cfg = model.cfg
    ids = [1, 9, 10, cfg.global_image_token_id, *[cfg.image_token_id] * cfg.image_tokens_per_tile, 55, 66, 77]
    prompt = PreparedPrompt(torch.tensor(ids), torch.rand(1, 3, cfg.tile_size, cfg.tile_size), len(ids) - 3)
    config = SamplingConfig(max_new_tokens=6)
    torch_tokens = Generator(model, eos_token_ids=(), compile=False).generate_prepared([prompt], config)
    fused_engine = Generator(model, eos_token_ids=(), compile=False, sampler="csrc")
    assert fused_engine._sample is fused  # the fused op, not the PyTorch fallback
    fused_tokens = fused_engine.generate_prepared([prompt], config)
    assert fused_tokens[0].token_ids == torch_tokens[0].token_ids
