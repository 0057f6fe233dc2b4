"""Quantization-aware training: press's schemes in training mode, switched on by config.

`fake_quantize(params, projections, scheme)` is a pure transform applied inside a loss
function: each projection the scheme would quantize keeps its float kernel but gains a
static MatmulSpec with `fake=True`, and `compress.models.linear.dense` then runs that
matmul through AQT in training mode — weights (and, for w8a8, activations per token)
rounded to the scheme's grid in the forward pass, straight-through gradients in the
backward pass (compress/quant/aqt_matmul.py). The optimizer, the parameter tree and
checkpoints never change: only the loss sees the quantized forward.

    def loss_fn(params, batch):
        params = qat.fake_quantize(params, decoder.PROJECTIONS, scheme)   # or not, by config
        logits = decoder.forward(params, batch["tokens"], config).logits
        ...

The forward numerics are those `press quantize` serves (absmax scales, the same integer
ranges and groups), so what training optimises is what is served; group scales are
float32 here and float16 when stored, a difference far below the quantization step.
Gradients stay float (AQT's stochastic rounding applies to quantized gradients, which
press does not use).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compress.quant.matmul import spec_of
from compress.quant.schemes import Scheme
from compress.quant.weights import map_projections, to_quantize


def fake_quantize(params: dict[str, Any], projections: dict[str, str], scheme: Scheme) -> dict[str, Any]:
    """The tree with every projection `scheme` selects marked for quantized training matmuls.

    Arrays are not copied or changed (gradients reach the float kernels unchanged in
    structure); keep-float patterns are honoured as in `press quantize`.
    """
    if not scheme.quantizes_weights:
        return params
    if scheme.calibration is not None:
        # GPTQ is post-training; training towards its grid is training towards round to nearest.
        scheme = dataclasses.replace(scheme, calibration=None)
    selected = to_quantize(params, projections, scheme)
    spec = dataclasses.replace(spec_of(scheme), fake=True)

    return map_projections(params, selected, lambda path, value: {**value, "spec": spec})
