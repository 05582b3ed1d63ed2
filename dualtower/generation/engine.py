"""The generation engine: cached left tower, varlen right-tower prefill, static-cache decode loop.

Shape legend:
    R   requests in the call, B cache rows (R rounded up to a power of two when shapes must be static)
    L   LM layers, P / T prefix / prompt-text tokens of one request, Hkv key-value heads, D head dim
    S   cache capacity, V vocabulary

Per call:
1. left tower once per distinct (tiles, prefix tokens), skipped for prefixes already in the PrefixCache;
2. one varlen right-tower prefill over all prompt texts, writing [prefix K/V | text K/V] into the cache;
3. a decode loop of one step per token: on GPU the decoder block is torch.compiled (one graph serves every
   layer) and the whole step is replayed as one CUDA graph; on CPU it runs eagerly. Tokens, EOS flags and
   positions stay on the device; the host looks at them every `sync_every` steps (stop strings, streaming,
   the all-rows-finished check), so a finished batch runs at most `sync_every - 1` idle steps, and a batch
   that reaches max_new_tokens runs exactly max_new_tokens - 1 decode steps (the first token comes from the
   prefill; no step runs after the last token).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dualtower.generation.kv_cache import (
    GraphedDecodeStep,
    PrefillLayout,
    StaticKVCache,
    block_decode,
    decode_step,
    prefill,
)
from dualtower.generation.left_batch import chunks_by_tiles, left_tower_batch
from dualtower.generation.prefix_cache import (
    PrefixCache,
    PrefixKey,
    left_tower_parameters,
    tensor_digest,
    weights_state,
)
from dualtower.generation.requests import (
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    PreparedPrompt,
    check_positions,
    prepare_requests,
)
from dualtower.generation.sampling import SamplingConfig, make_generator, sample
from dualtower.generation.stopping import StopTracker, TextCallback

logger = logging.getLogger(__name__)

DEFAULT_EOS_TOKEN_ID = 2  # <|im_end|>
CAPACITY_BUCKET = 256  # compiled decode: round the cache length up so that few shapes get compiled
DECODE_GRAPH_LIMIT = 64  # compiled decode graphs (rows x capacity buckets) before new buckets run eagerly


class Generator:
    """Batched, ragged generation with a DualTowerVLM. Keep one Generator to reuse its caches and graphs.

    sampler: "torch" (the PyTorch sampler) or "csrc" (the fused CUDA op, built on first use; falls back to
    "torch" without CUDA or nvcc). compile: torch.compile the decoder block of the decode step (one compiled
    graph serves every layer; default on CUDA). cuda_graph: capture the whole decode step in one CUDA graph
    per cache shape (default on CUDA). Both are off on CPU, where the step runs eagerly.
    compile_prefill (default off): also compile every block of the three towers for the prefill, in place and
    with dynamic shapes (`Module.compile`, as training does; blocks compiled already are left alone). On a GPU
    an eager prefill is bound by kernel launches: an H200 took 65 ms to the first token at 360m (32 ms with the
    image's K/V cached), far more than the prefill's arithmetic needs. Off by default because it compiles the
    caller's model in place and costs a compilation per tower on the first call; leave it off for a model that
    training wraps (FSDP).

    Sampling with `SamplingConfig.seed` reproduces the output of the same batch of requests, not of one request
    in any batch (see SamplingConfig): one torch.Generator per call draws the noise of every row.

    phase_hook (attribute, default None): called with "left_tower" or "decode_step" around each of those phases,
    it returns the context manager to run the phase in. The generation profiler labels and ends traces with it.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        prefix_cache_bytes: int = 512 * 2**20,
        compile: bool | None = None,
        compile_prefill: bool = False,
        cuda_graph: bool | None = None,
        sync_every: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        sampler: str = "torch",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._cached_weights_state = (weights_state(left_tower_parameters(model)), self._autocast_state())
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else compile
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        if self.cuda_graph and not on_cuda:
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        if sync_every is not None and sync_every < 1:
            raise ValueError(f"sync_every must be >= 1 (or None for the device's default), got {sync_every}")
        self.sync_every = sync_every or (8 if self.device.type == "cuda" else 1)
        self.eos_token_ids = tuple(_default_eos(tokenizer) if eos_token_ids is None else eos_token_ids)
        self.pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else DEFAULT_EOS_TOKEN_ID
        self._sample = _pick_sampler(sampler, self.device)
        if compile_prefill:
            compile_prefill_blocks(model)
        block_fn = compiled_block_decode() if self.compile else block_decode
        self._step: Callable[..., Tensor] = functools.partial(decode_step, block_fn=block_fn)
        self._cache: StaticKVCache | None = None
        self._graphed: GraphedDecodeStep | None = None
        self.stats = GenerationStats()
        self.phase_hook: Callable[[str], contextlib.AbstractContextManager] | None = None

    # Read from the model at every use: a Generator kept across `model.to(dtype / device)` follows it.
    @property
    def device(self) -> torch.device:
        return self.model.text_decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.text_decoder.token_embedding.weight.dtype

    # -- public API ---------------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingConfig | None = None,
        *,
        on_text: TextCallback | None = None,
        return_logits: bool = False,
    ) -> list[GenerationResult]:
        """Answer every request (one batch). `on_text(row, new_text)` streams text as it is produced."""
        start = time.perf_counter()
        if self.tokenizer is None:
            raise ValueError("Generator.generate needs a tokenizer; use generate_prepared for token ids")
        prompts = prepare_requests(list(requests), self.tokenizer, self.model.cfg)
        return self.generate_prepared(prompts, sampling, on_text=on_text, return_logits=return_logits, start_time=start)

    def generate_prepared(
        self,
        prompts: Sequence[PreparedPrompt],
        sampling: SamplingConfig | None = None,
        *,
        on_text: TextCallback | None = None,
        return_logits: bool = False,
        start_time: float | None = None,
    ) -> list[GenerationResult]:
        """Generate from already tokenized prompts (tiles + input ids + prefix length)."""
        if not prompts:
            return []
        sampling = sampling or SamplingConfig()
        check_positions(prompts, sampling.max_new_tokens, self.model.cfg.lm.max_position_embeddings)
        start = time.perf_counter() if start_time is None else start_time
        stats = GenerationStats(requests=len(prompts), prompt_tokens=sum(p.input_ids.numel() for p in prompts))
        stats.prepare_s = time.perf_counter() - start
        tracker = StopTracker(
            self.tokenizer, len(prompts), sampling.max_new_tokens, self.eos_token_ids, sampling.stop_strings, on_text
        )
        if sampling.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        with torch.inference_mode():
            logits_log = self._run(prompts, sampling, tracker, stats, start, return_logits)
        tracker.finish()
        results = tracker.results()
        if logits_log is not None:
            stacked = torch.stack(logits_log, dim=1).cpu()  # (R, steps, V)
            for row, result in enumerate(results):
                result.logits = stacked[row, : len(result.token_ids)]
        stats.generated_tokens = sum(len(r.token_ids) for r in results)
        stats.total_s = time.perf_counter() - start
        self.stats = stats
        logger.debug("generation: %s", stats.summary())
        return results

    # -- the three phases ---------------------------------------------------------------------------------

    def _run(
        self,
        prompts: Sequence[PreparedPrompt],
        sampling: SamplingConfig,
        tracker: StopTracker,
        stats: GenerationStats,
        start: float,
        return_logits: bool,
    ) -> list[Tensor] | None:
        prefill_start = time.perf_counter()
        with self._phase("left_tower"):
            prefix_kv = self._prefix_kv(prompts, stats)
        decoder = self.model.text_decoder
        longest = max(p.input_ids.numel() for p in prompts)
        capacity = self._bucket_capacity(longest + sampling.max_new_tokens)
        cache = self._cache_for(self._bucket_rows(len(prompts)), capacity)
        layout = PrefillLayout.build([p.text_ids for p in prompts], [p.prefix_len for p in prompts], self.device)
        logits = prefill(decoder, cache, layout, torch.cat(prefix_kv, dim=2))
        lengths = torch.tensor([p.input_ids.numel() for p in prompts], device=self.device)
        loop = _DecodeLoop(self, cache, sampling, tracker, stats, return_logits)
        loop.first_token(logits, lengths)
        stats.ttft_s = time.perf_counter() - start
        stats.prefill_s = time.perf_counter() - prefill_start
        decode_start = time.perf_counter()
        loop.run()
        stats.decode_s = time.perf_counter() - decode_start
        return loop.logits_log

    def _phase(self, name: str) -> contextlib.AbstractContextManager:
        return self.phase_hook(name) if self.phase_hook is not None else contextlib.nullcontext()

    def _prefix_kv(self, prompts: Sequence[PreparedPrompt], stats: GenerationStats) -> list[Tensor]:
        """(L, 2, P, Hkv, D) per prompt: from the prefix cache, or one left-tower pass for all misses."""
        self._drop_stale_prefixes()
        entries: list[Tensor | None] = [None] * len(prompts)
        pending: dict[PrefixKey, list[int]] = {}  # key -> prompts sharing it (computed once)
        for index, prompt in enumerate(prompts):
            if prompt.prefix_len == 0:
                entries[index] = self._empty_prefix()
                continue
            key = self._dedupe_key(prompt)
            if key in pending:
                pending[key].append(index)
                stats.prefix_cache_hits += 1
                continue
            cached = self.prefix_cache.get(key) if self.prefix_cache is not None else None
            if cached is not None:
                entries[index] = cached
                stats.prefix_cache_hits += 1
            else:
                pending[key] = [index]
                stats.prefix_cache_misses += 1
        for group in chunks_by_tiles(list(pending.items()), prompts):
            computed = self._left_tower([prompts[indices[0]] for _, indices in group], stats)
            for (key, indices), kv in zip(group, computed, strict=True):
                if self.prefix_cache is not None:
                    self.prefix_cache.put(key, kv)
                for index in indices:
                    entries[index] = kv
        return entries  # type: ignore[return-value]

    def _drop_stale_prefixes(self) -> None:
        """Empty the prefix cache when the left tower's weights changed since it was filled (an optimizer step,
        load_state_dict, or a move to another dtype or device between calls): its K/V would be those of the old
        weights. The parameters are looked up again, as a load may have replaced them. The caller's autocast
        is part of the state too: K/V computed under bf16 autocast differ from those of an fp32 pass."""
        state = (weights_state(left_tower_parameters(self.model)), self._autocast_state())
        if self.prefix_cache is not None and state != self._cached_weights_state and len(self.prefix_cache):
            logger.info("the left tower's weights or the autocast changed: prefix cache cleared")
            self.prefix_cache.clear()
        self._cached_weights_state = state

    def _autocast_state(self) -> tuple[bool, torch.dtype]:
        device_type = self.device.type
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)

    def _dedupe_key(self, prompt: PreparedPrompt) -> PrefixKey:
        if self.prefix_cache is not None or prompt.image_digest is not None:
            return prompt.key
        # Nothing to share with later calls: within this call, the same tiles tensor is enough (no hashing).
        return f"tiles@{id(prompt.tiles)}", tensor_digest(prompt.prefix_ids)

    def _left_tower(self, prompts: list[PreparedPrompt], stats: GenerationStats) -> list[Tensor]:
        batch = left_tower_batch(prompts, self.model.cfg).to(self.device)
        if batch.pixel_values.shape[0]:
            stats.vision_tower_runs += 1
            stats.vision_tiles += batch.pixel_values.shape[0]
        kvs = self.model.prefix_kv(batch)
        # In the model's dtype: under the caller's autocast the K/V are bf16, and a cached bf16 entry would then
        # meet the fp32 text K/V of a later call made without autocast.
        stacked = torch.stack([t for kv in kvs for t in kv]).unflatten(0, (len(kvs), 2))  # (L, 2, Np, Hkv, D)
        stacked = stacked.to(self.dtype)
        bounds = batch.cu_prefix.tolist()
        if len(bounds) == 2:  # one prefix: the buffer is its entry
            return [stacked]
        # Clones, so that a cached entry does not keep the whole batch's buffer alive.
        return [stacked[:, :, a:b].clone() for a, b in itertools.pairwise(bounds)]

    def _empty_prefix(self) -> Tensor:
        cfg = self.model.text_decoder.cfg
        return torch.zeros(cfg.n_blocks, 2, 0, cfg.n_kv_heads, cfg.head_dim, dtype=self.dtype, device=self.device)

    @property
    def _static_shapes(self) -> bool:
        return self.compile or self.cuda_graph

    def _bucket_rows(self, rows: int) -> int:
        # Compiled code and CUDA graphs are specialized to the batch size: powers of two keep them few.
        return 1 << (rows - 1).bit_length() if self._static_shapes else rows

    def _bucket_capacity(self, length: int) -> int:
        return -(-length // CAPACITY_BUCKET) * CAPACITY_BUCKET if self._static_shapes else length

    def _cache_for(self, rows: int, capacity: int) -> StaticKVCache:
        if self._cache is None or not self._cache.matches(rows, capacity, self.dtype, self.device):
            self._cache = self._graphed = None  # free the old buffers (and the graph using them) first
            self._cache = StaticKVCache(self.model.text_decoder, rows, capacity, self.dtype, self.device)
        return self._cache

    def _decode(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """One decode step over the current cache: (B,) tokens at (B,) positions -> (B, V) fp32 logits."""
        cache, decoder = self._cache, self.model.text_decoder
        # The flag was chosen for the device at construction; a model moved off CUDA since decodes eagerly.
        if not self.cuda_graph or self.device.type != "cuda":
            return self._step(decoder, tokens, positions, cache.keys, cache.values)
        if self._graphed is None or self._graphed.cache is not cache:
            self._graphed = GraphedDecodeStep(self._step, decoder, cache, tokens, positions)
        return self._graphed(tokens, positions)


class _DecodeLoop:
    """The device-side state of one decode loop; the host looks in every `sync_every` steps."""

    def __init__(
        self,
        engine: Generator,
        cache: StaticKVCache,
        sampling: SamplingConfig,
        tracker: StopTracker,
        stats: GenerationStats,
        return_logits: bool,
    ):
        self.engine, self.cache, self.sampling, self.tracker, self.stats = engine, cache, sampling, tracker, stats
        self.requests = len(tracker.rows)
        device = engine.device
        self.generator = make_generator(sampling.seed, device)
        self.eos = torch.tensor(engine.eos_token_ids or (-1,), device=device)
        self.pad = engine.pad_token_id
        self.tokens = torch.full((cache.rows, sampling.max_new_tokens), self.pad, dtype=torch.long, device=device)
        self.finished = torch.ones(cache.rows, dtype=torch.bool, device=device)
        self.positions = torch.zeros(cache.rows, dtype=torch.long, device=device)
        self.current = torch.full((cache.rows,), self.pad, dtype=torch.long, device=device)  # last token per row
        self.logits_log: list[Tensor] | None = [] if return_logits else None
        # The fused sampler was picked for the device at construction and runs on CUDA only.
        self.sample = engine._sample if device.type == "cuda" else sample

    def first_token(self, logits: Tensor, lengths: Tensor) -> None:
        """Sample each request's first token from the prefill logits (R, V) and sync once (TTFT)."""
        first = self.sample(logits, self.sampling, self.generator)
        self.current[: self.requests] = first
        self.tokens[:, 0] = self.current
        self.finished[: self.requests] = self._is_eos(first)
        self.positions[: self.requests] = lengths
        if self.logits_log is not None:
            self.logits_log.append(logits)
        self._sync(0, 1)

    def run(self) -> None:
        step, last = 1, self.sampling.max_new_tokens
        while step < last and not self.tracker.all_finished:
            end = min(step + self.engine.sync_every, last)
            for column in range(step, end):
                self._step(column)
            self.stats.decode_steps += end - step
            self._sync(step, end)
            step = end

    def _step(self, column: int) -> None:
        engine = self.engine
        # A contiguous (B,) input: a column view of `tokens` would make the compiled step depend on its stride.
        with engine._phase("decode_step"):
            logits = engine._decode(self.current, self.positions)
        if self.logits_log is not None:
            self.logits_log.append(logits[: self.requests].clone())
        self.positions += 1
        chosen = self.sample(logits, self.sampling, self.generator)
        self.current = torch.where(self.finished, self.pad, chosen)
        self.tokens[:, column] = self.current
        self.finished |= self._is_eos(self.current)

    def _is_eos(self, tokens: Tensor) -> Tensor:
        return (tokens[:, None] == self.eos[None, :]).any(dim=-1)

    def _sync(self, start: int, end: int) -> None:
        chunk = self.tokens[: self.requests, start:end].tolist()
        stopped = self.tracker.update(chunk)
        if stopped:
            self.finished[torch.tensor(stopped, device=self.finished.device)] = True


@functools.cache
def compiled_block_decode(backend: Any = "inductor") -> Callable[..., Tensor]:
    """One compiled block_decode per process: Generators share its compiled code instead of recompiling.

    Each (rows, capacity) bucket is its own static graph (what the CUDA graphs replay). Dynamo's default limit
    of 8 graphs per function would make the 9th bucket of an evaluation run decode eagerly.
    """
    compiled = torch.compile(block_decode, dynamic=False, backend=backend)
    return torch._dynamo.config.patch(recompile_limit=DECODE_GRAPH_LIMIT)(compiled)


def compile_prefill_blocks(model: Any, backend: Any = "inductor") -> None:
    """Compile each tower's blocks in place for the prefill; blocks that are compiled already are kept.

    Not fullgraph: a graph break costs speed, not the answer. One graph per tower serves all of its layers, and
    dynamic shapes from the first call keep new prompt lengths from recompiling.
    """
    from dualtower.parallel.compile import apply_compile

    if not any(getattr(block, "_compiled_call_impl", None) for block in model.text_decoder.blocks):
        apply_compile(model, fullgraph=False, backend=backend)


def _default_eos(tokenizer: Any) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return (DEFAULT_EOS_TOKEN_ID,) if eos is None else (int(eos),)


def _pick_sampler(name: str, device: torch.device) -> Callable[..., Tensor]:
    if name == "torch":
        return sample
    if name == "csrc":
        from dualtower.generation.csrc_sampler import sampler_for

        return sampler_for(device)
    raise ValueError(f"unknown sampler {name!r}; choose 'torch' or 'csrc'")
