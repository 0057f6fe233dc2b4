"""What each part of press's GPTQ buys: plain GPTQ, + clipping search, + act order, both.

SmolLM2-135M-Instruct, gptq-int4-g64 (or --scheme), 64 calibration windows of 256 tokens from
the train part of the language reference; perplexity on 8 held-out windows of 512 tokens,
fp32 in the same run. About 6 minutes on 2 CPU cores.

  .venv/bin/python benchmarks/gptq_ablation.py [--scheme gptq-int4-g64] [--out bench-results/gptq-ablation.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

from common import log, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--scheme", default="gptq-int4-g64")
    parser.add_argument("--out", default="bench-results/gptq-ablation.json")
    args = parser.parse_args()

    from compress.commands.quantize import quantize_model
    from compress.eval.perplexity import EvalConfig, evaluate_models
    from compress.quant.gptq import GPTQConfig

    base = GPTQConfig(num_sequences=64, act_order=False, clip_search=0)
    variants = {"plain": base, "clip_search": dataclasses.replace(base, clip_search=20),
                "act_order": dataclasses.replace(base, act_order=True),
                "both (default)": dataclasses.replace(base, act_order=True, clip_search=20)}
    with tempfile.TemporaryDirectory() as tmp:
        outs = []
        for i, (name, calibration) in enumerate(variants.items()):
            outs.append(os.path.join(tmp, str(i)))
            quantize_model(args.model, args.scheme, outs[-1], calibration=calibration)
            log(f"{name}: quantized")
        results = evaluate_models(EvalConfig(models=(args.model, *outs), windows=8, decode_tokens=0), log=log)
    fp32 = results[0].perplexity
    write_result(args.out, {"model": args.model, "scheme": args.scheme, "fp32_perplexity": fp32, "results": {
        name: {"perplexity": r.perplexity, "perplexity_change_from_fp32": r.perplexity / fp32 - 1}
        for name, r in zip(variants, results[1:])}})


if __name__ == "__main__":
    main()
