"""`press finetune`: full, partial and adapter fine-tuning (LoRA, QLoRA) on the shared trainer.

    result = finetune(load(FinetuneConfig, "configs/finetune-tiny.yaml"))

Methods (`method`):
  full      every parameter trains (what `press train` does from pretrained weights)
  partial   the parameters matched by `freeze` (regexes over '/'-joined names) stay bit-identical;
            the optimizer keeps state only for the rest
  lora      a LoRA adapter on the projections `lora.targets` selects (compress/adapters/lora.py);
            nothing else trains. On a base written by `press quantize` (int8, int4-gN,
            gptq-int4-gN, w8a8) this is QLoRA: the base stays in its stored integers and runs
            through the same kernels it is served with, the adapter in float32.
            `lora.init_from=DIR` continues a PEFT adapter (a run's `adapter/`, or one
            trained with `peft`) instead of starting from B = 0

An adapter run trains and checkpoints the adapter alone: its factors are the train state's
parameters and the base is a constant of the step (loaded again on resume), so a checkpoint
holds the adapter's bytes, not the model's. At the end it writes `adapter/` (the PEFT format:
`peft.PeftModel.from_pretrained` loads it onto the transformers model) and, for a float base,
`hf/`, the adapter merged into the base (a plain model every command loads). A quantized base
cannot absorb the update in its integers: `quantized/` holds it dequantized, merged and rounded
to the same grid again (said in the run's log: that rounding makes it differ from base +
adapter, which `press serve --adapter` serves exactly).

The data is `press train`'s (compress/data): text, or chat JSONL trained on the assistant turns.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, ClassVar, Literal

import jax

from compress import pretrained
from compress.adapters import lora, peft
from compress.errors import InputError
from compress.formats import quantized
from compress.models import decoder
from compress.pretrained import ModelConfig
from compress.quant import schemes
from compress.train.loop import Recipe, RunConfig, TrainResult, run
from compress.train.loss import causal_lm_loss

ADAPTER_DIR = "adapter"
QUANTIZED_DIR = "quantized"  # a QLoRA run's adapter merged into its base and quantized again


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(RunConfig):
    """`press finetune`: a pretrained model (float or quantized) tuned on text or chats."""

    RESUME_KEYS: ClassVar[tuple[str, ...]] = ("model", "method", "lora", "data", "freeze")

    model: ModelConfig = ModelConfig()
    method: Literal["full", "partial", "lora"] = "lora"
    lora: lora.LoraConfig = lora.LoraConfig()
    out: str = "out/finetune"

    def __post_init__(self):
        super().__post_init__()
        if self.method == "partial" and not self.freeze:
            raise InputError("method: partial needs freeze patterns (regexes over parameter names, e.g. "
                             "'embed' or 'layers/(q|k|v|o)/.*')")
        if self.method != "partial" and self.freeze:
            raise InputError(f"freeze is for method: partial (method: {self.method} "
                             + ("trains every parameter)" if self.method == "full" else "trains the adapter only)"))


def finetune(config: FinetuneConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) the fine-tuning `config` describes; see the module docstring."""
    return run(config, functools.partial(_recipe, config, log or (lambda line: None)), log=log)


def _recipe(config: FinetuneConfig, log: Callable[[str], None], mesh) -> Recipe:
    m = config.model
    loaded = pretrained.load_decoder(m.name, mesh=mesh, param_dtype=m.param_dtype or "float32", dtype=m.dtype)
    model_config = loaded.config
    if config.method != "lora":
        if loaded.quantization is not None:
            raise InputError(f"{m.name} holds integer weights ({loaded.quantization}); method: {config.method} trains "
                             "float weights (use method: lora for QLoRA on this base, or tune the float model)")
        loss = causal_lm_loss(model_config, remat=config.remat)
        return Recipe(model_config, loaded.params, decoder.param_axes(model_config), loaded.tokenizer,
                      loss_fn=loss, eval_loss_fn=loss)

    adapted = _adapted(loaded.params, model_config, config, log)
    factors, base = lora.split(adapted)
    axes, _ = lora.split(lora.param_axes(decoder.param_axes(model_config), adapted, model_config))
    trained, total = _count(factors), _count(decoder.param_shapes(model_config))
    kind = f"QLoRA on the {loaded.quantization} base" if loaded.quantization else "LoRA"
    log(f"{kind}: rank {config.lora.rank} on {len(lora.adapter_paths(adapted))} projections "
        f"({', '.join(lora.adapter_paths(adapted))}): {trained / 1e6:.3f}M trainable parameters, "
        f"{100 * trained / total:.2f}% of the model's {total / 1e6:.1f}M")
    causal = causal_lm_loss(model_config, remat=config.remat)

    def loss_fn(factors, batch, rng, base):
        return causal(lora.with_dropout_keys(lora.join(base, factors), rng), batch, rng)

    def eval_loss_fn(factors, batch, rng, base):
        return causal(lora.join(base, factors), batch, rng)

    def exported(factors):
        if loaded.quantization is not None:
            return None  # integers cannot absorb the update (module docstring)
        return lora.merge(lora.join(base, factors))

    def write_adapter(factors, out):
        directory = os.path.join(out, ADAPTER_DIR)
        tree = lora.join(base, factors)
        peft.export(tree, directory, base_model=m.name)
        note = f"wrote the adapter (PEFT format, {_count(factors) * 4 / 1e6:.2f} MB in float32) to {directory}"
        if loaded.quantization is not None:
            scheme = schemes.get(loaded.quantization)
            merged_dir = os.path.join(out, QUANTIZED_DIR)
            quantized.save(lora.merge_requantized(tree, scheme), model_config, scheme, merged_dir,
                           tokenizer=loaded.tokenizer)
            note += (f"; and the adapter merged into the {scheme.name} base to {merged_dir}: dequantized, merged and "
                     "rounded to nearest on the same grid again (not re-calibrated), so it differs from base + "
                     "adapter by that rounding (serve the base with --adapter for the exact model)")
        return note

    return Recipe(model_config, factors, axes, loaded.tokenizer, loss_fn=loss_fn, eval_loss_fn=eval_loss_fn,
                  constants=base, exported=exported, also_write=write_adapter)


def _adapted(params, model_config, config: FinetuneConfig, log) -> dict[str, Any]:
    """The base with a fresh adapter (`lora.add`), or with the PEFT adapter `lora.init_from`
    (trained by press or by `peft`), whose rank, scale and targets then apply; the dropout while
    training is this run's `lora.dropout`."""
    source = config.lora.init_from
    if not source:
        return lora.add(params, model_config, config.lora, jax.random.key(config.seed))
    adapter = peft.read(source, model_config)
    first = next(iter(adapter.values()))  # one rank and scale for all (peft.read refuses patterns)
    spec, rank = lora.LoraSpec(first[lora.SPEC].scale, config.lora.dropout), first[lora.A].shape[-1]
    log(f"continuing the adapter in {source}: rank {rank}, scale {spec.scale:g} "
        f"(lora.rank, lora.alpha and lora.targets are taken from it)")
    return lora.attach(params, {path: {**p, lora.SPEC: spec} for path, p in adapter.items()})


def _count(tree: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
