"""The real bundled SmolLM2-135M-Instruct (GGUF Q4_1) against transformers on the same file."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from compress.formats import hf_decoder
from compress.models import decoder
from compress.pretrained import load_decoder
from compress.formats.registry import resolve

from tests.reference import PROMPTS

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def models():
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve("smollm2-135m-instruct").path
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return load_decoder("smollm2-135m-instruct"), ref.eval()


def _ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


def test_logits_match_transformers(models):
    import torch

    ours, ref = models
    for prompt in PROMPTS:
        ids = np.asarray([_ids(ours.tokenizer, prompt)])
        with torch.no_grad():
            expected = ref(torch.tensor(ids)).logits.numpy()
        got = np.asarray(decoder.forward(ours.params, jnp.asarray(ids), ours.config).logits)
        relative = np.abs(got - expected).max() / np.abs(expected).max()
        assert relative <= 1e-3, (prompt, relative)
        np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


def test_export_to_hf_directory_gives_the_same_logits(models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    ours, _ = models
    hf_decoder.export(ours.params, ours.config, str(tmp_path), tokenizer=ours.tokenizer)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = np.asarray([_ids(ours.tokenizer, PROMPTS[0])])
    with torch.no_grad():
        expected = exported(torch.tensor(ids)).logits.numpy()
    got = np.asarray(decoder.forward(ours.params, jnp.asarray(ids), ours.config).logits)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-4
    # The tokenizer and chat template travel with the export.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path)).chat_template == ours.tokenizer.chat_template
