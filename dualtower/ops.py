"""The one entry point for attention and the other hot ops; picks a backend per call.

Backends (DESIGN.md section 2):
    "triton"        our fused kernels (dualtower_kernels), on CUDA, or on CPU under TRITON_INTERPRET=1
    "flash"         flash-attn varlen (attention only; needs `pip install flash-attn`, CUDA)
    "torch_varlen"  torch.nn.attention.varlen.varlen_attn (attention only; CUDA)
    "chunked"       pure PyTorch, supervised rows only, in chunks (linear cross-entropy only; any device)
    "reference"     pure PyTorch: the CPU fallback and the test oracle
"auto" picks the fastest available on the tensors' device: triton on CUDA (fp64 excepted: the kernels compute
in fp32 at most); on CPU, and for fp64, chunked where an op has it, else reference. Override with
`set_backend(name)` (what the model / trainer config passes), `set_backend(name, op=...)` for one op, or the
environment variable DUALTOWER_BACKEND. A forced backend applies to the ops that implement it; the others keep
their automatic choice (so "flash" changes attention only).
flash / torch_varlen get K = [prefix; text] per document, concatenated: their bottom-right-aligned causal mask
is exactly our semantics.

Shape legend: Nt text tokens, Np prefix tokens, Hq / Hkv query / key-value heads, D head dim, B rows.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
import os
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

from dualtower_kernels import decode_attention as _decode
from dualtower_kernels import linear_cross_entropy as _lce
from dualtower_kernels import prefix_attention as _prefix
from dualtower_kernels import prefix_attention_reference as _prefix_reference
from dualtower_kernels import projector as _projector
from dualtower_kernels._common import INTERPRET, KERNEL_DTYPES

logger = logging.getLogger(__name__)

AUTO, TRITON, FLASH, TORCH_VARLEN = "auto", "triton", "flash", "torch_varlen"
CHUNKED, REFERENCE = "chunked", "reference"
BACKENDS = (AUTO, TRITON, FLASH, TORCH_VARLEN, CHUNKED, REFERENCE)

_override: str | None = None
_op_overrides: dict[str, str] = {}
_logged: set[tuple[str, str, str]] = set()


# ------------------------------------------------------------------------------------------------------------
# Library backends for prefix attention: K/V concatenated per document, causal bottom-right aligned
# ------------------------------------------------------------------------------------------------------------


def _flash_attend(q, keys, values, cu_q, cu_k, max_q, max_k, scale) -> Tensor:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:  # pragma: no cover - only where flash-attn is installed
        raise RuntimeError("the 'flash' backend needs flash-attn: pip install 'dualtower[flash]'") from exc
    return flash_attn_varlen_func(q, keys, values, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True)


def _varlen_params() -> frozenset[str]:
    """Keyword names of the installed varlen_attn: 2.10 has is_causal; later ones window_size / enable_gqa."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


# Probed once at import: inspect / importlib do not belong inside a compiled graph.
_VARLEN_PARAMS = _varlen_params()
_FLASH_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def torch_varlen_attention(
    q: Tensor, keys: Tensor, values: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    scale: float | None = None,
) -> Tensor:
    """Bottom-right-aligned causal varlen attention through torch's varlen_attn, whatever its signature."""
    from torch.nn.attention.varlen import varlen_attn

    kwargs: dict = {"window_size": (-1, 0)} if "window_size" in _VARLEN_PARAMS else {"is_causal": True}
    if q.shape[1] != keys.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:  # older torch: no GQA, so repeat the K/V heads
            group = q.shape[1] // keys.shape[1]
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    if scale is not None:
        if "scale" in _VARLEN_PARAMS:
            kwargs["scale"] = scale
        else:
            q = q * (scale * math.sqrt(q.shape[-1]))
    return varlen_attn(q, keys, values, cu_q.int(), cu_k.int(), max_q, max_k, **kwargs)


def _library_prefix_attention(attend, q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len,
                              max_prefix_len, scale=None) -> Tensor:
    """flash / torch_varlen: K = [prefix; text] per document, merged, then causal (bottom-right aligned).

    The libraries never write the rows after the last document, in the output or in the gradients; masking
    those rows of every input and of the output keeps them (and their gradients) exactly zero, like ours.
    """
    in_text = (torch.arange(q.shape[0], device=q.device) < cu_text[-1])[:, None, None]
    q, k, v = (torch.where(in_text, t, 0) for t in (q, k, v))
    # The left tower's causal pass has nothing to merge. An empty prefix from the left tower (a text-only batch)
    # still goes through the merge: dropping it would leave the left tower without gradients (None, not the
    # zeros the other backends give), and sharded data parallelism needs the same gradients on every rank.
    if k_prefix.shape[0] == 0 and not (k_prefix.requires_grad or v_prefix.requires_grad):
        keys, values, cu_k = k, v, cu_text
    else:
        in_prefix = (torch.arange(k_prefix.shape[0], device=q.device) < cu_prefix[-1])[:, None, None]
        k_prefix, v_prefix = (torch.where(in_prefix, t, 0) for t in (k_prefix, v_prefix))
        keys, values, cu_k = _prefix.concat_prefix_text(k, v, k_prefix, v_prefix, cu_text, cu_prefix)
    out = attend(q, keys, values, cu_text, cu_k, max_text_len, max_text_len + max_prefix_len, scale)
    return torch.where(in_text, out, 0)


