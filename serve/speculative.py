"""Speculative decoding: a small draft model proposes K tokens, the target checks them in one pass.

A decode step reads all of the target's weights for one token per row. Here the draft (a
distilled student of the target, or the target quantized; the same tokenizer) runs K cheap
steps, and ONE forward of the target over K + 1 tokens per row, [last token, d1 .. dK], gives
its next-token distributions p1 .. pK+1 at every position at once (on a CPU or at small
batches that pass costs about what one decode step does: the weights' read dominates).

Acceptance, per row (Leviathan et al. 2023, Chen et al. 2023):
  - greedy rows: d_j is kept while it equals argmax p_j; the first mismatch is replaced by
    argmax p_j; with all K kept, argmax pK+1 comes free. The output is the target's greedy
    output exactly.
  - sampled rows: with p_j, q_j the target's and draft's distributions after the same
    temperature/top-k/top-p (serve/sampling.py `probabilities`), and d_j drawn from q_j, d_j is
    kept with probability min(1, p_j(d_j) / q_j(d_j)); the first rejected one is replaced by a
    draw from normalize(max(0, p_j - q_j)); with all K kept, a draw from pK+1 is added. Every
    token is then distributed as the target alone would sample it.
A row keeps n of its K draft tokens (0 <= n <= K) and gains n + 1 tokens.

Randomness: each draw is keyed by the request's seed, the count of the token it decides (as
`sample` keys its draws) and what it is for (a proposal, an acceptance test, a replacement),
so a seeded request is reproducible whatever else shares its batch.

A lookup draft (`draft="ngram"`, after prompt lookup decoding, Saxena 2023, and vLLM's ngram
proposer) is no model: each row proposes the K tokens that followed the latest earlier
occurrence of its last 2-3 tokens in its own prompt and output (`lookup`), where answers quote
their sources (retrieval, summaries, code edits) or repeat themselves. Nothing is drafted on the
device; the target's pass is the same (`check`), with the proposal's distribution q one-hot at
each proposed token, so a sampled row keeps d_j with probability p_j(d_j) and replaces the
first rejected one by a draw from p_j without d_j: still the target's distribution.

Caches: the draft keeps a KV cache with the target's rows and slot layout. At the start of a
step each row's target cache holds its context up to the token it feeds next (`cur`, not yet
written); the draft's holds it up to the token before (`prev`), which it may be missing (a
step that kept all K does not write dK into the draft), so the draft's first pass writes
[prev, cur] from one slot back and every later pass one token. After the target's pass both
caches are cut back to the kept tokens (`truncate`): the rejected slots stop being valid and
index/lengths move back, all inside the step's program.

Axes: B rows, K draft tokens, V vocabulary, S cache slots.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compress.errors import InputError
from compress.models import decoder
from compress.models.attention import KVCache
from serve.sampling import greedy as argmax, probabilities

MAX_DRAFT_TOKENS = 16  # K; a longer proposal is almost never kept whole, and each K is its own program
LOOKUP = "ngram"  # the draft that is no model: prompt lookup in each request's own context (`lookup`)
LOOKUP_NGRAM = 3  # the longest n-gram a lookup matches
# ... and the shortest: single tokens recur too often to predict what follows (on SmolLM2 at batch 1,
# 0.38 of proposed tokens kept with 1-grams against 0.52 without, and 1.1-1.2x slower decoding).
LOOKUP_MIN_NGRAM = 2
CERTAIN = -1e30  # a proposal's logits off its token: softmax gives them exactly 0 (finite, so no NaN)

# What a draw decides, folded into its key after the token count.
PROPOSE, ACCEPT, REPLACE = 1, 2, 3


def _keys(seeds: jnp.ndarray, counts: jnp.ndarray, purpose: int) -> jnp.ndarray:
    """Keys [B] of draws for the tokens numbered `counts` [B] of the requests seeded `seeds` [B]."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), c), purpose))(seeds, counts)


