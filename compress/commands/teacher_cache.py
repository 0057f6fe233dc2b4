"""`press teacher-cache`: run a teacher once over the training data and keep its top-k log-probabilities.

  press teacher-cache configs/teacher-cache-smollm2.yaml
  press teacher-cache --teacher smollm2-135m-instruct --data notes/ --top-k 64 --out out/teacher-cache

Writes `out`: the data's packed rows and, for every position, the teacher's k most likely next
tokens and their log-probabilities, as zarr3 arrays with a manifest (compress/distill/teacher_cache.py),
which distillation reads for as many epochs as it likes without the teacher in memory. The
manifest records the teacher, tokenizer, data and k: rerunning the same command after a crash or
`kill -9` continues where it stopped, rerunning it on a complete cache does nothing, and any other
settings are refused, naming what differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from compress import config as cfg
from compress import pretrained
from compress.data.pipeline import DataConfig
from compress.distill.teacher_cache import write_cache
from compress.pretrained import ModelConfig

HELP = "run a teacher once over the training data and store its top-k log-probabilities"


@dataclasses.dataclass(frozen=True)
class TeacherCacheConfig:
    """`press teacher-cache`: which teacher, over which rows, keeping how many of its tokens, where."""

    teacher: ModelConfig = ModelConfig()  # bundled name, Hugging Face directory, .gguf file or quantized directory
    # The rows: one pass of the training pipeline, every token of the documents packed once (a
    # finite pass is one stream of rows, whatever data.batch_size); epochs must be finite (1: every
    # document once).
    data: DataConfig = DataConfig(batch_size=1, epochs=1)
    top_k: int = 64  # the teacher's most likely tokens kept per position
    batch_size: int = 8  # rows per teacher forward (and per shard of the stored arrays)
    out: str = "out/teacher-cache"  # the cache directory: new, empty, or a cache of these same settings

    def __post_init__(self):
        cfg.require_at_least(self, 1, "top_k", "batch_size")
        if self.data.epochs is None:
            raise ValueError("data.epochs is null (forever); a cache holds a finite pass: set data.epochs (1: every "
                             "document once); distillation reads the cache for as many epochs as it likes")
        if not self.out:
            raise ValueError("out is empty; give the cache directory")


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, TeacherCacheConfig)
    flags.flag("--teacher", key="teacher.name",
               help="bundled name, Hugging Face directory, .gguf file or quantized directory")
    flags.flag("--out", key="out", help="the cache directory")
    flags.flag("--top-k", key="top_k", type=int, help="the teacher's most likely tokens kept per position")
    flags.flag("--batch-size", key="batch_size", type=int, help="rows per teacher forward")
    flags.flag("--seq-len", key="data.seq_len", type=int, help="tokens per packed row")
    flags.flag("--data", key="data.sources", action="extend", nargs="+", metavar="SOURCE",
               help="text or .jsonl files, directories, or the built-in corpora 'pydoc' and 'stdlib'")


def run(args: argparse.Namespace) -> int:
    config: TeacherCacheConfig = cfg.config_from_args(args)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    m = config.teacher
    teacher = pretrained.load_decoder(m.name, param_dtype=m.param_dtype or m.dtype, dtype=m.dtype)
    summary = write_cache(teacher.config, teacher.params, teacher.tokenizer, config.data, config.out, k=config.top_k,
                          teacher_name=m.name, batch_size=config.batch_size, log=log)
    print(json.dumps(dataclasses.asdict(summary)))
    return 0
