"""Prefix caching: the keys and values of prompt prefixes kept between requests, block by block.

Requests that share a prefix (the chat template's system prompt, a RAG instruction, few-shot
examples) reuse its KV instead of prefilling it again. A prompt is cut into blocks of
BLOCK tokens; block j is keyed by a hash of its tokens chained to block j-1's key, so a key
names the whole prefix up to the end of its block (the automatic prefix caching of vLLM).
A new prompt reuses the longest run of cached blocks from its start.

Each block holds its K and V as the model computed them at those positions, [L, BLOCK, K, H]
each (plus per-token scales for an int8 cache), on the device. Blocks are evicted least
recently used beyond `max_blocks`.

Axes: L layers, P prefix tokens, K key/value heads, H head dim.
"""

from __future__ import annotations

import collections
import hashlib
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

BLOCK = 16  # tokens per block


class Block(NamedTuple):
    k: jnp.ndarray  # [L, BLOCK, K, H]
    v: jnp.ndarray  # [L, BLOCK, K, H]
    k_scale: jnp.ndarray | None  # [L, BLOCK, K] (int8 caches)
    v_scale: jnp.ndarray | None


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
    """Blocks of prompt KV by chained key, least recently used evicted beyond `max_blocks`."""

    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self._blocks: collections.OrderedDict[bytes, Block] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def cached_blocks(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, are cached (and marks them recently used)."""
        count = 0
        for key in keys:
            if key not in self._blocks:
                break
            self._blocks.move_to_end(key)
            count += 1
        return count

    def prefix(self, keys: Sequence[bytes]) -> Block:
        """The cached KV of the prefix made of these blocks, each [L, P, ...] with P = BLOCK x len(keys)."""
        blocks = [self._blocks[key] for key in keys]
        join = lambda arrays: None if arrays[0] is None else jnp.concatenate(arrays, axis=1)  # noqa: E731
        return Block(*(join([getattr(b, field) for b in blocks]) for field in Block._fields))

    def store(self, key: bytes, block: Block) -> None:
        if self.max_blocks <= 0:
            return
        self._blocks[key] = block
        self._blocks.move_to_end(key)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def clear(self) -> None:
        self._blocks.clear()


def reusable_blocks(cached: int, prompt_len: int) -> int:
    """Blocks of a cached prefix a prompt reuses: at most `cached`, leaving at least one prompt
    token to prefill, rounded down to its two leading bits (1, 2, 3, 4, 6, 8, 12, 16, ... blocks),
    so at most two prefix lengths an octave are ever compiled."""
    usable = min(cached, (prompt_len - 1) // BLOCK)
    if usable < 1:
        return 0
    top = usable.bit_length() - 1
    return usable & ((1 << top) | ((1 << (top - 1)) if top else 0))
