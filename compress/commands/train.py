"""`press train`: causal-LM training of a press decoder on text: full, or partial with freeze patterns.

  press train configs/train-tiny.yaml                     # a tiny model from scratch, under a minute
  press train configs/train-smollm2.yaml steps=200 optimizer.learning_rate=1e-5
  press train CONFIG --distributed ...                    # on every host of a pod (see README)

The run (compress/train/loop.py) writes to `out`: checkpoints/ (state and data position),
metrics.jsonl, tensorboard/ and, at the end, hf/ (a Hugging Face directory every other
command loads: `press generate --model out/train/hf`). Rerunning the same command after a
crash, `kill -9` or SIGTERM continues from the last checkpoint with the same losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from compress import config as cfg
from compress import distributed
from compress.train.loop import TrainConfig, train

HELP = "train a model on text (full or partial fine-tuning, continued pretraining)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, TrainConfig)
    flags.flag("--model", key="model.name", help="bundled name, Hugging Face directory or .gguf file")
    flags.flag("--out", key="out", help="directory for checkpoints, metrics and the exported model")
    flags.flag("--steps", key="steps", type=int, help="optimizer updates in all")
    flags.flag("--lr", key="optimizer.learning_rate", type=float, help="peak learning rate")
    flags.flag("--batch-size", key="data.batch_size", type=int, help="rows per global batch")
    flags.flag("--seq-len", key="data.seq_len", type=int, help="tokens per packed row")
    flags.flag("--data", key="data.sources", action="extend", nargs="+", metavar="SOURCE",
               help="text or .jsonl files, directories, or the built-in corpora 'pydoc' and 'stdlib'")
    flags.flag("--freeze", key="freeze", action="extend", nargs="+", metavar="REGEX",
               help="parameter names (e.g. 'embed', 'layers/attn/.*') kept as they are")
    flags.flag("--remat", key="remat", help="what the backward pass recomputes per layer: none, full, dots")
    flags.flag("--no-progress", key="progress", action="store_false", help="one line per logged step, no bar")
    distributed.add_cluster_flags(flags)


def run(args: argparse.Namespace) -> int:
    config: TrainConfig = cfg.config_from_args(args)
    result = train(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(dataclasses.asdict(result)))
    return 0
