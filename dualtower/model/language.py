"""SmolLM2 / Llama decoder over packed varlen tokens: RMSNorm, GQA attention with RoPE, SwiGLU, tied head.

Shape legend:
    N   tokens of all documents in the batch, concatenated (no padding)
    C   hidden width, Hq / Hkv query / key-value heads, D head dim
    B   documents; cu_* are (B + 1,) int32 cumulative lengths

A block attends through `ops.prefix_attention`: its queries see, per document, an optional prefix K/V (all
visible; the left tower's cache in the right tower) and their own K/V causally. Without a prefix that is
plain causal attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualtower import ops
from dualtower.model.config import LMConfig

KV = tuple[Tensor, Tensor]  # (k, v), each (N, Hkv, D); k has RoPE applied


def _compute_dtype(x: Tensor) -> torch.dtype:
    """At least fp32 for reductions and rotations (bf16 in, bf16 out; fp64 stays fp64 for tests)."""
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics whatever the activation dtype; the result keeps the input dtype.
        xf = x.to(_compute_dtype(x))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def inverse_frequencies(head_dim: int, theta: float, device: torch.device | str | None = None) -> Tensor:
    """(D/2,) RoPE frequencies theta^(-2i/D), computed in fp32 as the original and transformers' Llama do."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; cos/sin are computed per token from explicit positions (packing restarts them).

    The angles are fp32 (fp64 in a float64 model), never lower: in bf16, positions above 256 are no longer
    integers and each frequency is off by up to 2^-9 of itself, radians of error at position 4096.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # Module.to(bfloat16) / half() / to_empty() would round or drop the frequencies; they are constants, so
        # after any conversion they are rebuilt on the buffer's new device, in fp32 or fp64.
        super()._apply(fn, recurse)
        dtype = torch.float64 if self.inv_freq.dtype == torch.float64 else torch.float32
        self.inv_freq = inverse_frequencies(self.head_dim, self.theta, self.inv_freq.device).to(dtype)
        return self

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:  # (N,) -> cos, sin (N, D) fp32 or fp64
        freqs = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (N, H, D); math in fp32 so bf16 activations stay bf16 without losing precision in the rotation."""
    xf = x.to(_compute_dtype(x))
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_dim, bias=False)

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> KV:
        k = self.k_proj(x).view(x.shape[0], self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(x.shape[0], self.n_kv_heads, self.head_dim)
        return apply_rope(k, cos, sin), v

    def q(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rope(self.q_proj(x).view(x.shape[0], self.n_heads, self.head_dim), cos, sin)


class SwiGLU(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_dim, cfg.inter_dim, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_dim, cfg.inter_dim, bias=False)
        self.down_proj = nn.Linear(cfg.inter_dim, cfg.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_dim, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_dim, cfg.rms_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cu_seqlens: Tensor,
        max_len: int,
        k_prefix: Tensor,
        v_prefix: Tensor,
        cu_prefix: Tensor,
        max_prefix_len: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the block output and this block's (k, v) for the tokens of x."""
        h = self.norm1(x)
        q = self.attn.q(h, cos, sin)
        k, v = self.attn.kv(h, cos, sin)
        attn = ops.prefix_attention(q, k, v, k_prefix, v_prefix, cu_seqlens, cu_prefix, max_len, max_prefix_len)
        x = self.finish(x, attn)
        return x, k, v

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """Output projection, residual and MLP after attention (shared with the decode path)."""
        x = x + self.attn.out_proj(attn.flatten(1))
        return x + self.mlp(self.norm2(x))

    def kv_only(self, x: Tensor, cos: Tensor, sin: Tensor) -> KV:
        return self.attn.kv(self.norm1(x), cos, sin)


class LanguageModel(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_dim)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_blocks))
        self.norm = RMSNorm(cfg.hidden_dim, cfg.rms_eps)
        self.head = nn.Linear(cfg.hidden_dim, cfg.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied

    def empty_kv(self, like: Tensor) -> Tensor:
        return like.new_empty((0, self.cfg.n_kv_heads, self.cfg.head_dim))

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cu_seqlens: Tensor,
        max_len: int,
        prefix_kv: list[KV] | None = None,
        cu_prefix: Tensor | None = None,
        max_prefix_len: int = 0,
    ) -> Tensor:
        """Embeddings (N, C) -> final-normed hidden states (N, C); per layer, an optional prefix K/V to attend to."""
        cos, sin = self.rotary(positions)
        if prefix_kv is None:
            empty = self.empty_kv(x)
            prefix_kv = [(empty, empty)] * len(self.blocks)
            cu_prefix = torch.zeros_like(cu_seqlens)
        for block, (k_prefix, v_prefix) in zip(self.blocks, prefix_kv, strict=True):
            x, _, _ = block(x, cos, sin, cu_seqlens, max_len, k_prefix, v_prefix, cu_prefix, max_prefix_len)
        return self.norm(x)

    def prefix_kv(self, x: Tensor, positions: Tensor, cu_seqlens: Tensor, max_len: int) -> list[KV]:
        """Causal pass that returns each layer's (k, v); the last layer computes only its K/V projections."""
        cos, sin = self.rotary(positions)
        empty = self.empty_kv(x)
        no_prefix = torch.zeros_like(cu_seqlens)
        kvs = []
        for block in self.blocks[:-1]:
            x, k, v = block(x, cos, sin, cu_seqlens, max_len, empty, empty, no_prefix, 0)
            kvs.append((k, v))
        kvs.append(self.blocks[-1].kv_only(x, cos, sin))
        return kvs

    def unused_in_prefix_pass(self) -> list[nn.Parameter]:
        """Parameters prefix_kv() never touches (its last block's query/output/MLP path, the final norm)."""
        last = self.blocks[-1]
        modules = [last.attn.q_proj, last.attn.out_proj, last.norm2, last.mlp, self.norm]
        return [p for m in modules for p in m.parameters()]

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