def propose(logits, seeds, counts, temperature, top_k, top_p, native: bool = True) -> jnp.ndarray:
    """The draft's token per row [B] from its logits [B, V]: the argmax for greedy rows, a draw
    from its filtered distribution q for sampled rows (what `verify` assumes). native: as
    serve/sampling.py `greedy`'s."""
    greedy = argmax(logits, native)
    sampling = temperature > 0

    def sampled(_):
        q = probabilities(logits, temperature, top_k, top_p, native)  # [B, V]
        drawn = jax.vmap(jax.random.categorical)(_keys(seeds, counts, PROPOSE), jnp.log(q)).astype(jnp.int32)
        return jnp.where(sampling, drawn, greedy)

    return jax.lax.cond(sampling.any(), sampled, lambda _: greedy, None)


def verify(target_logits, draft_tokens, draft_logits, seeds, counts, temperature, top_k, top_p, native: bool = True):
    """Accept or reject each row's draft tokens (module docstring).

    Args:
      target_logits: [B, K + 1, V] float32, the target's logits after [cur, d1 .. dK].
      draft_tokens: [B, K] int32, d1 .. dK; draft_logits: [B, K, V] the draft's logits they came from.
      seeds [B], counts [B] (tokens generated before d1), temperature, top_k, top_p [B]: as `sample`.
      native: as serve/sampling.py `greedy`'s.
    Returns:
      (tokens [B, K + 1] int32, kept [B] int32): a row's new tokens are tokens[:kept + 1].
    """
    b, k1, v = target_logits.shape
    k = k1 - 1
    sampling = temperature > 0
    best = argmax(target_logits, native)  # [B, K + 1]
    # Greedy: the kept tokens equal the target's argmax, so the argmax row is the output.
    greedy_kept = jnp.sum(jnp.cumprod(draft_tokens == best[:, :k], axis=1), axis=1).astype(jnp.int32)

    def sampled(_):
        per_position = lambda x: jnp.repeat(x, k1)  # noqa: E731 - one setting per row -> per row and position
        p = probabilities(target_logits.reshape(b * k1, v), per_position(temperature), per_position(top_k),
                          per_position(top_p), native).reshape(b, k1, v)
        q = probabilities(draft_logits.reshape(b * k, v), jnp.repeat(temperature, k), jnp.repeat(top_k, k),
                          jnp.repeat(top_p, k), native).reshape(b, k, v)
        at_draft = lambda dist: jnp.take_along_axis(dist, draft_tokens[..., None], axis=-1)[..., 0]  # noqa: E731
        p_d, q_d = at_draft(p[:, :k]), at_draft(q)  # [B, K]
        counts_at = (counts[:, None] + jnp.arange(k)[None, :]).reshape(-1)  # [B * K] the count each d_j decides
        uniforms = jax.vmap(jax.random.uniform)(_keys(jnp.repeat(seeds, k), counts_at, ACCEPT)).reshape(b, k)
        ok = uniforms * q_d < p_d  # u < p / q, with q_d > 0 since d was drawn from q
        kept = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)  # [B]
        # The replacement at the first rejection n, max(0, p_n - q_n) normalized; after all K
        # (q_K taken as 0) that is p_K+1 itself.
        q_padded = jnp.concatenate([q, jnp.zeros((b, 1, v), q.dtype)], axis=1)  # [B, K + 1, V]
        p_n = jnp.take_along_axis(p, kept[:, None, None], axis=1)[:, 0]  # [B, V]
        residual = jnp.maximum(p_n - jnp.take_along_axis(q_padded, kept[:, None, None], axis=1)[:, 0], 0.0)
        residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_n)  # p == q to rounding: draw from p
        last = jax.vmap(jax.random.categorical)(_keys(seeds, counts + kept, REPLACE), jnp.log(residual))
        drafted = jnp.concatenate([draft_tokens, jnp.zeros((b, 1), jnp.int32)], axis=1)  # [B, K + 1]
        index = jnp.arange(k1)[None, :]
        tokens = jnp.where(index < kept[:, None], drafted, jnp.where(index == kept[:, None], last[:, None], 0))
        return (jnp.where(sampling[:, None], tokens.astype(jnp.int32), best),
                jnp.where(sampling, kept, greedy_kept))

    # Batches that are all greedy (the common case) skip the distributions and the draws.
    return jax.lax.cond(sampling.any(), sampled, lambda _: (best, greedy_kept), None)


