"""The generation engine on a random `debug` model: cache correctness, batching, stopping, prefix cache."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from dualtower.batch import IGNORE_INDEX
from dualtower.generation import Generator, PrefixCache, PreparedPrompt, SamplingConfig
from dualtower.generation import engine as engine_module
from dualtower.generation.engine import compile_prefill_blocks
from dualtower.generation.left_batch import left_tower_batch
from dualtower.model import DualTowerVLM

# (tiles, extra prefix tokens before the images, prompt text tokens): ragged on purpose.
RAGGED = [(1, 0, 5), (3, 2, 9), (0, 0, 4), (2, 1, 6)]


@pytest.fixture(scope="module")
def model() -> DualTowerVLM:
    return varied_debug_model()


def varied_debug_model(flavor: str = "debug") -> DualTowerVLM:
    """A debug model whose greedy outputs vary: wider weights and an untied right head (a random tied head
    mostly echoes the input token)."""
    torch.manual_seed(0)
    model = DualTowerVLM.from_flavor(flavor)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embedding" not in name:
                param.normal_(0.0, param.shape[-1] ** -0.5)
        decoder = model.text_decoder
        decoder.head.weight = nn.Parameter(torch.randn_like(decoder.head.weight))
    return model.requires_grad_(False)


def make_prompt(model: DualTowerVLM, tiles: int, extra: int, text: int, seed: int) -> PreparedPrompt:
    cfg, generator = model.cfg, torch.Generator().manual_seed(seed)
    ids = [1, 9, 10, *torch.randint(3, 900, (extra,), generator=generator).tolist()]
    for _ in range(tiles):
        ids += [cfg.global_image_token_id] + [cfg.image_token_id] * cfg.image_tokens_per_tile
    prefix_len = len(ids) if tiles else 0
    ids += torch.randint(3, 900, (text,), generator=generator).tolist()
    pixels = torch.rand(tiles, 3, cfg.tile_size, cfg.tile_size, generator=generator)
    return PreparedPrompt(torch.tensor(ids), pixels, prefix_len)


@pytest.fixture(scope="module")
def prompts(model: DualTowerVLM) -> list[PreparedPrompt]:
    return [make_prompt(model, *shape, seed=index) for index, shape in enumerate(RAGGED)]


def greedy(tokens: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=tokens)


def teacher_forced_logits(model: DualTowerVLM, prompts: list[PreparedPrompt], generated: list[list[int]]) -> list:
    """Full recomputation of every text position (prompt + generated tokens but the last) in one packed pass."""
    batch = left_tower_batch(prompts, model.cfg)
    texts = [
        torch.cat([p.text_ids, torch.tensor(g[:-1], dtype=torch.long)]) for p, g in zip(prompts, generated, strict=True)
    ]
    lengths = [t.numel() for t in texts]
    batch = dataclasses.replace(
        batch,
        text_ids=torch.cat(texts),
        labels=torch.full((sum(lengths),), IGNORE_INDEX),
        cu_text=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
        text_positions=torch.cat([torch.arange(n) + p.prefix_len for n, p in zip(lengths, prompts, strict=True)]),
        max_text_len=max(lengths),
    )
    logits = model.logits(model(batch.to(model.text_decoder.head.weight.device))).float().cpu().split(lengths)
    return [row[p.text_ids.numel() - 1 :] for row, p in zip(logits, prompts, strict=True)]


def test_cached_decode_equals_teacher_forced_recomputation(model, prompts) -> None:
    engine = Generator(model, eos_token_ids=())
    results = engine.generate_prepared(prompts, greedy(6), return_logits=True)
    expected = teacher_forced_logits(model, prompts, [r.token_ids for r in results])
    for result, reference in zip(results, expected, strict=True):
        assert len(result.token_ids) == 6 and result.finish_reason == "length"
        torch.testing.assert_close(result.logits, reference, atol=1e-4, rtol=0)
        assert result.token_ids == reference.argmax(-1).tolist()


def test_batched_greedy_equals_one_by_one(model, prompts) -> None:
    """Each prompt alone runs on a fresh engine without a prefix cache: nothing the batched call computed (its
    left-tower K/V, for one) can leak into the one-by-one results."""
    uncached = lambda: Generator(model, eos_token_ids=(), prefix_cache_bytes=0)
    batched = uncached().generate_prepared(prompts, greedy(8), return_logits=True)
    alone = [uncached().generate_prepared([prompt], greedy(8), return_logits=True)[0] for prompt in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    for together, single in zip(batched, alone, strict=True):
        torch.testing.assert_close(together.logits, single.logits, atol=1e-4, rtol=0)
    assert len({tuple(r.token_ids) for r in batched}) == len(prompts)  # the test model is not degenerate


def test_the_left_tower_batch_restarts_positions_at_every_prompt(model, prompts) -> None:
    batch = left_tower_batch(prompts, model.cfg)
    prefix_lens = [p.prefix_len for p in prompts]
    assert 0 in prefix_lens and len(set(prefix_lens)) == len(prompts)  # ragged, and one prompt has no prefix
    expected = torch.cat([torch.arange(n) for n in prefix_lens])
    assert torch.equal(batch.prefix_positions, expected)
    assert batch.cu_prefix.tolist() == [0, *torch.tensor(prefix_lens).cumsum(0).tolist()]
    assert batch.max_prefix_len == max(prefix_lens) and batch.num_rows == len(prompts)
    assert torch.equal(batch.prefix_ids, torch.cat([p.prefix_ids for p in prompts]))


def test_exactly_max_new_tokens_minus_one_decode_steps(model, prompts) -> None:
    engine = Generator(model, eos_token_ids=(), sync_every=3)
    calls = []
    step = engine._step
    engine._step = lambda *args: calls.append(1) or step(*args)
    results = engine.generate_prepared(prompts[:2], greedy(5))
    assert [len(r.token_ids) for r in results] == [5, 5]
    assert len(calls) == engine.stats.decode_steps == 4  # the first token comes from the prefill


def test_every_row_stops_at_its_own_eos(model, prompts) -> None:
    free = Generator(model, eos_token_ids=()).generate_prepared(prompts, greedy(8))
    eos = free[0].token_ids[2]
    engine = Generator(model, eos_token_ids=(eos,), sync_every=4)
    stopped = engine.generate_prepared(prompts, greedy(8))
    for full, result in zip(free, stopped, strict=True):
        if eos in full.token_ids:
            cut = full.token_ids.index(eos) + 1
            assert result.token_ids == full.token_ids[:cut] and result.finish_reason == "eos"
        else:
            assert result.token_ids == full.token_ids and result.finish_reason == "length"
    assert stopped[0].token_ids == free[0].token_ids[:3]


def test_a_finished_batch_stops_early(model, prompts) -> None:
    first = Generator(model, eos_token_ids=()).generate_prepared(prompts[:1], greedy(1))[0].token_ids[0]
    engine = Generator(model, eos_token_ids=(first,), sync_every=1)
    result = engine.generate_prepared(prompts[:1], greedy(20))[0]
    assert result.token_ids == [first] and result.finish_reason == "eos"
    assert engine.stats.decode_steps == 0


class SpacedTokenizer:
    """Decodes token t as 't<t> ' so that stop strings can be aimed at tokens."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"t{i} " for i in ids)


