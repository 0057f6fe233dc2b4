"""Native CPU kernels for small-batch int8 and int4 matmuls: exact against float64 references,
the same logits and gradients as the plain JAX path, no float copy of a weight in the compiled
decode step, and a clean fallback where they cannot be built."""

import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.models import decoder
from compress.kernels import cpu as cpu_kernels
from compress.quant import aqt_matmul, matmul, packed_int4, schemes, weights
from tests.tiny_decoder import tiny_decoder


def test_the_kernels_build_here():
    assert cpu_kernels.available(), cpu_kernels.status()


def _int4_case(rng, layers, groups, size, n, zero_point):
    codes = rng.integers(-8, 8, (layers, groups, size, n))
    packed = packed_int4.pack(jnp.asarray(codes), 2)  # [L, G, S/2, N]
    scale = jnp.asarray(rng.random((layers, groups, n)) + 0.5, jnp.float16)
    offset = jnp.asarray(rng.standard_normal((layers, groups, n)), jnp.float16) if zero_point else None
    w = codes * np.asarray(scale, np.float64)[:, :, None]  # [L, G, S, N]
    if zero_point:
        w = w + 8 * np.asarray(scale, np.float64)[:, :, None] + np.asarray(offset, np.float64)[:, :, None]
    return packed, scale, offset, w.reshape(layers, groups * size, n)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17, 64])
