"""The `press` command: one dispatcher over every command, and the only module that imports them all.

  press COMMAND [CONFIG.yaml] [--flags] [key=value ...]

  command    what it does                                   its code
  models     bundled models and architectures               compress/commands/models.py
  quantize   integer weights and scales to a directory      compress/commands/quantize.py
  train      train a model on text (full or partial)        compress/commands/train.py
  distill    a teacher into a smaller student               compress/commands/distill.py
  finetune   full, partial, LoRA or QLoRA fine-tuning       compress/commands/finetune.py
  teacher-cache  a teacher's top-k over the data, resumable compress/commands/teacher_cache.py
  index      build, update and search a retrieval index     retrieval/commands/index.py
  generate   one prompt through the engine                  serve/commands/generate.py
  batch      a JSONL file of prompts, offline, resumable    serve/commands/batch.py
  synthesize a teacher's answers as chat training data      serve/commands/synthesize.py
  serve      an OpenAI-compatible HTTP server               serve/commands/serve.py
  ask        a question answered from an index, cited       serve/commands/ask.py
  eval       perplexity, agreement, bytes, decode speed     serve/commands/eval.py

Every job reads a typed config (a frozen dataclass in its command's module): its defaults,
then the YAML file (a first bare word, or --config), then the flags, then `key=value`
overrides (dotted keys for sections, e.g. model.dtype=bfloat16). An unknown key or a wrong
type stops the job before any work.

Errors: bad input (compress.errors.InputError: configs, files, tensors, values; and missing
or existing files) is printed as one line naming what was wrong, exit status 2. Anything else
is a bug in press: its traceback is printed, exit status 1. --debug prints the traceback of
every error.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Sequence

from compress.commands import distill, finetune, models, quantize, teacher_cache, train
from compress.errors import InputError
from retrieval.commands import index
from serve.commands import ask, batch, generate, serve, synthesize
from serve.commands import eval as eval_command

COMMANDS = {
    "models": models,
    "generate": generate,
    "batch": batch,
    "synthesize": synthesize,
    "serve": serve,
    "quantize": quantize,
    "train": train,
    "distill": distill,
    "finetune": finetune,
    "teacher-cache": teacher_cache,
    "eval": eval_command,
    "index": index,
    "ask": ask,
}

# Bad input the user can fix: one line and exit 2, not a traceback.
USER_ERRORS = (InputError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="press", description="Distil, fine-tune, quantize, serve and ground language "
                                                          "models in JAX")
    p.add_argument("--debug", action="store_true", help="print the traceback of every error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        doc = (module.__doc__ or "").split("\n\n")
        command = sub.add_parser(name, help=module.HELP, description=doc[0],
                                 epilog="\n\n".join(doc[1:]) or None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
    return p


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a command line; key=value words may come after flags too (`press eval --model M windows=8`)."""
    p = parser()
    args, rest = p.parse_known_args(argv)
    stray = [w for w in rest if w.startswith("-") or not hasattr(args, "config_args")]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.config_args = [*args.config_args, *rest]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    name = args.command + (f" {args.index_command}" if getattr(args, "index_command", None) else "")
    try:
        return COMMANDS[args.command].run(args) or 0
    except USER_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        message = str(e) if isinstance(e, InputError) or not getattr(e, "filename", None) else \
            f"{e.filename}: {e.strerror}"
        sys.stderr.write(f"press {name}: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"press {name}: interrupted\n")
        return 130
    except Exception:  # a bug in press, not in the input: show where it happened
        traceback.print_exc()
        sys.stderr.write(f"press {name}: internal error (the traceback above is a bug in press; please report it "
                         f"with the command line)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
