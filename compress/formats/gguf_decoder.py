"""Llama-family decoders stored as GGUF: config from metadata, tensors by llama.cpp names.

llama.cpp's converter permutes the rows of Q and K (Llama and Mistral, not Qwen2)
so that RoPE rotates interleaved pairs; press rotates halves like Hugging Face, so
those rows are permuted back on import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compress.formats.gguf_file import GGUFFile
from compress.formats.tensor_source import FormatError
from compress.models.decoder import DecoderConfig
from compress.models.rope import RopeScaling
from compress.formats.placement import Recipe, per_layer

GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def config_from_gguf(f: GGUFFile) -> DecoderConfig:
    arch = f.require("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise FormatError(
            f"{f.path}: architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    key = lambda k: f"{arch}.{k}"  # noqa: E731
    heads = int(f.require(key("attention.head_count")))
    embed = int(f.require(key("embedding_length")))
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = f.get(key("vocab_size")) or (len(tokens) if tokens else None)
    if vocab is None:
        vocab = f.shape("token_embd.weight")[0]
    head_dim = int(f.get(key("attention.key_length")) or f.get(key("rope.dimension_count")) or embed // heads)
    scaling = None
    kind = f.get(key("rope.scaling.type"))
    if kind in ("linear", "yarn"):
        scaling = RopeScaling(
            kind=kind,
            factor=float(f.require(key("rope.scaling.factor"))),
            original_max_position_embeddings=int(f.get(key("rope.scaling.original_context_length"), 0) or 0)
            or int(f.require(key("context_length"))),
        )
    elif kind not in (None, "none"):
        raise FormatError(f"{f.path}: rope scaling type {kind!r} is not supported")
    if "rope_freqs.weight" in f.names():
        raise FormatError(
            f"{f.path}: tensor 'rope_freqs.weight' (Llama 3.1 style frequency factors) is not supported from GGUF yet; "
            "load the model's Hugging Face directory instead"
        )
    eos = f.get("tokenizer.ggml.eos_token_id")
    return DecoderConfig(
        vocab_size=int(vocab),
        embed_dim=embed,
        mlp_dim=int(f.require(key("feed_forward_length"))),
        num_layers=int(f.require(key("block_count"))),
        num_heads=heads,
        num_kv_heads=int(f.get(key("attention.head_count_kv")) or heads),
        head_dim=head_dim,
        rms_norm_eps=float(f.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
        rope_theta=float(f.get(key("rope.freq_base"), 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(f.get(key("context_length"), 2048)),
        tie_word_embeddings="output.weight" not in f.names(),
        qkv_bias="blk.0.attn_q.bias" in f.names(),
        o_bias="blk.0.attn_output.bias" in f.names(),
        architecture=GGUF_ARCHITECTURES[arch],
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=f.get("tokenizer.ggml.padding_token_id"),
    )


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def decoder_recipes(c: DecoderConfig, permuted_qk: bool) -> dict[str, Any]:
    """Recipes mapping press parameters to GGUF tensor names (weights stored [out, in])."""
    L, D, H = c.num_layers, c.embed_dim, c.head_dim

    def qk(heads):
        if permuted_qk:
            return lambda w: unpermute_rows(w, heads).T.reshape(D, heads, H)
        return lambda w: w.T.reshape(D, heads, H)

    def qk_bias(heads):
        if permuted_qk:
            return lambda b: unpermute_rows(b, heads).reshape(heads, H)
        return lambda b: b.reshape(heads, H)

    def proj(name, transform, bias_transform=None, bias=False):
        p = {"kernel": Recipe(per_layer(f"blk.{{i}}.{name}.weight", L), transform)}
        if bias:
            p["bias"] = Recipe(per_layer(f"blk.{{i}}.{name}.bias", L), bias_transform or (lambda b: b))
        return p

    N, K = c.num_heads, c.num_kv_heads
    recipes = {
        "embed": Recipe("token_embd.weight"),
        "layers": {
            "attn_norm": Recipe(per_layer("blk.{i}.attn_norm.weight", L)),
            "q": proj("attn_q", qk(N), qk_bias(N), c.qkv_bias),
            "k": proj("attn_k", qk(K), qk_bias(K), c.qkv_bias),
            "v": proj("attn_v", lambda w: w.T.reshape(D, K, H), lambda b: b.reshape(K, H), c.qkv_bias),
            "o": proj("attn_output", lambda w: w.T.reshape(N, H, D), None, c.o_bias),
            "mlp_norm": Recipe(per_layer("blk.{i}.ffn_norm.weight", L)),
            "gate": proj("ffn_gate", lambda w: w.T),
            "up": proj("ffn_up", lambda w: w.T),
            "down": proj("ffn_down", lambda w: w.T),
        },
        "final_norm": Recipe("output_norm.weight"),
    }
    if not c.tie_word_embeddings:
        recipes["lm_head"] = {"kernel": Recipe("output.weight", lambda w: w.T)}
    return recipes