@pytest.mark.parametrize("k, n", [(64, 16), (96, 48), (128, 80), (576, 192), (64, 4112)])  # 4112: split by columns
def test_int8_and_int4_products_equal_float64(rows, k, n):
    rng = np.random.default_rng(rows * 1000 + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    q = rng.integers(-127, 128, (3, k, n)).astype(np.int8)
    scale = (rng.random((3, n)) + 0.5).astype(np.float32)
    want = x.astype(np.float64) @ (q[2].astype(np.float64) * scale[2])
    got = jax.jit(cpu_kernels.int8_matmul)(x, q, scale, 2)  # layer 2 of a stack of 3, read in place
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    hinted = cpu_kernels.int8_matmul(jnp.asarray(x), q, scale, 2, after=(q[:, ::-1], 7))  # prefetch hints: past the end
    np.testing.assert_array_equal(hinted, got)
    if matmul.tileable(k, n):  # the codes in the tiled layout: the same sums in the same order
        tiled = matmul.tile(jnp.asarray(q), 1, lead=1)
        np.testing.assert_array_equal(cpu_kernels.int8_matmul(jnp.asarray(x), tiled, scale, 2, tiled=True), got)
    for zero_point in (False, True):
        packed, gscale, offset, w = _int4_case(rng, 2, k // 32, 32, n, zero_point)
        want = x.astype(np.float64) @ w[1]
        got = cpu_kernels.int4_matmul(jnp.asarray(x), packed, gscale, offset, zero_point, 1)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
        hinted = cpu_kernels.int4_matmul(jnp.asarray(x), packed, gscale, offset, zero_point, 1, after=(packed, 0))
        np.testing.assert_array_equal(hinted, got)
        if n % 64 == 0 and n < cpu_kernels.WIDE:  # each group's rows of 64 columns contiguous: the same sums
            tiled = matmul.tile(jnp.asarray(packed), 2, lead=1, rows=packed.shape[2])
            np.testing.assert_array_equal(
                cpu_kernels.int4_matmul(jnp.asarray(x), tiled, gscale, offset, zero_point, 1, tiled=True), got)


def _rounded_per_group(x, size):
    """x [M, K] with each group of `size` inputs rounded to int8 with its own step (max |x| / 127,
    half to even, as the kernels round), in float64."""
    rows, k = x.shape
    step = np.abs(x.reshape(rows, k // size, size)).max(axis=-1, keepdims=True) / np.float32(127)
    step[step == 0] = 1
    codes = np.clip(np.round(x.reshape(rows, k // size, size) / step.astype(np.float32)), -127, 127)
    return (codes * step).reshape(rows, k).astype(np.float64)


vnni = pytest.mark.skipif(not cpu_kernels.has_w8a8(), reason="no AVX-512 VNNI on this CPU: w8a8 keeps AQT's path")
w4a8_kernel = pytest.mark.skipif(not cpu_kernels.has_w4a8(), reason="no AVX-512 or AVX2 here: w4a8 takes the int4 kernel")
w8a8g_kernel = pytest.mark.skipif(not cpu_kernels.has_w8a8g(),
                                  reason="no AVX2 or AVX-512 VNNI here: w8a8-gN takes the int8 kernel")


@vnni
@pytest.mark.parametrize("rows, k, n", [(1, 576, 576), (5, 576, 192), (16, 1536, 576), (64, 64, 4160), (3, 68, 128)])
def test_w8a8_products_are_the_per_token_integer_products_aqt_computes(rows, k, n):
    rng = np.random.default_rng(rows + k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, 3] = 40.0  # an outlier channel: the row's step is large, most codes small
    if rows > 1:
        x[1] = 0.0  # a row of zeros: step 1, every code 0
    q = rng.integers(-127, 128, (3, k, n)).astype(np.int8)
    scale = ((rng.random((3, n)) + 0.5) / 100).astype(np.float32)
    got = np.asarray(jax.jit(cpu_kernels.w8a8_matmul)(x, q, scale, 1))
    step = np.abs(x).max(axis=1, keepdims=True) / 127
    step[step == 0] = 1
    codes = np.clip(np.round(x / step), -127, 127)  # numpy rounds half to even, as the kernel
    want = (codes.astype(np.float64) @ q[1].astype(np.float64)) * step * scale[1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    from compress.quant import aqt_matmul

    aqt = aqt_matmul.int_weight_einsum("mk,kn->mn", jnp.asarray(x), jnp.asarray(q[1]), jnp.asarray(scale[1][None]), 8, 8)
    np.testing.assert_allclose(got, aqt, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@w4a8_kernel
@pytest.mark.parametrize("rows, k, n, size", [(1, 576, 576, 32), (3, 576, 192, 64), (5, 1536, 576, 32),
                                              (17, 128, 64, 128), (64, 64, 128, 32)])
def test_w4a8_products_are_each_groups_integer_products(rows, k, n, size):
    """The w4a8 kernel rounds each group of `size` activations to int8 codes with its own step and
    sums codes times the int4 codes in integers: float64 math on the same codes, and the plain
    path (the activations rounded, then int4's float product), give the same numbers."""
    rng = np.random.default_rng(rows + k + n + size)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, 3] = 40.0  # an outlier: its group's step is large, the other groups keep theirs
    x[-1, :size] = 0.0  # a group of zeros: step 1, every code 0
    rounded = _rounded_per_group(x, size)
    for zero_point in (False, True):
        packed, scale, offset, w = _int4_case(rng, 2, k // size, size, n, zero_point)
        want = rounded @ w[1]
        tiled = matmul.w4a8_tile(jnp.asarray(packed), 1)
        assert np.array_equal(matmul.w4a8_tile(tiled, 1, inverse=True), packed)
        got = jax.jit(cpu_kernels.w4a8_matmul, static_argnums=4)(jnp.asarray(x), tiled, scale, offset, zero_point, 1)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
        plain = packed_int4.einsum(packed_int4.quantize_activations(jnp.asarray(x), 1, size), packed[1], scale[1],
                                   None if offset is None else offset[1], 1, zero_point)
        np.testing.assert_allclose(plain, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
        hinted = cpu_kernels.w4a8_matmul(jnp.asarray(x), tiled, scale, offset, zero_point, 1, after=(tiled, 0))
        np.testing.assert_array_equal(hinted, got)


@w8a8g_kernel
@pytest.mark.parametrize("rows, k, n, size", [(1, 576, 576, 32), (3, 576, 192, 64), (5, 1536, 576, 32),
                                              (17, 128, 64, 128), (64, 64, 128, 32)])
def test_w8a8g_products_are_each_groups_integer_products(rows, k, n, size):
    """The w8a8-gN kernel rounds each group of `size` activations to int8 codes with its own step
    and sums codes times the int8 weights in integers: float64 math on the same codes, and the
    plain path (the activations rounded, then int8's product), give the same numbers."""
    rng = np.random.default_rng(rows + k + n + size)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, 3] = 40.0  # an outlier: its group's step is large, the other groups keep theirs
    x[-1, :size] = 0.0  # a group of zeros: step 1, every code 0
    q = rng.integers(-127, 128, (3, k, n)).astype(np.int8)
    q[1, 0, :4] = [-127, 127, -127, 127]  # the codes' ends, where a sign trick could overflow
    scale = ((rng.random((3, n)) + 0.5) / 100).astype(np.float32)
    want = (_rounded_per_group(x, size) @ q[1].astype(np.float64)) * scale[1]
    tiled = matmul.w8a8g_tile(jnp.asarray(q), 1, size, lead=1)
    assert not np.array_equal(tiled, q) and np.array_equal(matmul.w8a8g_tile(tiled, 1, size, lead=1, inverse=True), q)
    got = jax.jit(cpu_kernels.w8a8g_matmul, static_argnums=3)(jnp.asarray(x), tiled, scale, size, 1)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    stored = {"qkernel": jnp.asarray(q[1]), "scale": jnp.asarray(scale[1][None])}  # as quantize_kernel stores them
    plain = matmul.spec_of(schemes.get(f"w8a8-g{size}")).plain_einsum(stored, jnp.asarray(x), "mk,kn->mn")
    np.testing.assert_allclose(plain, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    hinted = cpu_kernels.w8a8g_matmul(jnp.asarray(x), tiled, scale, size, 1, after=(tiled, 0))
    np.testing.assert_array_equal(hinted, got)


def test_a_w8a8g_decoder_computes_what_its_plain_path_does(tiny):
    """w8a8-g32 rows take the int8 kernel on the rounded activations; in its own tiled layout
    (every engine stores it where the kernel is built) the integer kernel; prefill undoes the
    tiles. All compute the plain path's logits, and QAT rounds the activations the same way."""
    config, params, _ = tiny
    q = _quantized(params, "w8a8-g32")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, 5)), jnp.int32)
    forward = jax.jit(lambda p, t: decoder.forward(p, t, config).logits)
    plain = forward(matmul.single_device(q), tokens)
    np.testing.assert_allclose(forward(q, tokens), plain, atol=2e-5 * float(jnp.abs(plain).max()))
    assert forward.lower(q, tokens).as_text().count("press_int8") == 7
    tiled = matmul.native_float(q, None, own_layouts=decoder.PROJECTIONS)
    assert tiled["layers"]["up"]["spec"].tiled == cpu_kernels.has_w8a8g()
    np.testing.assert_allclose(forward(tiled, tokens), plain, atol=2e-5 * float(jnp.abs(plain).max()))
    if cpu_kernels.has_w8a8g():
        text = forward.lower(tiled, tokens).as_text()
        assert text.count("press_w8a8g") == 5 and text.count("press_int8") == 2  # k, v: 32 wide
        assert _float_copies(forward.lower(tiled, tokens).compile().as_text(), q) == []
    long = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 40)), jnp.int32)  # 80 rows
    want = forward(matmul.single_device(q), long)
    np.testing.assert_allclose(forward(tiled, long), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    fake = dataclasses.replace(q["layers"]["up"]["spec"], fake=True, tiled=False)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, config.embed_dim)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(3).standard_normal((config.embed_dim, 64)), jnp.float32) / 10
    np.testing.assert_allclose(fake.plain_einsum({"kernel": kernel}, x, "mk,kn->mn"),
                               aqt_matmul.fake_quant_einsum("mk,kn->mn", packed_int4.quantize_activations(x, 1, 32),
                                                            kernel, 8), rtol=1e-6)


@pytest.mark.parametrize("name", ["w4a8-g32", "w4a8-g32-asym+embed-int4-g32-asym"])
def test_a_w4a8_decoder_computes_what_its_plain_path_does(tiny, name):
    """w4a8 rows take the int4 kernel on the rounded activations; tiled (engines of few rows) the
    integer kernel (AVX-512 or AVX2); prefill undoes the tiles. All compute the plain path's logits."""
    config, params, _ = tiny
    q = _quantized(params, name)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, 5)), jnp.int32)
    forward = jax.jit(lambda p, t: decoder.forward(p, t, config).logits)
    plain = forward(matmul.single_device(q), tokens)
    np.testing.assert_allclose(forward(q, tokens), plain, atol=2e-5 * float(jnp.abs(plain).max()))
    assert forward.lower(q, tokens).as_text().count("press_int4") == 7 + ("embed" in name)
    tiled = matmul.native_float(q, decoder.PROJECTIONS)
    assert tiled["layers"]["up"]["spec"].tiled == cpu_kernels.has_w4a8()
    np.testing.assert_allclose(forward(tiled, tokens), plain, atol=2e-5 * float(jnp.abs(plain).max()))
    if cpu_kernels.has_w4a8():
        text = forward.lower(tiled, tokens).as_text()
        assert text.count("press_w4a8") == 5 and text.count("press_int4") == 2 + ("embed" in name)  # k, v: 32 wide
        assert _float_copies(forward.lower(tiled, tokens).compile().as_text(), q) == []
    long = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 40)), jnp.int32)  # 80 rows
    want = forward(matmul.single_device(q), long)
    np.testing.assert_allclose(forward(tiled, long), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    # An engine of any width stores w4a8's layout (its kernel has no other) and generates what the plain path does.
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    outputs = []
    for served in (q, matmul.single_device(q)):
        with Engine(served, config, tiny[2], max_slots=4, max_seq_len=64, compilation_cache=False) as engine:
            assert engine.params["layers"]["up"]["spec"].tiled == (served is q and cpu_kernels.has_w4a8())
            outputs.append([o.token_ids for o in engine.generate(["Hello there", "The for statement"],
                                                                  SamplingParams(max_new_tokens=6))])
    assert outputs[0] == outputs[1]
    # Quantization-aware training of the scheme rounds the activations the same way (straight through).
    fake = dataclasses.replace(q["layers"]["up"]["spec"], fake=True, tiled=False)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, config.embed_dim)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(3).standard_normal((config.embed_dim, 64)), jnp.float32) / 10
    trained = fake.plain_einsum({"kernel": kernel}, x, "mk,kn->mn")
    rounded = aqt_matmul.fake_quant_einsum("mk,kn->mn", packed_int4.quantize_activations(x, 1, 32), kernel, 4, 32,
                                           fake.zero_point)
    np.testing.assert_allclose(trained, rounded, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: fake.plain_einsum({"kernel": kernel}, x, "mk,kn->mn").sum())(x),
                               jax.grad(lambda x: aqt_matmul.fake_quant_einsum("mk,kn->mn", x, kernel, 4, 32,
                                                                               fake.zero_point).sum())(x), rtol=1e-5)