def test_stop_strings_cut_the_text_and_streaming_matches(model, prompts) -> None:
    free = Generator(model, eos_token_ids=()).generate_prepared(prompts, greedy(7))
    target = free[1].token_ids[3]
    stop = f"t{target} "
    streamed: dict[int, str] = {}
    engine = Generator(model, SpacedTokenizer(), eos_token_ids=(), sync_every=2)
    config = SamplingConfig(max_new_tokens=7, stop_strings=(stop,))
    results = engine.generate_prepared(
        prompts, config, on_text=lambda row, s: streamed.update({row: streamed.get(row, "") + s})
    )
    cut = free[1].token_ids.index(target) + 1
    assert results[1].token_ids == free[1].token_ids[:cut] and results[1].finish_reason == "stop"
    assert results[1].text == "".join(f"t{i} " for i in free[1].token_ids[: cut - 1])
    for row, result in enumerate(results):
        assert stop not in result.text
        assert streamed.get(row, "") == result.text


def test_a_seed_reproduces_sampled_generations(model, prompts) -> None:
    engine = Generator(model, eos_token_ids=())
    config = SamplingConfig(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=3)
    first = [r.token_ids for r in engine.generate_prepared(prompts, config)]
    again = [r.token_ids for r in engine.generate_prepared(prompts, config)]
    other = [r.token_ids for r in engine.generate_prepared(prompts, dataclasses.replace(config, seed=4))]
    assert first == again
    assert first != other


