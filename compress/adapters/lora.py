"""LoRA as a transform of the parameter tree: low-rank factors added to chosen projections.

    tree = lora.add(params, model_config, LoraConfig(rank=8, alpha=16), rng)
    decoder.forward(tree, tokens, model_config)           # base + (alpha/r) * x A B
    lora.trainable(tree)                                  # the names the optimizer may touch
    merged = lora.merge(tree)                             # a plain float model, same logits

A targeted projection's dict keeps its base arrays as they are (a float `kernel`; or the
integer `qkernel` and scales of `press quantize`, whose static `spec` computes the matmul;
or QAT's fake-quantized kernel) and gains

    lora_a  [layers?, *in, r]    uniform(-1/sqrt(in), 1/sqrt(in)), PEFT's kaiming init
    lora_b  [layers?, r, *out]   zeros, so the tree computes exactly the base model at step 0
    lora    LoraSpec             static: the scale (alpha / r, or alpha / sqrt(r) for rsLoRA)
                                 and the dropout rate

`compress.models.linear.dense` adds `p["lora"].apply(p, x, equation)` to whatever the base
computes, so LoRA composes with every kernel without the model code knowing about it; and
since the factors are leaves beside the base's, the trainable/frozen split is a partition of
one tree (`trainable`): integer leaves are never differentiated, yet gradients flow through
the integer matmuls to the activations and so to the factors of earlier layers (QLoRA).

The factors of stacked layers carry the `layers` axis first, like every other leaf there, so
the layer scan slices them with the rest. Dropout (on the adapter's input only, as PEFT does)
needs a key per projection: `with_dropout_keys(tree, rng)` puts one beside each adapter for a
training step; without keys, dropout is off (evaluation, serving).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from compress.config import full_matches
from compress.errors import InputError
from compress.models import decoder
from compress.models.params import ParamSpec
from compress.quant import grid
from compress.quant.weights import dequantize_kernel, map_projections, quantize_kernel

A, B, SPEC, KEY = "lora_a", "lora_b", "lora", "lora_key"
RANK_AXIS = "lora_rank"  # the logical axis of the rank (compress/sharding.py: replicated)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which projections get adapters, and their rank, scaling and dropout."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, while training
    targets: tuple[str, ...] = ("layers/(q|k|v|o|gate|up|down)",)  # regexes over projection paths
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank (Kalajdzievski, 2023)
    init_from: str = ""  # a PEFT adapter directory to continue training (its rank, scale and targets apply)

    def __post_init__(self):
        if self.rank < 1:
            raise InputError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
        if not self.targets:
            raise InputError("lora.targets is empty: name at least one projection, e.g. 'layers/(q|v)'")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The static part of one adapter (no arrays): what multiplies x A B, and the dropout rate."""

    scale: float
    dropout: float = 0.0

    def apply(self, p: dict[str, Any], x: jnp.ndarray, equation: str) -> jnp.ndarray:
        """scale * (x A) B for the projection `einsum(equation, x, kernel)`, in x's dtype."""
        eq_a, eq_b = factor_equations(equation)
        if self.dropout and KEY in p:
            keep = jax.random.bernoulli(jax.random.wrap_key_data(p[KEY]), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = jnp.einsum(eq_a, x, p[A].astype(x.dtype))
        return (self.scale * jnp.einsum(eq_b, h, p[B].astype(x.dtype))).astype(x.dtype)


def factor_equations(equation: str) -> tuple[str, str]:
    """'BTNH,NHD->BTD' -> ('BTNH,NHr->BTr', 'BTr,rD->BTD'): the two einsums of x A B."""
    inputs, out = equation.split("->")
    x, kernel = inputs.split(",")
    contracted = "".join(c for c in kernel if c in x)
    kept = "".join(c for c in kernel if c not in x)
    batch = "".join(c for c in x if c not in kernel)
    return f"{x},{contracted}r->{batch}r", f"{batch}r,r{kept}->{out}"


# ----------------------------------------------------------------------------- the tree transform


def targets(model_config: decoder.DecoderConfig, config: LoraConfig) -> dict[str, tuple[ParamSpec, str]]:
    """Projection path ('layers/q') -> (its float kernel's ParamSpec, its einsum), for every
    projection the config's patterns select. A pattern that selects nothing is an InputError
    naming the projections, and so is the LM head of a model with tied embeddings (there the
    head is the embedding table, which no projection reads)."""
    specs = decoder.param_specs(model_config)
    found = {}
    for path, kernel in projection_kernels(specs):
        found[path] = (kernel, decoder.PROJECTIONS[path.rsplit("/", 1)[-1]])
    chosen = {}
    for pattern in config.targets:
        matched = full_matches(pattern, list(found), "lora.targets")
        if not matched:
            tied = " (the LM head is tied to the embeddings in this model)" if model_config.tie_word_embeddings else ""
            raise InputError(f"lora.targets pattern {pattern!r} matches no projection; projections: "
                             f"{', '.join(found)}{tied}")
        chosen.update((path, found[path]) for path in matched)
    return chosen


def projection_kernels(specs: dict[str, Any], prefix: str = ""):
    """(path, kernel ParamSpec) of every projection in a decoder's `param_specs` tree."""
    for name, value in specs.items():
        if isinstance(value, dict) and "kernel" in value and name in decoder.PROJECTIONS:
            yield f"{prefix}{name}", value["kernel"]
        elif isinstance(value, dict):
            yield from projection_kernels(value, f"{prefix}{name}/")


def factor_specs(kernel: ParamSpec, equation: str, rank: int) -> tuple[ParamSpec, ParamSpec]:
    """The ParamSpecs of A [lead?, *in, r] and B [lead?, r, *out] for a kernel [lead?, *in, *out]."""
    axes = grid.contracted_axes(equation, len(kernel.shape))
    lead, end = axes[0], axes[-1] + 1
    a = ParamSpec((*kernel.shape[:end], rank), (*kernel.axes[:end], RANK_AXIS), "normal")
    b = ParamSpec((*kernel.shape[:lead], rank, *kernel.shape[end:]), (*kernel.axes[:lead], RANK_AXIS, *kernel.axes[end:]),
                  "zeros")
    return a, b


def add(params: dict[str, Any], model_config: decoder.DecoderConfig, config: LoraConfig, rng: jax.Array,
        dtype=jnp.float32) -> dict[str, Any]:
    """`params` (float or quantized) with an adapter on every projection `config` targets."""
    chosen = targets(model_config, config)
    keys = dict(zip(chosen, jax.random.split(rng, len(chosen))))
    spec = LoraSpec(config.scale, config.dropout)

    def adapt(path, p):
        if A in p:
            raise InputError(f"{path} already has a LoRA adapter; merge it first (press finetune merges on export)")
        kernel, equation = chosen[path]
        a, b = factor_specs(kernel, equation, config.rank)
        bound = 1.0 / math.sqrt(math.prod(kernel.shape[i] for i in grid.contracted_axes(equation, len(kernel.shape))))
        a_value = jax.random.uniform(keys[path], a.shape, jnp.float32, -bound, bound).astype(dtype)
        return {**p, A: a_value, B: jnp.zeros(b.shape, dtype), SPEC: spec}

    return map_projections(params, set(chosen), adapt)


def _n_in(equation: str) -> int:
    x, kernel = equation.split("->")[0].split(",")
    return sum(c in x for c in kernel)


def param_axes(axes: dict[str, Any], tree: dict[str, Any], model_config: decoder.DecoderConfig) -> dict[str, Any]:
    """The logical-axes tree of an adapted tree: `axes` (the base's) plus the factors' axes."""
    specs = decoder.param_specs(model_config)
    rank_of = {path: p[A].shape[-1] for path, p in _adapted(tree)}
    out = jax.tree.map(lambda x: x, axes, is_leaf=lambda x: isinstance(x, tuple))
    for path, kernel in projection_kernels(specs):
        if path in rank_of:
            a, b = factor_specs(kernel, decoder.PROJECTIONS[path.rsplit("/", 1)[-1]], rank_of[path])
            node = _node(out, path)
            node[A], node[B] = a.axes, b.axes
    return out


def _node(tree: dict[str, Any], path: str) -> dict[str, Any]:
    for name in path.split("/"):
        tree = tree[name]
    return tree


def _adapted(tree: dict[str, Any], prefix: str = ""):
    """(path, projection dict) of every projection that has an adapter."""
    for name, value in tree.items():
        if isinstance(value, dict) and A in value:
            yield f"{prefix}{name}", value
        elif isinstance(value, dict):
            yield from _adapted(value, f"{prefix}{name}/")


def adapter_paths(tree: dict[str, Any]) -> list[str]:
    """The projections of `tree` that carry an adapter ('layers/q', ...)."""
    return [path for path, _ in _adapted(tree)]


def trainable(tree: dict[str, Any]) -> tuple[str, ...]:
    """'/'-joined names of the adapters' factors (the only leaves an adapter run trains)."""
    return tuple(f"{path}/{name}" for path in adapter_paths(tree) for name in (A, B))


def adapters(tree: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """path -> {lora_a, lora_b, lora}: the adapter alone (what an adapter checkpoint or PEFT export holds)."""
    return {path: {A: p[A], B: p[B], SPEC: p[SPEC]} for path, p in _adapted(tree)}


def attach(params: dict[str, Any], adapter: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`params` with the adapters of `adapters(...)` put back on their projections."""
    missing = [path for path in adapter if not _has_path(params, path)]
    if missing:
        raise InputError(f"the adapter names projections the model does not have: {', '.join(missing)}")
    return map_projections(params, set(adapter), lambda path, p: {**p, **adapter[path]})


def _has_path(tree: dict[str, Any], path: str) -> bool:
    try:
        return isinstance(_node(tree, path), dict)
    except (KeyError, TypeError):
        return False


def delta(p: dict[str, Any], equation: str) -> jnp.ndarray:
    """scale * A B as a kernel-shaped float32 array [lead?, *in, *out] (the merge's update)."""
    a, b = p[A].astype(jnp.float32), p[B].astype(jnp.float32)
    n_in, rank = _n_in(equation), a.shape[-1]
    lead = a.shape[: a.ndim - 1 - n_in]
    in_shape, out_shape = a.shape[len(lead):-1], b.shape[len(lead) + 1:]
    w = jnp.matmul(a.reshape(*lead, -1, rank), b.reshape(*lead, rank, -1))
    return p[SPEC].scale * w.reshape(*lead, *in_shape, *out_shape)


def merge(tree: dict[str, Any], sign: float = 1.0) -> dict[str, Any]:
    """Every adapter folded into its float kernel (kernel + scale * A B) and removed.

    A quantized base cannot absorb an update in place: dequantize it, merge, and quantize the
    result again (`press quantize`), which is what an export of a QLoRA run does and says.
    """
    def fold(path, p):
        if "kernel" not in p or "spec" in p:
            raise InputError(f"{path} is quantized: an adapter merges into float weights only (dequantize, merge, "
                             "then quantize again)")
        return _merged_float(p, decoder.PROJECTIONS[path.rsplit("/", 1)[-1]], sign)

    return map_projections(tree, set(adapter_paths(tree)), fold)


def unmerge(merged: dict[str, Any], adapter: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The inverse of merge: subtract each adapter's update and put the adapter back."""
    return attach(merge(attach(merged, adapter), sign=-1.0), adapter)


def with_dropout_keys(tree: dict[str, Any], rng: jax.Array) -> dict[str, Any]:
    """`tree` with a fresh dropout key (raw key data) beside every adapter whose dropout is on;
    stacked layers get one key per layer."""
    paths = [path for path, p in _adapted(tree) if p[SPEC].dropout]
    if not paths:
        return tree
    keys = dict(zip(paths, jax.random.split(rng, len(paths))))

    def put(path, p):
        lead = p[A].shape[: p[A].ndim - 1 - _n_in(decoder.PROJECTIONS[path.rsplit("/", 1)[-1]])]
        key = jax.random.split(keys[path], lead) if lead else keys[path]
        return {**p, KEY: jax.random.key_data(key)}

    return map_projections(tree, set(paths), put)


def split(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(factors, rest): the adapters' A and B leaves in a tree of their own (what an adapter run
    trains and checkpoints), and everything else (the base, with each adapter's static spec)."""
    factors, rest = {}, {}
    for name, value in tree.items():
        if isinstance(value, dict):
            f, r = split(value)
            if f:
                factors[name] = f
            rest[name] = r
        elif name in (A, B):
            factors[name] = value
        else:
            rest[name] = value
    return factors, rest


def join(rest: dict[str, Any], factors: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `split`."""
    out = dict(rest)
    for name, value in factors.items():
        out[name] = join(rest[name], value) if isinstance(value, dict) and name in rest else value
    return out


def merge_requantized(tree: dict[str, Any], scheme) -> dict[str, Any]:
    """Every adapter folded into its projection's weights where those are integers too: the
    stored integers dequantized, the update added, the sum rounded to nearest on `scheme`'s grid
    (a GPTQ base is re-rounded, not re-calibrated). Float projections merge as in `merge`."""
    def fold(path, p):
        equation = decoder.PROJECTIONS[path.rsplit("/", 1)[-1]]
        if "spec" not in p:
            return _merged_float(p, equation)
        kernel = dequantize_kernel(p, equation) + delta(p, equation)
        q = quantize_kernel(kernel, grid.contracted_axes(equation, kernel.ndim), scheme)
        return {**q, **({"bias": p["bias"]} if "bias" in p else {})}

    return map_projections(tree, set(adapter_paths(tree)), fold)


def _merged_float(p: dict[str, Any], equation: str, sign: float = 1.0) -> dict[str, Any]:
    kernel = p["kernel"]
    merged = (kernel.astype(jnp.float32) + sign * delta(p, equation)).astype(kernel.dtype)
    return {k: v for k, v in p.items() if k not in (A, B, SPEC, KEY)} | {"kernel": merged}
