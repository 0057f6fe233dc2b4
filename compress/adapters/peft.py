"""LoRA adapters in the PEFT format, both ways: what `peft.PeftModel.from_pretrained` loads.

A directory holds
  adapter_config.json          peft_type LORA, r, lora_alpha, use_rslora, target_modules, ...
  adapter_model.safetensors    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, in]
                               base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, r]
                               (base_model.model.lm_head.lora_A.weight for an untied LM head)

PEFT's A is [r, in] and B [out, r] over transformers' flattened Linear (in and out are the
press kernel's input and output axes flattened row-major, the order hf_decoder uses); press
keeps A [layers, *in, r] and B [layers, r, *out] beside the kernel (compress/adapters/lora.py).
The scale, alpha / r (or alpha / sqrt(r) with use_rslora), is the same in both.

Reading accepts what press can compute exactly: one rank and alpha for every module, no DoRA,
no `fan_in_fan_out`, no bias training, adapters on the decoder's projections; anything else is
an error naming the file and the key or tensor.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compress.adapters import lora
from compress.errors import InputError
from compress.formats import safetensors_file
from compress.formats.hf_decoder import PROJECTION_MODULES
from compress.models import decoder

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _module(path: str, layer: int | None) -> str:
    """'layers/q', 3 -> 'model.layers.3.self_attn.q_proj'; 'lm_head' -> 'lm_head'."""
    if path == "lm_head":
        return "lm_head"
    return f"model.layers.{layer}.{PROJECTION_MODULES[path.split('/', 1)[1]]}"


def _target_name(path: str) -> str:
    return "lm_head" if path == "lm_head" else PROJECTION_MODULES[path.split("/", 1)[1]].rsplit(".", 1)[-1]


def export(tree: dict[str, Any], directory: str, *, base_model: str = "", dtype=np.float32) -> None:
    """Write the adapters of an adapted parameter tree as a PEFT adapter directory (the scale is
    written as lora_alpha = scale * r, which is exact for rsLoRA adapters too)."""
    adapters = lora.adapters(tree)
    if not adapters:
        raise InputError("no LoRA adapter in these parameters to export")
    specs = {p[lora.SPEC] for p in adapters.values()}
    ranks = {p[lora.A].shape[-1] for p in adapters.values()}
    if len(specs) != 1 or len(ranks) != 1:
        raise InputError("PEFT export needs one rank, scale and dropout for every adapter; "
                         f"these have ranks {sorted(ranks)} and {len(specs)} settings")
    (spec,), (rank,) = specs, ranks
    alpha = spec.scale * rank
    tensors = {}
    for path, p in adapters.items():
        a, b = np.asarray(jax.device_get(p[lora.A]), np.float32), np.asarray(jax.device_get(p[lora.B]), np.float32)
        stacked = path.startswith("layers/")
        for i in range(a.shape[0]) if stacked else [None]:
            ai, bi = (a[i], b[i]) if stacked else (a, b)
            name = PREFIX + _module(path, i)
            tensors[f"{name}.lora_A.weight"] = ai.reshape(-1, rank).T.astype(dtype)
            tensors[f"{name}.lora_B.weight"] = bi.reshape(rank, -1).T.astype(dtype)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "use_rslora": False, "lora_dropout": spec.dropout,
        "target_modules": sorted({_target_name(path) for path in adapters}), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    os.makedirs(directory, exist_ok=True)
    safetensors_file.save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def read(directory: str, model_config: decoder.DecoderConfig) -> dict[str, dict[str, Any]]:
    """A PEFT LoRA directory as press adapters (path -> {lora_a, lora_b, lora}) for `model_config`:
    `lora.attach(params, adapters)` puts them on a model's parameters."""
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{directory} is not a PEFT adapter directory: no {CONFIG_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object")

    def refuse(key, why):
        raise InputError(f"{config_path}: {key} = {config.get(key)!r}: {why}")

    if config.get("peft_type") != "LORA":
        refuse("peft_type", "only LoRA adapters are supported")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            refuse(key, "not supported by press")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            refuse(key, "press needs one rank and alpha for every module")
    if config.get("bias", "none") != "none":
        refuse("bias", "trained biases are not supported")
    if config.get("modules_to_save"):
        refuse("modules_to_save", "fully trained modules are not supported")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        refuse("r", "expected a positive integer")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        refuse("lora_alpha", "expected a number")
    scale = alpha / (np.sqrt(rank) if config.get("use_rslora") else rank)
    spec = lora.LoraSpec(float(scale), float(config.get("lora_dropout") or 0.0))
    if not os.path.exists(weights_path):
        raise InputError(f"{directory}: no {WEIGHTS_FILE} (adapters saved as .bin are not read; save with "
                         "safe_serialization=True)")
    weights = safetensors_file.SafetensorsFile(weights_path)
    names = set(weights.names())
    specs = decoder.param_specs(model_config)
    adapters: dict[str, dict[str, Any]] = {}
    used = set()
    for path, kernel in lora.projection_kernels(specs):
        equation = decoder.PROJECTIONS[path.rsplit("/", 1)[-1]]
        a_spec, b_spec = lora.factor_specs(kernel, equation, rank)
        stacked = path.startswith("layers/")
        layers = range(model_config.num_layers) if stacked else [None]
        found = [f"{PREFIX}{_module(path, i)}.lora_A.weight" in names for i in layers]
        if not any(found):
            continue
        if not all(found):
            missing = [i for i, ok in zip(layers, found) if not ok]
            raise InputError(f"{weights_path}: {path} has adapters in some layers only (none in layers {missing}); "
                             "press adapts a projection in every layer")
        a_parts, b_parts = [], []
        in_shape = a_spec.shape[1 if stacked else 0 : -1]
        out_shape = b_spec.shape[2 if stacked else 1 :]
        for i in layers:
            name = f"{PREFIX}{_module(path, i)}"
            a, b = _tensor(weights, f"{name}.lora_A.weight", (rank, int(np.prod(in_shape)))), \
                _tensor(weights, f"{name}.lora_B.weight", (int(np.prod(out_shape)), rank))
            used.update((f"{name}.lora_A.weight", f"{name}.lora_B.weight"))
            a_parts.append(a.T.reshape(*in_shape, rank))
            b_parts.append(b.T.reshape(rank, *out_shape))
        a_value = np.stack(a_parts) if stacked else a_parts[0]
        b_value = np.stack(b_parts) if stacked else b_parts[0]
        adapters[path] = {lora.A: jnp.asarray(a_value), lora.B: jnp.asarray(b_value), lora.SPEC: spec}
    unknown = sorted(names - used)
    if unknown:
        raise InputError(f"{weights_path}: tensors press does not know how to apply: {', '.join(unknown[:5])}"
                         + (" ..." if len(unknown) > 5 else ""))
    if not adapters:
        raise InputError(f"{weights_path}: no LoRA tensor for any projection of this model")
    return adapters


def _tensor(weights, name: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        value = weights.read(name)
    except KeyError:
        raise InputError(f"{weights.path}: missing tensor {name}") from None
    if tuple(value.shape) != shape:
        raise InputError(f"{weights.path}: tensor {name} has shape {list(value.shape)}, expected {list(shape)} "
                         "(was the adapter trained on another model?)")
    value = np.asarray(value, np.float32)
    if not np.all(np.isfinite(value)):
        raise InputError(f"{weights.path}: tensor {name} holds NaN or infinite values")
    return value
