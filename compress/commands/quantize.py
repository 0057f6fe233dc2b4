"""`press quantize`: a float model's integer weights and scales, written to a new directory.

  press quantize [configs/quantize.yaml] [--model M] [--scheme S] [--out DIR] [key=value ...]
  press quantize configs/quantize.yaml scheme=gptq-int4-g64 calibration.num_sequences=64

The directory (its layout: compress/formats/quantized.py) is served, evaluated and quantized
no further by every other command: pass it as --model. Calibrated schemes (gptq-*, smooth-*)
read calibration text from the train part of the language reference unless
calibration.data names a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable

from compress import config as cfg
from compress.quant import schemes
from compress.quant.gptq import GPTQConfig

HELP = "write a model's integer weights and scales to a directory"


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """`press quantize`: which float model, which scheme, where to write it."""

    model: str = "smollm2-135m-instruct"  # bundled name, Hugging Face directory or .gguf file (float)
    # int8, int4-g{32,64,128}[-asym], gptq-int4-g{32,64,128}[-asym], w8a8, smooth-w8a8; +kv-int8 adds an int8 KV
    # cache; +embed-int8 or +embed-int4-g{32,64,128}[-asym] quantizes the embedding table and LM head too
    scheme: str = "int8"
    out: str | None = None  # a new directory; None: out/<model>-<scheme>
    keep_float: tuple[str, ...] = schemes.DEFAULT_KEEP_FLOAT  # fnmatch patterns of projections left float
    calibration: GPTQConfig = GPTQConfig()  # gptq-* and smooth-* schemes: text, windows and GPTQ's settings

    def __post_init__(self):
        try:
            schemes.get(self.scheme)
        except ValueError as e:
            raise cfg.ConfigError(str(e), key="scheme") from None
        if self.out is not None and not self.out:
            raise cfg.ConfigError("is empty; give a new directory (or null for out/<model>-<scheme>)", key="out")

    @property
    def out_dir(self) -> str:
        """`out`, else out/<the model's last path component, without .gguf>-<scheme>."""
        if self.out:
            return self.out
        name = os.path.basename(os.path.normpath(self.model)).removesuffix(".gguf")
        return os.path.join("out", f"{name}-{self.scheme.replace('+', '-')}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, QuantizeConfig)
    flags.flag("--model", key="model", help="bundled name, Hugging Face directory or .gguf file (float)")
    flags.flag("--scheme", key="scheme",
               help="int8, int4-g{32,64,128}[-asym], gptq-int4-g{32,64,128}[-asym], w8a8, smooth-w8a8; "
                    "+kv-int8 adds an int8 KV cache; +embed-int8 or +embed-int4-gN[-asym] the embedding table "
                    "and LM head (stored once when tied)")
    flags.flag("--keep-float", key="keep_float", metavar="PATTERNS", type=lambda text: [p for p in text.split(",") if p],
               help="comma-separated fnmatch patterns of projections left float, e.g. 'lm_head,layers/down' "
                    "('' quantizes every projection)")
    flags.flag("--out", key="out", help="new directory to write; serve it with --model OUT")
    calib = p.add_argument_group("calibration (gptq-* and smooth-* schemes)")
    calib_flags = cfg.ConfigFlags(calib, QuantizeConfig, argparse.SUPPRESS)
    calib_flags.flag("--calibration-data", key="calibration.data", metavar="PATH",
                     help="a UTF-8 text file (None: the train part of pydoc_data.topics, never the held-out part)")
    calib_flags.flag("--calibration-sequences", key="calibration.num_sequences", type=int, help="windows drawn")
    calib_flags.flag("--calibration-length", key="calibration.sequence_length", type=int, help="tokens per window")


def run(args: argparse.Namespace) -> int:
    config: QuantizeConfig = cfg.config_from_args(args)
    summary = quantize_model(config.model, config.scheme, config.out_dir, keep_float=config.keep_float,
                             calibration=config.calibration, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(summary))
    return 0


def quantize_model(
    name_or_path: str, scheme_name: str, out: str, *, keep_float=None, calibration: GPTQConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Load a float model, quantize it with a scheme, write `out`. Returns a summary (bytes against bf16).

    keep_float: fnmatch patterns of projections left float (None: the scheme's default, the LM head).
    calibration: settings for calibrated schemes (gptq-*, smooth-*).
    log: called with a line of progress per calibrated layer.
    """
    import jax

    from compress.formats import quantized
    from compress.models import decoder
    from compress.pretrained import load_decoder
    from compress.quant import gptq, smooth
    from compress.quant.weights import is_quantized, quantize_params

    scheme = schemes.get(scheme_name)
    if keep_float is not None:
        scheme = scheme.with_keep_float(keep_float)
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; choose a new --out or delete it")
    model = load_decoder(name_or_path)
    if model.quantization is not None or is_quantized(model.params):
        raise cfg.ConfigError(
            f"{name_or_path} is already quantized ({model.quantization}); quantize the float model it came from",
            key="model")
    if scheme.calibration == "gptq":
        qparams = gptq.quantize_decoder(model.params, model.config, scheme, model.tokenizer, calibration, log=log)
    elif scheme.calibration == "smoothquant":
        smoothed = smooth.smooth_decoder(model.params, model.config, model.tokenizer, calibration, log=log)
        qparams = quantize_params(smoothed, decoder.PROJECTIONS, scheme)
    else:
        qparams = quantize_params(model.params, decoder.PROJECTIONS, scheme)
    quantized.save(qparams, model.config, scheme, out, tokenizer=model.tokenizer)
    bf16 = sum(x.size * 2 for x in jax.tree.leaves(model.params))
    stored = sum(x.nbytes for x in jax.tree.leaves(qparams))
    # The quantized projections alone (integers + scales) against the same matrices in bf16.
    projections = [p for p in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, dict) and "qkernel" in x)
                   if isinstance(p, dict)]
    q_bytes = sum(a.nbytes for p in projections for k, a in p.items() if k not in ("bias", "spec"))
    q_bf16 = sum(p["qkernel"].size * (2 if p["spec"].weight_bits == 4 else 1) * 2 for p in projections)  # 4-bit: 2 a byte
    return {"model": name_or_path, "scheme": scheme.name, "keep_float": list(scheme.keep_float), "out": out,
            "bytes": stored, "bf16_bytes": bf16, "fraction_of_bf16": round(stored / bf16, 4),
            "quantized_matrices_fraction_of_bf16": round(q_bytes / q_bf16, 4) if q_bf16 else None}
