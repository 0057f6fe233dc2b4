"""`press eval`: held-out perplexity, top-1 agreement, bytes and decode speed of one or more models.

  press eval [configs/eval.yaml] --model M [--reference R] [--data PATH] [--json] [key=value ...]
  press eval --compare A B ... [--reference R] [--plot PATH.png] [--json]

With two or more models the first is the reference for agreement unless `reference` names
another; with one model there is agreement only when `reference` is given. Output: a table,
or with --json JSON Lines, one object per model in the order given (model, quantization,
perplexity, agreement, reference, bytes, bf16_bytes, fraction_of_bf16,
decode_tokens_per_second, windows, window, data). Comparing models also writes a PNG of
perplexity against parameter bytes (default eval-compare.png in the current directory).

What is measured: compress/eval/perplexity.py (quality and bytes) and serve/decode_speed.py
(batch-1 decode through the serving engine, which is why this command lives in serve/).
"""

from __future__ import annotations

import argparse
import json
import sys

from compress import config as cfg
from compress.eval.perplexity import EvalConfig

HELP = "perplexity, agreement, bytes and decode speed of models"


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, EvalConfig)
    which = cfg.ConfigFlags(p.add_mutually_exclusive_group(), EvalConfig, argparse.SUPPRESS)
    which.flag("--model", key="models", type=lambda name: [name],
               help="one model: bundled name, Hugging Face directory, .gguf file or quantized directory")
    which.parser.add_argument("--compare", dest="compare", nargs="+", metavar="MODEL",
                              help="two or more models, evaluated on the same text (sets models)")
    flags.flag("--reference", key="reference", help="model whose next-token argmax agreement is measured against")
    flags.flag("--data", key="data", help="a UTF-8 text file (None: the held-out part of pydoc_data.topics)")
    flags.flag("--windows", key="windows", type=int, help="at most this many windows")
    flags.flag("--window", key="window", type=int, help="tokens per window")
    flags.flag("--batch", key="batch", type=int, help="windows per forward pass")
    flags.flag("--decode-tokens", key="decode_tokens", type=int,
               help="new tokens of the batch-1 decode-speed run (0 skips it)")
    flags.flag("--plot", key="plot", help="PNG of perplexity against bytes (None: eval-compare.png with 2+ models)")
    p.add_argument("--json", action="store_true", help="print JSON Lines: one object per model")


def run(args: argparse.Namespace, out=None) -> int:
    """`press eval`; exit status 0."""
    extra = []
    if args.compare is not None:
        if len(args.compare) < 2:
            raise cfg.ConfigError("--compare needs two or more models; use --model for one")
        extra.append(f"models={json.dumps(args.compare, ensure_ascii=False)}")
    return evaluate(cfg.config_from_args(args, extra_overrides=extra), as_json=args.json, out=out)


def evaluate(config: EvalConfig, *, as_json: bool = False, out=None) -> int:
    from compress.eval.perplexity import evaluate_models
    from compress.eval.report import print_table, write_plot
    from serve.decode_speed import model_decode_speed

    out = out or sys.stdout
    if not config.models:
        raise cfg.ConfigError("no models: pass --model M, --compare A B ... or models=[...]", key="models")
    results = evaluate_models(config, log=_log, decode_speed=model_decode_speed)
    if as_json:
        for r in results:
            out.write(json.dumps(r.to_dict()) + "\n")
    else:
        print_table(results, out)
    if config.plot_path:
        write_plot(results, config.plot_path)
        sys.stderr.write(f"press eval: wrote {config.plot_path}\n")
    return 0


def _log(line: str) -> None:
    sys.stderr.write(f"press eval: {line}\n")
    sys.stderr.flush()
