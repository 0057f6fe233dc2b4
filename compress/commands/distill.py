"""`press distill`: a student trained on a teacher's outputs, on the shared trainer.

  press distill configs/distill-tiny.yaml                  # a small student of SmolLM2, under a minute
  press distill configs/distill-smollm2.yaml loss.alpha=0.5 loss.temperature=4
  press distill CONFIG teacher_cache=out/teacher-cache     # read a `press teacher-cache` instead of running the teacher

The student is cut from the teacher (layers kept, widths pruned by importance) or random in a
smaller shape; the teacher runs inside the jitted step (online) or was cached once. What the
run writes is what `press train` writes (compress/train/loop.py): checkpoints/, metrics.jsonl
(with kd, ce and the student's top-1 agreement with the teacher), tensorboard/, and hf/, the
student as a Hugging Face directory: `press eval --compare TEACHER out/distill/hf`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from compress import config as cfg
from compress import distributed
from compress.distill.job import DistillConfig, distill

HELP = "distil a teacher into a smaller student (KD losses, pruned students, cached teachers)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, DistillConfig)
    flags.flag("--teacher", key="teacher.name", help="bundled name, Hugging Face directory, .gguf file or quantized directory")
    flags.flag("--out", key="out", help="directory for checkpoints, metrics and the exported student")
    flags.flag("--steps", key="steps", type=int, help="optimizer updates in all")
    flags.flag("--lr", key="optimizer.learning_rate", type=float, help="peak learning rate")
    flags.flag("--teacher-cache", key="teacher_cache", help="a press teacher-cache directory to read instead of the teacher")
    flags.flag("--alpha", key="loss.alpha", type=float, help="weight of the hard-label CE (1: CE only)")
    flags.flag("--temperature", key="loss.temperature", type=float, help="softening of both distributions")
    flags.flag("--no-progress", key="progress", action="store_false", help="one line per logged step, no bar")
    distributed.add_cluster_flags(flags)


def run(args: argparse.Namespace) -> int:
    config: DistillConfig = cfg.config_from_args(args)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    result = distill(config, log=log)
    print(json.dumps(dataclasses.asdict(result)))
    return 0
