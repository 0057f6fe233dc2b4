"""A float model with bfloat16 weights against float32: perplexity, top-1 agreement, decode speed.

`param_dtype=bfloat16` (`--set model.param_dtype=bfloat16` for any press command) stores the
weights in bfloat16 and computes in float32; on a CPU the native float kernel reads the
bfloat16 stacks in place and widens them in registers (compress/kernels/cpu.cc), so a batch-1
step reads half the bytes. One run, the same held-out text as benchmarks/quant.py (every fifth
topic of the language reference, `--windows` windows of 512 tokens) and the same decode-speed
run as `press eval` (batch 1, 128 new tokens after a warm-up, the engine's path), float32 first.

  .venv/bin/python benchmarks/bf16_weights.py [--model smollm2-135m-instruct] [--windows 16]
      [--out bench-results/bf16-weights.json]
"""

from __future__ import annotations

import argparse

from common import log, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--out", default="bench-results/bf16-weights.json")
    args = parser.parse_args()

    from compress.data import corpus
    from compress.eval.perplexity import EvalConfig, parameter_bytes, score_windows, top1_agreement
    from compress.pretrained import load_decoder
    from serve.decode_speed import model_decode_speed

    config = EvalConfig(models=(args.model,), windows=args.windows)
    text, source = corpus.held_out_text(config.data)
    rows, reference = {}, None
    for dtype in ("float32", "bfloat16"):
        model = load_decoder(args.model, param_dtype=dtype, dtype="float32")
        windows = corpus.token_windows(model.tokenizer(text, verbose=False)["input_ids"], config.window,
                                       config.windows, source)
        scores = score_windows(model.params, model.config, windows, config.batch)
        reference = reference if reference is not None else scores
        rows[dtype] = {"perplexity": scores.perplexity, "bytes": parameter_bytes(model.params),
                       "top1_agreement_with_float32": top1_agreement(scores.argmax, reference.argmax),
                       "decode_tokens_per_s": model_decode_speed(model, config)}
        log(f"bf16_weights: {dtype}: {rows[dtype]}")
        del model
    base = rows["float32"]
    rows["bfloat16"]["perplexity_change_from_float32"] = rows["bfloat16"]["perplexity"] / base["perplexity"] - 1
    rows["bfloat16"]["decode_over_float32"] = rows["bfloat16"]["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    write_result(args.out, {"model": args.model, "held_out_tokens": len(reference.argmax.reshape(-1)),
                            "windows": args.windows, "results": rows})


if __name__ == "__main__":
    main()
