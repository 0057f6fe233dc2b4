"""`press finetune`: full, partial, LoRA and QLoRA fine-tuning of a pretrained model.

  press finetune configs/finetune-smollm2.yaml                       # LoRA r=8 on SmolLM2
  press finetune CONFIG model.name=out/q8 lora.rank=16               # QLoRA on a press quantize directory
  press finetune CONFIG method=partial freeze='[embed, "layers/(q|k|v|o)/.*"]'

The run (compress/finetune/job.py on compress/train/loop.py) writes to `out`: checkpoints/
(the adapter alone for LoRA), metrics.jsonl, tensorboard/, adapter/ (PEFT format) and hf/ (the
tuned model; for LoRA the adapter merged into a float base). Rerunning the same command
continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from compress import config as cfg
from compress import distributed
from compress.finetune.job import FinetuneConfig, finetune

HELP = "fine-tune a model: full, partial (frozen patterns), LoRA, or QLoRA on a quantized base"


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, FinetuneConfig)
    flags.flag("--model", key="model.name", help="bundled name, Hugging Face directory, .gguf file or quantized directory")
    flags.flag("--method", key="method", help="full, partial or lora")
    flags.flag("--out", key="out", help="directory for checkpoints, metrics, the adapter and the tuned model")
    flags.flag("--steps", key="steps", type=int, help="optimizer updates in all")
    flags.flag("--lr", key="optimizer.learning_rate", type=float, help="peak learning rate")
    flags.flag("--rank", key="lora.rank", type=int, help="LoRA rank")
    flags.flag("--no-progress", key="progress", action="store_false", help="one line per logged step, no bar")
    distributed.add_cluster_flags(flags)


def run(args: argparse.Namespace) -> int:
    config: FinetuneConfig = cfg.config_from_args(args)
    result = finetune(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(dataclasses.asdict(result)))
    return 0
