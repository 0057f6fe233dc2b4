"""Masked grouped-query attention and the key/value cache it reads and writes.

Axes: B batch, T query positions, S key slots, N query heads, K key/value heads,
G query heads per key/value head (N = K * G), H head_dim, L layers.

Cache layout (preallocated, one array per K and V, layers stacked first so the
layer scan slices it like the parameters):

  k, v    [L, B, S, K, H]  key/value vectors per slot
  valid   [B, S]           the slot holds a real (non-padding) token
  index   [B]              the next slot each row writes
  lengths [B]              real tokens seen so far = the next position id

An int8 cache (kv-int8) stores k and v as int8 with one float32 scale per token and head,

  k_scale, v_scale  [L, B, S, K]   k = k_int8 * k_scale[..., None]  (symmetric, absmax / 127)

about 0.53 of a bfloat16 cache's bytes; vectors are quantized as they are written and
dequantized as they are read, so attention itself runs in the compute dtype.

Rows advance independently (`index` is per row), which lets a scheduler fill a
freed row with a new request while the others keep decoding.

Attention over the cache (`cached_attention`) runs, on a CPU, a native kernel that reads the
layer's rows where they lie (compress/kernels/cpu.py); elsewhere the attended slots are sliced
out, dequantized and passed to `grouped_query_attention`. A cache placed on a mesh of several
devices sets `native=False`: a custom call would gather it whole onto every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from compress.kernels import cpu


@struct.dataclass
class KVCache:
    k: jnp.ndarray  # [L, B, S, K, H]
    v: jnp.ndarray  # [L, B, S, K, H]
    valid: jnp.ndarray  # [B, S] bool
    index: jnp.ndarray  # [B] int32
    lengths: jnp.ndarray  # [B] int32
    k_scale: jnp.ndarray | None = None  # [L, B, S, K] float32, int8 caches only
    v_scale: jnp.ndarray | None = None
    native: bool = struct.field(pytree_node=False, default=True)  # the native attention kernel may read it

    @classmethod
    def zeros(
        cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32,
        quantized: bool = False,
    ):
        """An empty cache; quantized=True stores int8 vectors with per-token, per-head scales."""
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        # Two arrays, never one shared: the engine donates the cache, and a buffer donated twice fails.
        scales = lambda: jnp.ones(shape[:-1], jnp.float32) if quantized else None
        return cls(
            k=jnp.zeros(shape, jnp.int8 if quantized else dtype),
            v=jnp.zeros(shape, jnp.int8 if quantized else dtype),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((batch,), jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            k_scale=scales(),
            v_scale=scales(),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value vectors and their scales."""
        arrays = (self.k, self.v) + ((self.k_scale, self.v_scale) if self.quantized else ())
        return sum(a.size * a.dtype.itemsize for a in arrays)


