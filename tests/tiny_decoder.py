"""A tiny random Llama with SmolLM2's real tokenizer (and chat template), for tests of the serving
and evaluation paths: real prompts, fast steps."""

from __future__ import annotations

import jax

from compress.formats import hf_decoder
from compress.formats.registry import resolve
from compress.formats.tokenizer import load_tokenizer
from compress.models import decoder


def tiny_decoder(*, with_eos: bool = False, seed: int = 0, **overrides):
    """(config, params, tokenizer). Without EOS (the default) it generates until max_new_tokens."""
    tokenizer = load_tokenizer(resolve("smollm2-135m-instruct"))
    eos = dict(eos_token_ids=(tokenizer.eos_token_id,), bos_token_id=tokenizer.bos_token_id) if with_eos else {}
    config = decoder.DecoderConfig(vocab_size=len(tokenizer), architecture="llama", **{**eos, **overrides})
    return config, decoder.init_params(config, jax.random.key(seed), scale=0.1), tokenizer


def export_tiny_decoder(path: str, **kwargs) -> str:
    """tiny_decoder(**kwargs) written to `path` as a Hugging Face directory; returns the path."""
    config, params, tokenizer = tiny_decoder(**kwargs)
    hf_decoder.export(params, config, path, tokenizer=tokenizer)
    return path
