"""lmms-eval model plugin `dualtower`: batched `generate_until` and a real `loglikelihood`.

Use it with lmms-eval's own CLI through either discovery mechanism of lmms-eval >= 0.7:
- the entry point group `lmms_eval.models` (`dualtower = "dualtower.eval.lmms_manifest:manifests"`), or
- `LMMS_EVAL_PLUGINS=dualtower.eval lmms-eval --model dualtower --model_args pretrained=DIR ...`;
or through `python -m dualtower.evaluate`, which passes an instance to lmms-eval directly.

Requests: `generate_until` args are (context, gen_kwargs, doc_to_visual, doc_id, task, split);
`loglikelihood` args are (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split) or
(context, continuation) without images. Requests are grouped by their generation kwargs (each group gets
its own `until`, max_new_tokens, temperature, top_p, top_k), run longest first in batches of `batch_size`,
and answered in the original order. The context is formatted with the original wrapper's per-benchmark
table (dualtower.eval.prompts) and wrapped in a user turn after the images (several images per request are
numbered as in training).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from dualtower.eval.runner import (
    DEFAULT_MAX_NEW_TOKENS,
    EvalModel,
    EvalPrompt,
    default_device,
    flatten_visuals,
    gen_kwargs_key,
    sampling_from_gen_kwargs,
)
from dualtower.generation.sampling import batch_seed

MISSING_LMMS_EVAL = "lmms-eval is not installed: pip install 'dualtower[eval]' (the `eval` extra)"
try:
    from lmms_eval.api.model import lmms
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(MISSING_LMMS_EVAL) from error

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "patrickamadeus/dualtower-cauldron"


class DualTowerLMMS(lmms):
    """DualTowerVLM for lmms-eval. `pretrained` (alias `model`): a checkpoint directory, Hub id or model."""

    is_simple = True

    def __init__(
        self,
        pretrained: Any = None,
        device: str | None = None,
        batch_size: int | str = 32,
        dtype: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        tokenizer: Any = None,
        seed: int | None = None,
        model: Any = None,
        architecture: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            logger.warning("dualtower plugin: ignoring unknown model_args %s", sorted(kwargs))
        self._rank, self._world_size = _distributed_rank()
        source = pretrained if pretrained is not None else model if model is not None else DEFAULT_MODEL
        self.max_new_tokens = int(max_new_tokens)
        self.runner = _build_runner(
            source, _device(device), dtype, tokenizer, _batch_size(batch_size), seed, architecture
        )
        self.model = self.runner.model
        self.tokenizer = self.runner.tokenizer
        self.device = self.runner.device
        self.batch_size = self.runner.batch_size
        # A ready EvalModel brings its own seed (and batch size), as the offline evaluation uses it.
        self.seed = seed if seed is not None else self.runner.seed

    @property
    def batch_size_per_gpu(self) -> int:
        return self.batch_size

    # -- lmms-eval API ------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any]) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[gen_kwargs_key(request.args[1] or {})].append(index)
        answers: list[str] = [""] * len(requests)
        with self._progress(len(requests), "dualtower generating") as advance:
            for group_index, indices in enumerate(groups.values()):
                gen_kwargs = requests[indices[0]].args[1] or {}
                # Each group its own seed: the runner derives its batches' seeds from it, and groups sharing one
                # would start from the same noise.
                seed = batch_seed(self.seed, group_index)
                sampling = sampling_from_gen_kwargs(gen_kwargs, self.max_new_tokens, seed)
                prompts = [self._prompt(requests[i].args[0], *requests[i].args[2:6]) for i in indices]
                for index, text in zip(indices, self.runner.generate(prompts, sampling, advance), strict=True):
                    answers[index] = text
                    self._cache(requests[index], "generate_until", text)
        return answers

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            args = request.args
            if len(args) == 2:  # unconditional requests (acc_mutual_info): no images, no task
                context, continuation = args
                pairs.append((self._prompt(context, None, None, None, None), continuation))
                continue
            context, target, doc_to_visual, doc_id, task, split = args[:6]
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            pairs.append((self._prompt(context, doc_to_visual, doc_id, task, split), str(continuation)))
        with self._progress(len(requests), "dualtower scoring") as advance:
            results = self.runner.loglikelihood(pairs, advance)
        for request, result in zip(requests, results, strict=True):
            self._cache(request, "loglikelihood", result)
        return results

    def clean(self) -> None:
        """lmms-eval's end-of-run cleanup: also drop the runner, which holds the model and the KV caches."""
        self.runner = None
        super().clean()

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("dualtower: multi-round generation is not supported; use generate_until tasks")

    # -- helpers ------------------------------------------------------------------------------------------

    def _prompt(
        self, context: str, doc_to_visual: Callable | None, doc_id: Any, task: str | None, split: str | None
    ) -> EvalPrompt:
        from dualtower.eval.prompts import format_prompt

        formatted = format_prompt(context, task)
        if doc_to_visual is None:
            return EvalPrompt([], formatted.user_text, formatted.assistant_prefix)

        def images() -> list[Any]:  # loaded when the request's batch runs, not all at once
            return flatten_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))

        return EvalPrompt(images, formatted.user_text, formatted.assistant_prefix)

    def _cache(self, request: Any, kind: str, result: Any) -> None:
        self.cache_hook.add_partial(kind, request.args, result)

    def _progress(self, total: int, description: str) -> Any:
        from tqdm import tqdm

        return _ProgressBar(tqdm(total=total, disable=self.rank != 0, desc=description))


