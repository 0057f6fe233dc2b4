"""The optimizer of a training run, built from optax: AdamW, a learning-rate schedule, clipping.

    optimizer = make_optimizer(OptimizerConfig(learning_rate=3e-4, warmup_steps=100, total_steps=2000))

The chain is clip_by_global_norm(clip_norm) then adamw(schedule, ...): clipping sees the raw
gradient, as in MaxText, Levanter and Hugging Face's Trainer. The schedule counts optimizer
updates (one per train step, however many microbatches it accumulates).

Weight decay is decoupled (AdamW: p -= lr * weight_decay * p) and skips the leaves matched by
`no_decay`: by default norm scales, biases and embeddings, as OLMo does (decay_norm_and_bias=False,
decay_embeddings=False). nanoGPT and Hugging Face also decay embeddings; drop '.*embed' to do so.

Gradient accumulation is not here: the train step accumulates microbatches itself
(`make_train_step(..., grad_accum_steps=k)`); see compress/train/step.py for why.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import jax
import optax

from compress.sharding import path_name

Schedule = Literal["cosine", "linear", "constant"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup, a decay schedule and global-norm clipping. Defaults suit LLM fine-tuning."""

    learning_rate: float = 3e-4  # peak learning rate, reached at the end of warmup
    schedule: Schedule = "cosine"  # after warmup: cosine or linear decay to min_lr_ratio, or constant
    warmup_steps: int = 0  # linear warmup from 0 over this many updates
    total_steps: int = 1000  # updates over which warmup + decay run (warmup included); min lr after
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak (cosine and linear)
    weight_decay: float = 0.1  # decoupled (AdamW) decay, applied to leaves not matched by no_decay
    no_decay: tuple[str, ...] = (r".*embed", r".*norm.*", r".*bias")  # regexes over whole '/'-joined names
    b1: float = 0.9  # Adam's first-moment decay
    b2: float = 0.95  # Adam's second-moment decay (0.95 is the LLM norm; optax's default is 0.999)
    eps: float = 1e-8  # Adam's denominator epsilon
    clip_norm: float | None = 1.0  # clip gradients to this global L2 norm; None: no clipping

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be at least 0, got {self.warmup_steps}")
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"total_steps={self.total_steps} must exceed warmup_steps={self.warmup_steps} for a "
                f"{self.schedule} schedule (total_steps counts warmup too)"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be at least 0, got {self.weight_decay}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive (or None for no clipping), got {self.clip_norm}")
        for pattern in self.no_decay:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"no_decay pattern {pattern!r} is not a regular expression: {e}") from None


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """The learning rate at each optimizer update: linear warmup from 0, then the chosen decay."""
    c = config
    peak, end = c.learning_rate, c.learning_rate * c.min_lr_ratio
    if c.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, c.warmup_steps, c.total_steps, end)
    warmup = optax.linear_schedule(0.0, peak, c.warmup_steps)
    if c.schedule == "linear":
        after = optax.linear_schedule(peak, end, c.total_steps - c.warmup_steps)
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([warmup, after], [c.warmup_steps])


def decay_mask(params: Any, no_decay: tuple[str, ...]) -> Any:
    """A tree of bools in `params`' structure: True where weight decay applies (None leaves stay None)."""
    regexes = [re.compile(p) for p in no_decay]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(r.fullmatch(path_name(path)) for r in regexes), params
    )


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm, then AdamW on the schedule with weight decay masked by `no_decay`."""
    c = config
    adamw = optax.adamw(
        learning_rate_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
        mask=lambda params: decay_mask(params, c.no_decay),
    )
    if c.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), adamw)
