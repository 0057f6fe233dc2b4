"""How `press eval` shows its results: a table of models and a PNG of perplexity against bytes."""

from __future__ import annotations

import os
from typing import Sequence, TextIO

from compress.eval.perplexity import ModelEval


# Directories press writes inside a run's output (`out/RUN/hf`, ...): named by the run instead.
_RUN_OUTPUTS = ("hf", "quantized", "adapter")


def label(model: str) -> str:
    """A short name for a model: a bundled name as is, a path by its last component, or by its
    last two where the last is an output directory of a run ('kd-mix/hf')."""
    if os.path.sep not in model:
        return model
    parts = os.path.normpath(model).split(os.path.sep)
    return "/".join(parts[-2:]) if parts[-1] in _RUN_OUTPUTS and len(parts) > 1 else parts[-1]


def print_table(results: Sequence[ModelEval], out: TextIO) -> None:
    """One row per model (rich table)."""
    from rich.console import Console
    from rich.table import Table

    first = results[0]
    reference = first.reference
    ref_ppl = next((r.perplexity for r in results if r.model == reference), None)
    table = Table(caption=f"{first.data}: {first.windows} windows of {first.window} tokens"
                          + (f"; agreement with {label(reference)}" if reference else ""))
    for name in ("model", "scheme", "perplexity", "vs ref", "top-1 agree", "MB", "of bf16", "decode tok/s"):
        table.add_column(name, justify="left" if name in ("model", "scheme") else "right")
    for r in results:
        table.add_row(
            label(r.model),
            r.quantization or "float",
            f"{r.perplexity:.3f}",
            "" if ref_ppl is None or r.model == reference else f"{r.perplexity / ref_ppl - 1:+.2%}",
            "" if r.agreement is None else f"{r.agreement:.1%}",
            f"{r.bytes / 1e6:.1f}",
            f"{r.bytes / r.bf16_bytes:.2f}",
            "" if r.decode_tokens_per_second is None else f"{r.decode_tokens_per_second:.1f}",
        )
    # A terminal sets the width; written to a file or pipe, wide enough for one line per row.
    Console(file=out, **({} if out.isatty() else {"width": 120})).print(table)


def write_plot(results: Sequence[ModelEval], path: str) -> None:
    """A PNG at `path`: perplexity (y) against parameter bytes in MB (x), one labelled point per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(figure)  # the Agg canvas: no display, no global backend state
    ax = figure.add_subplot()
    # Labels go right of their points; one that would print over a label already placed near
    # it (schemes of similar size and quality are a common sight) moves up, with a leader line.
    xs, ys = [r.bytes / 1e6 for r in results], [r.perplexity for r in results]
    x_near = 0.3 * (max(xs) - min(xs) or max(xs))  # a label runs about this far right
    gap = 0.045 * (max(ys) - min(ys) or max(ys) * 0.1)
    placed: list[tuple[float, float]] = []
    for r in sorted(results, key=lambda r: r.perplexity):
        x, y, scheme = r.bytes / 1e6, r.perplexity, r.quantization or "float"
        name = label(r.model)
        at = y
        # Move just above the highest label it would cover. A label moved to py + gap may still
        # read as nearer than gap to py once rounded, hence the tolerance: each move then goes
        # strictly up, past a different label, so the loop ends.
        while near := [py for px, py in placed if abs(x - px) < x_near and abs(at - py) < gap * (1 - 1e-9)]:
            at = max(near) + gap
        placed.append((x, at))
        ax.scatter([x], [y], s=36)
        ax.annotate(scheme if name == scheme else f"{name} ({scheme})", (x, y), xytext=(x + 0.02 * x_near / 0.3, at),
                    textcoords="data", fontsize=8, va="center",
                    arrowprops=None if at == y else {"arrowstyle": "-", "lw": 0.5, "color": "0.5"})
    ax.set_xlabel("parameter bytes (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    first = results[0]
    ax.set_title(f"perplexity against size: {first.windows} windows of {first.window} tokens", fontsize=10)
    ax.margins(0.2)
    ax.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
