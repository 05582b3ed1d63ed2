"""Fast generation for DualTowerVLM: prefix-K/V cache, varlen prefill, static-cache compiled decode.

Example::

    from dualtower.generation import Generator, GenerationRequest, SamplingConfig
    generator = Generator(model, tokenizer)
    results = generator.generate([GenerationRequest(["cat.png"], "What is this?")], SamplingConfig())
    results[0].text, generator.stats.ttft_s
"""

from dualtower.generation.engine import Generator
from dualtower.generation.prefix_cache import PrefixCache
from dualtower.generation.requests import GenerationRequest, GenerationResult, GenerationStats, PreparedPrompt
from dualtower.generation.sampling import SamplingConfig, sample

__all__ = [
    "GenerationRequest",
    "GenerationResult",
    "GenerationStats",
    "Generator",
    "PrefixCache",
    "PreparedPrompt",
    "SamplingConfig",
    "sample",
]