@vnni
def test_a_w8a8_decoder_runs_its_projections_on_the_integer_kernel(tiny):
    config, params, _ = tiny
    q = _quantized(params, "w8a8")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 7)), jnp.int32)
    forward = jax.jit(lambda p, t: decoder.forward(p, t, config).logits)
    native, plain = forward(q, tokens), forward(matmul.single_device(q), tokens)
    np.testing.assert_allclose(native, plain, atol=1e-4 * float(jnp.abs(plain).max()))
    text = forward.lower(q, tokens).as_text()
    assert text.count("press_w8a8") == 5  # q, o, gate, up, down; k and v (32 wide) stay on AQT's path
    assert "press_w8a8" not in forward.lower(matmul.single_device(q), tokens).as_text()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, config.embed_dim)), jnp.float32)
    w = q["layers"]["gate"]
    one = {key: (v[0] if hasattr(v, "shape") else v) for key, v in w.items()}
    grad = jax.grad(lambda x: decoder.dense(one, x, decoder.PROJECTIONS["gate"]).sum())(x)  # the plain path's VJP
    grad_plain = jax.grad(lambda x: decoder.dense(matmul.single_device(one), x, decoder.PROJECTIONS["gate"]).sum())(x)
    np.testing.assert_allclose(grad, grad_plain, rtol=1e-5, atol=1e-6)


