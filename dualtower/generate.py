"""Answer questions about images from the command line.

    python -m dualtower.generate --checkpoint DIR_OR_REPO --image cat.png --prompt "What is this?"

Several requests: repeat --image / --prompt in pairs (one --image with several --prompt asks several questions
about the same image, which reuses its left-tower K/V), or give --requests FILE.jsonl with one
{"image": path | "images": [paths], "prompt": text} object per line (relative paths are taken from the file's
folder; any other key is an error). stdout carries only the generated texts, one per request in order and
stripped of surrounding whitespace, streamed or not (with --jsonl, one JSON object per request: index, the exact
text, finish_reason, tokens); logs and --stats go to stderr.
Errors (missing checkpoint or image, bad flags) print one line and exit non-zero.

--seed makes sampled answers reproducible for the same requests, --batch_size and --stream: each batch is
seeded from --seed and the index of its first request, so batches do not share their noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from dualtower.cli_errors import error_line

DEFAULT_PROMPT = "Describe the image."
REQUEST_KEYS = ("image", "images", "prompt")
EXIT_USAGE = 2
EXIT_FAILURE = 1

logger = logging.getLogger("dualtower.generate")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dualtower.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory, weights file or Hub repo id")
    parser.add_argument("--config", help="config.json to use when --checkpoint is a weights file")
    parser.add_argument(
        "--architecture", choices=("dual_tower", "vanilla"),
        help="nanoVLM checkpoints only: vanilla keeps the checkpoint whole (default: dual_tower, a copy of its LM "
        "as the right tower, the same answers at twice the LM memory)",
    )
    parser.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    parser.add_argument("--prompt", action="append", default=[], help=f"question (repeatable; '{DEFAULT_PROMPT}')")
    parser.add_argument("--requests", type=Path, help="JSONL file of {image|images, prompt} requests")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--sampling", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_k", type=int, default=50, help="0 disables top-k")
    parser.add_argument("--top_p", type=float, default=0.9, help="1 disables top-p")
    parser.add_argument(
        "--seed", type=int,
        help="seed for --sampling: the same requests with the same --batch_size / --stream draw the same tokens "
        "(each batch gets its own seed, derived from this one and the index of its first request)",
    )
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--batch_size", type=int, default=16, help="requests generated together (not with --stream)")
    parser.add_argument("--sampler", choices=("torch", "csrc"), default="torch", help="csrc: fused CUDA sampler")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step and the prefill's blocks (slower start)"
    )
    parser.add_argument("--no_cuda_graph", action="store_true", help="do not capture the decode step on CUDA")
    parser.add_argument(
        "--stream", action="store_true",
        help="print text as it is generated; generates one request at a time (--batch_size is ignored)",
    )
    parser.add_argument(
        "--jsonl", action="store_true",
        help="print one JSON object per request ({index, text, finish_reason, tokens}) instead of plain text",
    )
    parser.add_argument("--stats", action="store_true", help="TTFT, tokens/s and cache hits on stderr")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="write a torch profiler trace of the first batch (left tower, prefill, first decode steps) to DIR",
    )
    parser.add_argument("--profile_steps", type=int, default=8, help="decode steps traced by --profile")
    parser.add_argument("--verbose", "-v", action="store_true", help="info logs on stderr")
    return parser


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    checks = [
        (args.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
        (args.temperature > 0, "--temperature must be > 0"),
        (args.top_k >= 0, "--top_k must be >= 0"),
        (0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
        (args.batch_size >= 1, "--batch_size must be >= 1"),
        (not (args.requests and (args.image or args.prompt)), "--requests cannot be combined with --image/--prompt"),
        (all(args.stop), "--stop strings must be non-empty"),
        (args.profile_steps >= 1, "--profile_steps must be >= 1"),
        (not (args.jsonl and args.stream), "--jsonl cannot be combined with --stream"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)


# -- requests -----------------------------------------------------------------------------------------------


def pair_requests(images: list[str], prompts: list[str]) -> list[tuple[list[str], str]]:
    prompts = prompts or [DEFAULT_PROMPT]
    if not images:  # text-only requests
        return [([], prompt) for prompt in prompts]
    if len(images) == len(prompts):
        return [([image], prompt) for image, prompt in zip(images, prompts, strict=True)]
    if len(images) == 1:
        return [(images, prompt) for prompt in prompts]
    if len(prompts) == 1:
        return [([image], prompts[0]) for image in images]
    raise ValueError(
        f"got {len(images)} --image and {len(prompts)} --prompt; give them in pairs, or one image (or prompt) for all"
    )


def read_requests_file(path: Path) -> list[tuple[list[str], str]]:
    if not path.is_file():
        raise FileNotFoundError(f"requests file not found: {path}")
    requests = []
    # JSON Lines: UTF-8 (a BOM from Windows editors is dropped), records end at "\n" only. str.splitlines()
    # would also split at U+2028, U+2029 and NEL, which JSON strings may hold unescaped.
    text = _read_utf8(path)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not valid JSON ({error})") from error
        try:
            images, prompt = _parse_request(item)
        except ValueError as error:
            raise ValueError(f"{path} line {number}: {error}") from error
        requests.append(([str(_relative_to(path.parent, image)) for image in images], prompt))
    if not requests:
        raise ValueError(f"{path} holds no requests")
    return requests


def _read_utf8(path: Path) -> str:
    """The file's text; a file in another encoding fails naming its line (the codec's message names neither)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text ({error.reason} at byte {error.start})") from error


