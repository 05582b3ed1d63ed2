"""The fused CUDA sampler (csrc/sampling.cu): JIT build on request, a fallback when it cannot be used.

Shape legend: B rows, V vocabulary.

`torch.ops.dualtower.sample_logits(logits (B, V) fp32, uniforms (B,) fp32, temperature, top_k, top_p)`
implements the same HF conventions as `dualtower.generation.sampling` with a radix select instead of a sort.
The random numbers come from a torch.Generator, so a seed reproduces the tokens. Building needs nvcc and a
CUDA build of torch (about a minute the first time; cached by torch.utils.cpp_extension afterwards).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from dualtower.generation.sampling import SamplingConfig, sample

logger = logging.getLogger(__name__)

EXTENSION_NAME = "dualtower_csrc_sampling"
SOURCE_NAME = "sampling.cu"
OP_NAME = "sample_logits"


def csrc_dir() -> Path:
    """The repository's csrc/ folder (`DUALTOWER_CSRC_DIR` overrides, e.g. for a non-editable install)."""
    override = os.environ.get("DUALTOWER_CSRC_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "csrc"


def source_path() -> Path:
    path = csrc_dir() / SOURCE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"CUDA source {path} not found (set DUALTOWER_CSRC_DIR to the csrc folder)")
    return path


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def op_available() -> bool:
    """Whether torch.ops.dualtower.sample_logits is registered in this process."""
    try:
        getattr(torch.ops.dualtower, OP_NAME)
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.cache
def load_extension(verbose: bool = False) -> None:
    """Compile (once per source version) and load the extension; registers torch.ops.dualtower.sample_logits."""
    if op_available():
        return
    if not torch.cuda.is_available() or torch.version.cuda is None:
        raise RuntimeError("the fused CUDA sampler needs a CUDA build of torch and a GPU")
    if find_nvcc() is None:
        raise RuntimeError("the fused CUDA sampler needs nvcc (set CUDA_HOME)")
    from torch.utils.cpp_extension import load

    load(
        name=EXTENSION_NAME,
        sources=[str(source_path())],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        is_python_module=False,
        verbose=verbose,
    )
    _register_fake()


def _register_fake() -> None:
    """Shape rule so that torch.compile can trace through the op."""
    qualified = f"dualtower::{OP_NAME}"

    @torch.library.register_fake(qualified)
    def _fake(logits: Tensor, uniforms: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
        return logits.new_empty((logits.shape[0],), dtype=torch.long)


def fused_sample(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Same contract as `sampling.sample`, on the fused kernel: (B, V) logits -> (B,) int64, no host sync."""
    op = getattr(torch.ops.dualtower, OP_NAME)
    scores = logits.float().contiguous()
    if not config.do_sample:
        return op(scores, scores.new_empty(0), 0.0, 0, 1.0)
    uniforms = torch.rand(scores.shape[0], device=scores.device, generator=generator)
    return op(scores, uniforms, float(config.temperature), int(config.top_k), float(config.top_p))


def sampler_for(device: torch.device) -> Callable[..., Tensor]:
    """The fused sampler when it can run on `device`, else the PyTorch one (with a warning saying why)."""
    if device.type != "cuda":
        logger.warning("fused CUDA sampler requested on %s; using the PyTorch sampler", device)
        return sample
    try:
        load_extension()
    except (RuntimeError, OSError, FileNotFoundError, subprocess.CalledProcessError) as error:
        logger.warning("fused CUDA sampler unavailable (%s); using the PyTorch sampler", error)
        return sample
    return fused_sample


# Generated at torch build time and absent from CPU wheels; the compile-only check supplies it.
_CMAKE_MACROS = "c10/cuda/impl/cuda_cmake_macros.h"


def nvcc_compile_command(output: Path, arch: str = "sm_90") -> list[str]:
    """The nvcc command line torch.utils.cpp_extension would use, compiling only (no link, no GPU needed)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    # nvcc finds the CUDA headers itself; include_paths("cuda") would need a CUDA build of torch.
    includes = [*include_paths("cpu"), sysconfig.get_path("include")]
    if not any((Path(path) / _CMAKE_MACROS).is_file() for path in includes):
        includes.append(str(_macro_shim(output.parent)))
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    return [
        nvcc,
        "-c",
        str(source_path()),
        "-o",
        str(output),
        *[flag for path in includes for flag in ("-isystem", path)],
        f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *COMMON_NVCC_FLAGS,
        "--compiler-options",
        "-fPIC",
        "-std=c++20",
        f"-gencode=arch=compute_{arch[3:]},code={arch}",
        "-O3",
    ]


def _macro_shim(directory: Path) -> Path:
    root = directory / "shim_include"
    header = root / _CMAKE_MACROS
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return root


def compile_only(output: Path, arch: str = "sm_90", timeout_s: float = 600) -> Path:
    """Compile csrc/sampling.cu to an object file: checks the source on machines without a GPU."""
    command = nvcc_compile_command(output, arch)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"nvcc failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return output
