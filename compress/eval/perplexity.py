"""Evaluating causal language models: held-out perplexity, top-1 agreement, bytes, decode speed.

    config = EvalConfig(models=("smollm2-135m-instruct", "out/smollm2-int8"), windows=8, window=512)
    results = evaluate_models(config)   # agreement with the first model

Held-out text. Unless a text file is given, the text is the held-out part of the CPython
language reference that ships with Python (compress/data/corpus.py says how it is split;
calibration and training read only the other part).

Windows. The text is tokenized once and cut into consecutive, non-overlapping windows of
`window` tokens (the tail that does not fill one is dropped). A window of T tokens gives T-1
predictions: position t predicts token t+1 from tokens 0..t, with no context carried across
windows. Perplexity is exp of the mean negative log-likelihood over all those predictions.

Agreement is the fraction of those predictions whose argmax equals a reference model's argmax
on the same windows (the same tokenizer is required). Bytes are those of the parameter tree as
loaded (integers and scales for a quantized model; int4 at half a byte), beside the bf16 bytes
of the float model with the same config. Decode speed is measured by a function the caller
passes (the serving engine's, in `press eval`: serve/decode_speed.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from compress.errors import InputError
from compress.data import corpus
from compress.models import decoder
from compress.pretrained import Pretrained, load_decoder
from compress.quant import schemes


DEFAULT_PLOT = "eval-compare.png"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What `press eval` measures, and on what (the schema of configs/eval.yaml)."""

    models: tuple[str, ...] = ()  # bundled names, HF directories, .gguf files or quantized directories
    reference: str | None = None  # agreement is measured against it; None: the first model when there are 2+
    data: str | None = None  # a UTF-8 text file; None: the held-out part of pydoc_data.topics
    windows: int = 32  # at most this many windows (fewer if the text is shorter)
    window: int = 512  # tokens per window (window - 1 predictions each)
    batch: int = 4  # windows per forward pass
    decode_tokens: int = 128  # new tokens of the decode-speed run (batch 1, ignore_eos); 0 skips it, else >= 2
    decode_prompt: str = "Tell me a story about a dragon."  # prompt of the decode-speed run
    plot: str | None = None  # `press eval`: a PNG of perplexity against bytes; None: eval-compare.png with 2+ models

    def __post_init__(self):
        for name, least in (("windows", 1), ("window", 2), ("batch", 1), ("decode_tokens", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InputError(f"EvalConfig.{name} must be an integer >= {least}, got {value!r}")
        if self.decode_tokens == 1:  # the speed is timed from the first new token to the last
            raise InputError("EvalConfig.decode_tokens must be 0 (no speed run) or at least 2, got 1")
        if not self.decode_prompt:
            raise InputError("EvalConfig.decode_prompt is empty; the decode-speed run needs a prompt")
        if self.plot is not None and not self.plot.lower().endswith(".png"):  # checked before minutes of work
            raise InputError(f"plot {self.plot}: the plot is a PNG; give a path ending in .png")

    @property
    def reference_model(self) -> str | None:
        """The model agreement is measured against: `reference`, else the first of two or more models."""
        return self.reference or (self.models[0] if len(self.models) > 1 else None)

    @property
    def plot_path(self) -> str | None:
        """Where `press eval` writes its plot: `plot`, else eval-compare.png when comparing models."""
        return self.plot or (DEFAULT_PLOT if len(self.models) > 1 else None)


@dataclasses.dataclass(frozen=True)
class ModelEval:
    """The measurements of one model. Times in seconds, bytes in bytes."""

    model: str  # as given: bundled name, directory or .gguf file
    quantization: str | None  # the scheme of a quantized directory, None for a float model
    perplexity: float
    agreement: float | None  # top-1 agreement with `reference`; None without a reference
    reference: str | None
    bytes: int  # parameter tree as loaded (parameter_bytes)
    bf16_bytes: int  # the float model of the same config, in bf16
    decode_tokens_per_second: float | None  # None when EvalConfig.decode_tokens is 0
    windows: int  # windows evaluated
    window: int  # tokens per window
    data: str  # where the text came from

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON, with the fraction of bf16 bytes added."""
        return {**dataclasses.asdict(self), "fraction_of_bf16": round(self.bytes / self.bf16_bytes, 4)}


@dataclasses.dataclass(frozen=True)
class WindowScores:
    """Scores of N windows of T tokens.

    nll: [N] float64, negative log-likelihood summed over each window's T-1 predictions.
    argmax: [N, T-1] int32, the predicted next token at each position.
    """

    nll: np.ndarray
    argmax: np.ndarray

    @property
    def perplexity(self) -> float:
        return float(math.exp(self.nll.sum() / self.argmax.size))


# ----------------------------------------------------------------------------- measurements


@functools.partial(jax.jit, static_argnames=("config", "int8_cache"))
def _nll_and_argmax(params: Any, tokens: jnp.ndarray, config: decoder.DecoderConfig, int8_cache: bool = False):
    """tokens [B, T] -> (nll [B] summed over the T-1 predictions, argmax [B, T-1]).

    int8_cache: the keys and values go through an int8 KV cache, as when served with kv-int8
    (every position attends over the cache's dequantized entries)."""
    b, t = tokens.shape
    cache = decoder.init_cache(config, b, t, quantized=True) if int8_cache else None
    logits = decoder.forward(params, tokens, config, cache=cache).logits[:, :-1]  # [B, T-1, V] float32
    targets = tokens[:, 1:, None]  # [B, T-1, 1]
    # -log softmax at the target, without materialising the log-probabilities of every token.
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets, axis=-1)[..., 0]  # [B, T-1]
    return nll.sum(axis=1), logits.argmax(axis=-1).astype(jnp.int32)


def score_windows(params: Any, config: decoder.DecoderConfig, windows: np.ndarray, batch: int,
                  int8_cache: bool = False) -> WindowScores:
    """Negative log-likelihood and argmax of every window [N, T], `batch` windows per jitted call.

    The last batch is padded with copies of the first window (and their rows dropped), so one
    program serves every batch.
    """
    n = windows.shape[0]
    nll, argmax = [], []
    for start in range(0, n, batch):
        rows = windows[start : start + batch]  # [b, T], b <= batch
        padded = np.concatenate([rows, np.repeat(windows[:1], batch - len(rows), axis=0)])  # [batch, T]
        batch_nll, batch_argmax = _nll_and_argmax(params, jnp.asarray(padded), config, int8_cache)
        nll.append(np.asarray(batch_nll, np.float64)[: len(rows)])
        argmax.append(np.asarray(batch_argmax)[: len(rows)])
    return WindowScores(np.concatenate(nll), np.concatenate(argmax))


def top1_agreement(argmax: np.ndarray, reference_argmax: np.ndarray) -> float:
    """Fraction of positions where two models' argmax tokens are equal (same shapes required)."""
    if argmax.shape != reference_argmax.shape:
        raise ValueError(f"argmax shapes differ: {argmax.shape} against the reference's {reference_argmax.shape}")
    return float((argmax == reference_argmax).mean())


def parameter_bytes(params: Any) -> int:
    """Bytes of a parameter tree at its dtypes' widths: the leaves' nbytes, with sub-byte types
    (int4) counted at their bit width (two per byte, as stored) rather than numpy's one byte."""
    return int(sum(-(-leaf.size * jax.dtypes.itemsize_bits(leaf.dtype) // 8) for leaf in jax.tree.leaves(params)))


def bf16_bytes(config: decoder.DecoderConfig) -> int:
    """Bytes of the float model of `config` stored in bf16 (2 bytes per parameter)."""
    return int(sum(2 * math.prod(s.shape) for s in jax.tree.leaves(decoder.param_shapes(config))))


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class _Scored:
    """One loaded model's windows and scores (kept for the reference's argmax)."""

    windows: np.ndarray  # [N, T]
    scores: WindowScores


def _score(model, text: str, source: str, config: EvalConfig) -> _Scored:
    ids = model.tokenizer(text, verbose=False)["input_ids"]  # verbose=False: no "longer than max length" warning
    windows = corpus.token_windows(ids, config.window, config.windows, source)
    return _Scored(windows, score_windows(model.params, model.config, windows, config.batch, int8_cache(model)))


def int8_cache(model: Pretrained) -> bool:
    """Whether the model's scheme serves it with an int8 KV cache (kv-int8, 'int8+kv-int8', ...)."""
    return model.quantization is not None and bool(schemes.get(model.quantization).kv_bits)


def _agreement(name: str, scored: _Scored, reference: str, ref: _Scored) -> float:
    if not np.array_equal(scored.windows, ref.windows):
        raise InputError(
            f"{name} and the reference {reference} tokenize the text differently; top-1 agreement needs "
            f"models that share a tokenizer (choose another --reference)"
        )
    return top1_agreement(scored.scores.argmax, ref.scores.argmax)


def evaluate_models(
    config: EvalConfig,
    *,
    log: Callable[[str], None] | None = None,
    decode_speed: Callable[[Pretrained, EvalConfig], float] | None = None,
) -> list[ModelEval]:
    """Evaluate each of `config.models` (one loaded at a time) on the same text, in the order given.

    Args:
      config: the models and what to measure (EvalConfig). Agreement is measured against
        `config.reference_model` (scored first; it need not be among the models), else None.
      log: called with a line of progress per step (e.g. to print to stderr).
      decode_speed: (model, config) -> batch-1 decode tokens/s, run when config.decode_tokens
        is not 0 (None: no speed figure; `press eval` passes the serving engine's).
    """
    if not config.models:
        raise InputError("no models to evaluate; give at least one (models=[...] or --model M)")
    log = log or (lambda line: None)
    models, reference = config.models, config.reference_model
    text, source = corpus.held_out_text(config.data)
    ref: _Scored | None = None
    if reference is not None and reference not in models:
        ref = _score(load_decoder(reference), text, source, config)
        log(f"{reference}: reference perplexity {ref.scores.perplexity:.3f}")
    # The reference first, so every other model can be compared with it.
    order = sorted(range(len(models)), key=lambda i: models[i] != reference)
    results: dict[int, ModelEval] = {}
    for i in order:
        name = models[i]
        start = time.perf_counter()
        model = load_decoder(name)
        log(f"{name}: loaded in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        scored = _score(model, text, source, config)
        log(f"{name}: perplexity {scored.scores.perplexity:.3f} on {len(scored.windows)} windows of "
            f"{config.window} tokens in {time.perf_counter() - start:.1f} s")
        if name == reference and ref is None:
            ref = scored
        speed = None
        if config.decode_tokens and decode_speed is not None:
            start = time.perf_counter()
            speed = decode_speed(model, config)
            log(f"{name}: decode {speed:.1f} tokens/s at batch 1 (measured in {time.perf_counter() - start:.1f} s "
                f"with compilation and a first run)")
        results[i] = ModelEval(
            model=name,
            quantization=model.quantization,
            perplexity=scored.scores.perplexity,
            agreement=None if ref is None else _agreement(name, scored, reference, ref),
            reference=reference,
            bytes=parameter_bytes(model.params),
            bf16_bytes=bf16_bytes(model.config),
            decode_tokens_per_second=speed,
            windows=scored.windows.shape[0],
            window=config.window,
            data=source,
        )
        del model  # freed before the next model loads
    return [results[i] for i in range(len(models))]
