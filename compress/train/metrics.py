"""Where a training run's numbers go: a JSONL file, TensorBoard event files and the terminal.

Only process 0 of a multi-process job writes (every process computes the same replicated
metrics). Each JSONL line is one logged step, `{"step": 10, "loss": ..., "tokens_per_s": ...}`;
a resumed run appends to the same file, so a step logged before a crash may appear again after
it: readers take the last line of each step (`read_metrics` does).

TensorBoard: tensorboardX's SummaryWriter (pure Python, no TensorFlow), one scalar per
metric under `train/` or `eval/`. On a terminal, a rich progress bar shows loss, tokens/s and
the ETA; elsewhere (CI, a log file) one line per logged step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Write logged steps to `directory`/metrics.jsonl, `directory`/tensorboard and the terminal."""

    def __init__(self, directory: str, total_steps: int, *, first_step: int = 0, tensorboard: bool = True,
                 progress: bool = True, log=None):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._jsonl = self._tb = self._bar = None
        self._started, self._first_step = time.perf_counter(), first_step
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self._jsonl = open(os.path.join(directory, METRICS_FILE), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, TENSORBOARD_DIR), purge_step=first_step or None)
        if progress and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task("train", total=total_steps, completed=first_step, status="")
            self._bar.start()

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        """Record `metrics` (plain floats) for `step` (the number of updates applied)."""
        if not self.enabled:
            return
        record = {"step": step, **({} if prefix == "train" else {"split": prefix}), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{prefix}/{name}", value, step)
        status = "  ".join(f"{name} {_short(value)}" for name, value in metrics.items()
                           if name in ("loss", "tokens_per_s", "learning_rate", "perplexity"))
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)
        else:
            self._log(f"{prefix} step {step}/{self.total_steps}  {status}  {self._eta(step)}")

    def note(self, message: str) -> None:
        """A line for the person watching (process 0 only)."""
        if self.enabled:
            (self._bar.console.log if self._bar is not None else self._log)(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._jsonl = self._tb = self._bar = None

    def _eta(self, step: int) -> str:
        done = step - self._first_step
        if done <= 0:
            return ""
        seconds = (time.perf_counter() - self._started) / done * (self.total_steps - step)
        return f"ETA {int(seconds // 60)}m{int(seconds % 60):02d}s"


def read_metrics(directory: str, split: str = "train") -> dict[int, dict[str, Any]]:
    """{step: record} from `directory`/metrics.jsonl, the last record of each step winning (a resumed
    run logs again the steps after its checkpoint)."""
    records: dict[int, dict[str, Any]] = {}
    path = os.path.join(directory, METRICS_FILE)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == sum(1 for _ in open(path, encoding="utf-8")):
                    break  # a last line cut short by a kill mid-write
                raise
            if record.get("split", "train") == split:
                records[record["step"]] = record
    return dict(sorted(records.items()))


def _short(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
