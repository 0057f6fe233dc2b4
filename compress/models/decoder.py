"""A Llama-family causal decoder as pure functions over a parameter pytree.

Covers Llama 2/3, Mistral, Qwen2 (biased q/k/v) and SmolLM2: RMSNorm, RoPE with
scaling, grouped-query attention, SwiGLU, tied or untied embeddings. For training, a row
may pack several documents (`segment_ids`, `positions`: attention stays inside each) and
the layer scan may rematerialise activations (`remat`).

Glossary of axes (one letter each in einsums):
  B batch            T query positions     S key slots (cache length)
  D embed (model)    F mlp hidden          V vocabulary
  N query heads      K key/value heads     H head_dim
  L layers (stacked, scanned)

Parameters (logical axes in brackets; `layers` leaves are stacked over L):
  embed                    [vocab, embed]
  layers/attn_norm         [layers, norm]
  layers/q/kernel          [layers, embed, heads, head_dim]     (+ bias [layers, heads, head_dim])
  layers/k/kernel          [layers, embed, kv_heads, head_dim]  (+ bias)
  layers/v/kernel          [layers, embed, kv_heads, head_dim]  (+ bias)
  layers/o/kernel          [layers, heads, head_dim, embed]     (+ bias [layers, embed])
  layers/mlp_norm          [layers, norm]
  layers/gate/kernel       [layers, embed, mlp]
  layers/up/kernel         [layers, embed, mlp]
  layers/down/kernel       [layers, mlp, embed]
  final_norm               [norm]
  lm_head/kernel           [embed, vocab]   (absent when embeddings are tied)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from compress.models import attention as attn
from compress.models import layer_scan
from compress.models import params as params_lib
from compress.models.linear import dense
from compress.models.params import DTYPES, ParamSpec
from compress.models.rope import RopeScaling, apply_rope, inverse_frequencies, rope_tables

ARCHITECTURES = ("llama", "mistral", "qwen2")

# Rematerialisation of the layer scan (`forward(..., remat=...)`): what the backward pass keeps
# of each layer instead of recomputing it. "none" (not listed) keeps every activation.
REMAT_POLICIES = {
    "full": None,  # keep only each layer's input; recompute the whole layer
    # keep the projections' outputs; recompute attention (batched dots) and elementwise ops
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_NAMES = ("none", *REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and numerics of a decoder. Field names follow the glossary above."""

    vocab_size: int = 256  # V
    embed_dim: int = 64  # D, the residual stream width
    mlp_dim: int = 128  # F, the SwiGLU hidden width
    num_layers: int = 2  # L
    num_heads: int = 4  # N
    num_kv_heads: int = 2  # K; N must be a multiple of K
    head_dim: int = 16  # H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # Mistral v0.1 style local attention
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # Llama with attention_bias=True
    mlp_bias: bool = False
    architecture: str = "llama"  # one of ARCHITECTURES; decides the export format
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    param_dtype: str = "float32"  # storage dtype of parameters
    dtype: str = "float32"  # compute dtype of activations (logits are always float32)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r}; choose one of {', '.join(DTYPES)}")


# The einsum of every projection (activations, kernel -> output). Transforms of the
# parameters (quantization, adapters) read it to know which kernel axes are contracted.
PROJECTIONS = {
    "q": "BTD,DNH->BTNH",
    "k": "BTD,DKH->BTKH",
    "v": "BTD,DKH->BTKH",
    "o": "BTNH,NHD->BTD",
    "gate": "BTD,DF->BTF",
    "up": "BTD,DF->BTF",
    "down": "BTF,FD->BTD",
    "lm_head": "BTD,DV->BTV",
}
CALL_ORDER = ("q", "k", "v", "o", "gate", "up", "down")  # the order decoder_layer calls a layer's projections in


