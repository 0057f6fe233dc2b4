"""Quantized embedding table and LM head (`press quantize --scheme W+embed-E`): the table is
stored once, as the tied head's kernel, and both the lookup and the head read those integers;
an untied head is quantized on the same grid; directories store, reload (sharded too) and serve."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from compress import sharding as shd
from compress.commands.quantize import quantize_model
from compress.errors import InputError
from compress.models import decoder
from compress.pretrained import load_decoder
from compress.quant import schemes
from compress.quant.weights import dequantize_kernel, quantize_params
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests.tiny_decoder import export_tiny_decoder, tiny_decoder

HEAD = decoder.PROJECTIONS["lm_head"]
SCHEMES = ["int8+embed-int8", "int4-g32+embed-int4-g32", "int4-g32-asym+embed-int4-g32-asym"]


def _dequantized(q):
    """The same tree with the table (and an untied head) as float arrays of the stored values."""
    out = {**q, "embed": dequantize_kernel(q["embed"], HEAD).T}
    if "lm_head" in q:
        out["lm_head"] = {"kernel": dequantize_kernel(q["lm_head"], HEAD)}
    return out


@pytest.mark.parametrize("name,tied", [(SCHEMES[0], True), (SCHEMES[1], False), (SCHEMES[2], True)])
def test_lookup_and_head_read_the_stored_integers(name, tied):
    config, params, _ = tiny_decoder(tie_word_embeddings=tied)
    q = quantize_params(params, decoder.PROJECTIONS, schemes.get(name))
    table = q["embed"]
    assert table["qkernel"].dtype == jnp.int8 and "kernel" not in table
    d, v = config.embed_dim, config.vocab_size
    bits = table["spec"].weight_bits
    assert table["qkernel"].size == d * v // (2 if bits == 4 else 1)  # stored once, 4-bit codes two a byte
    if tied:
        assert "lm_head" not in q
    else:
        assert q["lm_head"]["qkernel"].dtype == jnp.int8 and q["lm_head"]["spec"].weight_bits == bits
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, v, (2, 12)), jnp.int32)
    got = decoder.forward(q, tokens, config).logits
    want = decoder.forward(_dequantized(q), tokens, config).logits
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    rows = table["spec"].take(table, tokens)  # the lookup alone: exactly the stored rows
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(_dequantized(q)["embed"][tokens]))
    # close to the float model: int8 rows within a scale step, int4 still the same model
    error = float(jnp.abs(rows - params["embed"][tokens]).max() / jnp.abs(params["embed"]).max())
    assert error < (0.01 if bits == 8 else 0.15)


def test_refused_without_a_weight_scheme_or_a_decoder_table():
    for bad in ("embed-int8", "int8+embed-gptq-int4-g32", "int8+embed-w8a8", "int8+embed-int8+embed-int4-g32"):
        with pytest.raises(InputError, match="embed-E with E one of int8, int4-g32"):
            schemes.get(bad)
    with pytest.raises(InputError, match="float embedding table"):
        quantize_params({"layers": {}}, decoder.PROJECTIONS, schemes.get("int8+embed-int8"))


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("qembed")
    float_dir = export_tiny_decoder(str(root / "float"), with_eos=True, tie_word_embeddings=True)
    out = str(root / "q")
    summary = quantize_model(float_dir, "int4-g32+embed-int4-g32", out)
    return float_dir, out, summary


def test_a_quantized_table_stores_once_reloads_sharded_and_serves(stored):
    float_dir, out, summary = stored
    plain = str(os.path.join(os.path.dirname(out), "plain"))
    quantize_model(float_dir, "int4-g32", plain)
    size = lambda d: os.path.getsize(os.path.join(d, "model.safetensors"))  # noqa: E731
    config, params, _ = tiny_decoder(with_eos=True, tie_word_embeddings=True)
    table_bytes = 4 * config.vocab_size * config.embed_dim
    assert size(plain) - size(out) > 0.8 * table_bytes  # the fp32 table gone, about a seventh of it back
    assert summary["fraction_of_bf16"] < 0.32
    model = load_decoder(out)
    assert model.quantization == "int4-g32+embed-int4-g32"
    assert model.params["embed"]["qkernel"].shape == (config.embed_dim // 32, 16, config.vocab_size)
    assert model.params["embed"]["qkernel"].dtype == jnp.int8
    in_memory = quantize_params(params, decoder.PROJECTIONS, schemes.get("int4-g32+embed-int4-g32"))
    mesh = shd.make_mesh(1, 4, 2)
    sharded = load_decoder(out, mesh=mesh)
    assert len(sharded.params["embed"]["qkernel"].sharding.device_set) == 8
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8]] * 2, jnp.int32)
    want = decoder.forward(in_memory, tokens, config).logits
    for loaded in (model, sharded):
        np.testing.assert_allclose(decoder.forward(loaded.params, tokens, loaded.config).logits, want, atol=1e-4)
    sampling = SamplingParams(max_new_tokens=8)
    with Engine.from_pretrained(out, max_slots=2, max_seq_len=64) as a, \
            Engine(in_memory, model.config, model.tokenizer, max_slots=2, max_seq_len=64) as b:
        got, expected = a.generate(["Hello there", "What is"], sampling), b.generate(["Hello there", "What is"], sampling)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected] and all(o.token_ids for o in got)
