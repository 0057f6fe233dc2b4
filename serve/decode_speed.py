"""Batch-1 decode speed through the serving engine: the speed figure of `press eval` and the benchmarks."""

from __future__ import annotations

from typing import Any

from compress.eval.perplexity import int8_cache
from serve.engine import Engine, power_of_two_at_least
from serve.sampling import SamplingParams


def decode_tokens_per_second(params: Any, config, tokenizer, *, new_tokens: int, prompt: str, runs: int = 3,
                             kv_cache: str | None = None) -> float:
    """Batch-1 decode speed through the serving engine: `new_tokens` greedy tokens, EOS ignored.

    The engine is warmed up, then a short request runs before the timed one: the first decode
    after `Engine.warmup` still compiles one program (warmup compiles its first width with the
    fresh cache, then the engine calls it with a committed one), which measured on a tiny model
    halved the figure. The timed request is then free of compilation. It runs `runs` times and
    the fastest counts: on a shared machine the others measure the neighbours as well.
    """
    prompt_len = len(tokenizer(prompt)["input_ids"])
    max_seq_len = power_of_two_at_least(prompt_len + new_tokens)
    with Engine(params, config, tokenizer, max_slots=1, max_seq_len=max_seq_len, kv_cache=kv_cache) as engine:
        engine.warmup(prompt_lengths=(prompt_len,))
        speeds = []
        for sampling in (SamplingParams(max_new_tokens=min(new_tokens, 4), ignore_eos=True),
                         *[SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)] * runs):
            out = engine.generate(prompt, sampling)[0]
            if out.finish_reason == "error":
                raise ValueError(f"decode-speed run failed: {out.error}")
            speeds.append(out.decode_tokens_per_second)
    return max(speeds[1:])


def model_decode_speed(model, config) -> float:
    """`decode_tokens_per_second` of a loaded model (compress.pretrained.Pretrained) with an
    EvalConfig's settings: the `decode_speed` that `press eval` gives compress.eval."""
    return decode_tokens_per_second(model.params, model.config, model.tokenizer, new_tokens=config.decode_tokens,
                                    prompt=config.decode_prompt, kv_cache="int8" if int8_cache(model) else None)
