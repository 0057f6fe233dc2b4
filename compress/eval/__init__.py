"""Evaluating causal language models: held-out perplexity, top-1 agreement, bytes (and, given
a function that measures it, decode speed), shown as a table and a plot.

`press eval` (serve/commands/eval.py) adds the serving engine's decode speed.
"""

# Measuring
from compress.eval.perplexity import (
    EvalConfig,
    ModelEval,
    WindowScores,
    bf16_bytes,
    evaluate_models,
    parameter_bytes,
    score_windows,
    top1_agreement,
)

# Showing
from compress.eval.report import print_table, write_plot

__all__ = [
    "EvalConfig", "ModelEval", "WindowScores", "bf16_bytes", "evaluate_models", "parameter_bytes",
    "score_windows", "top1_agreement", "print_table", "write_plot",
]