def test_offers_taken_back_while_a_worker_wakes_up_are_not_run():
    """With no spinning the workers sleep between calls; a caller that finishes every part before
    the worker it woke has looked takes its offer back, and the worker must see an empty mailbox
    (it once ran a null job: a segfault in a speculative benchmark)."""
    code = """
        import concurrent.futures
        from compress.kernels import cpu
        lib = cpu._load()
        assert all(lib.press_workers_selftest(2, 2, 0) == 3 for _ in range(300))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert all(pool.map(lambda i: lib.press_workers_selftest(3, 64, i % 2 * 50) == 6, range(300)))
        print("ok")
    """
    # A woken worker waits 200 us before it looks again, so the offer is nearly always gone by then.
    done = _python(code, {"PRESS_SPIN_US": "0", "PRESS_TEST_WAKE_DELAY_US": "200"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stdout, done.stderr[-2000:])


def test_callers_on_many_threads_at_once_get_their_own_products():
    """XLA may run independent custom calls side by side, and several models may serve in one
    process: every caller must get its own product while they share the kernels' workers."""
    import concurrent.futures

    rng = np.random.default_rng(7)
    q = rng.integers(-127, 128, (2, 576, 4096)).astype(np.int8)  # wide (columns split) and big enough to split
    scale = (rng.random((2, 4096)) + 0.5).astype(np.float32)
    xs = [rng.standard_normal((rows, 576)).astype(np.float32) for rows in (1, 2, 5, 1, 3, 1, 4, 7)]
    f = jax.jit(cpu_kernels.int8_matmul)
    want = [np.asarray(f(x, q, scale, 1)) for x in xs]  # one at a time
    with concurrent.futures.ThreadPoolExecutor(len(xs)) as pool:
        for _ in range(5):
            got = list(pool.map(lambda x: np.asarray(f(x, q, scale, 1)), xs))
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


def test_the_workers_run_every_part_once_under_contention_and_after_fork():
    library = cpu_kernels._load()
    parts = 257
    want = parts * (parts + 1) // 2
    assert library.press_workers_selftest(parts, 64, 100) == want
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # ctypes lets go of the GIL: six callers at once
        totals = list(pool.map(lambda i: library.press_workers_selftest(parts, 64, i % 3 * 500), range(600)))
    assert totals == [want] * 600
    # A forked child has none of its parent's threads; its calls must neither hang nor lose parts.
    code = """
        import os, signal, sys
        from compress.kernels import cpu
        lib = cpu._load()
        assert lib.press_workers_selftest(100, 64, 1000) == 5050
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)
            ok = all(lib.press_workers_selftest(100, 64, 1000) == 5050 for _ in range(200))
            os._exit(0 if ok and lib.press_kernel_workers() == cpu._load().press_kernel_workers() else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """
    done = _python(code, {})
    assert done.returncode == 0 and done.stdout.strip() == "0", (done.stdout, done.stderr)


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder(tie_word_embeddings=True)


SCHEMES = ["int8", "int4-g32", "int4-g32-asym", "int8+embed-int8", "int4-g32-asym+embed-int4-g32-asym"]


def _quantized(params, name):
    scheme = schemes.get(name)
    q = weights.quantize_params(params, decoder.PROJECTIONS, schemes.get(name.split("+")[0]))
    return weights.quantize_embeddings(q, scheme) if scheme.embed is not None else q


@pytest.mark.parametrize("name", SCHEMES)
def test_a_quantized_decoder_computes_what_the_plain_path_does(tiny, name):
    config, params, _ = tiny
    q = _quantized(params, name)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 7)), jnp.int32)
    forward = jax.jit(lambda p, t: decoder.forward(p, t, config).logits)
    native, plain = forward(q, tokens), forward(matmul.single_device(q), tokens)
    np.testing.assert_allclose(native, plain, atol=2e-5 * float(jnp.abs(plain).max()))
    # The layers' codes tiled (native_float, for engines of few rows): the kernel reads the tiles, and
    # the plain path (prefill, 64+ rows) undoes them; both compute what the rows did.
    tiled = matmul.native_float(q, decoder.PROJECTIONS)
    assert tiled["layers"]["up"]["spec"].tiled
    np.testing.assert_allclose(forward(tiled, tokens), native, rtol=1e-6, atol=1e-6 * float(jnp.abs(plain).max()))
    long = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 40)), jnp.int32)  # 80 rows
    np.testing.assert_allclose(forward(tiled, long), forward(q, long), rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(forward(q, long)).max()))
    text = forward.lower(q, tokens).as_text()
    assert text.count("press_int") == 7 + ("embed" in name)  # every projection of the scan body, and the head
    assert "press_int" not in forward.lower(matmul.single_device(q), tokens).as_text()


