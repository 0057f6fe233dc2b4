"""Quantized against float, one run: held-out perplexity, next-token agreement, bytes, decode speed.

Held-out text: the CPython language reference shipped with Python (`pydoc_data.topics`),
every fifth topic in sorted order, cut into windows of `--window` tokens.

  .venv/bin/python benchmarks/quant.py [--windows 32] [--window 512] [--out bench-results/quant.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def held_out_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)[::5])


def evaluate(params, config, windows, reference_argmax=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from compress.models import decoder

    @jax.jit
    def nll_and_argmax(params, tokens):
        logits = decoder.forward(params, tokens, config).logits[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return nll.sum(), logits.argmax(-1)

    total, count, argmaxes = 0.0, 0, []
    for start in range(0, len(windows), 4):
        batch = jnp.asarray(np.stack(windows[start : start + 4]))
        nll, argmax = nll_and_argmax(params, batch)
        total += float(nll)
        count += batch.shape[0] * (batch.shape[1] - 1)
        argmaxes.append(np.asarray(argmax))
    argmax = np.concatenate(argmaxes)
    result = {"perplexity": float(np.exp(total / count))}
    if reference_argmax is not None:
        result["top1_agreement_with_float"] = float((argmax == reference_argmax).mean())
    return result, argmax


def decode_speed(params, config, tokenizer) -> float:
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    sampling = SamplingParams(max_new_tokens=128, ignore_eos=True)
    with Engine(params, config, tokenizer, max_slots=1, max_seq_len=256) as engine:
        engine.warmup(prompt_lengths=(16,))
        return engine.generate("Tell me a story about a dragon.", sampling)[0].decode_tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--schemes", default="int8")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--out", default="bench-results/quant.json")
    args = parser.parse_args()

    import jax
    import numpy as np

    from compress.pretrained import load_decoder
    from compress.quant import store

    model = load_decoder(args.model)
    ids = model.tokenizer(held_out_text())["input_ids"]
    windows = [np.asarray(ids[i : i + args.window]) for i in range(0, len(ids) - args.window, args.window)][: args.windows]
    bf16_bytes = sum(x.size * 2 for x in jax.tree.leaves(model.params))

    float_result, float_argmax = evaluate(model.params, model.config, windows)
    rows = {"float32": {**float_result, "bytes": bf16_bytes * 2, "fraction_of_bf16": 2.0,
                        "decode_tokens_per_s": decode_speed(model.params, model.config, model.tokenizer)}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.schemes.split(","):
            out = os.path.join(tmp, name)
            summary = store.quantize_model(args.model, name, out)
            q = load_decoder(out)  # served from the stored integers, as press serve would
            result, _ = evaluate(q.params, q.config, windows, float_argmax)
            rows[name] = {
                **result,
                "perplexity_change": result["perplexity"] / float_result["perplexity"] - 1,
                "bytes": summary["bytes"],
                "fraction_of_bf16": summary["fraction_of_bf16"],
                "quantized_matrices_fraction_of_bf16": summary["quantized_matrices_fraction_of_bf16"],
                "decode_tokens_per_s": decode_speed(q.params, q.config, q.tokenizer),
            }
            rows[name]["decode_speedup_over_float32"] = rows[name]["decode_tokens_per_s"] / rows["float32"]["decode_tokens_per_s"]
    result = {"model": args.model, "held_out_tokens": len(windows) * args.window, "results": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
