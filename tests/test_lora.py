"""LoRA as a transform of the parameter tree (compress/adapters/lora.py) and its PEFT format
(compress/adapters/peft.py), proved against the float computation it stands for and against
`peft` on the transformers model."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.adapters import lora
from compress.adapters import peft as peft_format
from compress.errors import InputError
from compress.formats import hf_decoder, safetensors_file
from compress.models import decoder
from compress.quant import schemes, weights
from compress.train.loss import causal_lm_loss

CONFIG = decoder.DecoderConfig(vocab_size=128, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                               head_dim=16)
TOKENS = jnp.asarray(np.arange(42).reshape(2, 21) * 7 % 128)
BATCH = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:], "loss_mask": jnp.ones((2, 20))}


def _params(config=CONFIG):
    return decoder.init_params(config, jax.random.key(0))


def _logits(tree, config=CONFIG):
    return np.asarray(decoder.forward(tree, TOKENS, config).logits)


def _trained(tree, seed=2):
    """`tree` with every adapter factor set to random values (B is zero at init)."""
    factors, rest = lora.split(tree)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(factors))))
    factors = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), factors)
    return lora.join(rest, factors)


def _dequantized(qparams, scheme):
    selected = weights.to_quantize(_params(), decoder.PROJECTIONS, scheme)
    return weights.map_projections(qparams, selected, lambda path, p: {"kernel": weights.dequantize_kernel(p, selected[path])})


def test_factor_equations_contract_the_kernels_input_axes():
    assert lora.factor_equations("BTD,DNH->BTNH") == ("BTD,Dr->BTr", "BTr,rNH->BTNH")
    assert lora.factor_equations("BTNH,NHD->BTD") == ("BTNH,NHr->BTr", "BTr,rD->BTD")


@pytest.mark.parametrize("scheme", [None, "int8", "int4-g32", "int4-g32-asym"])
def test_a_new_adapter_computes_the_base_model(scheme):
    base = _params()
    if scheme:
        base = weights.quantize_params(base, decoder.PROJECTIONS, schemes.get(scheme))
    adapted = lora.add(base, CONFIG, lora.LoraConfig(rank=4), jax.random.key(1))
    np.testing.assert_allclose(_logits(adapted), _logits(base), rtol=1e-6, atol=1e-6)  # B = 0 (XLA may fuse differently)
    o = adapted["layers"]["o"]
    assert o["lora_a"].shape == (2, 4, 16, 4) and o["lora_b"].shape == (2, 4, 64) and not np.any(o["lora_b"])
    bound = 1 / np.sqrt(4 * 16)  # PEFT's init: uniform over +-1/sqrt(fan_in)
    assert 0.5 * bound < float(jnp.abs(o["lora_a"]).max()) <= bound


def test_merge_gives_the_adapted_logits_and_unmerge_gives_back_the_base_and_adapter():
    base = _params()
    config = lora.LoraConfig(rank=4, alpha=8, targets=("layers/.*", "lm_head"), rslora=True)
    adapted = _trained(lora.add(base, CONFIG, config, jax.random.key(1)))
    assert config.scale == 8 / 2 and adapted["lm_head"]["lora"].scale == 4.0
    merged = lora.merge(adapted)
    assert lora.adapter_paths(merged) == [] and set(merged["layers"]["q"]) == {"kernel"}
    np.testing.assert_allclose(_logits(merged), _logits(adapted), atol=2e-5, rtol=1e-5)
    assert np.abs(_logits(adapted) - _logits(base)).max() > 0.1  # the adapter changes the model
    back = lora.unmerge(merged, lora.adapters(adapted))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(back)[0], jax.tree.leaves(adapted)):
        np.testing.assert_allclose(x, y, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g32-asym"])
def test_qlora_gradients_flow_through_integer_weights_as_through_their_float_values(scheme):
    """QLoRA: the factors' gradients through stored integer matmuls (AQT int8, packed int4) equal
    those through the dequantized float kernels; the integers are never differentiated."""
    q = weights.quantize_params(_params(), decoder.PROJECTIONS, schemes.get(scheme))
    loss = causal_lm_loss(CONFIG)
    grads = []
    for base in (q, _dequantized(q, schemes.get(scheme))):
        factors, rest = lora.split(_trained(lora.add(base, CONFIG, lora.LoraConfig(rank=4), jax.random.key(1))))
        grads.append(jax.jit(jax.grad(lambda f, rest=rest: loss(lora.join(rest, f), BATCH, None)[0]))(factors))
    for (path, g), ref in zip(jax.tree_util.tree_flatten_with_path(grads[0])[0], jax.tree.leaves(grads[1])):
        assert float(jnp.abs(ref).max()) > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g, ref, atol=1e-4 * float(jnp.abs(ref).max()), err_msg=jax.tree_util.keystr(path))


def test_dropout_acts_only_with_keys_and_keeps_the_mean():
    adapted = _trained(lora.add(_params(), CONFIG, lora.LoraConfig(rank=4, dropout=0.5), jax.random.key(1)))
    plain = _logits(adapted)
    np.testing.assert_allclose(_logits(lora.merge(adapted)), plain, atol=2e-5)  # no keys: dropout off
    keyed = lora.with_dropout_keys(adapted, jax.random.key(7))
    assert keyed["layers"]["q"]["lora_key"].shape == (2, 2)  # one key per stacked layer
    assert np.abs(_logits(keyed) - plain).max() > 1e-3
    p = keyed["layers"]["q"]
    x = jnp.ones((4096, 64))
    one_layer = {k: (v[0] if k != "lora" else v) for k, v in p.items()}
    y = lora.LoraSpec(1.0, 0.5).apply(one_layer, x, "TD,DNH->TNH")
    expected = jnp.einsum("TD,Dr,rNH->TNH", x, one_layer["lora_a"], one_layer["lora_b"])
    assert not np.allclose(y, expected)  # dropped
    np.testing.assert_allclose(y.mean(0), expected.mean(0), atol=0.1 * float(jnp.abs(expected).max()))


def test_targets_that_match_nothing_or_a_tied_head_are_input_errors():
    with pytest.raises(InputError, match=r"'layers/qq' matches no projection; projections: layers/q, "):
        lora.add(_params(), CONFIG, lora.LoraConfig(targets=("layers/qq",)), jax.random.key(0))
    tied = decoder.DecoderConfig(tie_word_embeddings=True)
    with pytest.raises(InputError, match="tied to the embeddings"):
        lora.add(decoder.init_params(tied, jax.random.key(0)), tied, lora.LoraConfig(targets=("lm_head",)),
                 jax.random.key(0))
    with pytest.raises(InputError, match="lora.rank must be >= 1"):
        lora.LoraConfig(rank=0)
    adapted = lora.add(_params(), CONFIG, lora.LoraConfig(), jax.random.key(0))
    with pytest.raises(InputError, match="already has a LoRA adapter"):
        lora.add(adapted, CONFIG, lora.LoraConfig(), jax.random.key(0))
    q = weights.quantize_params(_params(), decoder.PROJECTIONS, schemes.get("int8"))
    with pytest.raises(InputError, match="layers/down is quantized"):
        lora.merge(lora.add(q, CONFIG, lora.LoraConfig(), jax.random.key(0)))


def test_trainable_names_are_the_factors_and_their_axes_shard_with_the_kernel():
    adapted = lora.add(_params(), CONFIG, lora.LoraConfig(targets=("layers/(q|o)",)), jax.random.key(0))
    assert lora.trainable(adapted) == ("layers/o/lora_a", "layers/o/lora_b", "layers/q/lora_a", "layers/q/lora_b")
    axes = lora.param_axes(decoder.param_axes(CONFIG), adapted, CONFIG)
    assert axes["layers"]["q"]["lora_a"] == ("layers", "embed", "lora_rank")
    assert axes["layers"]["q"]["lora_b"] == ("layers", "lora_rank", "heads", "head_dim")
    assert axes["layers"]["o"]["lora_a"] == ("layers", "heads", "head_dim", "lora_rank")


# ----------------------------------------------------------------------------- PEFT


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny float model as a transformers directory, and a trained-looking adapter in PEFT format."""
    root = tmp_path_factory.mktemp("peft")
    base = _params()
    hf_decoder.export(base, CONFIG, str(root / "base"))
    adapted = _trained(lora.add(base, CONFIG, lora.LoraConfig(rank=4, alpha=8, targets=("layers/.*", "lm_head")),
                                jax.random.key(1)))
    peft_format.export(adapted, str(root / "adapter"), base_model=str(root / "base"))
    return root, adapted


