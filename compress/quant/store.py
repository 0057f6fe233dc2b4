"""Quantized model directories: integer weights and scales on disk, loaded without a float copy.

Layout of a directory written by `save` (`press quantize --out DIR`):

  config.json          the float model's Hugging Face config, plus
                       "press_quantization": {"scheme": "int4-g64", "keep_float": ["lm_head"],
                       "format": 1}
  model.safetensors    one tensor per array leaf of press's parameter tree, named by its path
                       ("layers/q/qkernel" int8 [L, D, N, H], "layers/q/scale" float32
                       [L, 1, N, H], "layers/q/group_scale" float16 [L, G, N, H], "embed"
                       [V, D], ...); layers stay stacked (array layouts: compress/quant/weights.py).
                       int4/uint4 tensors are packed two to a byte: a flat uint8 tensor,
                       element 2i in the low nibble of byte i and 2i+1 in the high one; the
                       header's metadata "press_int4" maps each such name to its dtype and shape.
  tokenizer files      as the model's tokenizer saves them (chat template included)

Loading reads each tensor straight onto its shard in its stored dtype: integer weights stay
integer on the device (int4 as jnp.int4, which XLA packs on accelerators), and the full
float model never exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from compress.formats import hf_decoder
from compress.formats.safetensors_file import SafetensorsFile, SafetensorsSet, save_file
from compress.formats.tensor_source import FormatError
from compress.models import decoder
from compress.placement import Recipe, materialize
from compress.quant import schemes
from compress.quant.weights import is_quantized, quantize_params, quantized_axes

KEY = "press_quantization"
FORMAT = 1
INT4 = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}


def quantized_shapes(config: decoder.DecoderConfig, scheme: schemes.Scheme) -> Any:
    """ShapeDtypeStructs of the quantized tree (no memory, nothing computed)."""
    return jax.eval_shape(lambda p: quantize_params(p, decoder.PROJECTIONS, scheme), decoder.param_shapes(config))


def scheme_of(directory: str) -> schemes.Scheme | None:
    """The scheme a directory was quantized with (its keep-float patterns included), or None."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        info = json.load(f).get(KEY)
    if info is None:
        return None
    if info.get("format") != FORMAT:
        raise FormatError(f"{path}: {KEY} format {info.get('format')!r} is not {FORMAT}, the one this press reads")
    try:
        scheme = schemes.get(info["scheme"])
    except (KeyError, ValueError) as e:
        raise FormatError(f"{path}: {KEY} names no valid scheme: {e}") from None
    return scheme.with_keep_float(info.get("keep_float", schemes.DEFAULT_KEEP_FLOAT))