def param_specs(c: DecoderConfig) -> dict[str, Any]:
    """The parameter tree's shapes, logical axes and initialisers, from the config alone."""
    L, D, F, V, N, K, H = c.num_layers, c.embed_dim, c.mlp_dim, c.vocab_size, c.num_heads, c.num_kv_heads, c.head_dim

    def proj(shape, axes, bias_shape=None, bias_axes=None, with_bias=False):
        p = {"kernel": ParamSpec(shape, axes, "normal")}
        if with_bias:
            p["bias"] = ParamSpec(bias_shape, bias_axes, "zeros")
        return p

    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "q": proj((L, D, N, H), ("layers", "embed", "heads", "head_dim"), (L, N, H), ("layers", "heads", "head_dim"), c.qkv_bias),
        "k": proj((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), (L, K, H), ("layers", "kv_heads", "head_dim"), c.qkv_bias),
        "v": proj((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), (L, K, H), ("layers", "kv_heads", "head_dim"), c.qkv_bias),
        "o": proj((L, N, H, D), ("layers", "heads", "head_dim", "embed"), (L, D), ("layers", "embed"), c.o_bias),
        "mlp_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "gate": proj((L, D, F), ("layers", "embed", "mlp"), (L, F), ("layers", "mlp"), c.mlp_bias),
        "up": proj((L, D, F), ("layers", "embed", "mlp"), (L, F), ("layers", "mlp"), c.mlp_bias),
        "down": proj((L, F, D), ("layers", "mlp", "embed"), (L, D), ("layers", "embed"), c.mlp_bias),
    }
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": layers,
        "final_norm": ParamSpec((D,), ("norm",), "ones"),
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = {"kernel": ParamSpec((D, V), ("embed", "vocab"), "normal")}
    return specs


def param_axes(c: DecoderConfig) -> dict[str, Any]:
    """Logical axis names of every parameter, in the parameter tree's structure."""
    return params_lib.axes(param_specs(c))


def param_shapes(c: DecoderConfig) -> dict[str, Any]:
    """jax.ShapeDtypeStruct of every parameter (no memory allocated)."""
    return params_lib.shapes(param_specs(c), DTYPES[c.param_dtype])


