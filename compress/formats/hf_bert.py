"""Hugging Face BERT directories (config.json + safetensors) into press encoder parameters.

Tensor names are those of transformers' `BertModel` (`encoder.layer.{i}.attention.self.query.weight`
etc.); checkpoints saved from a task model (`BertForMaskedLM`, ...) prefix them with `bert.`,
and both spellings are accepted. PyTorch Linear weights are stored [out, in]; q/k/v are split
into heads here so the model's einsums see [embed, heads, head_dim]. The pooler and the task
heads are not read.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from compress.formats.safetensors_file import SafetensorsSet
from compress.formats.tensor_source import FormatError, read_config_json
from compress.models.params import DTYPES
from compress.models.encoder import EncoderConfig, ParamSpec, param_specs

PREFIX = "bert."


def encoder_config_from_hf(d: dict[str, Any], path_for_errors: str = "config.json") -> EncoderConfig:
    """An EncoderConfig from a parsed Hugging Face BERT config.json (`path_for_errors` names it in messages)."""
    path = path_for_errors
    model_type = d.get("model_type")
    if model_type != "bert":
        raise FormatError(f"{path}: key 'model_type' is {model_type!r}; only 'bert' encoders (e.g. MiniLM) load here")
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
    ):
        value = d.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            found = "missing" if key not in d else f"{value!r}"
            raise FormatError(f"{path}: key {key!r} must be a positive integer, found {found}")
    type_vocab_size = d.get("type_vocab_size", 2)
    if isinstance(type_vocab_size, bool) or not isinstance(type_vocab_size, int) or type_vocab_size <= 0:
        raise FormatError(f"{path}: key 'type_vocab_size' must be a positive integer, found {type_vocab_size!r}")
    eps = d.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise FormatError(f"{path}: key 'layer_norm_eps' must be a positive number, found {eps!r}")
    # Our MLP is exact (erf) GELU, which transformers calls "gelu"; the tanh variants differ slightly.
    if d.get("hidden_act", "gelu") != "gelu":
        raise FormatError(f"{path}: key 'hidden_act' is {d['hidden_act']!r}; only 'gelu' (exact erf GELU) is supported")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise FormatError(
            f"{path}: key 'position_embedding_type' is {d['position_embedding_type']!r}; only 'absolute' is supported"
        )
    width, heads = d["hidden_size"], d["num_attention_heads"]
    if width % heads:
        raise FormatError(f"{path}: key 'hidden_size'={width} is not a multiple of 'num_attention_heads'={heads}")
    return EncoderConfig(
        vocab_size=d["vocab_size"],
        embed_dim=width,
        mlp_dim=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        head_dim=width // heads,
        max_position_embeddings=d["max_position_embeddings"],
        type_vocab_size=type_vocab_size,
        layer_norm_eps=float(eps),
    )


class HFTensor(NamedTuple):
    """Where one parameter leaf comes from: an HF tensor name (with `{i}` for stacked layers),
    that tensor's expected shape, and the map from it to the leaf's (per-layer) layout."""

    name: str
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] = lambda x: x


def tensor_layout(c: EncoderConfig) -> dict[str, Any]:
    """HFTensor for every leaf, in the structure of `param_specs(c)`."""
    D, F, N, H = c.embed_dim, c.mlp_dim, c.num_heads, c.head_dim
    layer = "encoder.layer.{i}."

    def norm(prefix):
        return {"scale": HFTensor(prefix + "LayerNorm.weight", (D,)), "bias": HFTensor(prefix + "LayerNorm.bias", (D,))}

    def split_heads(name):  # [N*H, D] -> [D, N, H]; bias [N*H] -> [N, H]
        return {
            "kernel": HFTensor(f"{layer}attention.self.{name}.weight", (N * H, D), lambda w: w.T.reshape(D, N, H)),
            "bias": HFTensor(f"{layer}attention.self.{name}.bias", (N * H,), lambda b: b.reshape(N, H)),
        }

    def linear(name, out_dim, in_dim):  # [out, in] -> [in, out]
        return {
            "kernel": HFTensor(f"{layer}{name}.weight", (out_dim, in_dim), lambda w: w.T),
            "bias": HFTensor(f"{layer}{name}.bias", (out_dim,)),
        }

    return {
        "token_embed": HFTensor("embeddings.word_embeddings.weight", (c.vocab_size, D)),
        "position_embed": HFTensor("embeddings.position_embeddings.weight", (c.max_position_embeddings, D)),
        "type_embed": HFTensor("embeddings.token_type_embeddings.weight", (c.type_vocab_size, D)),
        "embed_norm": norm("embeddings."),
        "layers": {
            "q": split_heads("query"),
            "k": split_heads("key"),
            "v": split_heads("value"),
            "o": {  # [D, N*H] -> [N, H, D]
                "kernel": HFTensor(f"{layer}attention.output.dense.weight", (D, N * H), lambda w: w.T.reshape(N, H, D)),
                "bias": HFTensor(f"{layer}attention.output.dense.bias", (D,)),
            },
            "attn_norm": norm(f"{layer}attention.output."),
            "up": linear("intermediate.dense", F, D),
            "down": linear("output.dense", D, F),
            "mlp_norm": norm(f"{layer}output."),
        },
    }


def encoder_params_from_hf(
    read: Callable[[str], np.ndarray], config: EncoderConfig, *, path_for_errors: str = "checkpoint"
) -> dict[str, Any]:
    """The encoder parameter tree from Hugging Face BERT tensors.

    Args:
      read: returns the tensor of a safetensors name as a NumPy array, and raises KeyError for
        a name it lacks. Names are tried as written, then with the `bert.` prefix.
      config: the EncoderConfig the tensors must fit.
      path_for_errors: the file named in error messages.

    Returns:
      The parameter tree of `compress.models.encoder`, as jax arrays of `config.param_dtype`.

    Raises:
      FormatError (a ValueError) naming the tensor if one is missing or has the wrong shape.
    """
    dtype = DTYPES[config.param_dtype]

    def read_checked(name: str, shape: tuple[int, ...]) -> np.ndarray:
        try:
            value = read(name)
        except KeyError:
            try:
                value = read(PREFIX + name)
            except KeyError:
                raise FormatError(f"{path_for_errors}: tensor {name!r} (or {PREFIX + name!r}) is missing") from None
        if tuple(value.shape) != shape:
            raise FormatError(
                f"{path_for_errors}: tensor {name!r} has shape {tuple(value.shape)}, expected {shape} from the config "
                f"(hidden_size={config.embed_dim}, intermediate_size={config.mlp_dim}, "
                f"num_attention_heads={config.num_heads}, vocab_size={config.vocab_size})"
            )
        return np.asarray(value, np.float32)

    def load(tensor: HFTensor, spec: ParamSpec) -> jax.Array:
        if "{i}" in tensor.name:
            names = [tensor.name.format(i=i) for i in range(config.num_layers)]
            value = np.stack([tensor.transform(read_checked(name, tensor.shape)) for name in names])
        else:
            value = tensor.transform(read_checked(tensor.name, tensor.shape))
        assert value.shape == spec.shape, (tensor.name, value.shape, spec.shape)  # the layout table is wrong
        return jnp.asarray(value, dtype)

    return jax.tree.map(load, tensor_layout(config), param_specs(config), is_leaf=lambda x: isinstance(x, HFTensor))


def read_encoder_config(model_dir: str) -> EncoderConfig:
    """The EncoderConfig of a Hugging Face BERT directory's config.json."""
    d, path = read_config_json(model_dir)
    return encoder_config_from_hf(d, path)


def load_encoder(model_dir: str) -> tuple[EncoderConfig, dict[str, Any]]:
    """(config, params) of a Hugging Face BERT directory: config.json and model.safetensors
    (or a sharded model.safetensors.index.json set). bfloat16 and float16 tensors are widened
    to the config's float32 param_dtype."""
    config = read_encoder_config(model_dir)
    weights = SafetensorsSet(model_dir)
    available = set(weights.names())

    def read(name: str) -> np.ndarray:
        if name not in available:
            raise KeyError(name)
        return weights.read(name)

    return config, encoder_params_from_hf(read, config, path_for_errors=os.path.join(model_dir, "model.safetensors"))