def test_the_decode_step_reads_the_integers_in_place(tiny):
    """The compiled step hands the kernels the whole stacked int8 weights: no slice of them is
    copied out per layer, and no float copy of any weight exists."""
    config, params, _ = tiny
    q = _quantized(params, "int8+embed-int8")
    cache = decoder.init_cache(config, 1, 32)
    step = jax.jit(lambda p, t, c: decoder.forward(p, t, config, cache=c, attend_len=32).logits)
    hlo = step.lower(q, jnp.zeros((1, 1), jnp.int32), cache).compile().as_text()
    calls = [line for line in hlo.splitlines() if "press_int8_matmul" in line and "custom-call(" in line]
    assert len(calls) == 8 and all("s8[2," in line for line in calls[:7])  # [L=2, ...] stacks
    # Each layer call also names the stack its successor reads (the kernel prefetches it while it
    # finishes): the seven stacks once each, rotated (down's is the next layer's q); the head, none.
    operands = [re.search(r"operand_layout_constraints=\{(.*)\}, api_version", line).group(1) for line in calls]
    shapes = [[tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([0-9,]*)\]", o)]
              for o in operands]
    layer_calls = [sh for sh in shapes if sh[1][0] == 2]
    assert len(layer_calls) == 7
    assert sorted(np.prod(sh[4]) for sh in layer_calls) == sorted(np.prod(sh[1]) for sh in layer_calls)
    assert [sh[4] for sh in shapes if sh[1][0] != 2] == [(1,)]
    assert _float_copies(hlo, q) == []
    assert _float_copies(step.lower(matmul.single_device(q), jnp.zeros((1, 1), jnp.int32), cache).compile().as_text(),
                         q), "the plain path converts the head's int8 kernel to float: the check can fail"
    smallest = min(a[0].size for a in jax.tree.leaves(q["layers"]) if a.dtype == jnp.int8)  # one layer's matrix
    for line in hlo.splitlines():
        op = line.split("=", 1)[-1].lstrip()
        if "dynamic-slice(" in op and op.startswith("s8["):  # only the embedding lookup's column may be sliced
            assert np.prod([int(d) for d in op[3 : op.index("]")].split(",")]) < smallest, line


def _float_copies(hlo: str, params, dtype=jnp.int8) -> list[str]:
    """Lines of compiled HLO that convert a matrix of `dtype` (a whole stack, one layer, or a
    table either way round; not a norm's vector) to float32."""
    dims = set()
    for a in jax.tree.leaves(params):
        if a.dtype == dtype and a.ndim >= 2 and a.size > 2 * a.shape[-1]:
            dims |= {",".join(map(str, a.shape)), ",".join(map(str, a.shape[::-1]))}
            if a.ndim >= 3:
                dims.add(",".join(map(str, a.shape[1:])))
    pattern = re.compile(r"= f32\[([0-9,]+)\]\S* convert\(")
    header = re.compile(r"^\S.* -> \(?\w+\[([0-9,]*)\]")  # a computation and (the first of) its results
    size = lambda dims: int(np.prod([int(d) for d in dims.split(",") if d]))  # noqa: E731
    computations, result = [], None  # (its result's size, its lines)
    for line in hlo.splitlines():
        if (h := header.match(line)) is not None:
            computations.append((size(h.group(1)), []))
        elif computations:
            computations[-1][1].append(line)
    found = []
    for result, lines in computations:
        # A fusion that gathers fewer values than it converts (a lookup of table rows) converts only those.
        lookup = any(" gather(" in line for line in lines)
        found += [line for line in lines if (m := pattern.search(line)) and m.group(1) in dims
                  and not (lookup and size(m.group(1)) > result)]
    return found