def init_params(c: DecoderConfig, rng: jax.Array, scale: float = 0.02) -> dict[str, Any]:
    """Random parameters (normal(0, scale) matrices, unit norm scales, zero biases).

    To create them already sharded, jit this with `out_shardings`.
    """
    return params_lib.initialise(param_specs(c), rng, DTYPES[c.param_dtype], scale)


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
    """RMSNorm over the last axis, normalised in float32 and scaled in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def decoder_layer(p: dict[str, Any], x: jnp.ndarray, c: DecoderConfig, cos, sin, attend) -> tuple[jnp.ndarray, dict]:
    """One pre-norm layer: x + attention, then x + SwiGLU MLP.

    Args:
      p: one layer's parameters (a slice of `layers`).
      x: [B, T, D] residual stream.
      cos, sin: [B, T, H] rotary tables of the T positions.
      attend: (q [B, T, N, H], k, v [B, T, K, H]) -> [B, T, N, H]; owns masking and any cache.
    Returns:
      The new residual stream [B, T, D] and the input of every projection by name (what
      calibration needs, e.g. GPTQ's Hessians; unused outputs cost nothing under jit).
    """
    h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)  # [B, T, D]
    q = apply_rope(dense(p["q"], h, PROJECTIONS["q"]), cos, sin)  # [B, T, N, H]
    k = apply_rope(dense(p["k"], h, PROJECTIONS["k"]), cos, sin)  # [B, T, K, H]
    v = dense(p["v"], h, PROJECTIONS["v"])  # [B, T, K, H]
    y = attend(q, k, v)  # [B, T, N, H]
    x = x + dense(p["o"], y, PROJECTIONS["o"])
    h_mlp = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
    hidden = jax.nn.silu(dense(p["gate"], h_mlp, PROJECTIONS["gate"])) * dense(p["up"], h_mlp, PROJECTIONS["up"])  # [B, T, F]
    x = x + dense(p["down"], hidden, PROJECTIONS["down"])
    inputs = {"q": h, "k": h, "v": h, "o": y, "gate": h_mlp, "up": h_mlp, "down": hidden}
    return x, inputs


class Capture(NamedTuple):
    """What a forward pass keeps from inside its layers (for distillation losses), by layer number.

    hidden: residual streams, numbered as Hugging Face's hidden_states: 0 is the embedding
      output, i (1..L) the output of layer i (0-based layer i - 1).
    attention: attention probabilities of these layers (0-based), [B, N, T, S] each; only the
      captured layers compute them (each runs outside the scan, the others stay in it).
    """

    hidden: tuple[int, ...] = ()
    attention: tuple[int, ...] = ()


class DecoderOutput(NamedTuple):
    logits: jnp.ndarray  # [B, T, V] float32
    cache: attn.KVCache | None  # the updated cache when one was passed in
    hidden_states: jnp.ndarray | None  # [L+1, B, T, D] residual stream after embedding and each layer
    captured: dict[str, jnp.ndarray] | None = None  # Capture's: "hidden" [n, B, T, D], "attention" [m, B, N, T, S]


class LayerTables(NamedTuple):
    """What every layer of a cache-free pass shares: rotary tables and the attention mask."""

    cos: jnp.ndarray  # [B, T, H]
    sin: jnp.ndarray  # [B, T, H]
    allowed: jnp.ndarray  # [B, T, S=T] bool

    def attend(self, q, k, v):
        """Causal attention of the pass's own T positions: [B, T, N, H]."""
        return attn.causal_attention(q, k, v, self.allowed)


def layer_tables(
    config: DecoderConfig,
    attention_mask: jnp.ndarray,
    *,
    segment_ids: jnp.ndarray | None = None,
    positions: jnp.ndarray | None = None,
) -> LayerTables:
    """The tables `forward` builds for tokens without a cache (see its arguments); also the
    hook for walking the layers one at a time (`embed`, then `decoder_layer` with
    `tables.attend`), as calibration does."""
    c = config
    mask = attention_mask.astype(bool)  # [B, T]
    b, t = mask.shape
    key_valid = mask if segment_ids is None else mask & (segment_ids != 0)  # [B, S=T]
    if positions is None and segment_ids is not None:
        positions = segment_positions(segment_ids)  # [B, T]
    elif positions is None:
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B, T]
    query_slots = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))  # [B, T]
    allowed = attn.attention_mask(query_slots, key_valid, c.sliding_window)  # [B, T, T]
    if segment_ids is not None:
        allowed &= attn.same_segment(segment_ids)
    inv_freq, attention_factor = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    return LayerTables(*rope_tables(positions, inv_freq, attention_factor), allowed)


def embed(params: dict[str, Any], tokens: jnp.ndarray, config: DecoderConfig) -> jnp.ndarray:
    """The residual stream entering layer 0: [B, T, D] in the compute dtype. A quantized table
    (`press quantize` with an embed-* option) is a projection dict holding the tied head's
    kernel [D, V]; its static spec reads the rows at `tokens` from the integers (a float table
    served on the CPU kernels is stored the same way: compress/quant/matmul.py native_float)."""
    table = params["embed"]
    if isinstance(table, dict):
        return table["spec"].take(table, tokens).astype(DTYPES[config.dtype])
    return jnp.take(table, tokens, axis=0).astype(DTYPES[config.dtype])


def segment_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """[B, T] position of each token within its contiguous run of equal segment ids, from 0."""
    b, t = segment_ids.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))  # [B, T]
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)  # [B, T]
    return slots - jax.lax.cummax(jnp.where(starts, slots, 0), axis=1)


def init_cache(c: DecoderConfig, batch: int, max_len: int, dtype=None, quantized: bool = False) -> attn.KVCache:
    """An empty key/value cache of `max_len` slots per row (int8 with per-head scales if quantized)."""
    return attn.KVCache.zeros(
        c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, dtype or DTYPES[c.dtype], quantized=quantized
    )


