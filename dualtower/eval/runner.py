"""The model side of evaluation, shared by the lmms-eval plugin and the offline scorers.

`EvalModel` turns prompts (images + user message + optional assistant prefix) into generated text with the
batched Generator, and (prompt, continuation) pairs into log-likelihoods with one packed forward pass per
batch.

Shape legend:
    Nt  text tokens of all documents in a batch (packed)
    S   supervised (continuation) tokens of the batch, C LM width, V vocabulary
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dualtower.batch import IGNORE_INDEX
from dualtower.data.collate import collate
from dualtower.data.document import Document, document_from_prompt
from dualtower.data.images import ImageProcessor, load_image
from dualtower.generation import Generator, PreparedPrompt, SamplingConfig
from dualtower.generation.prefix_cache import image_digest
from dualtower.generation.sampling import batch_seed
from dualtower.hub import parse_dtype

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 50  # the original wrapper's default
DEFAULT_TOP_K = 50
MAX_TILES_PER_FORWARD = 64  # log-likelihood forwards: bounds the vision tower's activation memory


@dataclass
class EvalPrompt:
    """One question. `images` may be a zero-argument callable, so that images load only when batched."""

    images: Sequence[Any] | Callable[[], Sequence[Any]]
    text: str  # the user message, benchmark formatting already applied
    assistant_prefix: str = ""  # what the answer starts with, written after the assistant header


def parse_gen_kwargs(text: str) -> dict[str, Any]:
    """`key=value,key=value` (lmms-eval's --gen_kwargs syntax) -> dict with ints, floats, bools, None."""
    parsed: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"gen_kwargs item {item!r} is not key=value")
        parsed[key.strip()] = _scalar(value.strip())
    return parsed