def test_gradients_through_the_kernels_are_the_plain_paths(tiny):
    config, params, _ = tiny
    for name in ("int8", "int4-g32-asym"):
        q = _quantized(params, name)
        embedded = jax.random.normal(jax.random.key(1), (1, 3, config.embed_dim))  # 3 rows: the native path

        def loss(p, x):
            return jnp.sum(jnp.sin(decoder.decoder_layer(jax.tree.map(lambda a: a[0], p["layers"]), x, config,
                                                         *_tables(config), _attend)[0]))

        native = jax.grad(loss, argnums=1)(q, embedded)
        plain = jax.grad(loss, argnums=1)(matmul.single_device(q), embedded)
        np.testing.assert_allclose(native, plain, rtol=1e-4, atol=1e-5)


def _tables(config):
    tables = decoder.layer_tables(config, jnp.ones((1, 3), jnp.int32))
    return tables.cos, tables.sin


def _attend(q, k, v):
    from compress.models import attention

    return attention.causal_attention(q, k, v, jnp.tril(jnp.ones((1, 3, 3), bool)))


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=600)


def test_without_a_compiler_or_when_switched_off_the_plain_path_runs(tmp_path):
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
    broken.chmod(0o755)
    code = """
        import jax.numpy as jnp
        from compress.kernels import cpu as cpu_kernels
        from compress.quant import matmul, schemes, weights
        from compress.models import decoder
        from tests.tiny_decoder import tiny_decoder
        config, params, _ = tiny_decoder()
        q = weights.quantize_params(params, decoder.PROJECTIONS, schemes.get("int8"))
        logits = decoder.forward(q, jnp.zeros((1, 4), jnp.int32), config).logits
        print(cpu_kernels.available(), bool(jnp.isfinite(logits).all()), cpu_kernels.status())
    """
    failed = _python(code, {"CXX": str(broken), "PRESS_CACHE_DIR": str(tmp_path / "cache")})
    assert failed.returncode == 0, failed.stderr
    assert failed.stdout.startswith("False True unavailable") and "no compiler here" in failed.stdout
    off = _python(code, {"PRESS_CPU_KERNELS": "0"})
    assert off.stdout.startswith("False True switched off"), off.stderr


def test_two_processes_building_at_once_both_load_the_kernels(tmp_path):
    code = "from compress.kernels import cpu; print(cpu.available(), cpu.status())"
    # The portable loops: the quickest build (half the native one's time), and the write-beside-
    # and-rename that this checks is the same for every instruction set.
    env = {"PRESS_CACHE_DIR": str(tmp_path), "PRESS_CPU_KERNELS_ISA": "portable"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(out.startswith("True loaded") for out, _ in outs), outs
    assert len(os.listdir(tmp_path / "kernels")) == 1  # one library, no temporary file left behind


def test_params_loaded_onto_a_mesh_keep_the_plain_path(tmp_path, tiny):
    from compress import sharding as shd
    from compress.formats import quantized

    config, params, tokenizer = tiny
    scheme = schemes.get("int8")
    quantized.save(_quantized(params, "int8"), config, scheme, str(tmp_path / "q"), tokenizer)
    _, on_mesh = quantized.load(str(tmp_path / "q"), scheme, mesh=shd.make_mesh(data=-1, fsdp=1, tensor=1))
    _, alone = quantized.load(str(tmp_path / "q"), scheme)
    specs = lambda tree: [leaf for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, matmul.MatmulSpec))
                          if isinstance(leaf, matmul.MatmulSpec)]  # noqa: E731
    assert specs(on_mesh) and not any(s.native for s in specs(on_mesh)) and all(s.native for s in specs(alone))


@pytest.mark.parametrize("rows, dtype", [(1, "float32"), (2, "float32"), (4, "float32"), (5, "float32"),
                                         (7, "float32"), (9, "float32"), (24, "float32"), (1, "bfloat16"),
                                         (2, "bfloat16"), (4, "bfloat16"), (7, "bfloat16"),
                                         (64, "bfloat16")])  # bf16: up to 64 rows
