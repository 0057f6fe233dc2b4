"""LoRA and QLoRA on SmolLM2-135M-Instruct (issue 15), through the press commands.

Each arm runs `press finetune configs/finetune-smollm2.yaml` (LoRA rank 8 on the attention
projections, the built-in "pydoc-qa" instruction set: questions about the language reference's
sections answered in its own words, trained on the answers) from a different base:

  lora         the float model
  qlora-int8   `press quantize --scheme int8`: the adapter trains on the stored int8 base
  qlora-gptq   `press quantize --scheme gptq-int4-g64`: on the stored GPTQ int4 base

The run evaluates before its first step (the base: an adapter starts as the identity) and at its
end, on the answers of the held-out topics' questions (never trained on). Reported per arm: the
held-out loss before and after and the improvement, trainable parameters against the model's,
adapter bytes (the PEFT file, float32) against the model's float32 bytes, train tokens/s (median of the logged
windows, the first left out), and wall time.

  .venv/bin/python benchmarks/finetune.py [--arms lora,qlora-int8,qlora-gptq] [--steps 40] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

from common import log, write_result

PRESS = os.path.join(os.path.dirname(sys.executable), "press")
CONFIG = "configs/finetune-smollm2.yaml"
MODEL = "smollm2-135m-instruct"
BASES = {"lora": None, "qlora-int8": "int8", "qlora-gptq": "gptq-int4-g64"}


def _bytes(directory: str, suffix: str = ".safetensors") -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(suffix))


def _adapter_parameters(directory: str) -> int:
    from compress.formats.safetensors_file import SafetensorsFile

    f = SafetensorsFile(os.path.join(directory, "adapter_model.safetensors"))
    return sum(math.prod(f.shape(name)) for name in f.names())


def model_float32_bytes() -> int:
    import jax

    from compress.models import decoder
    from compress.pretrained import decoder_architecture

    config, _ = decoder_architecture(MODEL)
    return 4 * sum(math.prod(x.shape) for x in jax.tree.leaves(decoder.param_shapes(config)))


def base_model(args, scheme: str | None) -> str:
    """The base's name or directory, quantized first if asked (kept in --work)."""
    if scheme is None:
        return MODEL
    out = os.path.join(args.work, scheme)
    if not os.path.isdir(out):
        log(f"--- quantize {scheme}")
        subprocess.run([PRESS, "quantize", "--model", MODEL, "--scheme", scheme, "--out", out], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def arm(name: str, args) -> dict:
    base = base_model(args, BASES[name])
    out = os.path.join(args.work, name)
    steps = args.steps
    command = [PRESS, "finetune", CONFIG, "--no-progress", f"model.name={base}", f"out={out}", f"steps={steps}",
               f"optimizer.total_steps={steps}", f"eval_every={steps}", "save_every=0", *args.set]
    seconds = None
    if not (args.reuse and os.path.isdir(os.path.join(out, "adapter"))):
        log(f"--- {name}: {' '.join(command)}")
        start = time.perf_counter()
        run = subprocess.run(command, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seconds = round(time.perf_counter() - start, 1)
        with open(os.path.join(out, "log.txt"), "w") as f:
            f.write(run.stderr)
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = {line["step"]: line["loss"] for line in lines if line.get("split") == "eval"}
    speeds = [line["tokens_per_s"] for line in lines if "tokens_per_s" in line][1:]
    trainable = _adapter_parameters(os.path.join(out, "adapter"))
    before, after = evals[0], evals[steps]
    return {
        "command": " ".join(command), "seconds": seconds, "base": base,
        "held_out_loss_before": before, "held_out_loss_after": after,
        "improvement": (before - after) / before,
        "adapter_bytes": _bytes(os.path.join(out, "adapter")),
        "adapter_over_model_float32_bytes": _bytes(os.path.join(out, "adapter")) / args.model_bytes,
        "trainable_parameters": trainable,
        "trainable_over_model_parameters": trainable / (args.model_bytes / 4),
        "train_tokens_per_s": statistics.median(speeds) if speeds else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="lora,qlora-int8,qlora-gptq")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for every arm")
    p.add_argument("--work", default="out/bench-finetune")
    p.add_argument("--reuse", action="store_true", help="keep arms already run in --work")
    p.add_argument("--out", default="bench-results/finetune.json")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    args.model_bytes = model_float32_bytes()
    result = {name: arm(name, args) for name in args.arms.split(",")}
    if "lora" in result:
        for name, r in result.items():
            r["improvement_minus_lora_points"] = 100 * (r["improvement"] - result["lora"]["improvement"])
    write_result(args.out, result)


if __name__ == "__main__":
    main()