def test_a_prefix_cache_hit_skips_the_vision_tower_and_changes_nothing(model, prompts) -> None:
    vision_calls = []
    hook = model.vision_encoder.register_forward_hook(lambda *_: vision_calls.append(1))
    try:
        engine = Generator(model, eos_token_ids=())
        uncached = engine.generate_prepared(prompts[:2], greedy(5))
        assert len(vision_calls) == 1 and engine.stats.prefix_cache_misses == 2
        # Same images and prefixes, a different question for the first one.
        other_question = PreparedPrompt(
            torch.cat([prompts[0].input_ids, torch.tensor([77, 78])]), prompts[0].tiles.clone(), prompts[0].prefix_len
        )
        cached = engine.generate_prepared([*prompts[:2], other_question], greedy(5))
        assert len(vision_calls) == 1
        assert engine.stats.prefix_cache_hits == 3 and engine.stats.vision_tower_runs == 0
        assert [r.token_ids for r in cached[:2]] == [r.token_ids for r in uncached]
        fresh = Generator(model, eos_token_ids=(), prefix_cache_bytes=0).generate_prepared([other_question], greedy(5))
        assert cached[2].token_ids == fresh[0].token_ids
    finally:
        hook.remove()


def test_duplicate_images_in_one_batch_run_the_left_tower_once(model, prompts) -> None:
    engine = Generator(model, eos_token_ids=(), prefix_cache_bytes=0)
    results = engine.generate_prepared([prompts[1], prompts[1]], greedy(3))
    assert engine.stats.vision_tiles == prompts[1].tiles.shape[0]
    assert engine.stats.prefix_cache_hits == 1
    assert results[0].token_ids == results[1].token_ids


def test_prefix_cache_is_an_lru_bounded_in_bytes() -> None:
    cache = PrefixCache(max_bytes=3 * 400)
    entry = lambda: torch.zeros(100)  # 400 bytes
    for key in "abc":
        cache.put((key, ""), entry())
    assert cache.get(("a", "")) is not None  # a is now the most recent
    cache.put(("d", ""), entry())
    assert ("b", "") not in cache and ("a", "") in cache and ("d", "") in cache
    assert cache.stats.bytes_used == 1200 and cache.stats.evictions == 1
    cache.put(("huge", ""), torch.zeros(1000))  # over budget: never stored
    assert ("huge", "") not in cache and len(cache) == 3


def test_generation_stats_are_filled(model, prompts) -> None:
    engine = Generator(model, eos_token_ids=())
    engine.generate_prepared(prompts, greedy(4))
    stats = engine.stats
    assert stats.requests == 4 and stats.generated_tokens == 16 and stats.decode_steps == 3
    assert 0 < stats.ttft_s <= stats.total_s and 0 < stats.decode_s <= stats.total_s
    assert stats.tokens_per_s == pytest.approx(16 / stats.total_s)
    assert stats.ms_per_step == pytest.approx(1e3 * stats.decode_s / 3)
    assert stats.decode_tokens_per_s == pytest.approx((16 - 4) / stats.decode_s)  # the first tokens: prefill
    assert stats.as_dict()["ms_per_step"] == stats.ms_per_step


def test_the_compiled_block_matches_eager_on_cpu(model, prompts) -> None:
    """torch.compile of the decode block (one graph for every layer; about 15 s of CPU compile)."""
    eager = Generator(model, eos_token_ids=(), compile=False).generate_prepared(
        prompts[:2], greedy(3), return_logits=True
    )
    compiled = Generator(model, eos_token_ids=(), compile=True).generate_prepared(
        prompts[:2], greedy(3), return_logits=True
    )
    for fast, slow in zip(compiled, eager, strict=True):
        assert fast.token_ids == slow.token_ids
        torch.testing.assert_close(fast.logits, slow.logits, atol=1e-4, rtol=0)


def test_compiled_prefill_blocks_match_eager_on_cpu(model, prompts) -> None:
    """compile_prefill compiles each tower's blocks in place: one graph per tower for every layer and every
    prompt length (dynamic shapes), the same logits. aot_eager: the wiring, without inductor's CPU compile."""
    compiled_model, counter = copy.deepcopy(model), CompileCounterWithBackend("aot_eager")
    compile_prefill_blocks(compiled_model, backend=counter)
    engine = Generator(compiled_model, eos_token_ids=(), compile=False)
    eager = Generator(model, eos_token_ids=(), compile=False)
    graphs = []
    for batch in (prompts[:2], prompts[2:]):
        fast = engine.generate_prepared(batch, greedy(3), return_logits=True)
        slow = eager.generate_prepared(batch, greedy(3), return_logits=True)
        for ours, theirs in zip(fast, slow, strict=True):
            assert ours.token_ids == theirs.token_ids
            torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
        graphs.append(counter.frame_count)
    # A graph each for the vision, left LM and right LM blocks (torch 2.13 compiles the vision block twice:
    # its float LayerNorm eps is a graph input the first time); other tile counts and lengths add none.
    assert 3 <= graphs[0] <= 4 and graphs[1] == graphs[0]
    compiled = [block._compiled_call_impl for block in compiled_model.text_decoder.blocks]
    compile_prefill_blocks(compiled_model)  # compiled already (by training, say): kept as it is
    assert [block._compiled_call_impl for block in compiled_model.text_decoder.blocks] == compiled