def forward(
    params: dict[str, Any],
    tokens: jnp.ndarray,
    config: DecoderConfig,
    *,
    attention_mask: jnp.ndarray | None = None,
    cache: attn.KVCache | None = None,
    return_hidden: bool = False,
    attend_len: int | None = None,
    last_logits_only: bool = False,
    segment_ids: jnp.ndarray | None = None,
    positions: jnp.ndarray | None = None,
    remat: str = "none",
    capture: Capture | None = None,
) -> DecoderOutput:
    """Run the decoder.

    Args:
      params: the parameter tree described in the module docstring.
      tokens: [B, T] int token ids.
      config: the model's DecoderConfig.
      attention_mask: [B, T] 1 for real tokens, 0 for padding (left padding for batches
        of different lengths). Defaults to all ones.
      cache: a KVCache to append to; without one the T tokens attend among themselves.
      return_hidden: also return the residual stream after every layer (for distillation).
      attend_len: with a cache, attend over its first `attend_len` slots only (static; every
        row's slots in use must lie below it). Tokens may cover only the first B rows of a
        cache with more rows; the others are left as they are.
      last_logits_only: logits of the last position only ([B, 1, V]): what a prefill needs,
        without the LM head's cost over every prompt position.
      segment_ids: [B, T] int, packed rows (no cache): the document of each token, contiguous
        runs numbered from 1, 0 for padding. A token attends only to earlier tokens of its own
        document; padding attends to nothing real and nothing attends to it.
      positions: [B, T] int, packed rows (no cache): RoPE position of each token. Defaults to
        counting from 0 at the start of each segment (with segment_ids) or of the real tokens.
      remat: what the backward pass recomputes per layer: "none", "full" (the whole layer) or
        "dots" (all but the projections' outputs); see REMAT_POLICIES.
      capture: hidden states and attention probabilities of chosen layers to return (no cache).

    Returns:
      DecoderOutput with float32 logits [B, T, V], the updated cache (or None), the
      hidden states (or None) and what `capture` asked for (or None).
    """
    c = config
    dtype = DTYPES[c.dtype]
    b, t = tokens.shape
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if remat not in REMAT_NAMES:
        raise ValueError(f"remat={remat!r}; choose one of {', '.join(REMAT_NAMES)}")
    if cache is not None and (segment_ids is not None or positions is not None):
        raise ValueError("segment_ids and positions describe packed rows, which run without a cache; pass no cache")
    capture = capture or Capture()
    if cache is not None and capture != Capture():
        raise ValueError("capture is for passes without a cache (training, calibration)")
    _check_layers(capture.hidden, c.num_layers + 1, "capture.hidden")
    _check_layers(capture.attention, c.num_layers, "capture.attention")

    if cache is None:
        cos, sin, allowed = layer_tables(c, mask, segment_ids=segment_ids, positions=positions)
    else:
        if b > cache.index.shape[0]:
            raise ValueError(f"{b} token rows for a cache of {cache.index.shape[0]} rows")
        width = cache.max_len if attend_len is None else min(attend_len, cache.max_len)
        start, past = cache.index[:b], cache.lengths[:b]
        row_valid = attn.write_rows(cache.valid[:b], mask, start)  # [B, S]
        positions = past[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B, T]
        query_slots = start[:, None] + jnp.arange(t)[None, :]  # [B, T]
        allowed = attn.attention_mask(query_slots, row_valid[:, :width], c.sliding_window)  # [B, T, W]
        cos, sin = rope_tables(positions, *inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling))  # [B, T, H]

    x = embed(params, tokens, c)  # [B, T, D]
    keep_hidden = return_hidden or bool(capture.hidden)

    stacked, whole = layer_scan.split(params["layers"])  # arrays native kernels read from the stack itself

    def block(carry, p, with_probs=False):
        # The cache rides in the carry, so each layer updates its slots in place instead of
        # the scan copying the whole cache in and out on every call.
        x, (cache_k, k_scale), (cache_v, v_scale), layer = carry
        p = layer_scan.layer(p, whole, layer, CALL_ORDER)
        probs = None

        def attend(q, k, v):  # [B, T, N, H], [B, T, K, H] x2 -> [B, T, N, H]
            nonlocal cache_k, cache_v, k_scale, v_scale, probs
            if with_probs:
                y, probs = attn.attention_with_probs(q, k, v, allowed)
                return y
            if cache_k is None:
                return attn.causal_attention(q, k, v, allowed)
            cache_k, k_scale = attn.store_kv(cache_k, k_scale, layer, k, start)  # [L, R, S, K, H]
            cache_v, v_scale = attn.store_kv(cache_v, v_scale, layer, v, start)
            return attn.cached_attention(q, cache_k, k_scale, cache_v, v_scale, layer, allowed, dtype,
                                         native=cache.native)

        x, _ = decoder_layer(p, x, c, cos, sin, attend)
        return (x, (cache_k, k_scale), (cache_v, v_scale), layer + 1), (x if keep_hidden else None, probs)

    probe = functools.partial(block, with_probs=True)
    if remat != "none":
        # prevent_cse=False: the scan already keeps XLA from merging the recomputation away.
        block, probe = (jax.checkpoint(f, policy=REMAT_POLICIES[remat], prevent_cse=False) for f in (block, probe))
    if cache is not None:
        cache_kv = ((cache.k, cache.k_scale), (cache.v, cache.v_scale))
    else:
        cache_kv = ((None, None), (None, None))
    x_embedded = x
    carry = (x, *cache_kv, jnp.int32(0))
    hidden, attention = [], {}
    # Runs of layers in one scan each; a layer whose attention is captured runs on its own.
    edges = sorted({0, c.num_layers, *capture.attention, *(i + 1 for i in capture.attention)})
    for first, stop in zip(edges, edges[1:]):
        run = jax.tree.map(lambda leaf: leaf[first:stop], stacked) if len(edges) > 2 else stacked
        carry, (xs, probs) = jax.lax.scan(probe if first in capture.attention else block, carry, run)
        hidden.append(xs)
        if first in capture.attention:
            attention[first] = probs[0]
    (x, (new_k, new_k_scale), (new_v, new_v_scale), _) = carry

    all_hidden = jnp.concatenate([x_embedded[None], *hidden], axis=0) if keep_hidden else None  # [L+1, B, T, D]
    captured = None
    if capture != Capture():
        captured = {}
        if capture.hidden:
            captured["hidden"] = all_hidden[jnp.asarray(capture.hidden)]
        if capture.attention:
            captured["attention"] = jnp.stack([attention[i] for i in capture.attention])

    if last_logits_only:
        x = x[:, -1:]
    logits = lm_head(params, x, c)

    new_cache = None
    if cache is not None:
        new_cache = attn.KVCache(
            k=new_k,
            v=new_v,
            valid=cache.valid.at[:b].set(row_valid),
            index=cache.index.at[:b].add(t),
            lengths=cache.lengths.at[:b].add(mask.sum(axis=1).astype(jnp.int32)),
            k_scale=new_k_scale,
            v_scale=new_v_scale,
            native=cache.native,
        )
    return DecoderOutput(logits, new_cache, all_hidden if return_hidden else None, captured)


def lm_head(params: dict[str, Any], x: jnp.ndarray, config: DecoderConfig) -> jnp.ndarray:
    """Final norm and LM head: the residual stream [B, T, D] -> float32 logits [B, T, V]."""
    c = config
    x = rms_norm(x, params["final_norm"], c.rms_norm_eps)
    if c.tie_word_embeddings and isinstance(params["embed"], dict):  # stored as this kernel: quantized, or to serve
        # on the CPU kernels (compress/quant/matmul.py native_float)
        return dense(params["embed"], x, PROJECTIONS["lm_head"]).astype(jnp.float32)
    if c.tie_word_embeddings:
        return jnp.einsum("BTD,VD->BTV", x, params["embed"].astype(x.dtype), preferred_element_type=jnp.float32)
    return dense(params["lm_head"], x, PROJECTIONS["lm_head"]).astype(jnp.float32)


def _check_layers(layers: tuple[int, ...], count: int, what: str) -> None:
    if list(layers) != sorted(set(layers)) or any(not 0 <= i < count for i in layers):
        raise ValueError(f"{what}={layers}: distinct ascending numbers in [0, {count})")