def pack_int4(values: np.ndarray) -> np.ndarray:
    """int4/uint4 values -> flat uint8, two to a byte (element 2i low nibble, 2i+1 high)."""
    nibbles = values.astype(np.int8).reshape(-1).view(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of pack_int4: int8 values (-8..7 for int4, 0..15 for uint4) of `shape`."""
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[: int(np.prod(shape))]
    values = nibbles.astype(np.int8)
    if dtype == "int4":
        values = np.where(values >= 8, values - 16, values).astype(np.int8)
    return values.reshape(shape)


class _Int4Unpacking:
    """A tensor source over a quantized model file that unpacks its packed int4 tensors."""

    def __init__(self, directory: str):
        self.files = SafetensorsSet(directory)
        self.path = directory
        metadata = SafetensorsFile(os.path.join(directory, "model.safetensors")).metadata
        try:
            self.packed = json.loads(metadata.get("press_int4", "{}"))
        except json.JSONDecodeError as e:
            raise FormatError(f"{directory}/model.safetensors: malformed press_int4 metadata: {e}") from None

    def names(self) -> list[str]:
        return self.files.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.packed[name]["shape"]) if name in self.packed else self.files.shape(name)

    def read(self, name: str) -> np.ndarray:
        if name not in self.packed:
            return self.files.read(name)
        info = self.packed[name]
        packed = self.files.read(name)
        if packed.size != (int(np.prod(info["shape"])) + 1) // 2:
            raise FormatError(f"{self.path}/model.safetensors: packed int4 tensor {name!r} has {packed.size} bytes "
                              f"for shape {info['shape']}")
        return unpack_int4(packed, info["dtype"], tuple(info["shape"]))


def stored_bytes(leaf) -> int:
    """Bytes a leaf takes on disk (int4 at half a byte)."""
    if np.dtype(leaf.dtype) in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
        return (leaf.size + 1) // 2
    return leaf.size * np.dtype(leaf.dtype).itemsize


def save(qparams: Any, config: decoder.DecoderConfig, scheme: schemes.Scheme, directory: str, tokenizer=None) -> None:
    """Write a quantized model directory (written beside, then renamed: never half a model)."""
    if os.path.exists(directory):
        raise FileExistsError(f"{directory} already exists; choose a new --out or delete it")
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".press-quantize-")
    os.chmod(tmp, 0o755)
    tensors, packed = {}, {}
    for path, leaf in jax.tree.flatten_with_path(qparams)[0]:
        value = np.asarray(jax.device_get(leaf))
        for kind, dtype in INT4.items():
            if value.dtype == np.dtype(dtype):
                packed[_name(path)] = {"dtype": kind, "shape": list(value.shape)}
                value = pack_int4(value)
        tensors[_name(path)] = value
    metadata = {"format": "press", KEY: scheme.name, "press_int4": json.dumps(packed)}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata=metadata)
    hf_config = {**hf_decoder.config_to_hf(config), KEY: {**scheme.storage(), "format": FORMAT}}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    os.replace(tmp, directory)


def load(directory: str, scheme: schemes.Scheme, *, mesh: Mesh | None = None, dtype: str = "float32"):
    """(config, quantized params) of a directory written by `save`, each leaf on its shard."""
    config = dataclasses.replace(hf_decoder.read_config(directory), dtype=dtype)
    shapes = quantized_shapes(config, scheme)
    axes = quantized_axes(decoder.param_axes(config), shapes)
    recipes = jax.tree_util.tree_map_with_path(lambda path, _: Recipe(_name(path)), shapes)
    params = materialize(recipes, _Int4Unpacking(directory), shapes, axes, mesh)
    return config, params


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def quantize_model(
    name_or_path: str, scheme_name: str, out: str, *, keep_float: list[str] | None = None, calibration=None,
    log=None,
) -> dict:
    """`press quantize`: load a float model, quantize it with a scheme, write `out`. Returns a summary.

    keep_float: fnmatch patterns of projections left float (default: the LM head).
    calibration: settings for calibrated schemes (gptq-*): a compress.quant.gptq.GPTQConfig.
    log: called with a line of progress per calibrated layer.
    """
    from compress.pretrained import load_decoder

    scheme = schemes.get(scheme_name)
    if keep_float is not None:
        scheme = scheme.with_keep_float(keep_float)
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; choose a new --out or delete it")
    model = load_decoder(name_or_path)
    if model.quantization is not None or is_quantized(model.params):
        raise ValueError(
            f"{name_or_path} is already quantized ({model.quantization}); quantize the float model it came from"
        )
    if scheme.calibration == "gptq":
        from compress.quant import gptq

        qparams = gptq.quantize_decoder(model.params, model.config, scheme, model.tokenizer, calibration, log=log)
    else:
        qparams = quantize_params(model.params, decoder.PROJECTIONS, scheme)
    save(qparams, model.config, scheme, out, tokenizer=model.tokenizer)
    bf16 = sum(x.size * 2 for x in jax.tree.leaves(model.params))
    stored = sum(stored_bytes(x) for x in jax.tree.leaves(qparams))
    # The quantized projections alone (integers + scales) against the same matrices in bf16.
    quantized = [p for p in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, dict) and "qkernel" in x)
                 if isinstance(p, dict)]
    q_bytes = sum(stored_bytes(a) for p in quantized for k, a in p.items() if k not in ("bias", "spec"))
    q_bf16 = sum(p["qkernel"].size * 2 for p in quantized)
    return {"model": name_or_path, "scheme": scheme.name, "keep_float": list(scheme.keep_float), "out": out,
            "bytes": stored, "bf16_bytes": bf16, "fraction_of_bf16": round(stored / bf16, 4),
            "quantized_matrices_fraction_of_bf16": round(q_bytes / q_bf16, 4) if q_bf16 else None}