def _parse_request(item: Any) -> tuple[list[str], str]:
    """One JSONL object -> (image paths, prompt); ValueError naming the offending key otherwise."""
    if not isinstance(item, dict):
        raise ValueError(f"expected a {{image|images, prompt}} object, got {type(item).__name__}")
    unknown = [key for key in item if key not in REQUEST_KEYS]
    if unknown:
        names = ", ".join(repr(key) for key in unknown)
        raise ValueError(f"unknown key{'s' * (len(unknown) > 1)} {names} (expected {', '.join(REQUEST_KEYS)})")
    if "image" in item and "images" in item:
        raise ValueError("give 'image' or 'images', not both")
    if not item:
        raise ValueError("empty request: give 'image', 'images' or 'prompt'")
    images = [item["image"]] if "image" in item else item.get("images", [])
    key = "image" if "image" in item else "images"
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise ValueError(f"'{key}' must be {'a path' if key == 'image' else 'a list of paths'}")
    if any(not image.strip() for image in images):
        raise ValueError(f"'{key}' holds an empty image path")
    prompt = item.get("prompt", DEFAULT_PROMPT)
    if not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    return images, prompt


def _relative_to(folder: Path, image: Any) -> Path:
    path = Path(str(image)).expanduser()
    return path if path.is_absolute() else folder / path


def check_image_paths(pairs: list[tuple[list[str], str]]) -> None:
    for images, _ in pairs:
        for image in images:
            if not Path(image).is_file():
                raise FileNotFoundError(f"image not found: {image}")


def load_images(pairs: list[tuple[list[str], str]]) -> list[Any]:
    """Decode every image up front, so that a bad path fails before the model loads; one decode per path."""
    from dualtower.data.images import load_image
    from dualtower.generation import GenerationRequest

    decoded: dict[str, Any] = {}
    for images, _ in pairs:
        for image in images:
            if image not in decoded:
                decoded[image] = load_image(image)
    return [GenerationRequest([decoded[image] for image in images], prompt) for images, prompt in pairs]


# -- model --------------------------------------------------------------------------------------------------


def check_checkpoint(checkpoint: str, config: str | None) -> None:
    """Fail fast on a local path that does not exist; anything else may be a Hub repo id ("owner/name")."""
    path = Path(checkpoint).expanduser()
    looks_local = checkpoint.startswith(("/", ".", "~")) or checkpoint.count("/") != 1 or path.suffix != ""
    if not path.exists() and looks_local:
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if config is not None and not Path(config).expanduser().is_file():
        raise FileNotFoundError(f"config not found: {config}")


