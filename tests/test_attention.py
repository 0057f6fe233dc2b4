"""Attention kernels agree with each other and with a plain softmax reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from compress.models import attention as attn


def _reference(q, k, v, allowed):
    """Straight from the definition: per head, softmax(q k^T / sqrt(H)) v, masked, float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(allowed)[:, None], scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("block", [64, 128])
def test_blocked_causal_attention_matches_reference_with_left_padding(block):
    rng = np.random.default_rng(0)
    b, t, n, kv, h = 2, 256, 6, 2, 16
    q = rng.standard_normal((b, t, n, h), np.float32)
    k = rng.standard_normal((b, t, kv, h), np.float32)
    v = rng.standard_normal((b, t, kv, h), np.float32)
    mask = np.ones((b, t), bool)
    mask[1, :37] = False  # row 1 left-padded
    slots = np.broadcast_to(np.arange(t), (b, t))
    allowed = attn.attention_mask(jnp.asarray(slots), jnp.asarray(mask))
    got = np.asarray(attn.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), allowed, block=block))
    want = _reference(q, k, v, allowed)
    # Padding queries see no key; their output is unused, so compare real positions only.
    np.testing.assert_allclose(got[mask], want[mask], atol=2e-5)
    unblocked = np.asarray(attn.grouped_query_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), allowed))
    np.testing.assert_allclose(got[mask], unblocked[mask], atol=2e-5)


def test_decode_step_attention_matches_reference():
    rng = np.random.default_rng(1)
    b, s, n, kv, h = 3, 40, 8, 2, 16
    q = rng.standard_normal((b, 1, n, h), np.float32)
    k = rng.standard_normal((b, s, kv, h), np.float32)
    v = rng.standard_normal((b, s, kv, h), np.float32)
    valid = np.arange(s)[None, :] < np.array([[40], [17], [5]])
    allowed = attn.attention_mask(jnp.asarray([[39], [16], [4]]), jnp.asarray(valid))
    got = np.asarray(attn.grouped_query_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), allowed))
    np.testing.assert_allclose(got, _reference(q, k, v, allowed), atol=2e-5)
