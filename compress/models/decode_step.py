"""One serving step: the next token of every decoding row and a chunk of one prompt, in one pass.

A small-batch decode step reads every weight once for a handful of tokens; prefilling a short
prompt as its own call reads them all again (on a 2-core CPU a 16-token prefill costs 26 ms,
17 of them the weights' read, which a decode step already pays). Here both share the
projections: the decoding rows' tokens and the chunk's are one sequence for the matmuls
(x [1, R + C, D]) and only attention tells them apart. Each decoding row attends over its own
cache row; the chunk over the row it fills, causally. This is chunked prefill as vLLM and
SGLang schedule it, with one chunk per step.

A row being filled holds its prompt from the slot its first chunk starts at (the engine puts
a cached prefix in front of it and starts there); chunks need no padding but at their end,
where `length` says how many tokens are real. Its decode token in the same step is not
computed into the cache: that row's slots and counters advance by the chunk alone.

Axes (compress/models/decoder.py): R decoding rows, C chunk tokens, W attended slots, plus
L, D, V, N, K, H.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from compress.models import attention as attn
from compress.models import decoder, layer_scan
from compress.models.rope import inverse_frequencies, rope_tables


class Chunk(NamedTuple):
    """Prompt tokens to write into one cache row in a step."""

    tokens: jnp.ndarray  # [C] int32; positions past `length` are padding
    row: jnp.ndarray  # [] int32, the cache row it fills (at slots index[row] ..)
    length: jnp.ndarray  # [] int32, real tokens in `tokens` (1..C)


class StepOutput(NamedTuple):
    logits: jnp.ndarray  # [R, V] float32: each row's next-token logits (garbage for the chunk's row)
    chunk_logits: jnp.ndarray | None  # [V] float32 after the chunk's last real token
    cache: attn.KVCache


def forward_step(
    params: dict[str, Any],
    tokens: jnp.ndarray,
    cache: attn.KVCache,
    config: decoder.DecoderConfig,
    *,
    attend_len: int,
    chunk: Chunk | None = None,
) -> StepOutput:
    """Decode one token for cache rows [0, R) and, with `chunk`, run its tokens in the same pass.

    Args:
      tokens: [R] the token each row feeds next (rows 0..R-1 of the cache; the chunk's row, if
        among them, is skipped).
      cache: the engine's cache, updated in place when donated.
      attend_len: static, slots every row attends over; it must cover every row's slots in use
        and the chunk's last slot.
      chunk: the prompt tokens of one row being filled, or None (a plain decode step).
    """
    c = config
    dtype = decoder.DTYPES[c.dtype]
    r = tokens.shape[0]
    width = min(attend_len, cache.max_len)
    start, past = cache.index[:r], cache.lengths[:r]  # [R]
    inv_freq, factor = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    decoding = jnp.ones(r, bool) if chunk is None else jnp.arange(r) != chunk.row  # [R]
    write_at = jnp.where(decoding, start, cache.max_len)  # the chunk's row writes only its chunk
    valid = cache.valid.at[jnp.arange(r), write_at].set(True, mode="drop")  # [rows, S]
    allowed = attn.attention_mask(start[:, None], valid[:r, :width], c.sliding_window)  # [R, 1, W]
    positions, all_tokens = past, tokens
    if chunk is not None:
        n = chunk.tokens.shape[0]
        c_start, c_past = cache.index[chunk.row], cache.lengths[chunk.row]
        c_slots = c_start + jnp.arange(n)  # [C]
        real = jnp.arange(n) < chunk.length  # [C]
        valid = valid.at[chunk.row, c_slots].set(real, mode="drop")
        c_allowed = attn.attention_mask(c_slots[None], valid[chunk.row][None, :width], c.sliding_window)  # [1, C, W]
        positions = jnp.concatenate([past, c_past + jnp.arange(n)])  # [R + C]
        all_tokens = jnp.concatenate([tokens, chunk.tokens])
    cos, sin = rope_tables(positions[None], inv_freq, factor)  # [1, R + C, H]
    x = decoder.embed(params, all_tokens[None], c)  # [1, R + C, D]

    stacked, whole = layer_scan.split(params["layers"])  # arrays native kernels read from the stack itself

    def block(carry, p):
        x, (cache_k, k_scale), (cache_v, v_scale), layer = carry
        p = layer_scan.layer(p, whole, layer, decoder.CALL_ORDER)

        def attend(q, k, v):  # [1, R + C, N, H], [1, R + C, K, H] x2 -> [1, R + C, N, H]
            nonlocal cache_k, cache_v, k_scale, v_scale
            qd, kd, vd = (a[0, :r, None] for a in (q, k, v))  # [R, 1, ...]
            cache_k, k_scale = attn.store_kv(cache_k, k_scale, layer, kd, write_at)
            cache_v, v_scale = attn.store_kv(cache_v, v_scale, layer, vd, write_at)
            if chunk is not None:
                row = chunk.row[None]
                cache_k, k_scale = attn.store_kv(cache_k, k_scale, layer, k[:, r:], c_start[None], row)
                cache_v, v_scale = attn.store_kv(cache_v, v_scale, layer, v[:, r:], c_start[None], row)
            kv = (cache_k, k_scale, cache_v, v_scale, layer)
            y = attn.cached_attention(qd, *kv, allowed, dtype, native=cache.native)[:, 0][None]  # [1, R, N, H]
            if chunk is None:
                return y
            y_chunk = attn.cached_attention(q[:, r:], *kv, c_allowed, dtype, chunk.row, cache.native)  # [1, C, N, H]
            return jnp.concatenate([y, y_chunk], axis=1)

        x, _ = decoder.decoder_layer(p, x, c, cos, sin, attend)
        return (x, (cache_k, k_scale), (cache_v, v_scale), layer + 1), None

    carry = (x, (cache.k, cache.k_scale), (cache.v, cache.v_scale), jnp.int32(0))
    (x, (new_k, new_k_scale), (new_v, new_v_scale), _), _ = jax.lax.scan(block, carry, stacked)

    advance = decoding.astype(jnp.int32)  # [R]
    index, lengths = cache.index.at[:r].add(advance), cache.lengths.at[:r].add(advance)
    chunk_logits = None
    if chunk is None:
        logits = decoder.lm_head(params, x, c)[0]  # [R, V]
    else:
        last = jax.lax.dynamic_slice_in_dim(x, r + chunk.length - 1, 1, axis=1)  # [1, 1, D]
        both = decoder.lm_head(params, jnp.concatenate([x[:, :r], last], axis=1), c)[0]  # [R + 1, V]
        logits, chunk_logits = both[:r], both[r]
        index, lengths = index.at[chunk.row].add(chunk.length), lengths.at[chunk.row].add(chunk.length)
    new_cache = attn.KVCache(new_k, new_v, valid, index, lengths, new_k_scale, new_v_scale, cache.native)
    return StepOutput(logits, chunk_logits, new_cache)
