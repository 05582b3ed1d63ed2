"""Prefix attention's obviously-correct twin, and the same twin as an opaque op that torch.compile can trace.

Shape legend:
    Nt  text (query) tokens of all documents, concatenated
    Np  prefix tokens of all documents, concatenated
    Hq  query heads, Hkv key/value heads (Hq % Hkv == 0)
    D   head dim
    B   documents; cu_text / cu_prefix are (B + 1,) int32 cumulative lengths

The twin loops over documents with lengths read on the host, which torch.compile cannot trace: dynamo would
recompile for every new document count. `prefix_attention_reference_op` hides the loop inside a custom op
(`dualtower::prefix_attention_reference`), so a compiled block on CPU runs the twin as one opaque call. Its
backward, a second op, is the softmax backward written out per document (`prefix_attention_reference_backward`).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

from dualtower_kernels._common import check_offsets


def prefix_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_prefix: Tensor,
    v_prefix: Tensor,
    cu_text: Tensor,
    cu_prefix: Tensor,
    max_text_len: int,
    max_prefix_len: int,
    scale: float | None = None,
) -> Tensor:
    """Obviously-correct twin: one SDPA call per document with an explicit boolean mask."""
    del max_text_len, max_prefix_len  # only the kernels need them
    docs = _Documents(q, k, v, k_prefix, v_prefix, cu_text, cu_prefix)
    outputs = []
    for doc in docs.with_text():
        # (P+T, Hq, D): K/V heads repeated for their query groups. SDPA's enable_gqa is ~10x slower than this
        # in its CPU backward (torch 2.13), and this is the CPU training path.
        keys, values = docs.keys_values(doc)
        out = scaled_dot_product_attention(
            docs.q[doc].transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=docs.visible(doc),
            scale=scale,
        )
        outputs.append(out.squeeze(0).transpose(0, 1))
    # Padding rows after the last document attend to nothing: zeros, as the kernels write. Like the kernels'
    # outputs they stay in q's graph (a zero gradient rather than none), also when no document has text.
    padding = docs.q[-1]
    outputs.append(torch.where(torch.zeros((), dtype=torch.bool, device=q.device), padding, 0))
    return torch.cat(outputs)


def prefix_attention_reference_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_prefix: Tensor,
    v_prefix: Tensor,
    cu_text: Tensor,
    cu_prefix: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, dk_prefix, dv_prefix of `prefix_attention_reference`, by the softmax backward per document.

    Written out rather than taken from autograd: a custom op's implementation runs below autograd, so the opaque
    op's backward could not record a graph to differentiate.
    """
    docs = _Documents(q, k, v, k_prefix, v_prefix, cu_text, cu_prefix)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    grad_outs = grad_out.split(docs.text_sizes)
    dq, dk, dv = ([t.new_zeros((n, *t.shape[1:])) for n in docs.text_sizes] for t in (q, k, v))
    dk_prefix, dv_prefix = ([t.new_zeros((n, *t.shape[1:])) for n in docs.prefix_sizes] for t in (k_prefix, v_prefix))
    for doc in docs.with_text():
        keys, values = docs.keys_values(doc)  # (S, Hq, D), S = P + T
        scores = torch.einsum("thd,shd->hts", docs.q[doc], keys) * scale
        probs = scores.masked_fill(~docs.visible(doc), float("-inf")).softmax(-1)  # (Hq, T, S)
        d_probs = torch.einsum("thd,shd->hts", grad_outs[doc], values)
        d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
        dq[doc] = torch.einsum("hts,shd->thd", d_scores, keys) * scale
        d_keys = _fold_heads(torch.einsum("hts,thd->shd", d_scores, docs.q[doc]) * scale, docs.group)
        d_values = _fold_heads(torch.einsum("hts,thd->shd", probs, grad_outs[doc]), docs.group)
        n_prefix = docs.prefix_sizes[doc]
        dk_prefix[doc], dk[doc] = d_keys[:n_prefix], d_keys[n_prefix:]
        dv_prefix[doc], dv[doc] = d_values[:n_prefix], d_values[n_prefix:]
    return tuple(torch.cat(parts) for parts in (dq, dk, dv, dk_prefix, dv_prefix))


