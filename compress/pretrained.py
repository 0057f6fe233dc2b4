"""Load a decoder (config, sharded parameters, tokenizer) from a name, directory or GGUF file."""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import Mesh

from compress.formats import gguf_decoder, hf_decoder, quantized
from compress.formats.gguf_file import GGUFFile
from compress.formats.safetensors_file import SafetensorsSet
from compress.models import decoder
from compress.models.params import Dtype
from compress.formats.placement import materialize
from compress.formats.registry import ModelLocation, resolve
from compress.formats.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model a job loads, and in which dtypes (a section of every job's config)."""

    name: str = "smollm2-135m-instruct"  # bundled name, Hugging Face directory, .gguf file or quantized directory
    dtype: Dtype = "float32"  # compute dtype of activations
    param_dtype: Dtype | None = None  # storage dtype of the weights; None: dtype


@dataclasses.dataclass
class Pretrained:
    config: decoder.DecoderConfig
    params: Any
    tokenizer: Any  # a transformers tokenizer (chat template included when the model has one)
    location: ModelLocation
    quantization: str | None = None  # the scheme of a quantized directory (integer weights)


def decoder_architecture(name_or_path: str) -> tuple[decoder.DecoderConfig, Any]:
    """(config, tokenizer) of a bundled name, Hugging Face directory or .gguf file, without its weights:
    what a model trained from random weights in the same shape (or a variation of it) needs."""
    location = resolve(name_or_path)
    if location.format == "gguf":
        config = gguf_decoder.config_from_gguf(GGUFFile(location.path))
    else:
        config = hf_decoder.read_config(location.path)
    return config, load_tokenizer(location)


def load_decoder(
    name_or_path: str,
    *,
    mesh: Mesh | None = None,
    param_dtype: str = "float32",
    dtype: str = "float32",
    with_tokenizer: bool = True,
) -> Pretrained:
    """Load a decoder with each parameter placed directly onto its sharding on `mesh`.

    Args:
      name_or_path: a bundled name (`press models`), a Hugging Face directory, a .gguf file, or
        a directory written by `press quantize` (its integer weights stay integer on device).
      mesh: a (data, fsdp, tensor) mesh from `compress.sharding.make_mesh`; default one device.
      param_dtype, dtype: storage and compute dtypes ('float32', 'bfloat16', 'float16').
    """
    location = resolve(name_or_path)
    if location.format == "hf":
        scheme = quantized.scheme_of(location.path)
        if scheme is not None:
            config, params = quantized.load(location.path, scheme, mesh=mesh, dtype=dtype)
            tokenizer = load_tokenizer(location) if with_tokenizer else None
            return Pretrained(config, params, tokenizer, location, scheme.name)
    if location.format == "gguf":
        source = GGUFFile(location.path)
        config = gguf_decoder.config_from_gguf(source)
        recipes = gguf_decoder.decoder_recipes(config, permuted_qk=config.architecture in ("llama", "mistral"))
    else:
        source = SafetensorsSet(location.path)
        config = hf_decoder.read_config(location.path)
        recipes, _ = hf_decoder.decoder_recipes(config)
    tokenizer = load_tokenizer(location) if with_tokenizer else None
    config = dataclasses.replace(config, param_dtype=param_dtype, dtype=dtype)
    params = materialize(recipes, source, decoder.param_shapes(config), decoder.param_axes(config), mesh)
    return Pretrained(config, params, tokenizer, location)
