"""Hugging Face decoder directories: config.json + safetensors, to and from press.

Llama, Mistral and Qwen2 share one tensor layout (`model.layers.{i}.self_attn.q_proj.weight`
etc., PyTorch Linear weights stored [out, in]); only config fields differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from compress.formats import safetensors_file
from compress.formats.tensor_source import FormatError, read_config_json
from compress.models.decoder import DecoderConfig
from compress.models.rope import ROPE_KINDS, RopeScaling
from compress.formats.placement import Recipe, flatten_for_export, per_layer

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _rope_from_hf(d: dict, path: str) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_KINDS:
        raise FormatError(f"{path}: rope scaling type {kind!r} is not supported; supported: {', '.join(ROPE_KINDS)}")
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"kind"}
    kwargs = {k: v for k, v in scaling.items() if k in fields and v is not None}
    if kind == "yarn" and "original_max_position_embeddings" not in kwargs:
        kwargs["original_max_position_embeddings"] = d.get("max_position_embeddings", 2048)
    return float(theta), RopeScaling(kind=kind, **kwargs)


def config_from_hf(d: dict[str, Any], path: str = "config.json") -> DecoderConfig:
    """A DecoderConfig from a parsed Hugging Face config.json (`path` is for messages)."""
    model_type = d.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise FormatError(
            f"{path}: model_type {model_type!r} is not a supported decoder; supported: {', '.join(HF_ARCHITECTURES)}"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(d.get(key), int):
            raise FormatError(f"{path}: key {key!r} must be an integer, found {d.get(key)!r}")
    theta, scaling = _rope_from_hf(d, path)
    heads = d["num_attention_heads"]
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    attention_bias = bool(d.get("attention_bias", False))
    window = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    return DecoderConfig(
        vocab_size=d["vocab_size"],
        embed_dim=d["hidden_size"],
        mlp_dim=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        sliding_window=window,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        architecture=model_type,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=d.get("pad_token_id"),
    )


def config_to_hf(c: DecoderConfig) -> dict[str, Any]:
    """The config.json that transformers needs to rebuild this decoder."""
    if c.architecture == "qwen2" and (not c.qkv_bias or c.o_bias or c.mlp_bias):
        raise FormatError("Qwen2 export needs q/k/v biases and no o/mlp biases; this model's biases differ")
    if c.architecture in ("llama", "mistral") and c.qkv_bias != c.o_bias:
        raise FormatError(f"{c.architecture} export needs biases on all of q/k/v/o or none (attention_bias)")
    if c.architecture == "mistral" and c.mlp_bias:
        raise FormatError("mistral export cannot carry MLP biases")
    d: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[c.architecture]],
        "model_type": c.architecture,
        "vocab_size": c.vocab_size,
        "hidden_size": c.embed_dim,
        "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": c.param_dtype,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) > 1 else (c.eos_token_ids[0] if c.eos_token_ids else None),
        "pad_token_id": c.pad_token_id,
    }
    if c.rope_scaling is not None:
        s = dataclasses.asdict(c.rope_scaling)
        kind = s.pop("kind")
        d["rope_scaling"] = {"rope_type": kind, **{k: v for k, v in s.items() if v is not None}}
        d["rope_parameters"] = {"rope_theta": c.rope_theta, **d["rope_scaling"]}
    if c.architecture in ("llama",):
        d["attention_bias"] = c.o_bias
        d["mlp_bias"] = c.mlp_bias
    if c.architecture == "mistral":
        d["sliding_window"] = c.sliding_window
    if c.architecture == "qwen2":
        d["use_sliding_window"] = c.sliding_window is not None
        d["sliding_window"] = c.sliding_window
    return d


# Each press projection's module under `model.layers.{i}.` in transformers (PEFT names adapters by it).
PROJECTION_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                      "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _projection(c: DecoderConfig, name: str, heads: int | None, out: bool = False, bias: bool = False) -> dict:
    """Recipe and inverse for one projection's kernel (and bias) under `model.layers.{i}.`."""
    D, H = c.embed_dim, c.head_dim
    if heads is None:  # a plain [out, in] Linear
        kernel = (lambda w: w.T), (lambda k: k.T)
        bias_fns = (lambda b: b), (lambda b: b)
    elif not out:  # [N*H, D] -> [D, N, H]
        kernel = (lambda w: w.T.reshape(D, heads, H)), (lambda k: k.reshape(D, heads * H).T)
        bias_fns = (lambda b: b.reshape(heads, H)), (lambda b: b.reshape(heads * H))
    else:  # o_proj [D, N*H] -> [N, H, D]
        kernel = (lambda w: w.T.reshape(heads, H, D)), (lambda k: k.reshape(heads * H, D).T)
        bias_fns = (lambda b: b), (lambda b: b)
    L = c.num_layers
    recipes = {"kernel": Recipe(per_layer(f"model.layers.{{i}}.{name}.weight", L), kernel[0])}
    inverse = {"kernel": kernel[1]}
    if bias:
        recipes["bias"] = Recipe(per_layer(f"model.layers.{{i}}.{name}.bias", L), bias_fns[0])
        inverse["bias"] = bias_fns[1]
    return {"recipes": recipes, "inverse": inverse}


