"""Edges of the decode loop and its helpers: static-shape buckets, cache reuse, EOS defaults, argument checks,
streamed text (hold-back, incomplete UTF-8, the tail at finish), the generation profiler's warm-up and stop,
and the fused sampler's CPU-side lookup (built_for.json checks, fallbacks, nvcc, the build record)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_generation import LetterTokenizer, greedy, make_prompt, varied_debug_model

from dualtower.generation import Generator, PrefixCache, PreparedPrompt, SamplingConfig, csrc_sampler
from dualtower.generation.profiling import GenerationProfiler
from dualtower.generation.sampling import sample
from dualtower.generation.stopping import StopTracker
from dualtower.model import DualTowerVLM

# (tiles, extra prefix tokens, prompt text tokens): small, ragged, one prompt without an image.
SHAPES = [(1, 0, 5), (0, 0, 3), (1, 2, 7)]


@pytest.fixture(scope="module")
def model() -> DualTowerVLM:
    return varied_debug_model()


@pytest.fixture(scope="module")
def prompts(model: DualTowerVLM) -> list[PreparedPrompt]:
    return [make_prompt(model, *shape, seed=10 + index) for index, shape in enumerate(SHAPES)]


# -- engine: buckets, cache reuse, EOS defaults, argument checks ---------------------------------------------


def test_static_shape_buckets_pad_rows_and_capacity_without_changing_tokens(model, prompts) -> None:
    """With static shapes (compile or CUDA graphs) rows round up to a power of two and the capacity to 256;
    the idle padding rows must not change any request's tokens. Setting `compile` after construction keeps the
    eager step (no 15 s CPU compile) while the engine buckets as if it compiled."""
    reference = Generator(model, eos_token_ids=()).generate_prepared(prompts, greedy(3), return_logits=True)
    engine = Generator(model, eos_token_ids=())
    engine.compile = True
    bucketed = engine.generate_prepared(prompts, greedy(3), return_logits=True)
    assert (engine._cache.rows, engine._cache.capacity) == (4, 256)
    for padded, plain in zip(bucketed, reference, strict=True):
        assert padded.token_ids == plain.token_ids
        torch.testing.assert_close(padded.logits, plain.logits, atol=1e-4, rtol=0)
    # Exact powers of two and multiples of the bucket are not rounded further up.
    assert [engine._bucket_rows(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert [engine._bucket_capacity(n) for n in (1, 255, 256, 257)] == [256, 256, 256, 512]
    plain_engine = Generator(model, eos_token_ids=())
    assert (plain_engine._bucket_rows(3), plain_engine._bucket_capacity(17)) == (3, 17)  # eager: exact shapes


def test_a_cache_of_the_same_shape_is_reused_and_its_stale_entries_change_nothing(model, prompts) -> None:
    """The second call has the same rows and capacity with its long prompt in the other row: it reuses the
    cache, whose slots past each row's length still hold the first call's K/V."""
    first, second = [prompts[2], prompts[1]], [prompts[1], prompts[2]]
    engine = Generator(model, eos_token_ids=(), prefix_cache_bytes=0)
    engine.generate_prepared(first, greedy(3))
    cache = engine._cache
    reused = engine.generate_prepared(second, greedy(3), return_logits=True)
    assert engine._cache is cache
    fresh = Generator(model, eos_token_ids=(), prefix_cache_bytes=0).generate_prepared(
        second, greedy(3), return_logits=True
    )
    for again, new in zip(reused, fresh, strict=True):
        assert again.token_ids == new.token_ids
        torch.testing.assert_close(again.logits, new.logits, atol=1e-5, rtol=0)
    engine.generate_prepared(second, greedy(4))  # a longer answer needs more capacity: a new cache
    assert engine._cache is not cache and engine._cache.capacity == cache.capacity + 1


class EosTokenizer(LetterTokenizer):
    """A tokenizer that names its own EOS id (the engine's default stop token)."""

    def __init__(self, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id


def test_the_tokenizers_eos_is_the_default_and_an_empty_tuple_means_never_stop(model, prompts) -> None:
    text_only = prompts[1:2]
    free = Generator(model, eos_token_ids=()).generate_prepared(text_only, greedy(4))[0].token_ids
    eos = free[1]
    assert eos not in free[:1]
    by_default = Generator(model, EosTokenizer(eos))
    assert (by_default.eos_token_ids, by_default.pad_token_id) == ((eos,), eos)
    stopped = by_default.generate_prepared(text_only, greedy(4))[0]
    assert (stopped.token_ids, stopped.finish_reason) == (free[:2], "eos")
    never = Generator(model, EosTokenizer(eos), eos_token_ids=())
    assert never.eos_token_ids == ()
    unstopped = never.generate_prepared(text_only, greedy(4))[0]
    assert (unstopped.token_ids, unstopped.finish_reason) == (free, "length")
    assert Generator(model).eos_token_ids == (2,)  # no tokenizer: <|im_end|>


def test_invalid_engine_arguments_are_refused(model, prompts) -> None:
    with pytest.raises(ValueError, match="unknown sampler 'cuda'"):
        Generator(model, sampler="cuda")
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        Generator(model, cuda_graph=True)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        Generator(model).generate_prepared(prompts[:1], SamplingConfig(max_new_tokens=2, stop_strings=("x",)))


# -- the stop tracker's streamed text -------------------------------------------------------------------------


def streamed_chunks(tracker_args: dict, chunks: list[list[int]], tokenizer=None) -> list[str]:
    """What on_text receives, per update (an empty string where nothing was streamed), then after finish()."""
    out: list[str] = []
    tracker = StopTracker(tokenizer or LetterTokenizer(), 1, on_text=lambda row, text: out.append(text), **tracker_args)
    seen: list[str] = []
    for chunk in chunks:
        tracker.update([chunk])
        seen.append("".join(out))
        out.clear()
    tracker.finish()
    seen.append("".join(out))
    return seen


def test_streaming_holds_back_one_character_less_than_the_longest_stop_string() -> None:
    stop = {"max_new_tokens": 16, "eos_token_ids": [LetterTokenizer.EOS_ID], "stop_strings": ["xyz"]}
    assert streamed_chunks(stop, [[0], [1], [2], [3]]) == ["", "", "a", "b", "cd"]
    no_stop = {"max_new_tokens": 16, "eos_token_ids": [LetterTokenizer.EOS_ID]}
    assert streamed_chunks(no_stop, [[0], [1], [2]]) == ["a", "b", "c", ""]  # nothing to hold back


class ByteTokenizer:
    """Token t is the byte t: a multi-byte character is split across tokens, as byte-level BPE does."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_character_split_across_tokens_is_streamed_once_it_is_complete() -> None:
    e_acute = list("é".encode())  # two bytes
    args = {"max_new_tokens": 16, "eos_token_ids": []}
    chunks = [[ord("a")], e_acute[:1], e_acute[1:], [ord("b")]]
    assert streamed_chunks(args, chunks, ByteTokenizer()) == ["a", "", "é", "b", ""]


def test_rows_still_running_at_finish_end_as_length_and_stream_their_held_back_text() -> None:
    args = {"max_new_tokens": 16, "eos_token_ids": [], "stop_strings": ["xyz"]}
    assert streamed_chunks(args, [[0, 1, 2]]) == ["a", "bc"]


class SpecialTokenizer(LetterTokenizer):
    """Writes EOS out as <|im_end|> unless asked to skip special tokens, as real tokenizers do."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        special = "" if skip_special_tokens else "<|im_end|>"
        return "".join(special if i == self.EOS_ID else chr(ord("a") + i) for i in ids)


def test_the_text_leaves_out_special_tokens() -> None:
    args = {"max_new_tokens": 16, "eos_token_ids": [SpecialTokenizer.EOS_ID]}
    assert streamed_chunks(args, [[0, 1], [SpecialTokenizer.EOS_ID]], SpecialTokenizer()) == ["ab", "", ""]
    tracker = StopTracker(SpecialTokenizer(), 1, 16, [SpecialTokenizer.EOS_ID])
    tracker.update([[0, SpecialTokenizer.EOS_ID]])
    assert tracker.results()[0].text == "a"


def test_the_max_new_tokens_th_token_ends_the_row_and_later_tokens_are_dropped() -> None:
    tracker = StopTracker(LetterTokenizer(), 2, 2, [LetterTokenizer.EOS_ID])
    assert tracker.update([[5, 6, 7], [5]]) == []
    assert tracker.rows[0].finish_reason == "length" and not tracker.all_finished
    tracker.update([[], [LetterTokenizer.EOS_ID, 8]])
    assert tracker.all_finished  # before finish(): the engine's loop stops on this
    results = tracker.results()
    assert [(r.token_ids, r.finish_reason) for r in results] == [([5, 6], "length"), ([5, 99], "eos")]


# -- the generation profiler ---------------------------------------------------------------------------------


def fake_generator(compile: bool) -> SimpleNamespace:
    cache = PrefixCache(1 << 20)
    cache.put(("tiles", "prefix"), torch.zeros(4))
    return SimpleNamespace(compile=compile, cuda_graph=False, device=torch.device("cpu"), phase_hook=None,
                           prefix_cache=cache)  # fmt: skip


@pytest.mark.parametrize("compile", [True, False])
def test_a_compiling_generator_warms_up_untraced_and_the_traced_call_misses_the_prefix_cache(
    tmp_path: Path, compile: bool
) -> None:
    generator, events = fake_generator(compile), []

    def call() -> str:
        events.append(("call", len(generator.prefix_cache)))
        return "result"

    warm_up = lambda: events.append(("warm_up", len(generator.prefix_cache)))
    assert GenerationProfiler(tmp_path).run(generator, call, warm_up) == "result"
    assert events == ([("warm_up", 1), ("call", 0)] if compile else [("call", 1)])
    events.clear()
    GenerationProfiler(tmp_path).run(fake_generator(compile), call)  # warm_up defaults to the call itself
    assert [name for name, _ in events] == (["call", "call"] if compile else ["call"])


def test_a_call_shorter_than_the_traced_steps_still_stops_the_profiler(tmp_path: Path) -> None:
    generator = fake_generator(compile=False)
    profiler = GenerationProfiler(tmp_path, decode_steps=8)
    assert profiler.run(generator, lambda: torch.ones(3).sum().item()) == 3.0  # no decode step at all
    assert not torch.autograd._profiler_enabled()
    assert json.loads(profiler.path.read_text())["traceEvents"]


# -- the fused sampler's CPU-side logic ----------------------------------------------------------------------


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records libraries instead of loading them. No GPU is seen, so that a machine's own GPU does not decide
    whether the 9.0 build records load (the architecture check has its own tests)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded: list[str] = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(csrc_sampler, "_register_fake", lambda: None)
    return loaded


def write_built_for(folder: Path, **changes: str | None) -> Path:
    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "arch_list": "9.0", "source_sha256": "0" * 64}
    (folder / csrc_sampler.BUILT_FOR).write_text(json.dumps({**record, **changes}))
    return folder / f"{csrc_sampler.EXTENSION_NAME}.so"


def test_without_the_cuda_source_a_prebuilt_library_is_checked_against_the_torch_build_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_load: list[str]
) -> None:
    monkeypatch.setenv("DUALTOWER_CSRC_DIR", str(tmp_path / "no_csrc"))  # an install without csrc/
    library = write_built_for(tmp_path)
    assert csrc_sampler._load_prebuilt(library) and no_load == [str(library)]
    no_load.clear()
    write_built_for(tmp_path, cuda="0.0")  # another CUDA version of the same torch version
    assert not csrc_sampler._load_prebuilt(library) and no_load == []