@pytest.mark.parametrize("k, n", [(64, 16), (96, 48), (576, 192), (64, 4112)])
def test_float_products_equal_float64(rows, k, n, dtype):
    """float32 weights, and bfloat16 ones widened to float32 (exact), against float64."""
    rng = np.random.default_rng(rows * 100 + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((3, k, n)), dtype)
    want = x.astype(np.float64) @ np.asarray(w[1].astype(jnp.float32), np.float64)
    got = jax.jit(cpu_kernels.f32_matmul)(x, w, 1)  # layer 1 of a stack of 3, read in place
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    hinted = cpu_kernels.f32_matmul(jnp.asarray(x), w, 1, after=(w[:, ::-1], 9))  # a prefetch hint past the end
    np.testing.assert_array_equal(hinted, got)
    other = cpu_kernels.f32_matmul(jnp.asarray(x), w, 1, after=(q := jnp.zeros((2, 8, 8), jnp.int8), 0))
    np.testing.assert_array_equal(other, got)  # int8 weights next: no hint, the same product
    del q
    if matmul.tileable(k, n):  # the same weights in the tiled layout: the same sums in the same order
        tiled = matmul.tile(w, 1, lead=1)
        assert not np.array_equal(tiled, w) and np.array_equal(matmul.tile(tiled, 1, lead=1, inverse=True), w)
        np.testing.assert_array_equal(cpu_kernels.f32_matmul(jnp.asarray(x), tiled, 1, after=(tiled, 2), tiled=True),
                                      got)
    else:
        with pytest.raises(Exception, match="tiled weights need"):
            jax.block_until_ready(cpu_kernels.f32_matmul(jnp.asarray(x), w, 1, tiled=True))


def test_engines_of_few_rows_read_a_float32_table_through_the_kernel(tiny):
    """An fp32 tied table is the head's kernel where an engine has at most FLOAT_TABLE_SLOTS rows,
    tiled or not (a 2-row step took 0.72x the time so), and stays on XLA's dot in wider engines;
    the tokens are the same either way."""
    from serve.engine import FLOAT_TABLE_SLOTS, Engine
    from serve.sampling import SamplingParams

    config, params, tokenizer = tiny
    assert matmul.native_float(params)["embed"] is params["embed"]  # the default: with projections only
    assert isinstance(matmul.native_float(params, float_table=True)["embed"]["spec"], matmul.FloatSpec)
    outputs = {}
    for slots in (1, FLOAT_TABLE_SLOTS, FLOAT_TABLE_SLOTS + 1):  # tiled; untiled (chunked prefill); wider
        with Engine(params, config, tokenizer, max_slots=slots, max_seq_len=64) as engine:
            assert isinstance(engine.params["embed"], dict) == (slots <= FLOAT_TABLE_SLOTS), slots
            outputs[slots] = [o.token_ids for o in engine.generate(["a b c", "hello"] * 2,
                                                                   SamplingParams(max_new_tokens=6, ignore_eos=True))]
    assert outputs[1] == outputs[FLOAT_TABLE_SLOTS] == outputs[FLOAT_TABLE_SLOTS + 1]


@pytest.mark.parametrize("dtype, tiled", [("float32", False), ("bfloat16", False), ("float32", True),
                                          ("bfloat16", True)])
