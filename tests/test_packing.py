"""Packed rows: attention never crosses a document, and remat changes no gradient.

A row packing several documents (segment ids, positions restarting at 0) must give each
document the logits it gets when run alone, unpacked. The shapes are tests/tiny_decoder.py's
(DecoderConfig's defaults) with a 256-token vocabulary instead of SmolLM2's tokenizer, which
attention masks do not need (and which takes seconds to load).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.models import attention as attn
from compress.models import decoder


@functools.cache
def _model(**overrides):
    config = decoder.DecoderConfig(**overrides)
    # Jitted: one compile instead of one per parameter shape (seconds on 2 cores).
    init = jax.jit(decoder.init_params, static_argnums=(0, 2))
    return config, init(config, jax.random.key(0), 0.1)


def _pack(docs: list[np.ndarray], length: int):
    """(tokens, segment_ids, positions) [1, length] of docs laid end to end, padding after them."""
    tokens, segments, positions = (np.zeros((1, length), np.int32) for _ in range(3))
    start = 0
    for number, doc in enumerate(docs, 1):
        end = start + len(doc)
        tokens[0, start:end], segments[0, start:end], positions[0, start:end] = doc, number, np.arange(len(doc))
        start = end
    return tokens, segments, positions


@functools.partial(jax.jit, static_argnames=("config",))
def _logits(params, tokens, config, segment_ids=None, positions=None, attention_mask=None):
    return decoder.forward(
        params, tokens, config, segment_ids=segment_ids, positions=positions, attention_mask=attention_mask
    ).logits


def _alone(params, docs, config, length):
    """Each document in its own unpacked row (right-padded: causality keeps padding out): [n, length, V]."""
    tokens = np.zeros((len(docs), length), np.int32)
    mask = np.zeros((len(docs), length), np.int32)
    for i, doc in enumerate(docs):
        tokens[i, : len(doc)], mask[i, : len(doc)] = doc, 1
    return np.asarray(_logits(params, tokens, config, attention_mask=mask))


@pytest.mark.parametrize(
    "lengths, row, overrides",
    [
        ([5, 9, 3], 20, {}),  # three documents, three padding tokens
        ([6, 11], 17, dict(sliding_window=4, qkv_bias=True)),  # Mistral's window stays inside a document
        ([300, 150, 62], 512, {}),  # long enough for the blocked causal attention path
    ],
)
def test_packed_row_equals_each_document_alone(lengths, row, overrides):
    config, params = _model(**overrides)
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, config.vocab_size, size=n).astype(np.int32) for n in lengths]
    tokens, segments, positions = _pack(docs, row)

    packed = np.asarray(_logits(params, tokens, config, segments, positions))  # [1, row, V]
    assert np.isfinite(packed).all()  # padding queries see no key, yet give no NaN
    alone = _alone(params, docs, config, max(lengths))  # [n, max length, V]
    start = 0
    for i, doc in enumerate(docs):
        np.testing.assert_allclose(packed[0, start : start + len(doc)], alone[i, : len(doc)], atol=2e-5, rtol=0)
        start += len(doc)


def test_positions_default_to_counting_within_each_segment():
    config, params = _model()
    tokens, segments, positions = _pack([np.arange(1, 8), np.arange(9, 20)], 20)
    derived = np.asarray(decoder.segment_positions(jnp.asarray(segments)))
    np.testing.assert_array_equal(derived[segments > 0], positions[segments > 0])  # padding's positions are unused
    np.testing.assert_array_equal(
        np.asarray(_logits(params, tokens, config, segments)), np.asarray(_logits(params, tokens, config, segments, positions))
    )


def test_packed_rows_in_a_batch_are_independent():
    """Two packed rows of different layouts in one batch: each row equals the same row run by itself."""
    config, params = _model()
    rng = np.random.default_rng(1)
    rows = [_pack([rng.integers(1, 256, size=n) for n in lengths], 20) for lengths in ([4, 12], [5, 9, 3])]
    tokens, segments, positions = (np.concatenate(parts) for parts in zip(*rows))
    batched = np.asarray(_logits(params, tokens, config, segments, positions))
    for i, (t, s, p) in enumerate(rows):
        np.testing.assert_allclose(batched[i], np.asarray(_logits(params, t, config, s, p))[0], atol=1e-5, rtol=0)


def _packed_loss(params, config, batch, remat):
    logits = decoder.forward(
        params, batch["tokens"], config, segment_ids=batch["segments"], positions=batch["positions"], remat=remat
    ).logits
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
    target_log_probs = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]  # [B, T]
    return -jnp.mean(target_log_probs * (batch["segments"] > 0))


_gradients = jax.jit(jax.grad(_packed_loss), static_argnums=(1, 3))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat):
    config, params = _model()
    rng = np.random.default_rng(2)
    tokens, segments, positions = _pack([rng.integers(1, 256, size=n) for n in (7, 5, 10)], 24)
    batch = dict(tokens=tokens, segments=segments, positions=positions, targets=rng.integers(0, 256, size=tokens.shape))
    plain, recomputed = _gradients(params, config, batch, "none"), _gradients(params, config, batch, remat)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(recomputed)):
        # Recomputed activations may be fused differently: float32 rounding, not a change in value.
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6 * np.abs(a).max(), rtol=1e-5)


def test_bad_remat_and_packing_with_a_cache_are_refused():
    config, params = _model()
    tokens = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="remat='some'.*none, full, dots"):
        decoder.forward(params, tokens, config, remat="some")
    with pytest.raises(ValueError, match="without a cache"):
        decoder.forward(params, tokens, config, segment_ids=tokens, cache=decoder.init_cache(config, 1, 8))


def test_same_segment_mask():
    segments = jnp.asarray([[1, 1, 2, 0]])
    want = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(np.asarray(attn.same_segment(segments))[0], want)