def _reference_prefix_attention(*args) -> Tensor:
    """The twin itself in eager mode; under torch.compile the same twin as one opaque op (its document loop reads
    lengths on the host, which dynamo would otherwise recompile for at every new document count)."""
    if torch.compiler.is_compiling():
        return _prefix_reference.prefix_attention_reference_op(*args)
    return _prefix_reference.prefix_attention_reference(*args)


# op name -> backend name -> implementation
_IMPLEMENTATIONS: dict[str, dict[str, Callable[..., Tensor]]] = {
    "prefix_attention": {
        TRITON: _prefix.prefix_attention,
        FLASH: functools.partial(_library_prefix_attention, _flash_attend),
        TORCH_VARLEN: functools.partial(_library_prefix_attention, torch_varlen_attention),
        REFERENCE: _reference_prefix_attention,
    },
    "decode_attention": {TRITON: _decode.decode_attention, REFERENCE: _decode.decode_attention_reference},
    "linear_cross_entropy": {
        TRITON: _lce.linear_cross_entropy,
        CHUNKED: _lce.linear_cross_entropy_chunked,
        REFERENCE: _lce.linear_cross_entropy_reference,
    },
    "pixel_shuffle_project": {
        TRITON: _projector.pixel_shuffle_project,
        REFERENCE: _projector.pixel_shuffle_project_reference,
    },
}


# ------------------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------------------


def set_backend(name: str | None, op: str | None = None) -> None:
    """Force a backend (one of BACKENDS) or None / "auto" for the automatic choice.

    Globally, None and "auto" both leave the choice to DUALTOWER_BACKEND, then to the automatic rule (a config's
    default "auto" must not hide the environment variable). With `op`, only that op ("prefix_attention",
    "decode_attention", "linear_cross_entropy", "pixel_shuffle_project") is affected and must implement the
    backend; an op-level choice, "auto" included, beats the global one and DUALTOWER_BACKEND; None clears it.
    """
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if op is None:
        _override = None if name == AUTO else name
        return
    if op not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown op {op!r}; choose one of {', '.join(_IMPLEMENTATIONS)}")
    if name is None:
        _op_overrides.pop(op, None)
        return
    if name != AUTO and name not in _IMPLEMENTATIONS[op]:
        # Named for this op alone, a backend it lacks would otherwise silently become the automatic choice.
        raise ValueError(f"{op} has no {name!r} backend; choose one of auto, {', '.join(_IMPLEMENTATIONS[op])}")
    _op_overrides[op] = name


def is_available(backend: str, device: torch.device | str) -> bool:
    """Whether `backend` can run on tensors of `device` here (not whether it implements a given op)."""
    device_type = torch.device(device).type
    if backend in (REFERENCE, CHUNKED):
        return True
    if backend == TRITON:
        return device_type == "cuda" or (INTERPRET and device_type == "cpu")
    if backend == FLASH:
        return device_type == "cuda" and _FLASH_INSTALLED
    if backend == TORCH_VARLEN:
        return device_type == "cuda" and bool(_VARLEN_PARAMS)
    return False


def _requirement(backend: str) -> str:
    """What `backend` needs, for the error that refuses it (a bare "not available" leaves the user guessing)."""
    return {
        TRITON: "it needs a CUDA device (or TRITON_INTERPRET=1 on a CPU, set before dualtower is imported)",
        FLASH: "it needs a CUDA device and flash-attn (pip install 'dualtower[flash]')",
        TORCH_VARLEN: "it needs a CUDA device and a torch with torch.nn.attention.varlen.varlen_attn",
    }.get(backend, "no device here runs it")


def implementation(op: str, backend: str) -> Callable[..., Tensor]:
    """The function `backend` runs for `op` (benchmarks time each one directly)."""
    return _IMPLEMENTATIONS[op][backend]


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    return [name for name in _IMPLEMENTATIONS[op] if is_available(name, device)]