def test_a_float_decoder_served_on_a_cpu_streams_its_weights_through_the_kernel(tiny, dtype, tiled):
    """native_float gives every float projection a FloatSpec (tiled: the layer stacks in the
    kernels' tiled layout) and makes the tied table the head's kernel: a decode step then hands
    the float kernel whole stacks (no per-layer slice of a weight) and the head, makes no float32
    copy of a bfloat16 weight, computes the plain path's logits, and takes gradients to the
    weights and inputs that the plain einsum gives."""
    config, params, _ = tiny
    params = jax.tree.map(lambda a: a.astype(dtype), params)  # the weights' dtype; computed in float32
    served = matmul.native_float(params, decoder.PROJECTIONS if tiled else None)
    assert isinstance(served["layers"]["q"]["spec"], matmul.FloatSpec) and "spec" not in params["layers"]["q"]
    for name in decoder.CALL_ORDER:  # tiled where whole tiles fit (here k and v are 32 wide: not)
        lhs, rhs = decoder.PROJECTIONS[name].split("->")[0].split(",")
        shape = params["layers"][name]["kernel"].shape[1:]
        n_in = sum(c in lhs for c in rhs)
        fits = matmul.tileable(int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))
        assert served["layers"][name]["spec"].tiled == (tiled and fits), name
    assert not tiled or served["layers"]["up"]["spec"].tiled
    # The tied table becomes the head's kernel (not tiled: it is wide, its columns split) where it is
    # bfloat16 or the engine has few rows (with projections to tile); an fp32 one else stays on XLA.
    head = dtype == "bfloat16" or tiled
    assert isinstance(served["embed"], dict) == head and not (head and served["embed"]["spec"].tiled)
    cache = decoder.init_cache(config, 2, 32)
    step = jax.jit(lambda p, t, c: decoder.forward(p, t, config, cache=c, attend_len=32).logits)
    tokens = jnp.asarray([[5], [9]], jnp.int32)
    np.testing.assert_allclose(step(served, tokens, cache), step(params, tokens, cache),
                               atol=2e-5 * float(jnp.abs(step(params, tokens, cache)).max()))
    hlo = step.lower(served, tokens, cache).compile().as_text()
    target = cpu_kernels.FLOAT_WEIGHTS[jnp.dtype(dtype)]
    kind = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    calls = [line for line in hlo.splitlines() if target in line and "custom-call(" in line]
    shapes = [re.findall(r"\w+\[([0-9,]*)\]", re.search(r"operand_layout_constraints=\{(.*)\}", line).group(1))
              for line in calls]  # x, the weights, the layer, the next call's weights, its layer
    operands = [o for o in shapes if o[1].startswith("2,")]  # [L=2, ...] stacks
    assert len(calls) == 7 + head and len(operands) == 7  # and the head, [1, D, V]
    assert [o[1] for o in shapes if o not in operands] == [f"1,{config.embed_dim},{config.vocab_size}"] * head
    # Each layer call also names the stack its successor reads (prefetched while it finishes), not the dummy.
    assert all(o[3].startswith("2,") for o in operands), operands
    size = lambda dims: int(np.prod([int(d) for d in dims.split(",")]))  # noqa: E731
    assert sorted(size(o[3]) for o in operands) == sorted(size(o[1]) for o in operands)  # the seven stacks, rotated
    assert _float_copies(hlo, params, jnp.dtype(dtype)) == []
    if dtype == "bfloat16":
        assert _float_copies(step.lower(params, tokens, cache).compile().as_text(), params, jnp.dtype(dtype)), \
            "the plain path converts bfloat16 weights to float32: the check can fail"
    smallest = min(p["kernel"][0].size for p in params["layers"].values() if isinstance(p, dict) and "kernel" in p)
    for line in hlo.splitlines():
        op = line.split("=", 1)[-1].lstrip()
        if "dynamic-slice(" in op and op.startswith(f"{kind}["):  # no layer's matrix is sliced out of its stack
            assert np.prod([int(d) for d in op[len(kind) + 1 : op.index("]")].split(",")]) < smallest, line
    # Prefill (more rows than float_rows(), or BF16_ROWS) stays on XLA's dot, and reads the same table.
    rows = matmul.float_rows() if dtype == "float32" else matmul.BF16_ROWS
    long = jnp.asarray(np.arange(2 * rows).reshape(2, -1) * 7, jnp.int32)
    long_cache = decoder.init_cache(config, 2, 64)
    assert target not in step.lower(served, long, long_cache).as_text()
    np.testing.assert_allclose(step(served, long, long_cache), step(params, long, long_cache), rtol=1e-5, atol=1e-5)

    def loss(p, x):
        return jnp.sum(jnp.sin(decoder.decoder_layer(jax.tree.map(lambda a: a[0], p["layers"]), x, config,
                                                     *_tables(config), _attend)[0]))

    embedded = jax.random.normal(jax.random.key(1), (1, 3, config.embed_dim))
    native = jax.grad(loss, argnums=(0, 1))(served, embedded)
    plain = jax.grad(loss, argnums=(0, 1))(params, embedded)
    np.testing.assert_allclose(native[1], plain[1], rtol=1e-4, atol=1e-5)
    down = native[0]["layers"]["down"]["kernel"]  # the gradient to the stored (tiled) kernel, in its dtype
    grads = matmul.tile(down, 1, lead=1, inverse=True) if tiled else down, plain[0]["layers"]["down"]["kernel"]
    np.testing.assert_allclose(*(np.asarray(g, np.float32) for g in grads), rtol=1e-4 if dtype == "float32" else 1e-2,
                               atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_serves_float_models_on_the_kernel_unless_switched_off(tiny, dtype):
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    config, params, tokenizer = tiny
    params = jax.tree.map(lambda a: a.astype(dtype), params)  # param_dtype=bfloat16 computes in float32
    outputs = {}
    for switch, slots in (("1", 2), ("1", 1), ("0", 2)):  # one slot: the weights tiled (engine.TILED_ROWS)
        os.environ["PRESS_FLOAT_KERNELS"] = switch
        try:
            with Engine(params, config, tokenizer, max_slots=slots, max_seq_len=64, compilation_cache=False) as engine:
                spec = engine.params["layers"]["up"].get("spec")
                assert isinstance(spec, matmul.FloatSpec) == (switch == "1")
                assert (spec is not None and spec.tiled) == (slots == 1)
                outputs[switch, slots] = [o.token_ids for o in engine.generate(["Hello there", "The for statement"],
                                                                                 SamplingParams(max_new_tokens=6))]
        finally:
            del os.environ["PRESS_FLOAT_KERNELS"]
    assert outputs["1", 2] == outputs["0", 2] == outputs["1", 1]