def test_a_prebuilt_library_that_fails_to_load_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALTOWER_CSRC_DIR", str(tmp_path / "no_csrc"))
    library = write_built_for(tmp_path)
    assert not csrc_sampler._load_prebuilt(library)  # matching record, but no such file


def test_a_refused_prebuilt_library_falls_back_to_the_jit_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_load: list[str]
) -> None:
    builds: list[Path | None] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(csrc_sampler, "_jit_build", lambda build_directory, verbose: builds.append(build_directory))
    monkeypatch.setenv(csrc_sampler.PREBUILT_ENV, str(write_built_for(tmp_path, torch="0.0")))
    csrc_sampler.load_extension.__wrapped__()  # uncached: the cached function must not remember this fake GPU
    assert builds == [None] and no_load == []


def test_a_sampler_that_cannot_be_built_falls_back_to_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_nvcc() -> None:
        raise RuntimeError("the fused CUDA sampler needs nvcc")

    monkeypatch.setattr(csrc_sampler, "load_extension", no_nvcc)
    assert csrc_sampler.sampler_for(torch.device("cuda")) is sample


def test_nvcc_is_found_under_cuda_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "")  # so that only CUDA_HOME can find it
    assert csrc_sampler.find_nvcc() == str(nvcc)
    nvcc.unlink()
    assert csrc_sampler.find_nvcc() is None


def test_building_the_library_records_its_build_and_restores_the_arch_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str | None] = []
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    record_arch = lambda build_directory, verbose: seen.append(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    monkeypatch.setattr(csrc_sampler, "_jit_build", record_arch)
    library = csrc_sampler.build_library(tmp_path, arch_list="8.0")
    assert seen == ["8.0"] and "TORCH_CUDA_ARCH_LIST" not in os.environ
    record = json.loads((tmp_path / csrc_sampler.BUILT_FOR).read_text())
    assert record == {**csrc_sampler._this_build(), "arch_list": "8.0"} and record["cuda"] == "12.8"
    assert library == tmp_path / f"{csrc_sampler.EXTENSION_NAME}.so"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    csrc_sampler.build_library(tmp_path, arch_list="9.0")
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5"
