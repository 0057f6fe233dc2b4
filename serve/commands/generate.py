"""`press generate`: one prompt through the serving engine, text streamed as it is generated.

  press generate [configs/generate.yaml] --prompt TEXT [--chat] [--max-new-tokens N] [--json] [key=value ...]
  press generate --model M --draft DRAFT [--draft-tokens K] --prompt TEXT   # speculative decoding, acceptance reported
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from compress import config as cfg
from compress.errors import InputError
from compress.pretrained import ModelConfig
from serve.commands.batch import add_draft_flags, check_draft_fields
from serve.sampling import SamplingParams

HELP = "generate from one prompt (greedy unless --temperature)"


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """`press generate`: one prompt through the engine (greedy unless sampling says otherwise)."""

    model: ModelConfig = ModelConfig()
    prompt: str = ""
    chat: bool = False  # wrap the prompt as a user message in the model's chat template
    system: str | None = None  # an optional system message (with chat)
    sampling: SamplingParams = SamplingParams()
    max_seq_len: int = 2048  # KV-cache slots (prompt + new tokens), capped by the model's context
    stream: bool = True  # print text as it is generated (ignored with --json)
    draft: str | None = None  # a draft model of the same tokenizer for speculative decoding (name, directory, .gguf)
    draft_tokens: int | None = None  # tokens the draft proposes per step (None: 3 for ngram on a CPU, else 4)

    def __post_init__(self):
        check_draft_fields(self)
        if self.system is not None and not self.chat:
            raise ValueError("system is a chat message; set chat=true to use it")
        if not self.prompt:
            raise ValueError("prompt is empty: pass --prompt TEXT (or prompt=... / a config file)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, GenerateConfig)
    flags.flag("--model", key="model.name", help="bundled name, Hugging Face directory or .gguf file")
    flags.flag("--prompt", key="prompt", help="the prompt text")
    flags.flag("--chat", key="chat", action="store_true", help="apply the model's chat template")
    flags.flag("--system", key="system", help="system message (with --chat)")
    flags.flag("--max-new-tokens", key="sampling.max_new_tokens", type=int)
    flags.flag("--temperature", key="sampling.temperature", type=float, help="0 is greedy")
    flags.flag("--top-k", key="sampling.top_k", type=int)
    flags.flag("--top-p", key="sampling.top_p", type=float)
    flags.flag("--seed", key="sampling.seed", type=int)
    flags.flag("--stop", key="sampling.stop", action="append", help="a string that ends the text (repeatable)")
    add_draft_flags(flags)
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, timings)")


def run(args: argparse.Namespace) -> int:
    run_generate(cfg.config_from_args(args), as_json=args.json)
    return 0


def run_generate(config: GenerateConfig, *, as_json: bool, out=None) -> dict:
    """Generate for `config.prompt`, write the text (or one JSON object) to `out`; returns the report."""
    from serve.engine import Engine

    out = out or sys.stdout
    start = time.perf_counter()
    m = config.model
    engine = Engine.from_pretrained(m.name, dtype=m.dtype, param_dtype=m.param_dtype, max_slots=1,
                                    max_seq_len=config.max_seq_len, draft=config.draft,
                                    draft_tokens=config.draft_tokens)
    prompt = config.prompt
    if config.chat:
        prompt = ([{"role": "system", "content": config.system}] if config.system else []) + [
            {"role": "user", "content": config.prompt}
        ]
    with engine:
        # The programs this request needs, compiled (or loaded from the compilation cache) before it
        # runs, so that the decode speed reported is the decoding's alone, not a compile between tokens.
        prompt_len = len(engine.encode(prompt))
        engine.warmup(prompt_lengths=(prompt_len,), max_len=prompt_len + config.sampling.max_new_tokens)
        load_seconds = time.perf_counter() - start
        request = engine.submit(prompt, config.sampling)
        if config.stream and not as_json:
            for delta in request.deltas():
                out.write(delta)
                out.flush()
        result = request.result()
    if result.finish_reason == "error":
        raise InputError(result.error)
    report = {
        "model": m.name,
        "text": result.text,
        "token_ids": result.token_ids,
        "prompt_tokens": len(result.prompt_token_ids),
        "generated_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason,
        "load_seconds": round(load_seconds, 3),
        "time_to_first_token": round(result.time_to_first_token, 3),
        "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
        **engine.draft_stats(),
    }
    if as_json:
        out.write(json.dumps(report) + "\n")
    else:
        out.write(("" if config.stream else result.text) + "\n")
        drafted = ""
        if config.draft is not None:
            rate = report["acceptance_rate"]
            drafted = (f"; draft acceptance {'-' if rate is None else f'{rate:.2f}'} ({report['accepted_tokens']} of "
                       f"{report['drafted_tokens']} drafted tokens kept, {report['draft_tokens']} a step)")
        sys.stderr.write(
            f"[{len(result.token_ids)} tokens, {result.finish_reason}; prompt {len(result.prompt_token_ids)} tokens; "
            f"first token after {result.time_to_first_token:.2f} s; "
            f"decode {result.decode_tokens_per_second:.1f} tokens/s{drafted}; load and compile {load_seconds:.1f} s]\n"
        )
    return report
