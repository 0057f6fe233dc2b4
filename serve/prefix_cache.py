"""Prefix caching: the keys and values of prompt prefixes kept between requests, block by block.

Requests that share a prefix (the chat template's system prompt, a RAG instruction, few-shot
examples) reuse its KV instead of prefilling it again. A prompt is cut into blocks of
BLOCK tokens; block j is keyed by a hash of its tokens chained to block j-1's key, so a key
names the whole prefix up to the end of its block (the automatic prefix caching of vLLM).
A new prompt reuses the longest run of cached blocks from its start.

The blocks live in one preallocated pool on the device (a paged pool, as in vLLM's block
manager), and the index here says which pool block holds which key. The engine's prefill
reads a prompt's cached blocks by their indices and writes the new ones into the blocks the
index hands out, both inside its one jitted program (`gather`, `scatter`): no per-block
array ever reaches Python, and a prefill that reuses a prefix costs one gather.

Pool layout (the KV cache's, with blocks where the cache has rows and slots):

  k, v              [L, NB, BLOCK, K, H]
  k_scale, v_scale  [L, NB, BLOCK, K]      int8 caches only

Blocks are evicted least recently used; a block read or written by a prefill that is being
planned is pinned until that prefill has run.

Axes: L layers, NB pool blocks, n prefill rows, nb blocks per row, K key/value heads, H head dim.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Collection, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from compress.models.attention import KVCache

BLOCK = 16  # tokens per block


class Pool(NamedTuple):
    """The device arrays every cached block lives in (module docstring)."""

    k: jnp.ndarray  # [L, NB, BLOCK, K, H]
    v: jnp.ndarray  # [L, NB, BLOCK, K, H]
    k_scale: jnp.ndarray | None  # [L, NB, BLOCK, K] (int8 caches)
    v_scale: jnp.ndarray | None

    @property
    def blocks(self) -> int:
        return self.k.shape[1]


# Logical axes of the pool's arrays (compress/sharding.py), for an engine on a mesh.
POOL_AXES = Pool(
    k=("layers", "kv_blocks", "seq", "kv_heads", "head_dim"),
    v=("layers", "kv_blocks", "seq", "kv_heads", "head_dim"),
    k_scale=("layers", "kv_blocks", "seq", "kv_heads"),
    v_scale=("layers", "kv_blocks", "seq", "kv_heads"),
)


def new_pool(num_layers: int, blocks: int, num_kv_heads: int, head_dim: int, dtype, quantized: bool) -> Pool:
    """An empty pool of `blocks` blocks (int8 vectors and float32 scales if quantized)."""
    cache = KVCache.zeros(num_layers, blocks, BLOCK, num_kv_heads, head_dim, dtype, quantized)
    return Pool(cache.k, cache.v, cache.k_scale, cache.v_scale)


def gather(pool: Pool, ids: jnp.ndarray) -> Pool:
    """The KV of prefixes made of pool blocks `ids` [n, nb]: arrays [L, n, nb * BLOCK, ...]."""
    n, nb = ids.shape

    def take(array):
        if array is None:
            return None
        blocks = array[:, ids]  # [L, n, nb, BLOCK, ...]
        return blocks.reshape(array.shape[0], n, nb * BLOCK, *array.shape[3:])

    return Pool(*(take(a) for a in pool))


def scatter(pool: Pool, cache: KVCache, ids: jnp.ndarray, first_slot: jnp.ndarray,
            rows: jnp.ndarray | None = None) -> Pool:
    """Copy blocks of cache rows into the pool.

    cache: [L, R, W, ...] (a prefill's own rows, or the engine's cache); ids: [n, mb] int32, the
    pool block each of row r's blocks goes to (the pool's size, i.e. out of range, for none);
    block j of row r starts at slot first_slot[r] + j * BLOCK of cache row rows[r] (default r).
    """
    n, mb = ids.shape
    rows = (jnp.arange(n) if rows is None else rows)[:, None, None]  # [n, 1, 1]
    slots = first_slot[:, None, None] + (jnp.arange(mb) * BLOCK)[None, :, None] + jnp.arange(BLOCK)[None, None, :]
    slots = jnp.minimum(slots, cache.max_len - 1)  # [n, mb, BLOCK]; blocks past the row are dropped below

    def put(target, source):
        if target is None:
            return None
        return target.at[:, ids].set(source[:, rows, slots].astype(target.dtype), mode="drop")

    return Pool(put(pool.k, cache.k), put(pool.v, cache.v), put(pool.k_scale, cache.k_scale),
                put(pool.v_scale, cache.v_scale))


def block_keys(ids: Sequence[int], salt: bytes = b"") -> list[bytes]:
    """The chained keys of the full blocks of `ids` (a trailing partial block has none); a
    `salt` starts the chain, so the same tokens under another salt (an adapter) share no block."""
    keys, parent = [], salt
    tokens = np.asarray(ids, np.int32)
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        parent = hashlib.blake2b(parent + tokens[start : start + BLOCK].tobytes(), digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Which pool block holds which chained key; least recently used evicted when blocks run out."""

    def __init__(self, max_blocks: int):
        self.max_blocks = max(0, max_blocks)
        self._where: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # key -> block, LRU first
        self._free = list(range(self.max_blocks - 1, -1, -1))  # popped from the end: block 0 first

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: bytes) -> bool:
        return key in self._where

    def cached_blocks(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, are cached (and marks them recently used)."""
        count = 0
        for key in keys:
            if key not in self._where:
                break
            self._where.move_to_end(key)
            count += 1
        return count

    def block_ids(self, keys: Sequence[bytes]) -> list[int]:
        """The pool blocks of cached keys (KeyError for one that is not)."""
        return [self._where[key] for key in keys]

    def allocate(self, key: bytes, pinned: Collection[int] = ()) -> int | None:
        """A pool block for a new key: a free one, else the least recently used block not in
        `pinned` (its key is forgotten). None when the key is cached already or every block is
        pinned; the caller writes the block's KV before anything reads it."""
        if key in self._where or self.max_blocks == 0:
            return None
        if self._free:
            block = self._free.pop()
        else:
            victim = next((k for k, b in self._where.items() if b not in pinned), None)
            if victim is None:
                return None
            block = self._where.pop(victim)
        self._where[key] = block
        return block

    def discard(self, keys: Sequence[bytes]) -> None:
        """Forget keys whose blocks were never written (their prefill failed); their blocks are free."""
        for key in keys:
            block = self._where.pop(key, None)
            if block is not None:
                self._free.append(block)

    def clear(self) -> None:
        self._where.clear()
        self._free = list(range(self.max_blocks - 1, -1, -1))


def reusable_blocks(cached: int, prompt_len: int) -> int:
    """Blocks of a cached prefix a prompt reuses: at most `cached`, leaving at least one prompt
    token to prefill, rounded down to its two leading bits (1, 2, 3, 4, 6, 8, 12, 16, ... blocks),
    so at most two prefix lengths an octave are ever compiled."""
    usable = min(cached, (prompt_len - 1) // BLOCK)
    if usable < 1:
        return 0
    top = usable.bit_length() - 1
    return usable & ((1 << top) | ((1 << (top - 1)) if top else 0))
