"""Width pruning (compress/distill/pruning.py): a pruned student computes exactly what the teacher
computes with the pruned channels' and heads' output rows zeroed; the scores are what transformers'
down_proj and o_proj read; silenced units score lowest and go; the student exports like any press model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.distill.pruning import Importance, calibration_windows, importance, prune_width
from compress.errors import InputError
from compress.formats import hf_decoder
from compress.models import decoder
from compress.pretrained import load_decoder
from tests.reference import hf_logits
from tests.tiny_decoder import tiny_decoder

# 8 query heads in 4 key/value groups of G = 2; biases everywhere, so their slicing is checked too.
SHAPE = dict(num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8, mlp_dim=96, tie_word_embeddings=True,
             qkv_bias=True, o_bias=True, mlp_bias=True)
G = 2


@pytest.fixture(scope="module")
def teacher():
    """(config, params with random biases, tokenizer, calibration windows [6, 32], their Importance)."""
    config, params, tokenizer = tiny_decoder(**SHAPE)
    keys = iter(jax.random.split(jax.random.key(1), 16))
    layers = {name: ({**p, "bias": 0.1 * jax.random.normal(next(keys), p["bias"].shape)} if isinstance(p, dict) else p)
              for name, p in params["layers"].items()}
    params = {**params, "layers": layers}
    windows = calibration_windows(tokenizer, 6, 32)
    return config, params, tokenizer, windows, importance(config, params, windows, batch_size=4)


@functools.partial(jax.jit, static_argnames="config")
def _forward(params, tokens, config):
    return decoder.forward(params, tokens, config).logits  # [B, T, V]


def _logits(config, params, tokens):
    return np.asarray(_forward(params, jnp.asarray(tokens), config))


def _zeroed(params, mlp_kept, heads_kept):
    """The teacher with the `down` rows of channels not in mlp_kept [L, F'] and the `o` rows of
    heads not in heads_kept [L, N'] set to zero."""
    layers = dict(params["layers"])
    for name, kept in (("down", mlp_kept), ("o", heads_kept)):
        kernel = np.array(layers[name]["kernel"])  # down [L, F, D], o [L, N, H, D]
        mask = np.zeros(kernel.shape[:2], bool)
        np.put_along_axis(mask, kept, True, axis=1)
        kernel[~mask] = 0
        layers[name] = {**layers[name], "kernel": jnp.asarray(kernel)}
    return {**params, "layers": layers}


@pytest.mark.parametrize("mlp_dim, num_heads", [(40, None), (None, 4), (40, 2)])
def test_a_pruned_student_is_the_teacher_with_the_pruned_rows_of_down_and_o_zeroed(teacher, mlp_dim, num_heads):
    config, params, _, _, scores = teacher
    student_config, student = prune_width(config, params, scores, mlp_dim=mlp_dim, num_heads=num_heads)
    mlp_dim, num_heads = mlp_dim or config.mlp_dim, num_heads or config.num_heads
    assert (student_config.mlp_dim, student_config.num_heads, student_config.num_kv_heads) == (mlp_dim, num_heads, num_heads // G)
    assert student["layers"]["k"]["kernel"].shape == (3, config.embed_dim, num_heads // G, config.head_dim)

    L = config.num_layers
    mlp_kept = np.argsort(-scores.mlp, axis=1)[:, :mlp_dim]  # [L, F']
    groups_kept = np.argsort(-scores.heads.reshape(L, -1, G).sum(axis=2), axis=1)[:, : num_heads // G]  # [L, K']
    heads_kept = (groups_kept[:, :, None] * G + np.arange(G)).reshape(L, -1)  # [L, N']
    # The layers keep different units (else per-layer gathers would go untested).
    assert len({tuple(sorted(r)) for r in mlp_kept}) > 1 or mlp_dim == config.mlp_dim
    assert len({tuple(sorted(r)) for r in groups_kept}) > 1 or num_heads == config.num_heads

    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 16))
    expected = _logits(config, _zeroed(params, mlp_kept, heads_kept), tokens)
    assert np.abs(expected - _logits(config, params, tokens)).max() > 1e-3  # the pruned units mattered
    np.testing.assert_allclose(_logits(student_config, student, tokens), expected, atol=1e-5, rtol=0)


def test_importance_is_what_transformers_down_proj_and_o_proj_read(teacher, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    config, params, _, windows, scores = teacher
    assert scores.mlp.shape == (3, config.mlp_dim) and scores.heads.shape == (3, config.num_heads)
    hf_decoder.export(params, config, str(tmp_path))
    reference = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    seen = {"mlp": [], "heads": []}
    for layer in reference.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["mlp"].append(a[0].abs().mean(dim=(0, 1))))
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["heads"].append(
            a[0].unflatten(-1, (config.num_heads, config.head_dim)).norm(dim=-1).mean(dim=(0, 1))))
    hf_logits(reference, windows)
    np.testing.assert_allclose(scores.mlp, torch.stack(seen["mlp"]).numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(scores.heads, torch.stack(seen["heads"]).numpy(), rtol=1e-4, atol=1e-7)
    # Batches only bound memory: a last, partial batch counts like the others.
    other = importance(config, params, windows, batch_size=5)
    np.testing.assert_allclose(other.mlp, scores.mlp, rtol=1e-5)
    np.testing.assert_allclose(other.heads, scores.heads, rtol=1e-5)


def test_silenced_channels_and_groups_score_lowest_and_pruning_keeps_the_rest_unchanged(teacher):
    config, params, _, windows, _ = teacher
    silent_channels = np.array([[3, 50], [7, 8], [95, 0]])  # [L, 2]: different in every layer
    silent_group = np.array([1, 3, 0])  # [L]: the key/value head whose values are scaled to almost nothing
    layers = jax.tree.map(np.array, params["layers"])
    for l in range(config.num_layers):
        layers["up"]["kernel"][l][:, silent_channels[l]] = 0  # silu(gate) * 0: the channel's output is 0
        layers["up"]["bias"][l][silent_channels[l]] = 0
        layers["v"]["kernel"][l][:, silent_group[l]] *= 1e-3  # attention averages values: outputs 1e-3 as large
        layers["v"]["bias"][l][silent_group[l]] *= 1e-3
    params = {**params, "layers": jax.tree.map(jnp.asarray, layers)}

    scores = importance(config, params, windows)
    for l in range(config.num_layers):
        assert set(np.flatnonzero(scores.mlp[l] == 0)) == set(silent_channels[l])
        assert np.argmin(scores.heads[l].reshape(-1, G).sum(axis=1)) == silent_group[l]

    student_config, student = prune_width(config, params, scores, mlp_dim=config.mlp_dim - 2,
                                          num_heads=config.num_heads - G)
    teacher_layers, student_layers = params["layers"], student["layers"]
    for l in range(config.num_layers):
        channels = np.setdiff1d(np.arange(config.mlp_dim), silent_channels[l])  # ascending: the original order
        groups = np.setdiff1d(np.arange(config.num_kv_heads), silent_group[l])
        heads = (groups[:, None] * G + np.arange(G)).reshape(-1)
        kept = {("gate", "kernel"): (channels, 1), ("gate", "bias"): (channels, 0), ("up", "kernel"): (channels, 1),
                ("up", "bias"): (channels, 0), ("down", "kernel"): (channels, 0), ("q", "kernel"): (heads, 1),
                ("q", "bias"): (heads, 0), ("k", "kernel"): (groups, 1), ("k", "bias"): (groups, 0),
                ("v", "kernel"): (groups, 1), ("v", "bias"): (groups, 0), ("o", "kernel"): (heads, 0)}
        for (name, leaf), (index, axis) in kept.items():
            expected = np.take(np.asarray(teacher_layers[name][leaf][l]), index, axis)
            np.testing.assert_array_equal(student_layers[name][leaf][l], expected, err_msg=f"layers/{name}/{leaf} of layer {l}")
    for name in ("down", "o"):  # their biases add to the residual stream: nothing to prune
        assert student_layers[name]["bias"] is teacher_layers[name]["bias"]

    # The silenced channels contributed nothing, so the MLP-pruned student is the teacher itself.
    mlp_config, mlp_student = prune_width(config, params, scores, mlp_dim=config.mlp_dim - 2)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 16))
    np.testing.assert_allclose(_logits(mlp_config, mlp_student, tokens), _logits(config, params, tokens), atol=1e-5, rtol=0)


def test_full_sizes_are_the_identity_and_bad_sizes_are_refused(teacher):
    config, params, _, windows, _ = teacher
    scores = Importance(mlp=np.random.default_rng(0).random((3, config.mlp_dim)),
                        heads=np.random.default_rng(1).random((3, config.num_heads)))
    for sizes in ({}, dict(mlp_dim=config.mlp_dim, num_heads=config.num_heads)):
        same_config, same = prune_width(config, params, scores, **sizes)
        assert same_config == config
        jax.tree.map(np.testing.assert_array_equal, same, params)

    F, N = config.mlp_dim, config.num_heads
    for sizes, problem in [(dict(mlp_dim=0), "mlp_dim=0; choose an integer from 1 to 96"),
                           (dict(mlp_dim=F + 1), "mlp_dim=97"), (dict(mlp_dim=True), "mlp_dim=True"),
                           (dict(num_heads=0), "num_heads=0; choose a multiple of 2 from 2 to 8"),
                           (dict(num_heads=N + G), "num_heads=10"),
                           (dict(num_heads=3), "num_heads=3; .* in whole groups of 2")]:
        with pytest.raises(InputError, match=problem):
            prune_width(config, params, scores, **sizes)
    with pytest.raises(InputError, match=r"needs mlp \[3, 96\]"):
        prune_width(config, params, Importance(scores.mlp[:2], scores.heads), mlp_dim=8)
    with pytest.raises(InputError, match="windows must be"):
        importance(config, params, windows[0])
    with pytest.raises(InputError, match="seq_len must be a positive integer"):
        calibration_windows(None, 4, 0)


def test_a_pruned_student_exports_and_transformers_computes_the_same_logits(teacher, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    config, params, tokenizer, _, scores = teacher
    student_config, student = prune_width(config, params, scores, mlp_dim=40, num_heads=4)
    hf_decoder.export(student, student_config, str(tmp_path), tokenizer=tokenizer)
    reference = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    assert (reference.config.intermediate_size, reference.config.num_attention_heads,
            reference.config.num_key_value_heads) == (40, 4, 2)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 12))
    np.testing.assert_allclose(hf_logits(reference, tokens), _logits(student_config, student, tokens), atol=1e-4, rtol=0)
    assert load_decoder(str(tmp_path), with_tokenizer=False).config == student_config


def test_calibration_windows_come_from_the_train_part_of_the_reference(teacher):
    from compress.data import corpus

    _, _, tokenizer, windows, _ = teacher
    assert windows.shape == (6, 32) and windows.dtype == np.int32
    train = tokenizer(corpus.pydoc_split()[0], verbose=False)["input_ids"]
    as_text = lambda ids: "," + ",".join(map(str, ids)) + ","
    train_text = as_text(train)
    assert all(as_text(w) in train_text for w in windows)
    assert np.array_equal(calibration_windows(tokenizer, 6, 32), windows)  # seeded
    assert not np.array_equal(calibration_windows(tokenizer, 6, 32, seed=1), windows)
