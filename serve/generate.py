"""Greedy decoding with a KV cache: a jitted prefill, then a jitted one-token step.

Prompts are left-padded to a power-of-two length bucket and the cache is sized to
the bucket plus the new tokens, so repeated calls with similar prompts reuse the
compiled steps. (The continuous-batching engine with sampling builds on this.)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compress.models import decoder


@dataclasses.dataclass
class Generation:
    token_ids: list[int]  # generated tokens, the stopping EOS excluded
    finish_reason: str  # 'stop' (an EOS token) or 'length' (max_new_tokens reached)
    prompt_tokens: int
    prefill_seconds: float  # includes compilation on a new shape
    decode_seconds: float  # decode steps after the first (which may compile)
    decode_steps: int  # the steps timed in decode_seconds

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else float("nan")


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= n (and >= minimum)."""
    size = minimum
    while size < n:
        size *= 2
    return size


class GreedyDecoder:
    """Jitted prefill and decode steps for one model; reuse it across calls."""

    def __init__(self, params: Any, config: decoder.DecoderConfig):
        self.params, self.config = params, config

        def prefill(params, tokens, mask, cache):
            out = decoder.forward(params, tokens, config, attention_mask=mask, cache=cache)
            return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache

        def step(params, token, cache):
            out = decoder.forward(params, token[:, None], config, cache=cache)
            return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache

        self._prefill = jax.jit(prefill, donate_argnums=3)
        self._step = jax.jit(step, donate_argnums=2)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_ids: Sequence[int] = (),
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Generation]:
        """Greedy-decode each prompt (token ids) in one left-padded batch.

        on_token(row, token_id) is called for every generated token as it arrives.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        batch, longest = len(prompts), max(len(p) for p in prompts)
        width = bucket(longest)
        max_len = width + bucket(max_new_tokens, 16)
        if longest + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                f"of {self.config.max_position_embeddings}"
            )
        tokens = np.zeros((batch, width), np.int32)
        mask = np.zeros((batch, width), np.int32)
        for row, p in enumerate(prompts):
            tokens[row, width - len(p) :] = p
            mask[row, width - len(p) :] = 1
        cache = decoder.init_cache(self.config, batch, max_len)
        eos = set(int(e) for e in eos_ids)

        start = time.perf_counter()
        token, cache = self._prefill(self.params, jnp.asarray(tokens), jnp.asarray(mask), cache)
        token_host = np.asarray(token)
        prefill_seconds = time.perf_counter() - start

        outputs: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        finish = ["length"] * batch
        start, timed_steps = None, 0
        for i in range(max_new_tokens):
            for row in range(batch):
                if done[row]:
                    continue
                t = int(token_host[row])
                if t in eos:
                    done[row], finish[row] = True, "stop"
                    continue
                outputs[row].append(t)
                if on_token is not None:
                    on_token(row, t)
            if done.all() or i == max_new_tokens - 1:
                break
            token, cache = self._step(self.params, token, cache)
            token_host = np.asarray(token)
            if start is None:  # time from the end of the first step: it compiles on a new shape
                start = time.perf_counter()
            else:
                timed_steps += 1
        decode_seconds = time.perf_counter() - start if start is not None else 0.0
        return [
            Generation(outputs[r], finish[r], len(prompts[r]), prefill_seconds, decode_seconds, timed_steps) for r in range(batch)
        ]
