"""Compile every Triton kernel for a CUDA GPU on any machine, GPU or not, and report what each config needs.

    python -m dualtower_kernels.compile_check [--arch 90] [--dtype bfloat16 float32] [--json PATH]

Each kernel family's launchers run on small CPU tensors with a flavor's head dim and widths while
Triton's driver is swapped for one that reports the target card and launches nothing: every autotuning config
that a launch would benchmark is compiled instead (to PTX, then to a cubin by Triton's bundled ptxas). Per
compiled variant it reports the dynamic shared memory against the card's per-block limit, registers and local
memory (spills) from cuobjdump, the tensor-core instruction its dots became (wgmma, or mma.sync) and the
compile time. Exit status 1 when a variant fails to compile or could never launch on the card.

Run it without TRITON_INTERPRET=1: the interpreter replaces the compiler.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from dualtower_kernels import decode_attention, linear_cross_entropy, prefix_attention, projector
from dualtower_kernels._common import INTERPRET


@dataclasses.dataclass(frozen=True)
class Card:
    shared_bytes: int  # opt-in dynamic shared memory per block
    sm_count: int  # sizes the decode kernel's split-K plan


CARDS = {80: Card(166_912, 108), 90: Card(232_448, 132)}  # A100, H100 SXM


@dataclasses.dataclass
class Variant:
    """One compiled (kernel, dtype, launch config)."""

    kernel: str
    flavor: str
    dtype: str
    config: dict[str, int]  # the BLOCK_* constexprs
    num_warps: int
    num_stages: int
    default: bool  # the first config: the one DUALTOWER_AUTOTUNE=0 keeps
    shared_bytes: int
    registers: int
    local_bytes: int  # per-thread local memory: register spills
    tensor_cores: str  # "wgmma", "mma" or "none"
    compile_s: float


class _TargetDriver:
    """Stands in for Triton's CUDA driver: names the target card; nothing is ever launched through it."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclasses.dataclass
class Recorder:
    """What compile_only collects; `flavor` and `dtype` name the workload of the variants it records next."""

    flavor: str = ""
    dtype: str = ""
    variants: list[Variant] = dataclasses.field(default_factory=list)
    default: bool = True  # whether the config being compiled is its autotuner's first


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[Recorder]:
    """Within the block, kernel launches compile (every config an autotuner would try) and run nothing."""
    if INTERPRET:
        raise RuntimeError("compile_check needs the Triton compiler: unset TRITON_INTERPRET")
    recorder = Recorder()
    jit_run = JITFunction.run
    compiled: set[JITFunction] = set()

    def compile_variant(fn: JITFunction, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
        blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_") and isinstance(v, int)}
        seconds = time.perf_counter() - start
        compiled.add(fn)
        recorder.variants.append(_describe(fn.__name__, recorder, blocks, kernel, seconds))
        return kernel

    def compile_all_configs(tuner: Autotuner, *args, warmup, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
        for index, config in enumerate(tuner.prune_configs(kwargs)):
            recorder.default = index == 0
            tuner.fn.run(*args, **kwargs, **config.all_kwargs(), warmup=True)
        recorder.default, tuner.nargs = True, None

    previous_driver = driver._active  # reading the property instead would create the real driver: it needs a GPU
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(JITFunction, "run", compile_variant))
        stack.enter_context(mock.patch.object(Autotuner, "run", compile_all_configs))
        for module in (decode_attention, linear_cross_entropy, prefix_attention, projector):
            # CPU tensors stand in for CUDA ones: the kernels are never run on them.
            stack.enter_context(mock.patch.object(module, "check_triton_device", lambda *tensors: None))
        stack.enter_context(mock.patch.object(decode_attention, "sm_count", lambda index: CARDS[arch].sm_count))
        driver.set_active(_TargetDriver(arch))
        try:
            yield recorder
        finally:
            driver.set_active(previous_driver)
            for fn in compiled:  # their binders and kernels were made for the pretend card
                fn.device_caches.clear()


def _describe(name: str, recorder: Recorder, blocks: dict, kernel, seconds: float) -> Variant:
    ptx = kernel.asm["ptx"]
    registers, local_bytes = _resources(kernel.asm["cubin"])
    tensor_cores = "wgmma" if "wgmma." in ptx else "mma" if "mma.sync" in ptx else "none"
    meta = kernel.metadata
    return Variant(name, recorder.flavor, recorder.dtype, blocks, meta.num_warps, meta.num_stages, recorder.default,
                   meta.shared, registers, local_bytes, tensor_cores, round(seconds, 2))


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local bytes per thread) from the cubin, via Triton's bundled cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        command = [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name]
        usage = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":", 1) for item in usage.split() if item.startswith(("REG:", "LOCAL:")))
    return int(fields["REG"]), int(fields["LOCAL"])


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes that pick kernel specializations (constexprs, divisibility by 16); lengths stay small."""

    q_heads: int
    kv_heads: int
    head_dim: int
    vit_width: int
    vit_side: int  # patches per tile side
    shuffle: int
    lm_width: int


# 360m: SmolLM2-360M with SigLIP-B/16-512 (135m differs only in runtime sizes). debug: what the CPU recipe and
# the GPU tests use, and the projector's unaligned path (its width is no multiple of BLOCK_K).
FLAVORS = {"360m": Dims(15, 5, 64, 768, 32, 4, 960), "debug": Dims(4, 2, 32, 96, 8, 2, 128)}
VOCAB = 49218


def _prefix_attention(dims: Dims, dtype: torch.dtype) -> None:
    q = torch.randn(300, dims.q_heads, dims.head_dim, dtype=dtype)
    k, k_prefix = (torch.randn(n, dims.kv_heads, dims.head_dim, dtype=dtype) for n in (300, 200))
    cu_text, cu_prefix = torch.tensor([0, 100, 300], dtype=torch.int32), torch.tensor([0, 50, 200], dtype=torch.int32)
    lengths = (200, 150, dims.head_dim**-0.5)
    out, lse = prefix_attention.prefix_attention_fwd(q, k, k, k_prefix, k_prefix, cu_text, cu_prefix, *lengths)
    prefix_attention.prefix_attention_bwd(out, q, k, k, k_prefix, k_prefix, out, lse, cu_text, cu_prefix, *lengths)


def _projector(dims: Dims, dtype: torch.dtype) -> None:
    x = torch.randn(2, dims.vit_side**2, dims.vit_width, dtype=dtype)
    weight = torch.randn(dims.lm_width, dims.vit_width * dims.shuffle**2, dtype=dtype)
    out = projector.pixel_shuffle_project_op(x, weight, dims.shuffle)
    projector.pixel_shuffle_project_bwd(out, x, weight, dims.shuffle, True, True)


def _linear_cross_entropy(dims: Dims, dtype: torch.dtype) -> None:
    hidden, weight = torch.randn(4, dims.lm_width, dtype=dtype), torch.randn(VOCAB, dims.lm_width, dtype=dtype)
    labels = torch.tensor([5, -100, VOCAB - 1, 0])
    linear_cross_entropy.linear_cross_entropy_fwd(hidden, weight, labels, -100, False, False, 0, True)  # loss only
    linear_cross_entropy.linear_cross_entropy_fwd(hidden, weight, labels, -100, True, True, 0, True)


def _decode_attention(dims: Dims, dtype: torch.dtype) -> None:
    q = torch.randn(1, dims.q_heads, dims.head_dim, dtype=dtype)
    cache = torch.randn(1, dims.kv_heads, 2048, dims.head_dim, dtype=dtype)
    decode_attention.decode_attention(q, cache, cache, torch.tensor([389]))


WORKLOADS: dict[str, Callable[[Dims, torch.dtype], None]] = {
    "prefix_attention": _prefix_attention,
    "projector": _projector,
    "linear_cross_entropy": _linear_cross_entropy,
    "decode_attention": _decode_attention,
}


def compile_all(
    arch: int, dtypes: list[torch.dtype], flavors: list[str] | None = None, families: list[str] | None = None
) -> list[Variant]:
    with compile_only(arch) as recorder:
        for flavor in flavors or list(FLAVORS):
            for dtype in dtypes:
                recorder.flavor, recorder.dtype = flavor, str(dtype).removeprefix("torch.")
                for family in families or list(WORKLOADS):
                    WORKLOADS[family](FLAVORS[flavor], dtype)
    return recorder.variants


def problems(variants: list[Variant], card: Card) -> list[str]:
    """Variants that could never launch on the card (the autotuner would drop them; a lone default would fail)."""
    return [
        f"{v.kernel} {v.flavor} {v.dtype} {v.config} ({'default' if v.default else 'tuning'} config) needs "
        f"{v.shared_bytes} B of shared memory; the card has {card.shared_bytes} B per block"
        for v in variants
        if v.shared_bytes > card.shared_bytes
    ]


def format_table(variants: list[Variant]) -> str:
    header = f"{'kernel':26} flavor dtype     BLOCK_ sizes      warps stages shared KiB regs spill B MMA      s"
    rows = []
    for v in variants:
        blocks = " ".join(f"{name.removeprefix('BLOCK_')}{size}" for name, size in v.config.items())
        rows.append(
            f"{v.kernel:26} {v.flavor:6} {v.dtype:9} {blocks:17} {v.num_warps:5} {v.num_stages:6} "
            f"{v.shared_bytes / 1024:10.1f} {v.registers:4} {v.local_bytes:7} {v.tensor_cores:5} {v.compile_s:5.1f}"
        )
    return "\n".join([header, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(CARDS), help="compute capability x10")
    dtypes = ["bfloat16", "float16", "float32"]
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=dtypes)
    parser.add_argument("--flavor", nargs="+", choices=list(FLAVORS), help="shapes to compile for; default: all")
    parser.add_argument("--family", nargs="+", choices=list(WORKLOADS), help="default: all")
    parser.add_argument("--json", type=Path, help="also write the variants here")
    args = parser.parse_args(argv)
    if INTERPRET:
        parser.error("the Triton interpreter replaces the compiler: unset TRITON_INTERPRET")
    variants = compile_all(args.arch, [getattr(torch, d) for d in args.dtype], args.flavor, args.family)
    sys.stdout.write(format_table(variants) + "\n")
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(v) for v in variants], indent=1))
    found = problems(variants, CARDS[args.arch])
    for problem in found:
        sys.stderr.write(f"ERROR: {problem}\n")
    sys.stdout.write(f"{len(variants)} variants for sm_{args.arch}, {len(found)} that cannot launch\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