def truncate(cache: KVCache, index: jnp.ndarray, lengths: jnp.ndarray, end: jnp.ndarray) -> KVCache:
    """Cut rows [0, B) of `cache` back: index and lengths [B] set, slots [index, end) no longer valid."""
    b = index.shape[0]
    slots = jnp.arange(cache.max_len)[None, :]  # [1, S]
    drop = (slots >= index[:, None]) & (slots < end[:, None])  # [B, S]
    return cache.replace(valid=cache.valid.at[:b].set(cache.valid[:b] & ~drop), index=cache.index.at[:b].set(index),
                         lengths=cache.lengths.at[:b].set(lengths))


def feed(params, config: decoder.DecoderConfig, cache: KVCache, prev, cur, width: int):
    """The draft's first pass of a step: [prev, cur] [B] written from one slot before each row's
    index (where prev belongs), attending over `width` slots. Returns (logits after cur [B, V], cache)."""
    b = cur.shape[0]
    back = cache.replace(index=cache.index.at[:b].add(-1), lengths=cache.lengths.at[:b].add(-1))
    out = decoder.forward(params, jnp.stack([prev, cur], axis=1), config, cache=back, attend_len=width,
                          last_logits_only=True)
    return out.logits[:, -1], out.cache


def step(params, config: decoder.DecoderConfig, draft_params, draft_config: decoder.DecoderConfig, cache: KVCache,
         draft_cache: KVCache, prev, cur, seeds, counts, temperature, top_k, top_p, *, k: int, width: int):
    """One speculative step for rows [0, B): K draft passes, one target pass over K + 1 tokens,
    acceptance, and both caches cut back to what was kept.

    Args:
      cache, draft_cache: the target's and the draft's caches (more rows than B are left alone);
        every row needs K + 1 free slots past its index, all below `width`.
      prev, cur: [B] the token before the one each row feeds next, and that one.
      seeds, counts, temperature, top_k, top_p: [B], as `sample`.
    Returns:
      (tokens [B, K + 1], kept [B], cache, draft_cache): row b's new tokens are tokens[b, :kept[b] + 1].
    """
    start, past = cache.index[: cur.shape[0]], cache.lengths[: cur.shape[0]]
    filters = (temperature, top_k, top_p)
    native = cache.native  # one device: the native argmax may read the logits (serve/sampling.py greedy)
    logits, draft_cache = feed(draft_params, draft_config, draft_cache, prev, cur, width)
    first = propose(logits, seeds, counts, *filters, native)

    def draft_pass(carry, j):  # d_j -> the draft's logits after it and d_j+1
        dcache, token = carry
        out = decoder.forward(draft_params, token[:, None], draft_config, cache=dcache, attend_len=width)
        nxt = propose(out.logits[:, 0], seeds, counts + j, *filters, native)
        return (out.cache, nxt), (nxt, out.logits[:, 0])

    if k > 1:
        (draft_cache, _), (rest, rest_logits) = jax.lax.scan(draft_pass, (draft_cache, first), jnp.arange(1, k))
        draft_tokens = jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, K]
        draft_logits = jnp.concatenate([logits[:, None], rest_logits.transpose(1, 0, 2)], axis=1)  # [B, K, V]
    else:
        draft_tokens, draft_logits = first[:, None], logits[:, None]
    tokens, kept, cache = check(params, config, cache, cur, draft_tokens, draft_logits, seeds, counts, temperature,
                                top_k, top_p, width=width)
    draft_cache = truncate(draft_cache, start + kept + 1, past + kept + 1, start + k)
    return tokens, kept, cache, draft_cache


def check(params, config: decoder.DecoderConfig, cache: KVCache, cur, draft_tokens, draft_logits, seeds, counts,
          temperature, top_k, top_p, *, width: int):
    """The target's half of a step for rows [0, B): one pass over [cur, d1 .. dK], acceptance
    (`verify`), and its cache cut back to what was kept. draft_tokens [B, K], draft_logits
    [B, K, V] the proposal's logits (None: a lookup's, proposed with certainty). Returns
    (tokens [B, K + 1], kept [B], cache)."""
    b, k = draft_tokens.shape
    start, past = cache.index[:b], cache.lengths[:b]
    if draft_logits is None:
        draft_logits = certain(draft_tokens, config.vocab_size)
    out = decoder.forward(params, jnp.concatenate([cur[:, None], draft_tokens], axis=1), config, cache=cache,
                          attend_len=width)
    tokens, kept = verify(out.logits, draft_tokens, draft_logits, seeds, counts, temperature, top_k, top_p,
                          cache.native)
    index, lengths = start + kept + 1, past + kept + 1  # cur and the kept draft tokens are now context
    return tokens, kept, truncate(out.cache, index, lengths, start + k + 1)


