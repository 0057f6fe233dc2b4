"""Students with a teacher's layers dropped (compress/distill/students.py) compute what transformers
computes for the teacher with the same layers deleted, and export like any press model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.distill.students import every_nth_layer, keep_layers
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