def selected_backend(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend `op` would use on `device` now, for inputs of `dtype` (None: any the kernels take)."""
    wanted = _op_overrides.get(op) or _override or os.environ.get("DUALTOWER_BACKEND") or AUTO
    if wanted not in BACKENDS:
        raise ValueError(f"DUALTOWER_BACKEND={wanted!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    if wanted != AUTO and wanted in _IMPLEMENTATIONS[op]:
        if not is_available(wanted, device):
            device_type = torch.device(device).type
            raise RuntimeError(
                f"backend {wanted!r} is not available for {op} on {device_type} here: {_requirement(wanted)}"
            )
        return wanted
    # The kernels compute in fp32 at most: fp64 (a parity check, say) takes the twins, as on a CPU.
    if torch.device(device).type == "cuda" and (dtype is None or dtype in KERNEL_DTYPES):
        return TRITON
    return CHUNKED if CHUNKED in _IMPLEMENTATIONS[op] else REFERENCE


def check_backends(device: torch.device | str) -> None:
    """Raise now, rather than inside the first forward, if an op's chosen backend cannot run on `device`."""
    for op in _IMPLEMENTATIONS:
        selected_backend(op, device)


def _resolve(op: str, device: torch.device, dtype: torch.dtype) -> Callable[..., Tensor]:
    name = selected_backend(op, device, dtype)
    key = (op, name, device.type)
    # is_compiling() first: dynamo would otherwise guard on the set's contents and recompile when it grows.
    if not torch.compiler.is_compiling() and key not in _logged:
        _logged.add(key)
        logger.info("%s: using the %r backend on %s", op, name, device.type)
    return _IMPLEMENTATIONS[op][name]


# ------------------------------------------------------------------------------------------------------------
# Public ops (the model calls these)
# ------------------------------------------------------------------------------------------------------------


def _first_tensor(values: tuple) -> Tensor:
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise TypeError("an op needs at least one tensor argument")


def _autocast_like_a_matmul(op: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Under autocast, cast the op's floating-point tensors to the autocast dtype, as autocast casts a matmul's
    inputs, then run the op with autocast off.

    Autocast does not reach into a custom op's inputs, so without this an op would get a mix (bf16 from the
    linear layers before it, fp32 from the residual stream or the weights) while autocast still applied to the
    matmuls inside it. Single-device training runs under bf16 autocast with fp32 weights.
    """

    def cast(value: object, dtype: torch.dtype) -> object:
        # fp64 stays fp64, as autocast leaves fp64 matmuls alone.
        lower = isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64
        return value.to(dtype) if lower else value

    @functools.wraps(op)
    def run(*args, **kwargs) -> Tensor:
        device = _first_tensor((*args, *kwargs.values())).device.type
        if not torch.is_autocast_enabled(device):
            return op(*args, **kwargs)
        dtype = torch.get_autocast_dtype(device)
        args = tuple(cast(value, dtype) for value in args)
        kwargs = {key: cast(value, dtype) for key, value in kwargs.items()}
        with torch.autocast(device, enabled=False):
            return op(*args, **kwargs)

    return run


@_autocast_like_a_matmul
def prefix_attention(
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
    """q (Nt, Hq, D), k/v (Nt, Hkv, D), k_prefix/v_prefix (Np, Hkv, D) -> (Nt, Hq, D).

    Per document: its text queries see its whole prefix and its text causally. No document sees another.
    cu_text / cu_prefix are (B + 1,) int32 offsets; max_text_len / max_prefix_len bound the per-document lengths.
    """
    impl = _resolve("prefix_attention", q.device, q.dtype)
    return impl(q, k, v, k_prefix, v_prefix, cu_text, cu_prefix, max_text_len, max_prefix_len, scale)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int) -> Tensor:
    """Causal varlen attention over packed documents: prefix_attention with empty prefixes."""
    empty = k.new_empty((0, *k.shape[1:]))
    no_prefix = torch.zeros_like(cu_seqlens)
    return prefix_attention(q, k, v, empty, empty, cu_seqlens, no_prefix, max_len, 0)


def dense_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Non-causal attention over fixed-length sequences (the ViT): (B, H, S, D) -> (B, H, S, D)."""
    return scaled_dot_product_attention(q, k, v)


@_autocast_like_a_matmul
def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float | None = None
) -> Tensor:
    """q (B, Hq, D) over caches (B, Hkv, S, D) where row b holds lengths[b] valid positions -> (B, Hq, D)."""
    return _resolve("decode_attention", q.device, q.dtype)(q, k_cache, v_cache, lengths, scale)


@_autocast_like_a_matmul
def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum over supervised tokens of CE(hidden @ weight.T, labels), in at least fp32; hidden (N, C), weight (V, C)."""
    return _resolve("linear_cross_entropy", hidden.device, hidden.dtype)(hidden, weight, labels, ignore_index)


@_autocast_like_a_matmul
def pixel_shuffle_project(x: Tensor, weight: Tensor, factor: int) -> Tensor:
    """Pixel shuffle (N, S, C) -> (N, S / f^2, C f^2) then a bias-free linear layer with weight (O, C f^2)."""
    return _resolve("pixel_shuffle_project", x.device, x.dtype)(x, weight, factor)
