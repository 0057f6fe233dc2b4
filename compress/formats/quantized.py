"""Quantized model directories: integer weights and scales on disk, loaded without a float copy.

Layout of a directory written by `save` (`press quantize --out DIR`):

  config.json          the float model's Hugging Face config, plus
                       "press_quantization": {"scheme": "int4-g64", "keep_float": ["lm_head"],
                       "format": 2}
  model.safetensors    one tensor per array leaf of press's parameter tree, named by its path
                       ("layers/q/qkernel" int8 [L, D, N, H], "layers/q/scale" float32
                       [L, 1, N, H], "layers/q/group_scale" float16 [L, G, N, H], "embed"
                       [V, D], ...); layers stay stacked. 4-bit codes are int8 tensors holding
                       two codes a byte ("layers/q/qkernel" int8 [L, G, N/2, N, H]), exactly as
                       the matmul reads them (array layouts: compress/quant/weights.py and
                       compress/quant/packed_int4.py).
  tokenizer files      as the model's tokenizer saves them (chat template included)

Loading reads each tensor straight onto its shard in its stored dtype: integer weights stay
integer on the device (4-bit codes still two to a byte), and the full float model never exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from compress import file_locks
from compress.formats import hf_decoder
from compress.formats.safetensors_file import SafetensorsSet, save_file
from compress.formats.tensor_source import FormatError
from compress.models import decoder
from compress.formats.placement import Recipe, materialize
from compress.quant import matmul, schemes
from compress.quant.weights import quantize_params, quantized_axes

KEY = "press_quantization"
FORMAT = 2  # 1 (before 2026-11-23) stored 4-bit codes in the kernel's shape: re-quantize such directories


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
        raise FormatError(f"{path}: {KEY} format {info.get('format')!r} is not {FORMAT}, the one this press reads; quantize the float model again")
    try:
        scheme = schemes.get(info["scheme"])
    except (KeyError, ValueError) as e:
        raise FormatError(f"{path}: {KEY} names no valid scheme: {e}") from None
    return scheme.with_keep_float(info.get("keep_float", schemes.DEFAULT_KEEP_FLOAT))


STAGING = ".press-quantize-"  # a model being written, beside its --out, with its writer's lock file


def _remove_stale(parent: str, own: str) -> None:
    """Remove the staging directories in `parent` but `own` whose writer is gone (killed with -9: its
    lock is free); a live writer holds its lock from before its directory exists until after the
    rename (and this process's own, re-entrant, would not tell)."""
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if not name.startswith(STAGING) or name.endswith(".lock") or path == own or not os.path.isdir(path):
            continue
        try:
            with file_locks.exclusive(path + ".lock", refuse=file_locks.Held(path)):
                shutil.rmtree(path, ignore_errors=True)
                os.remove(path + ".lock")
        except (file_locks.Held, OSError):
            pass


def save(qparams: Any, config: decoder.DecoderConfig, scheme: schemes.Scheme, directory: str, tokenizer=None) -> None:
    """Write a quantized model directory (written beside, then renamed: never half a model)."""
    if os.path.exists(directory):
        raise FileExistsError(f"{directory} already exists; choose a new --out or delete it")
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{STAGING}{uuid.uuid4().hex[:12]}")
    with file_locks.exclusive(tmp + ".lock"):  # taken before the directory exists: see _remove_stale
        os.mkdir(tmp)
        _remove_stale(parent, tmp)
        try:
            _write(qparams, config, scheme, directory, tokenizer, tmp)
        finally:
            os.remove(tmp + ".lock")


def _write(qparams, config, scheme, directory: str, tokenizer, tmp: str) -> None:
    try:
        os.chmod(tmp, 0o755)
        tensors = {_name(path): np.asarray(jax.device_get(leaf))
                   for path, leaf in jax.tree.flatten_with_path(qparams)[0]}
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "press", KEY: scheme.name})
        hf_config = {**hf_decoder.config_to_hf(config), KEY: {**scheme.storage(), "format": FORMAT}}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, directory)
        except OSError:
            if os.path.isdir(directory) and os.listdir(directory):  # another writer renamed its model there first
                raise FileExistsError(f"{directory} was written by another process meanwhile; it is kept as that "
                                      "process wrote it: choose a new --out") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written model left beside the output
        raise


def load(directory: str, scheme: schemes.Scheme, *, mesh: Mesh | None = None, dtype: str = "float32"):
    """(config, quantized params) of a directory written by `save`, each leaf on its shard."""
    config = dataclasses.replace(hf_decoder.read_config(directory), dtype=dtype)
    shapes = quantized_shapes(config, scheme)
    axes = quantized_axes(decoder.param_axes(config), shapes)
    recipes = jax.tree_util.tree_map_with_path(lambda path, _: Recipe(_name(path)), shapes)
    params = materialize(recipes, SafetensorsSet(directory), shapes, axes, mesh)
    if mesh is not None and mesh.size > 1:  # no native kernels on a mesh (their custom calls would gather weights)
        params = matmul.single_device(params)
    return config, params


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")
