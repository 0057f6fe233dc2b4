"""Sampling settings of a request and the jittable sampler that applies them row by row.

Every row of a decode batch carries its own temperature, top-k, top-p and seed, so requests
with different settings share one compiled step. A row's random key is its seed folded with
the number of tokens it has generated, so the same seed gives the same text whatever else
is in the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from compress.errors import check_unicode
from compress.kernels import cpu as cpu_kernels

# top-k / top-p choose among at most this many highest-scoring tokens: a full sort of a
# 50k-256k vocabulary per row and step would cost more than the model on CPU. A nucleus
# wider than this (top_p near 1 over a very flat distribution) is cut at this many tokens.
MAX_CANDIDATES = 1024
# Stop strings are matched on the engine's scheduler thread after every token of their request
# (and whatever of one the text may be starting is held back from a stream), so a request's stop
# list is work that every other row waits for: 300,000 stop strings in one request (a 4.5 MB body,
# under the server's limit) made a 20-token request beside it take 28 s instead of 0.7. OpenAI
# takes at most 4 stop sequences, text-generation-inference 4 by default.
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024  # a million of them cost the request threads' share of the GIL before any check


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters off.
    stop: strings that end the text (not included in it). stop_token_ids: extra token ids
    that end it, besides the model's EOS tokens (unless ignore_eos).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        # Accept lists (JSON) for the tuple fields; keep the dataclass hashable.
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not _integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _integer(self.top_k) or not 0 <= self.top_k < 2**31:  # an int32 in the sampler
            raise ValueError(f"top_k must be an integer in [0, 2**31) (0 switches it off), got {self.top_k!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r:.200}")
        if len(self.stop) > MAX_STOP or max(map(len, self.stop), default=0) > MAX_STOP_CHARS:
            raise ValueError(f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters each, "
                             f"got {len(self.stop)} (the longest {max(map(len, self.stop))} characters)")
        for s in self.stop:
            check_unicode(s, "stop")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} token ids, got {len(self.stop_token_ids)}")
        if any(not _integer(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r:.200}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @functools.cached_property
    def stop_id_set(self) -> frozenset[int]:
        """stop_token_ids as a set: the engine looks every new token up in it."""
        return frozenset(self.stop_token_ids)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def greedy(logits: jnp.ndarray, native: bool = True) -> jnp.ndarray:
    """The argmax over the last axis as int32, the lowest index among ties and the first NaN
    where there is one (jnp.argmax's answer). With native=True on a CPU with the native kernels
    (float32 logits), one vector pass per row (compress/kernels/cpu.py `argmax`): XLA's CPU
    backend took 70-120 us for SmolLM2's 49,152 logits even as the two plain reductions below
    (and 260 us as jnp.argmax's (value, index) reduction), up to a twentieth of a decode step.
    A caller whose logits are sharded over devices passes native=False (a custom call would
    gather them)."""
    if native and cpu_kernels.argmax_usable(logits):
        return cpu_kernels.argmax(logits)
    top = jnp.max(logits, axis=-1, keepdims=True)
    nan = jnp.isnan(logits)  # a row's NaN is its answer: XLA's CPU max does not always carry it
    hit = jnp.where(nan.any(axis=-1, keepdims=True), nan, logits == top)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def sample(
    logits: jnp.ndarray,
    seeds: jnp.ndarray,
    counts: jnp.ndarray,
    temperature: jnp.ndarray,
    top_k: jnp.ndarray,
    top_p: jnp.ndarray,
    native: bool = True,
) -> jnp.ndarray:
    """One token per row.

    Args:
      logits: [B, V] float32.
      seeds: [B] uint32 per-request seeds; counts: [B] int32 tokens generated so far.
      temperature: [B] (0 = greedy); top_k: [B] int32 (0 = off); top_p: [B] (1 = off).
      native: as `greedy`'s.
    Returns:
      [B] int32 token ids.
    """
    best = greedy(logits, native)
    sampling = temperature > 0
    uses_filter = sampling & ((top_k > 0) | (top_p < 1))

    def sampled(_):
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        # Unfiltered rows sample the whole distribution exactly.
        full = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        # top_k over the vocabulary is the costliest part: only when some row filters.
        filtered = jax.lax.cond(uses_filter.any(), _filtered, lambda *_: full, keys, scaled, top_k, top_p)
        return jnp.where(sampling, jnp.where(uses_filter, filtered, full), best)

    # Decode batches that are all greedy (the common case) skip the random draws entirely.
    return jax.lax.cond(sampling.any(), sampled, lambda _: best, None)


def _filtered(keys, scaled, top_k, top_p):
    """Sample among the highest MAX_CANDIDATES tokens after the top-k and top-p filters."""
    kept, top_ids = _candidates(scaled, top_k, top_p)
    choice = jax.vmap(jax.random.categorical)(keys, kept)
    return jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _candidates(scaled, top_k, top_p):
    """The highest MAX_CANDIDATES scaled logits [B, n] (sorted descending; -inf where the top-k or
    top-p filter drops them) and their token ids [B, n]."""
    n = min(MAX_CANDIDATES, scaled.shape[-1])
    top_logits, top_ids = jax.lax.top_k(scaled, n)  # [B, n], sorted descending
    probs = jnp.exp(top_logits - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))  # of the full distribution
    rank = jnp.arange(n)[None, :]
    keep = jnp.where(top_k[:, None] > 0, rank < top_k[:, None], True)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < top_p[:, None]  # the smallest set whose mass reaches top_p (always >= 1 token)
    return jnp.where(keep, top_logits, -jnp.inf), top_ids


def probabilities(logits: jnp.ndarray, temperature: jnp.ndarray, top_k: jnp.ndarray, top_p: jnp.ndarray,
                  native: bool = True) -> jnp.ndarray:
    """The distribution `sample` draws each row's token from, as probabilities [B, V] float32:
    softmax(logits / temperature) over the tokens top-k and top-p keep (renormalized), and for a
    greedy row (temperature 0) all the mass on its argmax. Speculative decoding compares the
    target's and the draft's (serve/speculative.py); rows as in `sample`."""
    b, v = logits.shape
    sampling = temperature > 0
    uses_filter = sampling & ((top_k > 0) | (top_p < 1))
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    full = jax.nn.softmax(scaled, axis=-1)  # [B, V]

    def filtered(_):
        kept, top_ids = _candidates(scaled, top_k, top_p)  # [B, n]
        mass = jax.nn.softmax(kept, axis=-1)  # 0 where dropped
        return jnp.zeros((b, v), jnp.float32).at[jnp.arange(b)[:, None], top_ids].set(mass)

    # top_k over the vocabulary is the costliest part: only when some row filters.
    probs = jax.lax.cond(uses_filter.any(), filtered, lambda _: full, None)
    greedy_mass = jax.nn.one_hot(greedy(logits, native), v, dtype=jnp.float32)
    return jnp.where(sampling[:, None], jnp.where(uses_filter[:, None], probs, full), greedy_mass)
