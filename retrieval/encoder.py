"""Texts to unit-length sentence embeddings with a BERT encoder (e.g. all-MiniLM-L6-v2).

Batches are padded to a fixed number of rows and to one of a few lengths (powers of two
from 16 up to the maximum), so the jitted encoder compiles once per length bucket and
never again, however the texts vary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compress import registry
from compress.formats.hf_bert import load_encoder
from compress.formats.tensor_source import FormatError
from compress.models import encoder
from compress.models.decoder import DTYPES

MIN_BUCKET = 16


def length_buckets(max_length: int) -> tuple[int, ...]:
    """Padded lengths: powers of two from 16 below max_length, then max_length itself."""
    buckets, n = [], MIN_BUCKET
    while n < max_length:
        buckets.append(n)
        n *= 2
    return (*buckets, max_length)


def _sentence_transformers_settings(model_dir: str) -> dict[str, Any]:
    """max_seq_length from sentence_bert_config.json, and a check that pooling is mean pooling."""
    settings: dict[str, Any] = {}
    path = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.exists(path):
        with open(path) as f:
            settings = json.load(f)
    pooling_path = os.path.join(model_dir, "1_Pooling", "config.json")
    if os.path.exists(pooling_path):
        with open(pooling_path) as f:
            pooling = json.load(f)
        modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True)
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"{pooling_path}: pooling {modes} is not supported; SentenceEncoder mean-pools only")
    return settings


class SentenceEncoder:
    """Encodes lists of texts into float32 [n, D] unit vectors.

    Build one with `SentenceEncoder.from_dir`; `encode` is the whole interface.
    """

    def __init__(self, config: encoder.EncoderConfig, params: Any, tokenizer, *, max_length: int, batch_size: int):
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length={max_length} exceeds the model's {config.max_position_embeddings} positions")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; it must be at least 1")
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.buckets = length_buckets(max_length)
        self.pad_id = tokenizer.pad_token_id or 0

        def embed_batch(params, tokens, mask):  # [B, T], [B, T] -> [B, D]
            return encoder.embed(params, tokens, config, attention_mask=mask)

        # One jitted function; it compiles once per length bucket (the batch size is fixed).
        self.embed_batch = jax.jit(embed_batch)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "all-minilm-l6-v2", **kwargs) -> "SentenceEncoder":
        """A bundled encoder name (see `press models`) or a sentence-transformers directory."""
        location = registry.resolve(name_or_path)
        if location.format != "hf":
            raise FormatError(f"{location.path}: sentence encoders load from Hugging Face directories, not GGUF")
        return cls.from_dir(location.path, **kwargs)

    @classmethod
    def from_dir(
        cls, model_dir: str, *, dtype: str = "float32", max_length: int = 256, batch_size: int = 64
    ) -> "SentenceEncoder":
        """Load a Hugging Face / sentence-transformers BERT directory.

        Args:
          model_dir: holds config.json, model.safetensors and the tokenizer files.
          dtype: compute dtype ('float32', 'bfloat16', 'float16'); embeddings are float32 anyway.
          max_length: tokens kept per text; lowered to sentence_bert_config.json's
            max_seq_length and to the model's position table when those are smaller.
          batch_size: rows per forward pass (short batches are padded to it).
        """
        import transformers

        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
        config, params = load_encoder(model_dir)
        config = dataclasses.replace(config, dtype=dtype)
        settings = _sentence_transformers_settings(model_dir)
        max_length = min(max_length, settings.get("max_seq_length") or max_length, config.max_position_embeddings)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        return cls(config, params, tokenizer, max_length=max_length, batch_size=batch_size)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings of `texts`: float32 [len(texts), D], in the input order."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text as [text]")
        texts = list(texts)
        out = np.zeros((len(texts), self.config.embed_dim), np.float32)
        if not texts:
            return out
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        # Longest first, so each batch holds similar lengths and pads little.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            length = next(b for b in self.buckets if b >= len(ids[rows[0]]))
            tokens = np.full((self.batch_size, length), self.pad_id, np.int32)  # [B, T]
            mask = np.zeros((self.batch_size, length), np.int32)  # [B, T]
            for r, i in enumerate(rows):
                tokens[r, : len(ids[i])] = ids[i]
                mask[r, : len(ids[i])] = 1
            vectors = self.embed_batch(self.params, jnp.asarray(tokens), jnp.asarray(mask))  # [B, D]
            out[rows] = np.asarray(vectors)[: len(rows)]
        return out
