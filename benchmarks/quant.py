"""Quantized against float, one run: perplexity, agreement, bytes and speed; the int8 KV cache; a float-born encoder.

Three parts, each measured against its own float model in the same process:

1. Decoder weight schemes. Each is written by `press quantize` to a temporary directory and
   evaluated from there (integer weights on the device), beside the float model, with
   compress/eval/perplexity.py (the measurements of `press eval --compare`): held-out perplexity on
   the CPython language reference shipped with Python (`pydoc_data.topics`, every fifth topic
   in sorted order, cut into windows of `--window` tokens), next-token top-1 agreement with the
   float model, parameter bytes and batch-1 decode tokens/s (serve/decode_speed.py), and each
   scheme's decode tokens/s over float32's. GPTQ calibrates on the other
   topics only (`--gptq-sequences` windows of `--gptq-length` tokens). A PNG of perplexity
   against bytes goes beside the JSON.
2. The int8 KV cache (`--kv-prompts` questions from compress/data/pydoc_questions.jsonl, greedy,
   float weights): the share of answers identical to the float cache's, and the cache's bytes
   (`Engine.kv_cache_bytes`) against a bf16 cache's.
3. Float-born weights: SmolLM2's weights come from a Q4_1 GGUF file (asymmetric int4 in groups
   of 32), which flatters int4-g32-asym; all-MiniLM-L6-v2 is stored in float. Its projections
   are quantized with each of `--encoder-schemes`: cosine of every pydoc chunk's embedding to the
   float one, and hit@1/hit@5 of the question set with exact, embedding-only search.

  .venv/bin/python benchmarks/quant.py [--schemes int8,int4-g32,...] [--windows 32] [--out bench-results/quant.json]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from common import log, write_result

SCHEMES = ("int8,kv-int8,int8+kv-int8,w8a8,smooth-w8a8,int4-g64,int4-g32,int4-g64-asym,int4-g32-asym,gptq-int4-g64,"
           "gptq-int4-g32,gptq-int4-g64-asym,int8+embed-int8,int4-g32-asym+embed-int4-g32-asym,"
           "gptq-int4-g32+embed-int4-g32-asym,w4a8-g32-asym,w4a8-g32-asym+embed-int4-g32-asym,w8a8-g32,w8a8-g32+embed-int8")
ENCODER_SCHEMES = "int8,w8a8,int4-g64,int4-g32,int4-g32-asym"


def decoder_schemes(args) -> dict:
    from compress.commands.quantize import quantize_model
    from compress.eval.perplexity import EvalConfig, evaluate_models
    from compress.eval.report import write_plot
    from compress.quant.gptq import GPTQConfig
    from serve.decode_speed import model_decode_speed

    calibration = GPTQConfig(num_sequences=args.gptq_sequences, sequence_length=args.gptq_length)
    with tempfile.TemporaryDirectory() as tmp:
        summaries, seconds = {}, {}
        for name in args.schemes.split(","):
            start = time.perf_counter()
            summaries[name] = quantize_model(args.model, name, os.path.join(tmp, name), calibration=calibration)
            seconds[name] = time.perf_counter() - start
            log(f"{name}: quantized in {seconds[name]:.1f} s")
        config = EvalConfig(models=(args.model, *(s["out"] for s in summaries.values())), reference=args.model,
                            windows=args.windows, window=args.window)
        evals = evaluate_models(config, log=log, decode_speed=model_decode_speed)
        directory_bytes = {name: sum(os.path.getsize(os.path.join(s["out"], f)) for f in os.listdir(s["out"]))
                           for name, s in summaries.items()}  # weights, config and tokenizer files
        write_plot(evals, args.plot)
    base = evals[0]
    rows = {"float32": {"perplexity": base.perplexity, "bytes": base.bytes,
                        "fraction_of_bf16": round(base.bytes / base.bf16_bytes, 4),
                        "decode_tokens_per_s": base.decode_tokens_per_second}}
    for (name, summary), e in zip(summaries.items(), evals[1:]):
        rows[name] = {
            "perplexity": e.perplexity,
            "perplexity_change_from_float32": e.perplexity / base.perplexity - 1,
            "top1_agreement_with_float32": e.agreement,
            "bytes": summary["bytes"],
            "fraction_of_bf16": summary["fraction_of_bf16"],
            "directory_bytes": directory_bytes[name],
            "directory_fraction_of_bf16": directory_bytes[name] / base.bf16_bytes,
            "quantized_matrices_fraction_of_bf16": summary["quantized_matrices_fraction_of_bf16"],
            "decode_tokens_per_s": e.decode_tokens_per_second,
            "decode_tokens_per_s_over_float32": e.decode_tokens_per_second / base.decode_tokens_per_second,
            "quantize_seconds": round(seconds[name], 1),
        }
    return {"held_out_tokens": base.windows * base.window, "gptq": vars(calibration), "plot": args.plot,
            "results": rows}


def kv_cache(args) -> dict:
    """Greedy answers with the int8 KV cache against the float cache, and int8 weights beside for scale."""
    from compress.data.corpus import PYDOC_QUESTIONS
    from compress.models import decoder
    from compress.pretrained import load_decoder
    from compress.quant import schemes
    from compress.quant.weights import quantize_params
    from retrieval.quality import read_questions
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    model = load_decoder(args.model)
    questions = read_questions(PYDOC_QUESTIONS)[: args.kv_prompts]
    prompts = [[{"role": "user", "content": q["question"]}] for q in questions]
    sampling = SamplingParams(max_new_tokens=args.kv_tokens, ignore_eos=True)
    int8_weights = quantize_params(model.params, decoder.PROJECTIONS, schemes.get("int8"))
    outputs, cache_bytes = {}, {}
    for name, params, kind in (("float", model.params, None), ("kv-int8", model.params, "int8"),
                               ("int8 weights", int8_weights, None)):
        with Engine(params, model.config, model.tokenizer, max_slots=8, max_seq_len=256, kv_cache=kind) as e:
            outputs[name] = [o.token_ids for o in e.generate(prompts, sampling)]
            cache_bytes[name] = e.kv_cache_bytes

    def first_difference(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))

    out = {"prompts": len(prompts), "max_new_tokens": args.kv_tokens,
           "cache_bytes_float32": cache_bytes["float"], "cache_bytes_int8": cache_bytes["kv-int8"],
           "cache_bytes_int8_over_bf16": cache_bytes["kv-int8"] / (cache_bytes["float"] / 2)}
    for name in ("kv-int8", "int8 weights"):
        same = [first_difference(a, b) for a, b in zip(outputs["float"], outputs[name])]
        out[name] = {f"greedy_identical_share_first_{n}": sum(s >= n for s in same) / len(same)
                     for n in (16, 32, args.kv_tokens)}
        out[name]["mean_tokens_before_first_difference"] = float(np.mean(same))
    return out


def encoder_schemes(args) -> dict:
    from compress.data.corpus import PYDOC_QUESTIONS
    from compress.eval.perplexity import parameter_bytes
    from compress.models.encoder import PROJECTIONS
    from retrieval.documents import pydoc_documents
    from retrieval.encoder import SentenceEncoder
    from retrieval.quality import hit_rates, read_questions
    from retrieval.retriever import Retriever

    documents, questions = pydoc_documents(), read_questions(PYDOC_QUESTIONS)
    rows, texts, reference = {}, None, None
    for scheme in [None, *args.encoder_schemes.split(",")]:
        encoder = SentenceEncoder.from_pretrained("all-minilm-l6-v2", quantization=scheme)
        retriever = Retriever(encoder, exact=True, hybrid=False)
        if texts is None:
            texts = [c.embed_text for d in documents for c in retriever.chunk(d)]
        start = time.perf_counter()
        vectors = encoder.encode(texts)  # [n, D], unit rows
        encode_seconds = time.perf_counter() - start
        reference = vectors if reference is None else reference
        cosine = np.sum(vectors * reference, axis=1)
        retriever.add(documents)
        rates = hit_rates(retriever, questions, (1, 5))
        rows[scheme or "float32"] = {
            "mean_cosine_to_float": float(np.mean(cosine)), "min_cosine_to_float": float(np.min(cosine)),
            "hit@1": rates["hit@1"], "hit@5": rates["hit@5"],
            "projection_bytes": parameter_bytes({n: encoder.params["layers"][n] for n in PROJECTIONS}),
            "chunks_per_s": len(texts) / encode_seconds,
        }
        log(f"encoder {scheme or 'float32'}: {rows[scheme or 'float32']}")
    return {"model": "all-minilm-l6-v2", "chunks": len(texts), "questions": len(questions), "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--schemes", default=SCHEMES, help="decoder schemes, comma-separated")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--gptq-sequences", type=int, default=128)
    parser.add_argument("--gptq-length", type=int, default=256)
    parser.add_argument("--kv-prompts", type=int, default=32, help="0 skips the KV-cache part")
    parser.add_argument("--kv-tokens", type=int, default=64)
    parser.add_argument("--encoder-schemes", default=ENCODER_SCHEMES, help="'' skips the encoder part")
    parser.add_argument("--out", default="bench-results/quant.json")
    parser.add_argument("--plot", default=None, help="default: the --out path with .png")
    args = parser.parse_args()
    args.plot = args.plot or os.path.splitext(args.out)[0] + ".png"

    result = {"model": args.model}
    for part, run in (("decoder", args.schemes and decoder_schemes), ("kv_cache", args.kv_prompts and kv_cache),
                      ("encoder", args.encoder_schemes and encoder_schemes)):
        if run:
            result[part] = run(args)
            write_result(args.out, result)  # after each part: a later failure keeps what was measured


if __name__ == "__main__":
    main()
