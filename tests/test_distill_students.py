"""Students with a teacher's layers dropped (compress/distill/students.py) compute what transformers
computes for the teacher with the same layers deleted, and export like any press model; the greedy
layer choice drops what an exhaustive search over single removals drops, and a silent layer first."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.distill.students import every_nth_layer, keep_layers, select_layers
from compress.errors import InputError
from compress.formats import hf_decoder
from compress.models import decoder
from compress.pretrained import load_decoder
from tests.reference import hf_logits

TEACHER = decoder.DecoderConfig(vocab_size=101, num_layers=5, tie_word_embeddings=True, architecture="llama")


def test_every_nth_layer_keeps_the_last():
    assert every_nth_layer(30, 3) == (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29)
    assert every_nth_layer(5, 1) == (0, 1, 2, 3, 4) and every_nth_layer(5, 10) == (0, 4)


def test_a_student_of_kept_layers_is_the_teacher_with_the_others_deleted_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    params = decoder.init_params(TEACHER, jax.random.key(0), scale=0.1)
    hf_decoder.export(params, TEACHER, str(tmp_path / "teacher"))
    kept = (0, 2, 4)
    config, student = keep_layers(TEACHER, params, kept)
    assert config.num_layers == 3 and student["embed"] is params["embed"]

    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path / "teacher"), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in kept])
    for i, layer in enumerate(reference.model.layers):
        layer.self_attn.layer_idx = i
    reference.config.num_hidden_layers = len(kept)
    tokens = np.random.default_rng(0).integers(0, 101, size=(2, 12))
    ours = np.asarray(decoder.forward(student, jnp.asarray(tokens), config).logits)
    np.testing.assert_allclose(hf_logits(reference, tokens), ours, atol=1e-4, rtol=0)

    hf_decoder.export(student, config, str(tmp_path / "student"))  # and it is an ordinary press model
    assert load_decoder(str(tmp_path / "student"), with_tokenizer=False).config == config


@pytest.mark.parametrize("layers, problem", [((), "at least one"), ((2, 1), "ascending"), ((0, 0), "distinct"),
                                             ((0, 5), "out of range"), ((-1, 2), "out of range")])
def test_bad_layer_lists_are_refused(layers, problem):
    params = jax.eval_shape(lambda: decoder.init_params(TEACHER, jax.random.key(0)))
    with pytest.raises(InputError, match=problem):
        keep_layers(TEACHER, params, layers)


def _loss(config, params, tokens) -> float:
    """Next-token cross-entropy of whole windows through decoder.forward (the reference walk)."""
    log_probs = jax.nn.log_softmax(decoder.forward(params, tokens, config).logits[:, :-1])
    return float(-jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)))


def test_greedy_layer_choice_drops_the_cheapest_layer_each_round_and_a_silent_layer_first():
    params = decoder.init_params(TEACHER, jax.random.key(0), scale=0.1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 101, size=(3, 16)))
    # Layer 3 with its output projections zeroed adds nothing to the stream: dropping it costs nothing.
    silent = {name: ({**p, "kernel": p["kernel"].at[3].set(0)} if name in ("o", "down") else p)
              for name, p in params["layers"].items()}
    params = {**params, "layers": silent}
    kept, losses = select_layers(TEACHER, params, np.asarray(tokens), keep=3)
    assert len(kept) == 3 and len(losses) == 2
    # Exhaustive search over single removals, each scored by a full forward pass, round by round.
    current = list(range(TEACHER.num_layers))
    for round_loss in losses:
        trial = {i: _loss(*keep_layers(TEACHER, params, [k for k in current if k != i]), tokens) for i in current}
        best = min(trial, key=trial.get)
        if current == list(range(TEACHER.num_layers)):
            assert best == 3 and abs(trial[3] - _loss(TEACHER, params, tokens)) < 1e-5
        np.testing.assert_allclose(round_loss, trial[best], rtol=1e-5)
        current.remove(best)
    assert tuple(current) == kept


def test_layer_choice_keeping_every_layer_is_the_identity_and_bad_requests_are_refused():
    params = jax.eval_shape(lambda: decoder.init_params(TEACHER, jax.random.key(0)))
    windows = np.zeros((2, 8), np.int32)
    assert select_layers(TEACHER, params, windows, keep=5) == ((0, 1, 2, 3, 4), ())
    for keep in (0, 6, 2.0, True):
        with pytest.raises(InputError, match="keep must be an integer"):
            select_layers(TEACHER, params, windows, keep=keep)
    with pytest.raises(InputError, match="windows must be"):
        select_layers(TEACHER, params, np.zeros((2, 1), np.int32), keep=2)
