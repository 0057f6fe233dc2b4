"""Texts to unit-length sentence embeddings with a BERT encoder (e.g. all-MiniLM-L6-v2).

Batches are padded to a fixed number of rows and to one of a few lengths (powers of two
from 16 up to the maximum), so the jitted encoder compiles once per length bucket and
never again, however the texts vary.

With several local devices the batch is split over them (data parallel): the mesh is
`make_mesh(data=-1, fsdp=1, tensor=1)`, parameters are replicated, the rows of each padded
batch go to the devices by `batch_sharding`, and the batch size is rounded up to a multiple
of the device count so every device gets the same number of rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from compress.errors import InputError, check_unicode
from compress.formats import registry
from compress import sharding as shd
from compress.formats.hf_bert import load_encoder
from compress.formats.tensor_source import FormatError
from compress.models import encoder
from compress.models.params import DTYPES
from compress.quant import schemes
from compress.quant.weights import quantize_params

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
            raise InputError(f"{pooling_path}: pooling {modes} is not supported; SentenceEncoder mean-pools only")
    return settings


class SentenceEncoder:
    """Encodes lists of texts into float32 [n, D] unit vectors.

    Build one with `SentenceEncoder.from_pretrained` or `from_dir`; `encode` embeds texts and
    `token_spans` gives the character spans of a text's tokens (for chunking by tokens).
    Thread-safe: the tokenizer is used under a lock.

    Args:
      config, params: the BERT encoder (compress/models/encoder.py).
      tokenizer: its Hugging Face fast tokenizer (character offsets are needed).
      max_length: tokens kept per text, [CLS] and [SEP] included.
      batch_size: rows per forward pass (short batches are padded to it); rounded up to a
        multiple of the mesh's data-parallel size.
      name: what the encoder is called (its bundled name or directory); indexes record it.
      mesh: devices to split each batch over. None: every local device when there are
        several, else a single device without a mesh.
      quantization: the scheme `params` were quantized with, if any (indexes record it).
    """

    def __init__(
        self,
        config: encoder.EncoderConfig,
        params: Any,
        tokenizer,
        *,
        max_length: int,
        batch_size: int,
        name: str = "encoder",
        mesh: jax.sharding.Mesh | None = None,
        quantization: str | None = None,
    ):
        if max_length > config.max_position_embeddings:
            raise InputError(f"max_length={max_length} exceeds the model's {config.max_position_embeddings} positions")
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size}; it must be at least 1")
        if mesh is None and len(jax.local_devices()) > 1:
            mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1, devices=jax.local_devices())
        self.config = config
        self.tokenizer = tokenizer
        self.name = name
        self.quantization = quantization
        self.mesh = mesh
        self.max_length = max_length
        replicas = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-batch_size // replicas) * replicas  # every device gets the same rows
        self.buckets = length_buckets(max_length)
        self.pad_id = tokenizer.pad_token_id or 0
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share between threads
        if mesh is None:
            self.params, self._rows = params, None
        else:
            self.params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))  # replicated
            self._rows = shd.batch_sharding(mesh, 2, (self.batch_size, 1))

        def embed_batch(params, tokens, mask):  # [B, T], [B, T] -> [B, D]
            return encoder.embed(params, tokens, config, attention_mask=mask)

        # One jitted function; it compiles once per length bucket (the batch size is fixed).
        self.embed_batch = jax.jit(embed_batch)

    @property
    def dim(self) -> int:
        """D, the length of each embedding."""
        return self.config.embed_dim

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character (start, end) of each of `text`'s tokens, special tokens excluded, untruncated."""
        check_unicode(text, "the text")
        with self._tokenizer_lock:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False,
                                     verbose=False)
        return [(int(a), int(b)) for a, b in encoded["offset_mapping"]]

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without [CLS]/[SEP]: it fits in `encode` if this is <= max_length - 2."""
        return len(self.token_spans(text))

    @classmethod
    def from_pretrained(cls, name_or_path: str = "all-minilm-l6-v2", **kwargs) -> "SentenceEncoder":
        """A bundled encoder name (see `press models`) or a sentence-transformers directory."""
        location = registry.resolve(name_or_path)
        if location.format != "hf":
            raise FormatError(f"{location.path}: sentence encoders load from Hugging Face directories, not GGUF")
        return cls.from_dir(location.path, name=name_or_path, **kwargs)

    @classmethod
    def from_dir(
        cls,
        model_dir: str,
        *,
        dtype: str = "float32",
        max_length: int = 256,
        batch_size: int = 32,
        name: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
        quantization: str | None = None,
    ) -> "SentenceEncoder":
        """Load a Hugging Face / sentence-transformers BERT directory.

        Args:
          model_dir: holds config.json, model.safetensors and the tokenizer files.
          dtype: compute dtype ('float32', 'bfloat16', 'float16'); embeddings are float32 anyway.
          max_length: tokens kept per text; lowered to sentence_bert_config.json's
            max_seq_length and to the model's position table when those are smaller.
          batch_size: rows per forward pass (short batches are padded to it).
          name: recorded in indexes built with it (default: model_dir).
          mesh: devices to split batches over (default: all local devices).
          quantization: a weight scheme of compress/quant/schemes.py ('int8', 'int4-g32', ...)
            applied to every projection: the matmuls then run on the integer weights.
        """
        import transformers

        if dtype not in DTYPES:
            raise InputError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
        config, params = load_encoder(model_dir)
        config = dataclasses.replace(config, dtype=dtype)
        if quantization is not None:
            scheme = schemes.get(quantization)
            if not scheme.quantizes_weights or scheme.calibration is not None:
                raise InputError(f"encoder quantization {quantization!r}: choose a weight scheme without "
                                 "calibration (int8, w8a8, int4-gN[-asym])")
            params = quantize_params(params, encoder.PROJECTIONS, scheme)
        settings = _sentence_transformers_settings(model_dir)
        max_length = min(max_length, settings.get("max_seq_length") or max_length, config.max_position_embeddings)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        return cls(config, params, tokenizer, max_length=max_length, batch_size=batch_size,
                   name=name or model_dir, mesh=mesh, quantization=quantization)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings of `texts`: float32 [len(texts), D], in the input order."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text as [text]")
        texts = list(texts)
        out = np.zeros((len(texts), self.config.embed_dim), np.float32)
        if not texts:
            return out
        for i, text in enumerate(texts):  # a query of bytes that are not UTF-8 (argv) raised a TypeError
            if isinstance(text, str):
                check_unicode(text, f"text {i}" if len(texts) > 1 else "the text")
        with self._tokenizer_lock:
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
            if self._rows is None:
                tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
            else:  # rows split over the devices
                tokens, mask = jax.device_put(tokens, self._rows), jax.device_put(mask, self._rows)
            vectors = self.embed_batch(self.params, tokens, mask)  # [B, D]
            out[rows] = np.asarray(vectors)[: len(rows)]
        return out