def test_peft_loads_the_export_onto_transformers_with_the_same_logits(exported):
    import peft
    import torch
    import transformers

    root, adapted = exported
    config = json.load(open(root / "adapter" / "adapter_config.json"))
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj", "lm_head"}
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, root / "adapter")
    with torch.no_grad():
        theirs = model(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    np.testing.assert_allclose(theirs, _logits(adapted), atol=2e-5, rtol=1e-5)


def test_reading_a_peft_directory_gives_back_the_adapter(exported):
    root, adapted = exported
    back = lora.attach(_params(), peft_format.read(str(root / "adapter"), CONFIG))
    assert np.array_equal(_logits(back), _logits(adapted))


def _copy(root, tmp_path, edit_config=None, edit_tensors=None):
    out = tmp_path / "edited"
    out.mkdir(parents=True)
    config = json.load(open(root / "adapter" / "adapter_config.json"))
    if edit_config:
        edit_config(config)
    json.dump(config, open(out / "adapter_config.json", "w"))
    f = safetensors_file.SafetensorsFile(str(root / "adapter" / "adapter_model.safetensors"))
    tensors = {name: f.read(name) for name in f.names()}
    if edit_tensors:
        edit_tensors(tensors)
    safetensors_file.save_file(tensors, str(out / "adapter_model.safetensors"))
    return str(out)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(use_dora=True), "use_dora = True: not supported"),
    (lambda c: c.update(rank_pattern={"q_proj": 8}), "one rank and alpha"),
    (lambda c: c.update(peft_type="IA3"), "only LoRA adapters"),
    (lambda c: c.update(r=-1), "r = -1: expected a positive integer"),
])
def test_adapter_configs_press_cannot_compute_exactly_are_refused_by_key(exported, tmp_path, edit, message):
    root, _ = exported
    with pytest.raises(InputError, match=message):
        peft_format.read(_copy(root, tmp_path, edit_config=edit), CONFIG)


