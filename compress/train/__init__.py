"""The shared trainer: train state, optimizer, step, loss, checkpoints and the training loop.

Distillation and fine-tuning train on this too: the loss is a plug, `loss_fn(params, batch,
rng) -> (loss, aux)`, and the state knows which parameters train (freeze patterns).
"""

# State
from compress.train.state import TrainState, frozen_names, parameter_names, partition, combine

# Optimizer
from compress.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer

# Loss
from compress.train.loss import LossFn, causal_lm_loss, cross_entropy

# Step
from compress.train.step import init_train_state, make_train_step, state_shardings

__all__ = [
    "TrainState", "frozen_names", "parameter_names", "partition", "combine",
    "OptimizerConfig", "learning_rate_schedule", "make_optimizer",
    "LossFn", "causal_lm_loss", "cross_entropy",
    "init_train_state", "make_train_step", "state_shardings",
]
