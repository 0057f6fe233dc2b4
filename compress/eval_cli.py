"""`press eval`: held-out perplexity, top-1 agreement, bytes and decode speed of one or more models.

  press eval --model M [--reference R] [--data PATH] [--windows N] [--window T] [--json]
  press eval --compare A B ... [--reference R] [--plot PATH.png] [--json]

With --compare the first model is the reference for agreement unless --reference names
another; with --model there is agreement only when --reference is given. Output: a table, or
with --json JSON Lines, one object per model in the order given (model, quantization,
perplexity, agreement, reference, bytes, bf16_bytes, fraction_of_bf16,
decode_tokens_per_second, windows, window, data). --compare also writes a PNG of perplexity
against parameter bytes (default eval-compare.png in the current directory). What is measured
is described in compress/evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence, TextIO

from compress.evaluate import EvalConfig, ModelEval, evaluate_models

DEFAULT_PLOT = "eval-compare.png"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="perplexity, agreement, bytes and decode speed of models",
                              description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="bundled name, Hugging Face directory, .gguf file or quantized directory")
    which.add_argument("--compare", nargs="+", metavar="MODEL", help="two or more models, evaluated on the same text")
    p.add_argument("--reference", help="model whose next-token argmax agreement is measured against "
                                       "(default with --compare: the first model)")
    p.add_argument("--data", help="a UTF-8 text file (default: the held-out part of pydoc_data.topics)")
    p.add_argument("--windows", type=int, default=EvalConfig.windows, help="at most this many windows")
    p.add_argument("--window", type=int, default=EvalConfig.window, help="tokens per window")
    p.add_argument("--batch", type=int, default=EvalConfig.batch, help="windows per forward pass")
    p.add_argument("--decode-tokens", type=int, default=EvalConfig.decode_tokens,
                   help="new tokens of the batch-1 decode-speed run (0 skips it)")
    p.add_argument("--json", action="store_true", help="print JSON Lines: one object per model")
    p.add_argument("--plot", help=f"PNG of perplexity against bytes (default with --compare: ./{DEFAULT_PLOT})")
    return p


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`press eval`; exit status 0. Bad input raises ValueError / FileNotFoundError (press prints them)."""
    out = out or sys.stdout
    if args.compare is not None and len(args.compare) < 2:
        raise ValueError("--compare needs two or more models; use --model for one")
    models = args.compare or [args.model]
    reference = args.reference or (models[0] if args.compare else None)
    config = EvalConfig(data=args.data, windows=args.windows, window=args.window, batch=args.batch,
                        decode_tokens=args.decode_tokens)
    plot = args.plot or (DEFAULT_PLOT if args.compare else None)
    if plot and not plot.lower().endswith(".png"):  # checked before minutes of evaluation
        raise ValueError(f"--plot {plot}: the plot is a PNG; give a path ending in .png")
    results = evaluate_models(models, config, reference=reference, log=_log)
    if args.json:
        for r in results:
            out.write(json.dumps(r.to_dict()) + "\n")
    else:
        print_table(results, out)
    if plot:
        write_plot(results, plot)
        sys.stderr.write(f"press eval: wrote {plot}\n")
    return 0


def _log(line: str) -> None:
    sys.stderr.write(f"press eval: {line}\n")
    sys.stderr.flush()


def label(model: str) -> str:
    """A short name for a model: a bundled name as is, a path by its last component."""
    return os.path.basename(os.path.normpath(model)) if os.path.sep in model else model


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
        while any(abs(x - px) < x_near and abs(at - py) < gap for px, py in placed):
            at = max(py for px, py in placed if abs(x - px) < x_near and abs(at - py) < gap) + gap
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