def certain(tokens: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """Logits [..., V] of proposals made with certainty, tokens [...]: q one-hot at each token
    (after any temperature, top-k or top-p), so `verify` keeps d with probability p(d) and draws a
    replacement from p without d."""
    return jnp.where(jax.nn.one_hot(tokens, vocab_size, dtype=bool), 0.0, CERTAIN)


class Ngrams:
    """A growing token sequence with where each of its n-grams (min_ngram .. max_ngram tokens)
    starts, for prompt lookup: a step's proposal is a few dictionary reads, where a scan of the
    context took 0.2 ms at 400 tokens and 1 ms at 8,000 (numpy, every row, every step)."""

    def __init__(self, max_ngram: int = LOOKUP_NGRAM, min_ngram: int = LOOKUP_MIN_NGRAM):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self._starts: dict[tuple[int, ...], list[int]] = {}  # n-gram -> its starts, in order

    def extend(self, tokens: Sequence[int]) -> Ngrams:
        seq, starts = self.tokens, self._starts
        for token in tokens:
            seq.append(int(token))
            end = len(seq)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                starts.setdefault(tuple(seq[end - n :]), []).append(end - n)
        return self

    def follow(self, prompt: Sequence[int], generated: Sequence[int]) -> Ngrams:
        """Extend by what it lacks of prompt + generated, a request's context (both only grow)."""
        have = len(self.tokens)
        if have < len(prompt):
            self.extend(prompt[have:])
            have = len(prompt)
        return self.extend(generated[have - len(prompt) :])

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed an earlier occurrence of the last n tokens, for n from
        max_ngram down to min_ngram; [] when none recurs. Of the earlier occurrences the latest with
        k tokens after it is taken, else the earliest (the most after it)."""
        seq, end = self.tokens, len(self.tokens)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            starts = self._starts[tuple(seq[end - n :])]  # its last start is the last n tokens themselves
            if len(starts) < 2:
                continue
            latest = bisect.bisect_right(starts, end - n - k, 0, len(starts) - 1)  # those with k tokens after
            at = starts[latest - 1] if latest else starts[0]
            return seq[at + n : at + n + k]
        return []


def lookup(context: Sequence[int], k: int, max_ngram: int = LOOKUP_NGRAM, min_ngram: int = LOOKUP_MIN_NGRAM) -> list[int]:
    """`Ngrams.propose` for a context given whole."""
    return Ngrams(max_ngram, min_ngram).extend(context).propose(k)


def check_vocabulary(target: str, config: decoder.DecoderConfig, tokenizer: Any, draft: str,
                     draft_config: decoder.DecoderConfig, draft_tokenizer: Any | None) -> None:
    """InputError unless the draft `draft` shares the target `target`'s vocabulary (its size and,
    when the draft came with a tokenizer, every token's id), naming both and the first difference."""
    advice = "a draft must use the target's tokenizer (a student distilled from it, or the target quantized)"
    if draft_config.vocab_size != config.vocab_size:
        raise InputError(f"draft {draft!r} has a vocabulary of {draft_config.vocab_size} tokens and the target "
                         f"{target!r} one of {config.vocab_size}; {advice}")
    if draft_tokenizer is None or tokenizer is None:
        return
    ours, theirs = tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if ours == theirs:
        return
    token = next((t for t in sorted(ours) if theirs.get(t) != ours[t]), None)
    if token is None:
        token = next(t for t in sorted(theirs) if t not in ours)
        raise InputError(f"draft {draft!r} has the token {token!r} (id {theirs[token]}), which the target {target!r} "
                         f"lacks; {advice}")
    if token not in theirs:
        raise InputError(f"draft {draft!r} has no token {token!r} (the target {target!r} numbers it {ours[token]}); "
                         f"{advice}")
    raise InputError(f"draft {draft!r} numbers the token {token!r} {theirs[token]} where the target {target!r} "
                     f"numbers it {ours[token]}; {advice}")
