"""Token selection with Hugging Face conventions: greedy, or temperature -> top-k -> top-p -> sample.

Shape legend:
    B   rows being generated
    V   vocabulary (49218)

Conventions (those of `transformers`' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, with ties
resolved by value instead of by sort order):
- the temperature divides the logits *before* any filtering;
- top-k keeps every token whose logit is >= the k-th largest (ties at the boundary are kept);
- top-p, the rule (shared with the fused CUDA sampler, csrc/sampling.cu): with probabilities taken after the
  temperature and top-k, a token is kept iff the total probability of the tokens *strictly* more likely than
  it is < p. So the token that crosses p is kept, tokens of equal probability are all kept or all removed
  (the result is deterministic, independent of the sort order), and the most likely tokens always survive.
  transformers removes by sorted position instead, so among tokens tied with the one that crosses p it keeps
  only those sorted first (e.g. logits [2, 1, 1, 1, -5], p = 0.6: transformers keeps {0, one of 1..3}, this
  rule keeps {0, 1, 2, 3}, since the mass strictly above each tied token is 0.475 < 0.6).

Differences from the original DualTowerVLM code (reference_spec section 2.6 and item 12), fixed here:
- the original filtered the raw logits and divided by the temperature afterwards, so the temperature never
  changed which tokens survive top-p;
- its top-p dropped the token that crosses p (no right shift of the removal mask), so with a dominant
  token of probability >= p it kept only that token even when p asked for more mass, and in general kept
  strictly less than p.

Sampling draws with the exponential race (argmax of p_i / E_i with E_i ~ Exp(1), equivalent to a
multinomial draw): no host synchronization, and a `torch.Generator` makes it reproducible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingConfig:
    """How to pick tokens and when to stop. `do_sample=False` is greedy and ignores the sampling knobs.

    seed: reproduces the output of the same batch (the transformers convention): the same requests in the same
    order, with the same sampler, device and dtype. The noise of a row depends on its position in the batch and
    on the batch size (on CUDA, the batch rounded up to a power of two), so a request sampled alone or in
    another batch draws different tokens with the same seed. Several batches generated with one seed draw the
    same noise; give each batch its own seed (the CLI derives one per batch from --seed).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.7
    top_k: int = 50  # <= 0 disables top-k
    top_p: float = 0.9  # >= 1 disables top-p
    seed: int | None = None  # None: draw from torch's global generator (not reproducible)
    stop_strings: tuple[str, ...] = field(default_factory=tuple)  # a single str is one stop string (as in HF)

    def __post_init__(self) -> None:
        # tuple("ab") would be the stop strings "a" and "b": a lone string is one stop string.
        stops = self.stop_strings
        self.stop_strings = (stops,) if isinstance(stops, str) else tuple(stops)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    return logits / temperature if temperature != 1.0 else logits


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """(B, V) -> (B, V) with every logit below the k-th largest set to -inf (ties with it survive)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """(B, V) -> (B, V) with -inf where the module's top-p rule removes a token (strictly-more-likely mass >= p)."""
    if top_p >= 1.0:
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Mass of the sorted positions before each one; a cumsum of non-negatives never decreases, so the
    # positions with mass_before < p are a prefix. The first member of a tie group has exactly the mass of the
    # strictly more likely tokens before it, so the group is kept iff its first member is in that prefix.
    mass_before = torch.nn.functional.pad(cumulative[:, :-1], (1, 0))
    kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp_min(1)  # (B, 1)
    threshold = sorted_logits.gather(-1, kept - 1)  # the smallest kept logit: its whole tie group stays
    return logits.masked_fill(logits < threshold, float("-inf"))


def filtered_logits(logits: Tensor, config: SamplingConfig) -> Tensor:
    """fp32 logits after temperature, top-k and top-p, in that order; removed tokens are -inf."""
    scores = apply_temperature(logits.float(), config.temperature)
    scores = top_k_filter(scores, config.top_k)
    return top_p_filter(scores, config.top_p)


def sampling_probs(logits: Tensor, config: SamplingConfig) -> Tensor:
    """The distribution `sample` draws from: (B, V) fp32 probabilities, zero outside the kept support."""
    return filtered_logits(logits, config).softmax(dim=-1)


def sample(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B,) int64 token ids, on the logits' device, without a host synchronization."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, config)
    # Exp(1) draws are > 0 in theory; the clamp keeps a zero-probability token from winning with 0 / 0.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def batch_seed(seed: int | None, first_request: int) -> int | None:
    """The seed of the batch that starts at request `first_request` of a run split into batches (the generate
    CLI, evaluation): the seed itself for the first batch (so a single batch matches SamplingConfig(seed=seed)),
    a hash of both for the others, so that batches of one run do not share their noise and nearby seeds do not
    give shifted copies of each other."""
    if seed is None or first_request == 0:
        return seed
    digest = hashlib.sha256(f"dualtower.generate:{seed}:{first_request}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64, as every torch.Generator accepts