def _scalar(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def stop_strings(gen_kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    until = gen_kwargs.get("until")
    if not until:
        return ()
    return (until,) if isinstance(until, str) else tuple(s for s in until if s)


def sampling_from_gen_kwargs(
    gen_kwargs: Mapping[str, Any], default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int | None = None
) -> SamplingConfig:
    """lmms-eval generation kwargs -> SamplingConfig.

    Sampling happens when `do_sample` is true, or when it is absent and temperature > 0 (the convention of
    lmms-eval's own models); a temperature <= 0 is always greedy, a missing one is 1.0 when sampling.
    `max_gen_toks` is an alias of `max_new_tokens`; `until` becomes the stop strings.
    """
    known = {"until", "max_new_tokens", "max_gen_toks", "temperature", "top_p", "top_k", "do_sample", "num_beams"}
    ignored = sorted(set(gen_kwargs) - known)
    if ignored:
        logger.debug("ignoring generation kwargs %s", ignored)
    if (gen_kwargs.get("num_beams") or 1) > 1:
        logger.warning("beam search is not supported; generating with num_beams=1")
    max_new = gen_kwargs.get("max_new_tokens", gen_kwargs.get("max_gen_toks"))
    max_new = default_max_new_tokens if max_new is None else max_new
    do_sample = gen_kwargs.get("do_sample")
    temperature = gen_kwargs.get("temperature")
    temperature = float((1.0 if do_sample else 0.0) if temperature is None else temperature)  # HF: 1.0
    do_sample = temperature > 0 if do_sample is None else bool(do_sample) and temperature > 0
    top_p = gen_kwargs.get("top_p")
    if do_sample and top_p is not None and top_p <= 0:  # HF then keeps only the most likely token: greedy
        do_sample, top_p = False, None
    top_k = gen_kwargs.get("top_k", DEFAULT_TOP_K)
    return SamplingConfig(
        max_new_tokens=int(max_new),
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_k=int(top_k) if top_k is not None else 0,
        top_p=float(top_p) if top_p is not None else 1.0,
        seed=seed,
        stop_strings=stop_strings(gen_kwargs),
    )


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the earliest stop string (the Generator already cuts; this makes it a guarantee)."""
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


def to_image_input(visual: Any) -> Any:
    """What load_image accepts: numpy arrays become PIL images, everything else passes through."""
    if isinstance(visual, np.ndarray):
        return Image.fromarray(visual)
    return visual


def flatten_visuals(visuals: Any) -> list[Any]:
    """lmms-eval's doc_to_visual results (None, one visual, or nested lists) -> a flat list."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    flat: list[Any] = []
    for item in visuals:
        flat.extend(flatten_visuals(item))
    return flat


class EvalModel:
    """A DualTowerVLM ready for evaluation: tokenizer, image processor and one reusable Generator."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, seed: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.batch_size = batch_size
        self.seed = seed
        self.processor = ImageProcessor(model.cfg)
        self.generator = Generator(model, tokenizer)
        parameter = next(model.parameters())
        self.device = parameter.device

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        tokenizer_id: str | None = None,
        architecture: str | None = None,
        **kwargs: Any,
    ) -> EvalModel:
        """Load a checkpoint (directory or Hub id) and its tokenizer (checkpoint directory first).

        architecture: for nanoVLM checkpoints, as in `DualTowerVLM.from_pretrained` ("vanilla" keeps them whole).
        """
        from dualtower.adapters.common import resolve_source
        from dualtower.model import DualTowerVLM
        from dualtower.tokenizer import load_tokenizer

        device = torch.device(default_device() if device is None else device)
        # Resolved once: a Hub id becomes its downloaded snapshot, which holds the checkpoint's tokenizer files.
        path = resolve_source(source)
        model = DualTowerVLM.from_pretrained(
            path, device=device, dtype=resolve_dtype(dtype, device), architecture=architecture
        )
        checkpoint_dir = path if path.is_dir() else path.parent
        tokenizer = load_tokenizer(checkpoint_dir=checkpoint_dir, tokenizer_id=tokenizer_id or model.cfg.tokenizer_id)
        return cls(model, tokenizer, **kwargs)

    # -- prompts ------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    @staticmethod
    def prompt_images(prompt: EvalPrompt) -> list[Image.Image]:
        """The prompt's images, decoded (RGB)."""
        images = prompt.images() if callable(prompt.images) else prompt.images
        return [load_image(to_image_input(v)) for v in flatten_visuals(list(images))]

    def prompt_document(self, prompt: EvalPrompt, images: list[Image.Image] | None = None) -> Document:
        """The inference document of a prompt: images + user turn + assistant header (+ assistant prefix)."""
        images = self.prompt_images(prompt) if images is None else images
        document = document_from_prompt(images, prompt.text, self.processor, self.tokenizer, self.cfg)
        if not prompt.assistant_prefix:
            return document
        return _extend(document, self.encode(prompt.assistant_prefix))

    # -- generation ---------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[EvalPrompt], sampling: SamplingConfig, progress: Callable[[int], Any] | None = None
    ) -> list[str]:
        """Texts for every prompt; batches of `batch_size`, longest prompts first, results in input order."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].text))
        texts: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            prepared = [self._prepared(prompts[i]) for i in chunk]
            # One seed per batch, as the CLI derives them: with one seed, every batch would draw the same noise.
            batch_sampling = replace(sampling, seed=batch_seed(sampling.seed, start))
            results = self.generator.generate_prepared(prepared, self._within_positions(prepared, batch_sampling))
            for index, result in zip(chunk, results, strict=True):
                texts[index] = cut_at_stop(result.text, sampling.stop_strings)
            if progress is not None:
                progress(len(chunk))
        return texts

    def _within_positions(self, prepared: Sequence[PreparedPrompt], sampling: SamplingConfig) -> SamplingConfig:
        """Cap max_new_tokens where a batch would run past the model's positions: many lmms-eval tasks ask for
        8k-49k new tokens, and generation stops at the last position instead of failing the run."""
        limit = self.cfg.lm.max_position_embeddings
        room = limit - max(p.input_ids.numel() for p in prepared)
        if room < 1:
            raise ValueError(f"a prompt fills all {limit} of the model's positions: no room to generate")
        if sampling.max_new_tokens <= room:
            return sampling
        logger.warning(
            "max_new_tokens %d capped to %d: the longest prompt of the batch leaves no more of the model's %d "
            "positions",
            sampling.max_new_tokens,
            room,
            limit,
        )
        return replace(sampling, max_new_tokens=room)

    def _prepared(self, prompt: EvalPrompt) -> PreparedPrompt:
        images = self.prompt_images(prompt)
        document = self.prompt_document(prompt, images)
        self._check_length(document.num_tokens, "prompt")
        # The prefix cache keys by the decoded images' pixels, not by the tiles: up to 17 fp32 tiles (53 MB)
        # would be hashed per prompt otherwise.
        return PreparedPrompt(document.input_ids, document.tiles, document.prefix_len, image_digest(images))

    # -- log-likelihood -----------------------------------------------------------------------------------

    def loglikelihood(
        self, requests: Sequence[tuple[EvalPrompt, str]], progress: Callable[[int], Any] | None = None
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation token | everything before), whether greedy decoding yields it) per pair.

        The continuation follows the assistant header and prefix directly (no chat markup is added).
        """
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for start in range(0, len(requests), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(requests)))
            documents = {i: self.scoring_document(*requests[i]) for i in chunk}
            scored = [(i, doc) for i, doc in documents.items() if doc.num_supervised]  # empty continuations: 0.0
            for group in _by_tile_budget(scored, MAX_TILES_PER_FORWARD):
                for (i, _), value in zip(group, self._score([doc for _, doc in group]), strict=True):
                    results[i] = value
            if progress is not None:
                progress(len(chunk))
        return results

    def scoring_document(self, prompt: EvalPrompt, continuation: str) -> Document:
        """The prompt document followed by the continuation's tokens, which are the only supervised ones.

        As in lm-eval-harness, trailing whitespace of the context moves into the continuation and the
        continuation's tokens are those of the joint tokenization after the context's.
        """
        context = prompt.assistant_prefix
        kept = context.rstrip()
        continuation = context[len(kept) :] + continuation
        document = self.prompt_document(replace(prompt, assistant_prefix=kept))
        context_ids = self.encode(kept)
        whole = self.encode(kept + continuation)
        if whole[: len(context_ids)] == context_ids:
            continuation_ids = whole[len(context_ids) :]
        else:  # a merge across the boundary: fall back to separate tokenization
            continuation_ids = self.encode(continuation)
        document = _extend(document, [], continuation_ids)
        self._check_length(document.num_tokens, "prompt + continuation")
        return document

    @torch.inference_mode()
    def _score(self, documents: list[Document]) -> list[tuple[float, bool]]:
        batch = collate(documents, self.cfg.image_token_id, tokens_per_tile=self.cfg.image_tokens_per_tile)
        batch = batch.to(self.device)
        hidden = self.model(batch)  # (Nt, C)
        supervised = batch.labels != IGNORE_INDEX
        targets = batch.labels[supervised]  # (S,)
        logits = self._fp32_logits(hidden[supervised])  # (S, V)
        token_logprobs = logits.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)
        greedy = logits.argmax(dim=-1) == targets
        counts = [doc.num_supervised for doc in documents]
        return [
            (float(lp.sum()), bool(g.all()))
            for lp, g in zip(token_logprobs.cpu().split(counts), greedy.cpu().split(counts), strict=True)
        ]

    def _fp32_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, C) -> (S, V) fp32: with bf16 weights the head runs in fp32, since bf16 logits carry only ~3
        significant digits, too few for log-likelihood sums and argmax ties."""
        if hidden.dtype == torch.float32:
            return self.model.logits(hidden).float()
        weight = self.model.text_decoder.head.weight
        return torch.nn.functional.linear(hidden.float(), weight.float())

    def _check_length(self, tokens: int, what: str) -> None:
        limit = self.cfg.lm.max_position_embeddings
        if tokens > limit:
            raise ValueError(f"{what} has {tokens} tokens, more than the model's {limit} positions")


def _extend(document: Document, context_ids: list[int], continuation_ids: Sequence[int] = ()) -> Document:
    """Append context tokens (unsupervised) and continuation tokens (supervised) to a document."""
    added = torch.tensor([*context_ids, *continuation_ids], dtype=torch.int64)
    input_ids = torch.cat([document.input_ids, added])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if continuation_ids:
        first = input_ids.numel() - len(continuation_ids)
        if first - 1 < document.prefix_len:
            raise ValueError("the continuation must follow at least one text token")
        labels[first - 1 : -1] = input_ids[first:]  # label[t] = token t + 1
    return replace(document, input_ids=input_ids, labels=labels)


def _by_tile_budget(items: list[tuple[int, Document]], max_tiles: int) -> list[list[tuple[int, Document]]]:
    """Consecutive groups whose documents hold at most `max_tiles` tiles together (or a single document)."""
    groups: list[list[tuple[int, Document]]] = []
    tiles = 0
    for item in items:
        if not groups or tiles + item[1].num_tiles > max_tiles:
            groups.append([])
            tiles = 0
        groups[-1].append(item)
        tiles += item[1].num_tiles
    return groups


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """None -> bf16 on CUDA, fp32 elsewhere; strings like "bfloat16" / "bf16" / "float32"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return parse_dtype(str(dtype))


def gen_kwargs_key(gen_kwargs: Mapping[str, Any]) -> str:
    """A hashable, order-independent key: requests with equal keys share one SamplingConfig."""
    return json.dumps(dict(gen_kwargs), sort_keys=True, default=repr)
