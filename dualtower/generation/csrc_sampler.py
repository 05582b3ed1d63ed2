"""The fused CUDA sampler (csrc/sampling.cu): JIT build on request, a fallback when it cannot be used.

Shape legend: B rows, V vocabulary.

`torch.ops.dualtower.sample_logits(logits (B, V) fp32, uniforms (B,) fp32, temperature, top_k, top_p)`
implements the same HF conventions as `dualtower.generation.sampling` with a radix select instead of a sort;
the kept set is the same, ties at the top-p boundary included (the rule is stated once, in that module).
The random numbers come from a torch.Generator, so a seed reproduces the tokens. Building needs nvcc and a
CUDA build of torch (about a minute the first time; cached by torch.utils.cpp_extension afterwards).

A machine without nvcc can load a library built elsewhere for the same torch build: `python -m
dualtower.generation.csrc_sampler build DIR` (nvcc and a CUDA build of torch, no GPU needed) writes the library and
`built_for.json`; `DUALTOWER_CSRC_LIBRARY=DIR/dualtower_csrc_sampling.so` makes `load_extension` use it, when
torch's version and CUDA version match those it was built for and csrc/sampling.cu is unchanged.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import re
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
PREBUILT_ENV = "DUALTOWER_CSRC_LIBRARY"
BUILT_FOR = "built_for.json"


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
    prebuilt = os.environ.get(PREBUILT_ENV)
    if prebuilt and _load_prebuilt(Path(prebuilt)):
        return
    _jit_build(build_directory=None, verbose=verbose)


def _jit_build(build_directory: Path | None, verbose: bool) -> None:
    if find_nvcc() is None:
        raise RuntimeError(f"the fused CUDA sampler needs nvcc (set CUDA_HOME) or a prebuilt library ({PREBUILT_ENV})")
    from torch.utils.cpp_extension import load

    load(
        name=EXTENSION_NAME,
        sources=[str(source_path())],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        is_python_module=False,
        verbose=verbose,
        build_directory=None if build_directory is None else str(build_directory),
    )
    _register_fake()


def _this_build() -> dict[str, str | None]:
    """What a prebuilt library must have been built for: this torch build and the current CUDA source."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "source_sha256": _source_digest()}


def _source_digest() -> str | None:
    try:
        return hashlib.sha256(source_path().read_bytes()).hexdigest()
    except FileNotFoundError:
        return None  # an install without csrc/ cannot rebuild or compare; the torch build must still match


def _load_prebuilt(library: Path) -> bool:
    """Load a library from `build_library`; False (with a warning) when it is missing, built for another torch
    or for other GPUs, or built from another version of the CUDA source.

    A library linked against another libtorch can crash when called, so the recorded build must match; a stale
    source would silently run (and test) the old kernel."""
    built_for_path = library.parent / BUILT_FOR
    try:
        built_for = json.loads(built_for_path.read_text())
    except (OSError, ValueError) as error:
        logger.warning("prebuilt sampler ignored: no readable %s (%s)", built_for_path, error)
        return False
    wanted = {key: value for key, value in _this_build().items() if not (key == "source_sha256" and value is None)}
    if {key: built_for.get(key) for key in wanted} != wanted:
        logger.warning("prebuilt sampler ignored: built for %s, this is %s (a changed %s needs a rebuild)",
                       built_for, wanted, SOURCE_NAME)
        return False
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if capability is not None and not _runs_on(built_for.get("arch_list", ""), capability):
        # It would load, then fail at the first token ("no kernel image"), too late to fall back.
        logger.warning("prebuilt sampler ignored: built for CUDA architectures %r, this GPU is %d.%d",
                       built_for.get("arch_list"), *capability)
        return False
    try:
        torch.ops.load_library(str(library))
    except OSError as error:  # a missing file, or a libcudart / libtorch this process does not have
        logger.warning("prebuilt sampler %s did not load: %s", library, error)
        return False
    _register_fake()
    logger.info("fused CUDA sampler loaded from %s", library)
    return True


def _runs_on(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a build for `arch_list` (TORCH_CUDA_ARCH_LIST syntax) has code a GPU of `capability` can run:
    machine code of the same major version and an equal or lower minor one, or PTX of an equal or older GPU."""
    for entry in re.split(r"[\s;]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if match is None:
            return True  # a named architecture ("Hopper") or no record: not refused on a guess
        built = (int(match[1]), int(match[2]))
        if match[3] == "a":  # architecture-specific code (sm_90a) runs only on that GPU
            machine_code_runs = built == capability
        else:
            machine_code_runs = built[0] == capability[0] and built[1] <= capability[1]
        if machine_code_runs or (match[4] is not None and built <= capability):
            return True
    return False


def build_library(out_dir: Path, arch_list: str = "9.0+PTX", verbose: bool = False) -> Path:
    """Build the library into `out_dir` for `arch_list` (TORCH_CUDA_ARCH_LIST syntax) and record this torch build.

    Needs nvcc and a CUDA build of torch, not a GPU. Returns the library's path."""
    if torch.version.cuda is None:
        raise RuntimeError("building the fused sampler needs a CUDA build of torch (this one is CPU-only)")
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # without a GPU, torch cannot ask which arch to build for
    try:
        _jit_build(build_directory=out_dir, verbose=verbose)
    finally:
        if previous is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    (out_dir / BUILT_FOR).write_text(json.dumps({**_this_build(), "arch_list": arch_list}) + "\n")
    return out_dir / f"{EXTENSION_NAME}.so"


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the fused CUDA sampler for another machine (no GPU needed).")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the library and built_for.json into OUT_DIR")
    build.add_argument("out_dir", type=Path)
    build.add_argument("--arch-list", default="9.0+PTX", help="TORCH_CUDA_ARCH_LIST syntax (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    library = build_library(args.out_dir, args.arch_list)
    logger.info("built %s for torch %s, CUDA %s; set %s=%s", library, torch.__version__, torch.version.cuda,
                PREBUILT_ENV, library)


if __name__ == "__main__":
    main()