def pick_device(name: str) -> Any:
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device available")
    if name == "mps" and not has_mps:
        raise RuntimeError("--device mps: MPS is not available")
    return torch.device(name)


def load_model(args: argparse.Namespace, device: Any) -> tuple[Any, Any]:
    import torch

    from dualtower.adapters.common import resolve_source
    from dualtower.hub import parse_dtype
    from dualtower.model import DualTowerVLM
    from dualtower.tokenizer import load_tokenizer

    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = parse_dtype(args.dtype)
    # Resolved once: a Hub id becomes its downloaded snapshot, which also holds the checkpoint's tokenizer.
    source = resolve_source(args.checkpoint)
    model = DualTowerVLM.from_pretrained(
        source, config_path=args.config, device=device, dtype=dtype, architecture=args.architecture
    )
    model.requires_grad_(False)
    checkpoint_dir = source if source.is_dir() else source.parent
    tokenizer = load_tokenizer(checkpoint_dir, tokenizer_id=model.cfg.tokenizer_id)
    return model, tokenizer


# -- main ---------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    # Cheap checks before the heavy imports, so that a typo fails in a fraction of a second.
    check_checkpoint(args.checkpoint, args.config)
    pairs = read_requests_file(args.requests) if args.requests else pair_requests(args.image, args.prompt)
    check_image_paths(pairs)
    from dualtower.generation import Generator, SamplingConfig
    from dualtower.generation.sampling import batch_seed

    requests = load_images(pairs)
    device = pick_device(args.device)
    model, tokenizer = load_model(args, device)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sampling,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_strings=tuple(args.stop),
    )
    generator = Generator(
        model,
        tokenizer,
        compile=args.compile,
        compile_prefill=args.compile,
        cuda_graph=device.type == "cuda" and not args.no_cuda_graph,
        sampler=args.sampler,
        sync_every=1 if args.stream else None,
    )
    # Streaming prints one request at a time; otherwise requests go in batches.
    batch_size = 1 if args.stream else args.batch_size
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        on_text = _StrippedPrinter() if args.stream else None
        batch_sampling = dataclasses.replace(sampling, seed=batch_seed(args.seed, start))
        if args.profile is not None and start == 0:
            from dualtower.generation.profiling import GenerationProfiler

            results = GenerationProfiler(args.profile, args.profile_steps).run(
                generator,
                functools.partial(generator.generate, batch, batch_sampling, on_text=on_text),
                warm_up=functools.partial(generator.generate, batch, batch_sampling),  # the warm-up prints nothing
            )
        else:
            results = generator.generate(batch, batch_sampling, on_text=on_text)
        for index, result in enumerate(results, start=start):
            sys.stdout.write(_output_line(index, result, args))
        sys.stdout.flush()
        if args.stats:
            sys.stderr.write(f"stats: {generator.stats.summary()}\n")


def _output_line(index: int, result: Any, args: argparse.Namespace) -> str:
    if args.jsonl:  # the exact text: newlines inside it stay inside one JSON line
        record = {
            "index": index, "text": result.text, "finish_reason": result.finish_reason, "tokens": len(result.token_ids)
        }
        return json.dumps(record, ensure_ascii=False) + "\n"
    return "\n" if args.stream else result.text.strip() + "\n"


class _StrippedPrinter:
    """Streams one request's text as plain output prints it, stripped: leading whitespace is dropped, and
    whitespace is held back until more text follows it, so trailing whitespace is never printed."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""  # whitespace seen after the last printed character

    def __call__(self, row: int, text: str) -> None:
        text = self.pending + text
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self.pending = text[len(body) :]
        if body:
            self.started = True
            _print_delta(row, body)


def _print_delta(row: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a CLI reports any failure in one line; --verbose keeps the traceback
        if args.verbose:
            logger.exception("generation failed")
        sys.stderr.write(error_line(error) + "\n")
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