def test_bad_adapter_tensors_are_named(exported, tmp_path):
    root, _ = exported
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"

    def wrong_shape(t):
        t[name] = np.zeros((4, 32), np.float32)

    with pytest.raises(InputError, match=rf"{name} has shape \[4, 32\], expected \[4, 64\]"):
        peft_format.read(_copy(root, tmp_path, edit_tensors=wrong_shape), CONFIG)

    def one_layer_only(t):
        del t[name], t[name.replace("lora_A", "lora_B")]

    with pytest.raises(InputError, match=r"layers/q has adapters in some layers only \(none in layers \[1\]\)"):
        peft_format.read(_copy(root, tmp_path / "b", edit_tensors=one_layer_only), CONFIG)

    def nan(t):
        t[name] = np.full((4, 64), np.nan, np.float32)

    with pytest.raises(InputError, match="NaN"):
        peft_format.read(_copy(root, tmp_path / "c", edit_tensors=nan), CONFIG)
    with pytest.raises(InputError, match="no adapter_config.json"):
        peft_format.read(str(tmp_path), CONFIG)
    os.makedirs(tmp_path / "d")
    (tmp_path / "d" / "adapter_config.json").write_text("{not json")
    with pytest.raises(InputError, match="adapter_config.json: not valid JSON"):
        peft_format.read(str(tmp_path / "d"), CONFIG)
