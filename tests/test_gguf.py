"""GGUF import: the llama.cpp layout (permuted Q/K, [out, in] rows), every supported
tensor type, and clear errors for bad files. Files are written here with gguf.GGUFWriter."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from compress.formats.gguf_file import GGUFFile
from compress.formats.tensor_source import FormatError
from compress.models import decoder
from compress.pretrained import load_decoder
from tests.reference import hf_logits, tiny_hf_model

Q = gguf.GGMLQuantizationType


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (the inverse of what press undoes on import)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gguf(model, path, arch="llama", qtype=Q.F32):
    """Convert a transformers model into a GGUF file the way llama.cpp's converter does."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, value in model.state_dict().items():
        value = value.float().numpy()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            out = f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                value = permute_rows(value, cfg.num_attention_heads)
            if arch == "llama" and module == "self_attn.k_proj":
                value = permute_rows(value, cfg.num_key_value_heads)
        if value.ndim == 2 and qtype != Q.F32:
            w.add_tensor(out, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(out, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {})])
def test_gguf_model_matches_transformers(tmp_path, arch, overrides):
    model = tiny_hf_model(arch, **overrides)
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path, arch)
    ours = load_decoder(str(path), with_tokenizer=False)
    assert ours.config.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 20))
    got = np.asarray(decoder.forward(ours.params, jnp.asarray(tokens), ours.config).logits)
    np.testing.assert_allclose(got, hf_logits(model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype,tolerance", [(Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 2e-2), (Q.Q4_0, 0.25), (Q.Q4_1, 0.2)])
def test_quantized_types_dequantize_close_to_the_original(tmp_path, qtype, tolerance):
    rng = np.random.default_rng(0)
    original = rng.standard_normal((8, 256)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_tensor("t", gguf.quants.quantize(original, qtype), raw_dtype=qtype)
    w.add_tensor("after", np.arange(5, dtype=np.float32))  # checks offsets past a quantized tensor
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    f = GGUFFile(str(tmp_path / "q.gguf"))
    got = f.read("t")
    assert got.shape == (8, 256) and f.type_name("t") == qtype.name
    assert np.abs(got - original).max() <= tolerance * np.abs(original).max()
    np.testing.assert_array_equal(f.read("after"), np.arange(5, dtype=np.float32))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_read_block_by_block(tmp_path, qtype):
    """K-quant blocks (random bytes, finite f16 scales) read as gguf's reference dequantizer says, row by row."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(4, 2 * block_bytes), dtype=np.uint8)
    # f16 scale fields: small finite values (sign bit 0, exponent below 0x3C00 = 1.0).
    scale_fields = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [block_bytes - 2]}[qtype]
    for b in range(2):
        for off in scale_fields:
            raw[:, b * block_bytes + off : b * block_bytes + off + 2] = np.frombuffer(np.float16(0.01 * (b + 1)).tobytes(), np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("t", raw, raw_dtype=qtype)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    got = GGUFFile(str(tmp_path / "k.gguf")).read("t")
    assert got.shape == (4, 2 * block)
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    for row in range(4):  # each row decodes independently: no cross-row offset mistakes
        np.testing.assert_array_equal(got[row], gguf.quants.dequantize(raw[row : row + 1], qtype).reshape(-1))


def test_truncated_file_names_the_file_and_tensor(tmp_path):
    model = tiny_hf_model("llama")
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(FormatError, match=r"tiny\.gguf.*tensor '.*' runs past the end"):
        load_decoder(str(path), with_tokenizer=False)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(FormatError, match=r"bad\.gguf: not a GGUF file"):
        GGUFFile(str(path))


def test_unsupported_architecture_and_type(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("t", gguf.quants.quantize(np.ones((2, 32), np.float32), Q.Q5_0), raw_dtype=Q.Q5_0)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(FormatError, match=r"architecture 'gpt2' is not supported; supported: llama"):
        load_decoder(str(tmp_path / "gpt2.gguf"), with_tokenizer=False)
    with pytest.raises(FormatError, match=r"tensor 't' uses quantization Q5_0.*supported: F32"):
        GGUFFile(str(tmp_path / "gpt2.gguf")).read("t")


def test_wrong_tensor_shape_names_the_tensor(tmp_path):
    model = tiny_hf_model("llama")
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path)
    # Claim more heads than the tensors hold: the q projection no longer fits.
    f = GGUFFile(str(path))
    f.metadata["llama.embedding_length"] = 80
    from compress.formats import gguf_decoder
    from compress.formats.placement import check_sources

    config = gguf_decoder.config_from_gguf(f)
    with pytest.raises(FormatError, match=r"tensor 'token_embd.weight' has shape \(97, 64\)"):
        check_sources(gguf_decoder.decoder_recipes(config, True), f, decoder.param_shapes(config))
