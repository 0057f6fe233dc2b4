"""The row-wise sampler: greedy, temperature, top-k, top-p and per-request seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve.sampling import SamplingParams, sample

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32))


def _draw(n, temperature=1.0, top_k=0, top_p=1.0, seed=7):
    """n draws from LOGITS, one per row, each row a different step count of the same seed."""
    fn = jax.jit(sample)
    out = fn(
        jnp.tile(LOGITS, (n, 1)),
        jnp.full((n,), seed, jnp.uint32),
        jnp.arange(n, dtype=jnp.int32),
        jnp.full((n,), temperature, jnp.float32),
        jnp.full((n,), top_k, jnp.int32),
        jnp.full((n,), top_p, jnp.float32),
    )
    return np.bincount(np.asarray(out), minlength=LOGITS.size) / n


def test_temperature_one_follows_the_distribution():
    freq = _draw(20000)
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.015)


def test_low_temperature_sharpens():
    freq = _draw(4000, temperature=0.25)
    p = np.exp(LOGITS / 0.25)
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.02)


def test_top_k_and_top_p_keep_only_the_head():
    freq = _draw(8000, top_k=2)
    np.testing.assert_allclose(freq, [2 / 3, 1 / 3, 0, 0, 0], atol=0.02)
    # 0.5 + 0.25 < 0.8, so the nucleus needs the third token too; the rest never appear.
    freq = _draw(8000, top_p=0.8)
    np.testing.assert_allclose(freq, np.array([0.5, 0.25, 0.15, 0, 0]) / 0.9, atol=0.02)
    assert _draw(100, top_p=0.3)[0] == 1.0  # the top token alone already reaches 0.3


def test_greedy_rows_and_sampled_rows_share_a_batch():
    logits = jnp.tile(LOGITS, (4, 1))
    out = sample(
        logits,
        jnp.array([1, 2, 3, 4], jnp.uint32),
        jnp.zeros(4, jnp.int32),
        jnp.array([0.0, 50.0, 0.0, 50.0]),
        jnp.zeros(4, jnp.int32),
        jnp.ones(4),
    )
    assert out[0] == 0 and out[2] == 0  # greedy rows: argmax


def test_same_seed_same_tokens_regardless_of_row():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 100)), jnp.float32)
    args = dict(temperature=jnp.ones(3), top_k=jnp.zeros(3, jnp.int32), top_p=jnp.ones(3))
    a = sample(logits, jnp.array([5, 9, 5], jnp.uint32), jnp.array([3, 3, 3], jnp.int32), **args)
    swapped = sample(logits[::-1], jnp.array([5, 9, 5], jnp.uint32), jnp.array([3, 3, 3], jnp.int32), **args)
    assert a[0] == swapped[2] and a[2] == swapped[0]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(seed=-1), "seed"),
        (dict(stop=("",)), "stop"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(seed=True), "seed"),
        (dict(stop_token_ids=("3",)), "stop_token_ids"),
        (dict(ignore_eos="no"), "ignore_eos"),
        (dict(stop=tuple(f"s{i}" for i in range(17))), "stop takes at most 16"),  # matched after every token
        (dict(stop=("x" * 257,)), "stop takes at most 16 strings of at most 256"),
        (dict(stop=("fine", "a\ud800")), "stop holds a lone surrogate"),
        (dict(stop_token_ids=[1] * 1025), "stop_token_ids takes at most 1024"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("vocab", [49152, 49157, 7])  # 49157, 7: a tail past the last 16 logits
def test_greedy_is_jnp_argmax_ties_nans_and_all(native, vocab):
    from compress.kernels import cpu as cpu_kernels
    from serve.sampling import greedy

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((9, vocab)).astype(np.float32)
    logits[1, [3, 5, vocab - 1]] = 9.0  # a three-way tie: the lowest index
    logits[2, [5, 6]] = np.nan  # the first NaN, as jnp.argmax answers
    logits[3] = -np.inf  # nothing but -inf: index 0
    logits[4, -1] = np.inf  # the maximum in the tail
    logits[5, -1] = np.nan  # a NaN only in the tail
    logits[6, [0, -1]] = 50.0  # a tie between the first and the last
    logits[7] = 0.0  # all equal
    fn = jax.jit(lambda x: greedy(x, native))
    got = fn(jnp.asarray(logits))
    assert got.dtype == jnp.int32
    want = np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[1:8], [3, 5, 0, vocab - 1, vocab - 1, 0, 0])
    assert fn(jnp.asarray(logits[None])).shape == (1, 9)  # any leading axes
    assert fn(jnp.asarray(logits[:1])).shape == (1,)
    hlo = fn.lower(jnp.asarray(logits)).compile().as_text()
    assert ("press_argmax" in hlo) == (native and cpu_kernels.available())


def test_stop_token_ids_are_looked_up_as_a_set():
    params = SamplingParams(stop_token_ids=[7, 3, 7])
    assert params.stop_token_ids == (7, 3, 7) and params.stop_id_set == {3, 7}
