"""Tokenizers for decoders: a Hugging Face directory's own, or one built from GGUF metadata.

Building a tokenizer from GGUF metadata (transformers' converter) takes seconds, so the
result is cached as a tokenizer directory under the press cache (`$PRESS_CACHE_DIR`,
default `~/.cache/press`), keyed by the file's path, size and modification time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from compress.formats.tensor_source import FormatError
from compress.formats.registry import ModelLocation


def cache_root() -> str:
    return os.environ.get("PRESS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "press")


def _gguf_cache_dir(path: str) -> str:
    stat = os.stat(path)
    key = f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    return os.path.join(cache_root(), "tokenizers", hashlib.sha256(key.encode()).hexdigest()[:24])


def load_tokenizer(location: ModelLocation, use_cache: bool = True):
    """The transformers tokenizer (chat template included) for a resolved model."""
    from transformers import AutoTokenizer

    if location.format == "hf":
        try:
            return AutoTokenizer.from_pretrained(location.path)
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"{location.path}: cannot load the tokenizer: {e}") from e
    cached = _gguf_cache_dir(location.path)
    if use_cache and os.path.exists(os.path.join(cached, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(cached)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(location.path)), gguf_file=os.path.basename(location.path)
        )
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{location.path}: cannot build a tokenizer from the GGUF metadata: {e}") from e
    if use_cache:
        try:  # write beside, then rename: a crash never leaves a half-written cache entry
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp = tempfile.mkdtemp(dir=os.path.dirname(cached))
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, cached)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a read-only cache only costs speed
    return tokenizer