def quantize_heads(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """[..., H] float -> (int8 [..., H], float32 scale [...]): symmetric absmax per vector."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8), scale


def store_kv(values, scales, layer, new, index, rows=None):
    """Write new [B, T, K, H] at `layer`, slots index[b] + t of cache rows `rows` [B] (default
    0..B-1); int8 caches quantize it first.

    Returns the updated (values, scales); scales is None for a float cache.
    """
    if scales is None:
        return scatter_rows(values, layer, new, index, rows), None
    q, s = quantize_heads(new)  # [B, T, K, H], [B, T, K]
    return scatter_rows(values, layer, q, index, rows), scatter_rows(scales, layer, s, index, rows)


def load_kv(values, scales, layer, rows: int, width: int, dtype, first_row=0) -> jnp.ndarray:
    """[rows, width, K, H] in `dtype` from layer `layer`, cache rows first_row.. (dequantized for an
    int8 cache)."""
    x = read_rows(values, layer, rows, width, first_row)
    if scales is None:
        return x.astype(dtype)
    s = jax.lax.dynamic_slice(scales, (layer, first_row, 0, 0), (1, rows, width, scales.shape[-1]))[0]  # [rows, W, K]
    return (x.astype(jnp.float32) * s[..., None]).astype(dtype)


def cached_attention(q, cache_k, k_scale, cache_v, v_scale, layer, allowed, dtype, first_row=0, native=True):
    """`grouped_query_attention` of q [B, T, N, H] over slots [0, W) of cache rows first_row ..
    first_row + B of layer `layer`, W = allowed.shape[-1] (allowed [B, T, W]).

    With native=True on a CPU with the native kernels, float32 queries read the float32 or int8
    cache in place; otherwise the slots are sliced out and dequantized to `dtype` (`load_kv`).
    Returns [B, T, N, H] in q's dtype.
    """
    b = q.shape[0]
    if native and cpu.attention_usable(q, cache_k):
        return cpu.decode_attention(q, cache_k, cache_v, k_scale, v_scale, allowed, layer, first_row)
    width = allowed.shape[-1]
    keys = load_kv(cache_k, k_scale, layer, b, width, dtype, first_row)  # [B, W, K, H]
    values = load_kv(cache_v, v_scale, layer, b, width, dtype, first_row)
    return grouped_query_attention(q, keys, values, allowed)


def write_rows(cache_layer: jnp.ndarray, new: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """Write new [B, T, ...] into cache_layer [B, S, ...] at slot index[b] of each row."""

    def one_row(row, update, start):
        starts = (start,) + (0,) * (row.ndim - 1)
        return jax.lax.dynamic_update_slice(row, update.astype(row.dtype), starts)

    return jax.vmap(one_row)(cache_layer, new, index)


def scatter_rows(cache: jnp.ndarray, layer: jnp.ndarray, new: jnp.ndarray, index: jnp.ndarray,
                 rows: jnp.ndarray | None = None) -> jnp.ndarray:
    """Write new [B, T, K, H] into cache [L, R, S, K, H] at `layer`, rows `rows` [B] (default
    [0, B)), slots index[b] + t.

    A scatter of just the new vectors, done in place on a donated or loop-carried cache.
    Slots past the end are dropped (a finished row that is no longer read).
    """
    b, t = new.shape[:2]
    rows = jnp.broadcast_to((jnp.arange(b) if rows is None else rows)[:, None], (b, t))
    slots = index[:, None] + jnp.arange(t)[None, :]  # [B, T]
    return cache.at[layer, rows, slots].set(new.astype(cache.dtype), mode="drop")


def read_rows(cache: jnp.ndarray, layer: jnp.ndarray, rows: int, width: int, first_row=0) -> jnp.ndarray:
    """cache[layer, first_row : first_row + rows, :width]: [rows, width, K, H]."""
    _, _, _, k, h = cache.shape
    return jax.lax.dynamic_slice(cache, (layer, first_row, 0, 0, 0), (1, rows, width, k, h))[0]


def attention_mask(
    query_slots: jnp.ndarray,
    key_valid: jnp.ndarray,
    sliding_window: int | None = None,
) -> jnp.ndarray:
    """Which keys each query may see: [B, T, S] bool.

    Args:
      query_slots: [B, T] slot of each query token (queries see slots <= their own).
      key_valid: [B, S] slots holding real tokens.
      sliding_window: if set, a query sees only the last `sliding_window` slots.
    """
    key_slots = jnp.arange(key_valid.shape[1])  # [S]
    allowed = key_valid[:, None, :] & (key_slots[None, None, :] <= query_slots[:, :, None])
    if sliding_window is not None:
        allowed &= query_slots[:, :, None] - key_slots[None, None, :] < sliding_window
    return allowed


def same_segment(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Which keys share each query's segment, for packed rows: [B, T, S=T] bool.

    Args:
      segment_ids: [B, T] document number of each token in a packed row; 0 marks padding,
        which shares a segment with nothing (not even other padding).
    Combine with `attention_mask` (causality, sliding window) by `&`.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    return same & (segment_ids[:, None, :] != 0)


def grouped_query_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, allowed: jnp.ndarray) -> jnp.ndarray:
    """Softmax attention with K key/value heads shared by groups of query heads.

    Args:
      q: [B, T, N, H] queries.
      k, v: [B, S, K, H] keys and values.
      allowed: [B, T, S] mask from `attention_mask`.
    Returns:
      [B, T, N, H] attended values, in q's dtype. Scores and softmax are float32.
      A query that may see no key (a padding position) gets an average of the values;
      nothing real attends to padding, so it never reaches a real token.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q * jnp.asarray(h**-0.5, q.dtype)
    if t == 1:
        # Decoding: keep K/V grouped (no copies of the whole cache).
        q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
    # Prefill: K/V repeated to every query head and heads moved ahead of positions give
    # XLA plain [B*N] batched matmuls (about twice as fast on CPU as the grouped 5-D form).
    q, k, v = _heads_first(q, k, v)  # [B, N, T, H], [B, N, S, H]
    return _softmax_attention(q, k, v, allowed).transpose(0, 2, 1, 3)  # [B, T, N, H]


def causal_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, allowed: jnp.ndarray, block: int = 256):
    """`grouped_query_attention` when queries and keys are the same T positions (no cache).

    Causality leaves the upper triangle of the scores unused; query block i attends only
    to keys up to its own end, skipping that work (25% of it at two blocks, 44% at eight).
    Returns [B, T, N, H].
    """
    t = q.shape[1]
    if t != k.shape[1] or t < 2 * block or t % block:
        return grouped_query_attention(q, k, v, allowed)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    q, k, v = _heads_first(q, k, v)
    blocks = [
        _softmax_attention(q[:, :, s : s + block], k[:, :, : s + block], v[:, :, : s + block], allowed[:, s : s + block, : s + block])
        for s in range(0, t, block)
    ]  # each [B, N, block, H]
    return jnp.concatenate(blocks, axis=2).transpose(0, 2, 1, 3)


def attention_with_probs(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, allowed: jnp.ndarray):
    """`grouped_query_attention` that also returns its probabilities, for attention transfer.

    Returns ([B, T, N, H] attended values, [B, N, T, S] float32 probabilities; a row that may see
    no key, a padding position, is uniform, as in the attention itself).
    """
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    q, k, v = _heads_first(q, k, v)  # [B, N, T, H], [B, N, S, H]
    probs = _probabilities(q, k, allowed)  # [B, N, T, S]
    return jnp.einsum("BNTS,BNSH->BNTH", probs.astype(v.dtype), v).transpose(0, 2, 1, 3), probs


def _heads_first(q, k, v):
    """[B, T, N, H] and [B, S, K, H] -> [B, N, T, H] and K/V repeated to [B, N, S, H]."""
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2).transpose(0, 2, 1, 3) for x in (k, v))
    return q.transpose(0, 2, 1, 3), k, v


def _softmax_attention(q, k, v, allowed):
    """q [B, N, T, H] (already scaled), k/v [B, N, S, H], allowed [B, T, S] -> [B, N, T, H]."""
    return jnp.einsum("BNTS,BNSH->BNTH", _probabilities(q, k, allowed).astype(v.dtype), v)


def _probabilities(q, k, allowed):
    """q [B, N, T, H] (already scaled), k [B, N, S, H], allowed [B, T, S] -> float32 [B, N, T, S]."""
    scores = jnp.einsum("BNTH,BNSH->BNTS", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)