def decoder_recipes(c: DecoderConfig) -> tuple[dict, dict]:
    """(recipes, inverse) pytrees mapping press parameters to Hugging Face tensor names."""
    L = c.num_layers
    ident = lambda x: x  # noqa: E731
    m = PROJECTION_MODULES
    projections = {
        "q": _projection(c, m["q"], c.num_heads, bias=c.qkv_bias),
        "k": _projection(c, m["k"], c.num_kv_heads, bias=c.qkv_bias),
        "v": _projection(c, m["v"], c.num_kv_heads, bias=c.qkv_bias),
        "o": _projection(c, m["o"], c.num_heads, out=True, bias=c.o_bias),
        "gate": _projection(c, m["gate"], None, bias=c.mlp_bias),
        "up": _projection(c, m["up"], None, bias=c.mlp_bias),
        "down": _projection(c, m["down"], None, bias=c.mlp_bias),
    }
    recipes = {
        "embed": Recipe("model.embed_tokens.weight"),
        "layers": {
            "attn_norm": Recipe(per_layer("model.layers.{i}.input_layernorm.weight", L)),
            "mlp_norm": Recipe(per_layer("model.layers.{i}.post_attention_layernorm.weight", L)),
            **{k: v["recipes"] for k, v in projections.items()},
        },
        "final_norm": Recipe("model.norm.weight"),
    }
    inverse = {
        "embed": ident,
        "layers": {"attn_norm": ident, "mlp_norm": ident, **{k: v["inverse"] for k, v in projections.items()}},
        "final_norm": ident,
    }
    if not c.tie_word_embeddings:
        recipes["lm_head"] = {"kernel": Recipe("lm_head.weight", lambda w: w.T)}
        inverse["lm_head"] = {"kernel": lambda k: k.T}
    return recipes, inverse


def read_config(directory: str) -> DecoderConfig:
    """The DecoderConfig of a Hugging Face directory's config.json."""
    d, path = read_config_json(directory)
    return config_from_hf(d, path)


def export(params: Any, config: DecoderConfig, directory: str, tokenizer=None, dtype: str | None = None) -> None:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer) that transformers loads.

    dtype: tensor dtype to store ('float32', 'bfloat16', 'float16'); defaults to the config's param_dtype.
    """
    import ml_dtypes

    store = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype or config.param_dtype]
    os.makedirs(directory, exist_ok=True)
    recipes, inverse = decoder_recipes(config)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    tensors = {k: v.astype(store) for k, v in flatten_for_export(params, recipes, inverse).items()}
    safetensors_file.save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    hf_config = config_to_hf(dataclasses.replace(config, param_dtype=dtype or config.param_dtype))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
