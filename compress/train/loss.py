"""The causal language-modelling loss, one plug of the train step.

A loss is any `loss_fn(params, batch, rng) -> (loss, aux)`: a scalar float32 mean to
minimise and a dict of scalar metrics. When `aux` holds "tokens" (how many terms the mean
is over), gradient accumulation weights microbatches by it, so that k microbatches equal
one step on their concatenation (compress/train/step.py).

The batch contract (every array [B, T]):
  inputs       int32    token ids fed to the model
  targets      int32    the token expected at each position (inputs shifted left by one)
  loss_mask    float32  1 where the target counts, 0 for padding, prompts, document ends
  segment_ids  int32    optional: packed rows' document ids (attention stays inside one)
  positions    int32    optional: packed rows' positions, restarting at 0 in each document
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from compress.models import decoder

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

# Optional batch entries handed to `decoder.forward` as keyword arguments when present.
PACKING_KEYS = ("segment_ids", "positions")


def cross_entropy(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean token cross-entropy over `loss_mask`, in float32.

    Args:
      logits: [B, T, V] (any float dtype; the log-softmax is taken in float32).
      targets: [B, T] int token ids.
      loss_mask: [B, T] weights, 1 for tokens that count and 0 for the rest.
    Returns:
      (loss, {"tokens": the mask's sum, "accuracy": masked top-1 accuracy}); a batch with no
      counted token has loss 0 (not NaN).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, T]
    mask = loss_mask.astype(jnp.float32)  # [B, T]
    tokens = mask.sum()
    denominator = jnp.maximum(tokens, 1.0)
    loss = -(target_log_probs * mask).sum() / denominator
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [B, T]
    accuracy = (correct * mask).sum() / denominator
    return loss, {"tokens": tokens, "accuracy": accuracy}


def causal_lm_loss(config: decoder.DecoderConfig, **forward_kwargs: Any) -> LossFn:
    """The next-token loss of a press decoder, as a loss_fn for the train step.

    forward_kwargs go to `decoder.forward` on every call (e.g. `remat=...`). The batch's
    `segment_ids` and `positions`, when present, are passed as well, so packed rows never
    attend across documents. The rng is unused (the decoder has no dropout).
    """

    def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        del rng
        packing = {key: batch[key] for key in PACKING_KEYS if key in batch}
        logits = decoder.forward(params, batch["inputs"], config, **packing, **forward_kwargs).logits  # [B, T, V]
        return cross_entropy(logits, batch["targets"], batch["loss_mask"])

    return loss_fn
