"""A BERT encoder (e.g. MiniLM) for sentence embeddings, as pure functions over a parameter pytree.

Post-LayerNorm BERT: learned absolute position and token-type embeddings, bidirectional
attention over the non-padding tokens, exact (erf) GELU, biases on every projection.
Sentence embeddings are the mean of the final hidden states over real tokens, L2-normalised
(the sentence-transformers recipe of all-MiniLM-L6-v2 and its relatives).

Glossary of axes (one letter each in einsums):
  B batch            T query positions     S key positions (the same tokens as T)
  D embed (model)    F mlp hidden          N heads
  H head_dim         L layers (stacked, scanned)

Parameters (logical axes in brackets; `layers` leaves are stacked over L):
  token_embed              [vocab, embed]
  position_embed           [positions, embed]
  type_embed               [token_types, embed]
  embed_norm/scale, bias   [norm]
  layers/q/kernel          [layers, embed, heads, head_dim]   + bias [layers, heads, head_dim]
  layers/k/kernel          [layers, embed, heads, head_dim]   + bias
  layers/v/kernel          [layers, embed, heads, head_dim]   + bias
  layers/o/kernel          [layers, heads, head_dim, embed]   + bias [layers, embed]
  layers/attn_norm/scale, bias  [layers, norm]   (after the attention residual)
  layers/up/kernel         [layers, embed, mlp]               + bias [layers, mlp]
  layers/down/kernel       [layers, mlp, embed]               + bias [layers, embed]
  layers/mlp_norm/scale, bias   [layers, norm]   (after the MLP residual)

BERT's pooler (a tanh projection of the first token) is not part of the tree: sentence
embeddings do not use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from compress.models import attention as attn
from compress.models import params as params_lib
from compress.models.params import DTYPES
from compress.models.params import ParamSpec
from compress.models.linear import dense


# The einsum of every projection (activations, kernel -> output). Transforms of the
# parameters (quantization, adapters) read it to know which kernel axes are contracted.
PROJECTIONS = {
    "q": "BTD,DNH->BTNH",
    "k": "BTD,DNH->BTNH",
    "v": "BTD,DNH->BTNH",
    "o": "BTNH,NHD->BTD",
    "up": "BTD,DF->BTF",
    "down": "BTF,FD->BTD",
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape and numerics of a BERT encoder. Field names follow the glossary above."""

    vocab_size: int = 128  # V, rows of the token embedding
    embed_dim: int = 32  # D, the residual stream width
    mlp_dim: int = 64  # F, the GELU MLP hidden width
    num_layers: int = 2  # L
    num_heads: int = 4  # N
    head_dim: int = 8  # H; N * H is the attention width (D for every BERT we load)
    max_position_embeddings: int = 64  # rows of the position table = the longest input
    type_vocab_size: int = 2  # rows of the token-type (segment) table
    layer_norm_eps: float = 1e-12  # BERT's LayerNorm epsilon
    param_dtype: str = "float32"  # storage dtype of parameters
    dtype: str = "float32"  # compute dtype of activations (norms and softmax run in float32)

    def __post_init__(self):
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r}; choose one of {', '.join(DTYPES)}")


def param_specs(c: EncoderConfig) -> dict[str, Any]:
    """The parameter tree's shapes, logical axes and initialisers, from the config alone."""
    L, D, F, V, N, H = c.num_layers, c.embed_dim, c.mlp_dim, c.vocab_size, c.num_heads, c.head_dim

    def proj(kernel_shape, kernel_axes, bias_shape, bias_axes):
        return {
            "kernel": ParamSpec(kernel_shape, kernel_axes, "normal"),
            "bias": ParamSpec(bias_shape, bias_axes, "zeros"),
        }

    def norm(shape, axes):
        return {"scale": ParamSpec(shape, axes, "ones"), "bias": ParamSpec(shape, axes, "zeros")}

    qkv = ((L, D, N, H), ("layers", "embed", "heads", "head_dim"), (L, N, H), ("layers", "heads", "head_dim"))
    return {
        "token_embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "position_embed": ParamSpec((c.max_position_embeddings, D), ("positions", "embed"), "normal"),
        "type_embed": ParamSpec((c.type_vocab_size, D), ("token_types", "embed"), "normal"),
        "embed_norm": norm((D,), ("norm",)),
        "layers": {
            "q": proj(*qkv),
            "k": proj(*qkv),
            "v": proj(*qkv),
            "o": proj((L, N, H, D), ("layers", "heads", "head_dim", "embed"), (L, D), ("layers", "embed")),
            "attn_norm": norm((L, D), ("layers", "norm")),
            "up": proj((L, D, F), ("layers", "embed", "mlp"), (L, F), ("layers", "mlp")),
            "down": proj((L, F, D), ("layers", "mlp", "embed"), (L, D), ("layers", "embed")),
            "mlp_norm": norm((L, D), ("layers", "norm")),
        },
    }


def param_axes(c: EncoderConfig) -> dict[str, Any]:
    """Logical axis names of every parameter, in the parameter tree's structure."""
    return params_lib.axes(param_specs(c))


def param_shapes(c: EncoderConfig) -> dict[str, Any]:
    """jax.ShapeDtypeStruct of every parameter (no memory allocated)."""
    return params_lib.shapes(param_specs(c), DTYPES[c.param_dtype])


def init_params(c: EncoderConfig, rng: jax.Array, scale: float = 0.02) -> dict[str, Any]:
    """Random parameters (normal(0, scale) matrices, unit norm scales, zero biases).

    To create them already sharded, jit this with `out_shardings`.
    """
    return params_lib.initialise(param_specs(c), rng, DTYPES[c.param_dtype], scale)


def layer_norm(x: jnp.ndarray, p: dict[str, jnp.ndarray], eps: float, dtype=None) -> jnp.ndarray:
    """LayerNorm over the last axis, computed in float32, returned in `dtype` (default x's)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(dtype or x.dtype)


def forward(
    params: dict[str, Any],
    tokens: jnp.ndarray,
    config: EncoderConfig,
    *,
    attention_mask: jnp.ndarray | None = None,
    token_type_ids: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Run the encoder.

    Args:
      params: the parameter tree described in the module docstring.
      tokens: [B, T] int token ids, T <= max_position_embeddings.
      config: the model's EncoderConfig.
      attention_mask: [B, T] 1 for real tokens, 0 for padding (anywhere; BERT pads on the
        right). Defaults to all ones. Padding keys are never attended to.
      token_type_ids: [B, T] segment ids in [0, type_vocab_size). Defaults to zeros.

    Returns:
      [B, T, D] final hidden states in the compute dtype. Rows at padding positions are
      computed but meaningless; mask them out (as `mean_pool` does).
    """
    c = config
    dtype = DTYPES[c.dtype]
    b, t = tokens.shape
    if t > c.max_position_embeddings:
        raise ValueError(f"{t} tokens exceed max_position_embeddings={c.max_position_embeddings}; truncate the input")
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    types = jnp.zeros((b, t), jnp.int32) if token_type_ids is None else token_type_ids

    # Every query sees every real key; padding queries too (their outputs are discarded).
    allowed = jnp.broadcast_to(mask[:, None, :], (b, t, t))  # [B, T, S]

    x = (
        jnp.take(params["token_embed"], tokens, axis=0).astype(jnp.float32)  # [B, T, D]
        + params["position_embed"][:t].astype(jnp.float32)[None]  # [1, T, D]
        + jnp.take(params["type_embed"], types, axis=0).astype(jnp.float32)  # [B, T, D]
    )
    x = layer_norm(x, params["embed_norm"], c.layer_norm_eps, dtype)  # [B, T, D]

    def block(x, p):
        # Keys and values come from the same T positions; attention reads them as S.
        q = dense(p["q"], x, PROJECTIONS["q"])  # [B, T, N, H]
        k = dense(p["k"], x, PROJECTIONS["k"])  # [B, S=T, N, H]
        v = dense(p["v"], x, PROJECTIONS["v"])  # [B, S=T, N, H]
        y = attn.grouped_query_attention(q, k, v, allowed)  # [B, T, N, H]
        x = layer_norm(x + dense(p["o"], y, PROJECTIONS["o"]), p["attn_norm"], c.layer_norm_eps)  # [B, T, D]
        h = jax.nn.gelu(dense(p["up"], x, PROJECTIONS["up"]), approximate=False)  # [B, T, F]
        x = layer_norm(x + dense(p["down"], h, PROJECTIONS["down"]), p["mlp_norm"], c.layer_norm_eps)  # [B, T, D]
        return x, None

    x, _ = jax.lax.scan(block, x, params["layers"])
    return x


def mean_pool(hidden: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean of hidden [B, T, D] over the positions where mask [B, T] is 1: [B, D] float32.

    An all-padding row gives zeros (the count is clamped, as sentence-transformers does).
    """
    m = mask.astype(jnp.float32)[:, :, None]  # [B, T, 1]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)  # [B, D]
    return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def embed(
    params: dict[str, Any],
    tokens: jnp.ndarray,
    config: EncoderConfig,
    *,
    attention_mask: jnp.ndarray | None = None,
    token_type_ids: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Sentence embeddings: mean-pooled final hidden states, L2-normalised. [B, D] float32.

    Arguments as for `forward`. An all-padding row gives a zero vector.
    """
    b, t = tokens.shape
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
    hidden = forward(params, tokens, config, attention_mask=mask, token_type_ids=token_type_ids)  # [B, T, D]
    pooled = mean_pool(hidden, mask)  # [B, D]
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)  # [B, 1]
    return pooled / jnp.maximum(norm, 1e-12)