class _Documents:
    """The packed buffers split per document (plus one trailing piece of padding rows in each buffer)."""

    def __init__(self, q, k, v, k_prefix, v_prefix, cu_text: Tensor, cu_prefix: Tensor) -> None:
        check_offsets(cu_text, cu_prefix)
        text_bounds, prefix_bounds = cu_text.tolist(), cu_prefix.tolist()
        _check_bounds("cu_text", text_bounds, q.shape[0])
        _check_bounds("cu_prefix", prefix_bounds, k_prefix.shape[0])
        self.text_sizes = [b - a for a, b in itertools.pairwise(text_bounds)] + [q.shape[0] - text_bounds[-1]]
        self.prefix_sizes = [b - a for a, b in itertools.pairwise(prefix_bounds)] + [
            k_prefix.shape[0] - prefix_bounds[-1]
        ]
        # torch.split, not slicing: the backward of B slices would write B full-size zero gradients.
        self.q, self.k, self.v = (t.split(self.text_sizes) for t in (q, k, v))
        self.k_prefix, self.v_prefix = (t.split(self.prefix_sizes) for t in (k_prefix, v_prefix))
        self.group = q.shape[1] // k.shape[1]
        self.device = q.device

    def with_text(self) -> list[int]:
        return [doc for doc in range(len(self.text_sizes) - 1) if self.text_sizes[doc] > 0]

    def keys_values(self, doc: int) -> tuple[Tensor, Tensor]:
        """[prefix; text] keys and values of one document, K/V heads repeated for their query groups."""
        keys = torch.cat([self.k_prefix[doc], self.k[doc]])
        values = torch.cat([self.v_prefix[doc], self.v[doc]])
        return _repeat_heads(keys, self.group), _repeat_heads(values, self.group)

    def visible(self, doc: int) -> Tensor:
        """(T, P+T): query j (text position P+j) sees keys 0 .. P+j, the prefix and the causal part of the text."""
        n_text, n_prefix = self.text_sizes[doc], self.prefix_sizes[doc]
        return torch.ones(n_text, n_prefix + n_text, dtype=torch.bool, device=self.device).tril(diagonal=n_prefix)


def _check_bounds(name: str, bounds: list[int], rows: int) -> None:
    """The twin reads the offsets on the host anyway: say what is wrong with them (the kernels cannot cheaply)."""
    if bounds[0] != 0 or bounds[-1] > rows or any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"{name} must start at 0, never decrease and end within the {rows} rows, got {bounds}")


def _repeat_heads(x: Tensor, group: int) -> Tensor:
    """(L, Hkv, D) -> (L, Hkv * group, D), each K/V head repeated for the query heads of its group."""
    length, heads, dim = x.shape
    return x.unsqueeze(2).expand(length, heads, group, dim).reshape(length, heads * group, dim)


def _fold_heads(x: Tensor, group: int) -> Tensor:
    """(L, Hkv * group, D) -> (L, Hkv, D): gradients of repeated K/V heads summed over their group."""
    length, heads, dim = x.shape
    return x.reshape(length, heads // group, group, dim).sum(2)


@torch.library.custom_op("dualtower::prefix_attention_reference", mutates_args=())
def _reference_fwd(
    q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, cu_text: Tensor, cu_prefix: Tensor,
    max_text_len: int, max_prefix_len: int, scale: float | None,
) -> Tensor:
    return prefix_attention_reference(q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len,
                                      max_prefix_len, scale)


@_reference_fwd.register_fake
def _(q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len, max_prefix_len, scale):
    return q.new_empty(q.shape)  # torch.cat's output: contiguous


@torch.library.custom_op("dualtower::prefix_attention_reference_bwd", mutates_args=())
def _reference_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, cu_text: Tensor,
    cu_prefix: Tensor, scale: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return prefix_attention_reference_backward(grad_out, q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, scale)


@_reference_bwd.register_fake
def _(grad_out, q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, k_prefix, v_prefix))


def _setup_context(ctx, inputs, output) -> None:
    *tensors, _, _, scale = inputs
    ctx.save_for_backward(*tensors)
    ctx.scale = scale


def _backward(ctx, grad_out: Tensor):
    q, k, v, k_prefix, v_prefix, cu_text, cu_prefix = ctx.saved_tensors
    grads = _reference_bwd(grad_out, q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, ctx.scale)
    return (*grads, None, None, None, None, None)


_reference_fwd.register_autograd(_backward, setup_context=_setup_context)


def prefix_attention_reference_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_prefix: Tensor,
    v_prefix: Tensor,
    cu_text: Tensor,
    cu_prefix: Tensor,
    max_text_len: int,
    max_prefix_len: int,
    scale: float | None = None,
) -> Tensor:
    """`prefix_attention_reference` as one custom op: the same result, traceable by torch.compile."""
    return _reference_fwd(q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len, max_prefix_len, scale)
