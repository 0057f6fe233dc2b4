"""Tiny random reference models built with transformers (PyTorch), for parity tests."""

from __future__ import annotations

import numpy as np
import torch

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def tiny_hf_model(architecture: str, seed: int = 0, **overrides):
    """A randomly initialised transformers causal LM of `architecture` (llama, mistral, qwen2)."""
    import transformers

    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[architecture]
    config = cls[0](**{**TINY, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    return randomise_norms_and_biases(cls[1](config).eval(), "norm.weight")


def randomise_norms_and_biases(model, norm_weight_suffix: str):
    """Random (not default-initialised) norm scales and biases, so every parameter matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(norm_weight_suffix):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Reference logits [B, T, V]; positions count real tokens only (as generate does)."""
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    if mask is None:
        mask = np.ones_like(tokens)
    m = torch.tensor(np.asarray(mask), dtype=torch.long)
    positions = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=m, position_ids=positions)
    return out.logits.float().numpy()


# Prompts the real-model tests share: prose, code, a date, a list.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "In 1905, Albert Einstein published four papers that",
    "Ingredients: 2 cups of flour, 1 cup of sugar,",
]


def run_concurrently(fn, n: int) -> tuple[dict, list]:
    """Call fn(i) for i in range(n) on n threads at once; ({i: result}, [exceptions])."""
    import threading

    results, errors = {}, []

    def call(i):
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - collected for the test to assert on
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors
