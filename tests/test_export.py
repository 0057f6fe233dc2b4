"""Export to a Hugging Face directory: transformers loads it and computes our logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.formats import hf_decoder
from compress.formats.tensor_source import FormatError
from compress.models import decoder
from compress.models.rope import RopeScaling
from compress.pretrained import load_decoder
from tests.reference import hf_logits

CONFIGS = {
    "llama": decoder.DecoderConfig(vocab_size=101, num_heads=4, num_kv_heads=2, architecture="llama",
                                   rope_scaling=RopeScaling("llama3", factor=4.0, original_max_position_embeddings=64)),
    "llama-biased-tied": decoder.DecoderConfig(vocab_size=101, qkv_bias=True, o_bias=True, mlp_bias=True,
                                               tie_word_embeddings=True, architecture="llama"),
    "mistral": decoder.DecoderConfig(vocab_size=101, sliding_window=6, architecture="mistral"),
    "qwen2": decoder.DecoderConfig(vocab_size=101, qkv_bias=True, architecture="qwen2"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_round_trip(tmp_path, name):
    import torch
    from transformers import AutoModelForCausalLM

    config = CONFIGS[name]
    params = decoder.init_params(config, jax.random.key(0), scale=0.1)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)  # non-trivial norms/biases
    hf_decoder.export(params, config, str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, 101, size=(2, 16))
    ours = np.asarray(decoder.forward(params, jnp.asarray(tokens), config).logits)
    np.testing.assert_allclose(hf_logits(model, tokens), ours, atol=1e-4, rtol=0)
    # ... and press reads its own export back unchanged.
    again = load_decoder(str(tmp_path), with_tokenizer=False)
    assert again.config == config
    jax.tree.map(np.testing.assert_array_equal, again.params, params)


def test_export_refuses_what_the_format_cannot_express(tmp_path):
    config = decoder.DecoderConfig(qkv_bias=True, o_bias=False, architecture="llama")
    params = decoder.init_params(config, jax.random.key(0))
    with pytest.raises(FormatError, match="biases on all of q/k/v/o or none"):
        hf_decoder.export(params, config, str(tmp_path))