def test_the_compile_prefill_option_compiles_the_callers_model(model, monkeypatch) -> None:
    compiled = []
    monkeypatch.setattr(engine_module, "compile_prefill_blocks", compiled.append)
    Generator(model, compile=False)
    assert compiled == []  # off by default: it changes the caller's model
    Generator(model, compile=False, compile_prefill=True)
    assert compiled == [model]


@pytest.mark.gpu
@pytest.mark.parametrize("compile_block", [True, False])
def test_cuda_graph_decode_matches_eager_and_teacher_forcing(model, prompts, compile_block: bool) -> None:
    cuda_model = copy.deepcopy(model).cuda()
    three = prompts[:3]  # 3 requests: graphs pad them to a 4-row bucket
    eager = Generator(cuda_model, eos_token_ids=(), compile=False, cuda_graph=False)
    reference = eager.generate_prepared(three, greedy(6), return_logits=True)
    # compile_block also compiles the prefill, in place: on a copy, so that the references stay eager.
    engine_model = copy.deepcopy(cuda_model) if compile_block else cuda_model
    engine = Generator(engine_model, eos_token_ids=(), compile=compile_block, compile_prefill=compile_block,
                       cuda_graph=True, sync_every=4)
    graphed = engine.generate_prepared(three, greedy(6), return_logits=True)
    replayed = engine.generate_prepared(three, greedy(6))  # the captured graph again, same cache
    expected = teacher_forced_logits(cuda_model, three, [r.token_ids for r in graphed])
    for fast, slow, again, forced in zip(graphed, reference, replayed, expected, strict=True):
        assert fast.token_ids == slow.token_ids == again.token_ids
        torch.testing.assert_close(fast.logits, slow.logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(fast.logits, forced, atol=1e-4, rtol=0)


class LetterTokenizer:
    """Token t decodes to one letter ('a' + t); EOS_ID is a special token (skipped)."""

    EOS_ID = 99
    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("" if i == self.EOS_ID else chr(ord("a") + i) for i in ids)


@pytest.mark.parametrize(
    ("stream", "max_new_tokens", "stop", "expected"),
    [
        ([0, 2, 3], 3, "cd", [0, 2, 3]),  # the last allowed token completes the stop string
        ([3], 1, "d", [3]),  # max_new_tokens = 1 and the first token is the stop string
        ([0, 2, 3, 4, 5, 99, 99, 99], 64, "cd", [0, 2, 3]),  # stop, more tokens, then EOS
        ([0, 2, 3, 4, 5, 6, 7, 8], 64, "cd", [0, 2, 3]),
    ],
)
def test_the_stop_tracker_cuts_at_the_stop_string_however_the_tokens_are_chunked(
    stream: list[int], max_new_tokens: int, stop: str, expected: list[int]
) -> None:
    from dualtower.generation.stopping import StopTracker

    for chunk in (1, 8):
        tracker = StopTracker(LetterTokenizer(), 1, max_new_tokens, [LetterTokenizer.EOS_ID], [stop])
        for start in range(0, len(stream), chunk):
            if not tracker.all_finished:
                tracker.update([stream[start : start + chunk]])
        tracker.finish()
        result = tracker.results()[0]
        assert (result.finish_reason, result.token_ids) == ("stop", expected), chunk
        assert result.text == LetterTokenizer().decode(expected).split(stop)[0]


@pytest.mark.parametrize("stops", [("cd", "bcd"), ("bcd", "cd")])
def test_with_several_stop_strings_the_text_ends_before_the_earliest_one(stops: tuple[str, str]) -> None:
    """'abcd' completes both stop strings at its last token; the text is cut where the first of them begins."""
    from dualtower.generation.stopping import StopTracker

    stream = [0, 1, 2, 3, 4, 5]  # "abcdef"
    for chunk in (1, 8):
        streamed: list[str] = []
        tracker = StopTracker(LetterTokenizer(), 1, 64, [], stops, on_text=lambda row, s, out=streamed: out.append(s))
        for start in range(0, len(stream), chunk):
            if not tracker.all_finished:
                tracker.update([stream[start : start + chunk]])
        tracker.finish()
        result = tracker.results()[0]
        assert (result.finish_reason, result.token_ids, result.text) == ("stop", [0, 1, 2, 3], "a"), chunk
        assert "".join(streamed) == "a", chunk


def test_stop_strings_end_rows_the_same_for_any_sync_every(model, prompts) -> None:
    """On CUDA (sync_every=8) a stop string in the chunk that also ended the row (EOS or length) was missed."""
    two = [prompts[0], prompts[2]]  # the cheapest pair (one tile, no image)
    rows = [r.token_ids for r in Generator(model, eos_token_ids=()).generate_prepared(two, greedy(5))]
    # A row, a new token in it at cut - 1 >= 1 (the stop string), and a later new token (an EOS after the stop).
    # With sync_every=8 the tokens after the first all arrive in one chunk, which also ends the row.
    row, cut, eos_token = next(
        (row, cut, later)
        for row, free in enumerate(rows)
        for cut in range(2, 5)
        if free[cut - 1] not in free[: cut - 1]
        for later in free[cut:]
        if later not in free[:cut]
    )
    free = rows[row]
    # (eos ids, max_new_tokens): EOS after the stop in the same chunk; the stop string ends at the last token.
    scenarios = [((eos_token,), 5), ((), cut)]
    for eos, max_new_tokens in scenarios:
        config = SamplingConfig(max_new_tokens=max_new_tokens, stop_strings=(f"t{free[cut - 1]} ",))
        runs = []
        for sync_every in (1, 8):
            engine = Generator(model, SpacedTokenizer(), eos_token_ids=eos, sync_every=sync_every)
            results = engine.generate_prepared(two, config, return_logits=True)
            assert results[row].token_ids == free[:cut] and results[row].finish_reason == "stop", (eos, sync_every)
            assert engine.stats.generated_tokens == sum(len(r.token_ids) for r in results)
            assert all(r.logits.shape[0] == len(r.token_ids) for r in results)
            runs.append([(r.token_ids, r.finish_reason, r.text, r.logits) for r in results])
        for one, eight in zip(*runs, strict=True):
            assert one[:3] == eight[:3]
            torch.testing.assert_close(one[3], eight[3])


def test_prompt_plus_max_new_tokens_beyond_the_positions_is_refused_before_any_work(
    model, prompts, monkeypatch
) -> None:
    length = prompts[1].input_ids.numel()
    monkeypatch.setattr(model.cfg.lm, "max_position_embeddings", length + 3)
    engine = Generator(model, eos_token_ids=())
    engine._prefix_kv = lambda *args: pytest.fail("the check must run before the left tower")
    expected = rf"request 1: {length} prompt tokens \+ max_new_tokens 4 exceed the model's {length + 3} positions"
    with pytest.raises(ValueError, match=expected):
        engine.generate_prepared(prompts[:2], greedy(4))
    del engine._prefix_kv
    assert len(engine.generate_prepared(prompts[:2], greedy(3))[1].token_ids) == 3  # exactly at the limit


def test_compiled_decode_keeps_compiling_past_eight_buckets() -> None:
    """Every (rows, capacity) bucket is its own static graph; evaluation easily passes dynamo's default limit of 8
    graphs per function, after which new buckets would silently decode eagerly."""
    from torch._dynamo.testing import CompileCounter

    from dualtower.generation.engine import compiled_block_decode
    from dualtower.generation.kv_cache import StaticKVCache, decode_step
    from dualtower.model.config import LMConfig
    from dualtower.model.language import LanguageModel

    lm = LanguageModel(LMConfig(hidden_dim=32, inter_dim=48, n_heads=4, n_kv_heads=2, n_blocks=1, base_vocab_size=64))
    counter = CompileCounter()
    block_fn = compiled_block_decode(counter)
    buckets = [(rows, capacity) for capacity in (8, 16, 24) for rows in (1, 2, 3, 4)]
    for rows, capacity in buckets:
        cache = StaticKVCache(lm.eval(), rows, capacity, torch.float32, torch.device("cpu"))
        tokens = torch.zeros(rows, dtype=torch.long)
        with torch.inference_mode():
            decode_step(lm, tokens, tokens, cache.keys, cache.values, block_fn=block_fn)
    assert counter.frame_count == len(buckets)