class _ProgressBar:
    def __init__(self, bar: Any):
        self.bar = bar

    def __enter__(self) -> Callable[[int], Any]:
        return self.bar.update

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _build_runner(
    source: Any, device: str, dtype: str | None, tokenizer: Any, batch_size: int, seed: int | None,
    architecture: str | None = None,
) -> EvalModel:
    if isinstance(source, EvalModel):
        return source
    if isinstance(source, torch.nn.Module):
        if tokenizer is None or isinstance(tokenizer, str):
            from dualtower.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_id=tokenizer or source.cfg.tokenizer_id)
        return EvalModel(source, tokenizer, batch_size=batch_size, seed=seed)
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise TypeError("pass `tokenizer` as a tokenizer id or directory when `pretrained` is a path")
    return EvalModel.from_pretrained(
        str(source), device=device, dtype=dtype, tokenizer_id=tokenizer, architecture=architecture,
        batch_size=batch_size, seed=seed,
    )


def _batch_size(value: int | str) -> int:
    """An integer >= 1; lmms-eval's "auto" / "auto:N" (or any other non-integer) fall back to 32."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        logger.warning("dualtower plugin: batch_size=%r is not an integer; using 32", value)
        return 32
    if size < 1:
        raise ValueError(f"dualtower plugin: batch_size must be >= 1, got {value!r}")
    return size


def _device(device: str | None) -> str:
    """None -> cuda if available; "cuda" under a multi-process launch -> this process's local GPU."""
    device = device or default_device()
    local_rank = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local_rank is not None:
        return f"cuda:{int(local_rank)}"
    return device


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def skip_filelock_patch_if_incompatible() -> None:
    """lmms-eval 0.7's simple_evaluate patches `filelock._api`, which filelock >= 4 no longer has (it fails with
    ModuleNotFoundError). The patch only shares lock objects across lock classes for multi-rank dataset
    loading; where it cannot work, mark it as done so that evaluation runs."""
    try:
        import filelock._api  # noqa: F401
    except ImportError:
        from lmms_eval import evaluator

        patch = getattr(evaluator, "_enable_reentrant_filelocks", None)
        if patch is not None and not getattr(patch, "_patched", False):
            patch._patched = True
            logger.info("filelock >= 4: skipping lmms-eval's filelock patch (needed only across ranks)")


skip_filelock_patch_if_incompatible()


def register() -> None:
    """Register `dualtower` in this process's lmms-eval model registry (for `lmms_eval.models.get_model`)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    from dualtower.eval.lmms_manifest import manifests

    for manifest in manifests():
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
