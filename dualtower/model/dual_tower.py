"""DualTowerVLM: the left tower (ViT + projector + LM) turns each document's prefix into per-layer K/V; the
right tower (a second LM) reads the text while attending to that K/V.

Shape legend (see dualtower/batch.py):
    Np / Nt   prefix / text tokens of all documents, concatenated
    N         image tiles, T tokens per tile (64), I = N * T image placeholders
    C         LM width, V vocabulary

Semantics (DESIGN.md section 1): the left LM runs the prefix causally at positions 0..P-1 and yields K (RoPE
applied) and V per layer; the right LM runs only the text tokens at positions P..P+T-1, and in every layer a
text query sees [its document's prefix K/V (all visible)] + [its document's text K/V (causal)].
The `vanilla` architecture is the same computation with one LM for both roles, which equals a single causal
LM over the whole sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dualtower import ops
from dualtower.batch import IGNORE_INDEX, PackedBatch
from dualtower.model.config import ModelConfig, flavor
from dualtower.model.language import KV, LanguageModel
from dualtower.model.projector import Projector
from dualtower.model.vision import VisionTransformer


class DualTowerVLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.vision_encoder = VisionTransformer(cfg.vision)
        self.projector = Projector(cfg.vision.hidden_dim, cfg.lm.hidden_dim, cfg.image.pixel_shuffle_factor)
        self.left_decoder = LanguageModel(cfg.lm)
        self.right_decoder = LanguageModel(cfg.lm) if cfg.architecture == "dual_tower" else None
        # When set, a batch without images still runs the vision tower and projector, on one blank tile whose
        # features are dropped: every call then runs the same modules and gives every vision parameter a (zero)
        # gradient. Wrappers that gather a module's weights collectively inside its forward (sharded data
        # parallelism) need that; skipping the tower is cheaper otherwise.
        self.encode_blank_tile_without_images = False

    @classmethod
    def from_flavor(cls, name: str, device: torch.device | str = "cpu") -> DualTowerVLM:
        """Build a named flavor; on the meta device nothing is allocated (for counting and deferred init)."""
        return cls.from_config(flavor(name), device=device)

    @classmethod
    def from_config(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> DualTowerVLM:
        with torch.device(device):
            model = cls(cfg)
        if torch.device(device).type != "meta":
            model.init_weights()
        return model

    @property
    def text_decoder(self) -> LanguageModel:
        """The LM that reads the text and owns the output head."""
        return self.right_decoder if self.right_decoder is not None else self.left_decoder

    @torch.no_grad()
    def init_weights(self) -> None:
        self.vision_encoder.init_weights()
        self.projector.init_weights()
        self.left_decoder.init_weights()
        if self.right_decoder is not None:
            self.right_decoder.init_weights()

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; tied weights are counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- checkpoints (dualtower/hub.py; imported lazily because hub imports this module) ----------------------

    @classmethod
    def from_pretrained(cls, source: str | Path, **kwargs: Any) -> DualTowerVLM:
        """Load our, the original DualTowerVLM's or a nanoVLM checkpoint (see hub.load_pretrained)."""
        from dualtower import hub

        return hub.load_pretrained(source, **kwargs)

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        from dualtower import hub

        return hub.save_pretrained(self, directory, tokenizer=tokenizer)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        from dualtower import hub

        return hub.push_to_hub(self, repo_id, **kwargs)

    # -- left tower ---------------------------------------------------------------------------------------

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, T, C)."""
        features = self.vision_encoder(pixel_values.to(self.projector.proj.weight.dtype))
        return self.projector(features)

    def prefix_embeddings(self, batch: PackedBatch) -> Tensor:
        """Left-tower token embeddings of the prefixes with image features in place of the placeholders."""
        embeddings = self.left_decoder.token_embedding(batch.prefix_ids)  # (Np, C)
        if batch.pixel_values.shape[0] == 0:
            if not self.encode_blank_tile_without_images:
                return embeddings
            blank = batch.pixel_values.new_zeros((1, *batch.pixel_values.shape[1:]))
            image_features = self.encode_images(blank).flatten(0, 1)[:0]  # in the graph, nothing placed
        else:
            image_features = self.encode_images(batch.pixel_values).flatten(0, 1)  # (I, C)
        return embeddings.index_copy(0, batch.image_token_index, image_features.to(embeddings.dtype))

    def prefix_kv(self, batch: PackedBatch) -> list[KV]:
        """Per layer (k, v) of every prefix token, each (Np, Hkv, D); k has RoPE applied."""
        x = self.prefix_embeddings(batch)
        return self.left_decoder.prefix_kv(x, batch.prefix_positions, batch.cu_prefix, batch.max_prefix_len)

    # -- right tower --------------------------------------------------------------------------------------

    def forward(self, batch: PackedBatch, prefix_kv: list[KV] | None = None) -> Tensor:
        """Final-normed hidden states of the text tokens, (Nt, C). `prefix_kv` skips the left tower."""
        if prefix_kv is None:
            prefix_kv = self.prefix_kv(batch)
        decoder = self.text_decoder
        x = decoder.token_embedding(batch.text_ids)
        return decoder(
            x,
            batch.text_positions,
            batch.cu_text,
            batch.max_text_len,
            prefix_kv=prefix_kv,
            cu_prefix=batch.cu_prefix,
            max_prefix_len=batch.max_prefix_len,
        )

    def logits(self, hidden: Tensor) -> Tensor:
        return self.text_decoder.head(hidden)

    def loss_sum(self, batch: PackedBatch) -> Tensor:
        """Sum (fp32, fp64 for fp64 models) of the cross-entropy of every supervised text token; divide by the global
        token count."""
        hidden = self(batch)
        return ops.linear_cross_entropy(hidden, self.text_decoder.head.weight, batch.labels, IGNORE_INDEX)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters the dual-tower forward never uses (left LM: last block's non-K/V path, final norm).

        Their gradient is always None; the trainer freezes them. Tied head weights are used through the
        embedding and are not listed. The vanilla architecture uses everything.
        """
        if self.right_decoder is None:
            return []
        return self.left_decoder.unused_in_prefix_pass()

    def generate(self, requests: list[Any], tokenizer: Any, sampling: Any = None, **options: Any) -> list[Any]:
        """Answer `dualtower.generation.GenerationRequest`s; keep a `Generator` instead to reuse its caches."""
        from dualtower.generation import Generator

        return Generator(self, tokenizer, **options).generate(requests, sampling)
