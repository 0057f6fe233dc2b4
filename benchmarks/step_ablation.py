"""What each part of a batch-1 decode step costs: the engine's step with one part changed at a time.

Timing only: the changed steps compute wrong tokens, and nothing they return is used. The
engine's own jitted decode step (serve/engine.py `_decode`, one row, 64 attended slots) on a
model directory (`press quantize --scheme int8+embed-int8` of SmolLM2, say), one engine per
variant in one process, the variants alternating round by round (the machine's drift falls on
all of them), each round the median of `--steps` calls:

  base        the step as it is
  one-matrix  q, k and v as one [D, N + 2K] matrix and gate and up as one [D, 2F], each one
              kernel call (the stacks concatenated once, before timing): what fusing a layer's
              projections into fewer, larger calls could save at most
  no-norm     RMSNorm without its reduction (x * scale): four small XLA ops a norm, two a layer
  no-rope     no rotary embedding: its slices, concatenations and multiplies
  no-attention-kernel  the new keys and values written to the cache, attention returning q
  no-attention  attention returns q: no cache write, no attention kernel

The variants patch compress/models/decoder.py's (and attention.py's) functions before their
engine compiles its step, and put the originals back after.

  .venv/bin/python benchmarks/step_ablation.py --model out/smollm2-int8+embed-int8 [--rounds 15]
      [--variants base,one-matrix,no-norm,no-rope,no-attention-kernel,no-attention]
      [--out bench-results/step-ablation.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics

from common import decode_step_seconds, log, write_result

VARIANTS = ("base", "one-matrix", "no-norm", "no-rope", "no-attention-kernel", "no-attention")


def _one_matrix_layer(p, x, c, cos, sin, attend):
    """decoder.decoder_layer over p["qkv"] and p["gate_up"] (see `_one_matrix_params`)."""
    import jax

    from compress.models import decoder
    from compress.models.linear import dense

    b, t = x.shape[:2]
    h = decoder.rms_norm(x, p["attn_norm"], c.rms_norm_eps)
    qkv = dense(p["qkv"], h, "BTD,DN->BTN")
    nq, nk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    q = decoder.apply_rope(qkv[..., :nq].reshape(b, t, c.num_heads, c.head_dim), cos, sin)
    k = decoder.apply_rope(qkv[..., nq : nq + nk].reshape(b, t, c.num_kv_heads, c.head_dim), cos, sin)
    v = qkv[..., nq + nk :].reshape(b, t, c.num_kv_heads, c.head_dim)
    x = x + dense(p["o"], attend(q, k, v), decoder.PROJECTIONS["o"])
    gate_up = dense(p["gate_up"], decoder.rms_norm(x, p["mlp_norm"], c.rms_norm_eps), "BTD,DN->BTN")
    f = gate_up.shape[-1] // 2
    return x + dense(p["down"], jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:], decoder.PROJECTIONS["down"]), {}


def _one_matrix_params(params):
    """The layers with q, k, v concatenated into "qkv" and gate, up into "gate_up" (int8 codes
    with a scale per output: `press quantize --scheme int8...`)."""
    import jax.numpy as jnp

    layers = dict(params["layers"])

    def joined(names):
        parts = [layers.pop(n) for n in names]
        if any("qkernel" not in p or "group_scale" in p for p in parts):
            raise SystemExit("step_ablation: one-matrix takes int8 projections (a scale per output)")
        flat = [(p["qkernel"].reshape(*p["qkernel"].shape[:2], -1), p["scale"].reshape(p["scale"].shape[0], 1, -1))
                for p in parts]
        return {"qkernel": jnp.concatenate([q for q, _ in flat], -1), "scale": jnp.concatenate([s for _, s in flat], -1),
                "spec": parts[0]["spec"]}

    layers["qkv"], layers["gate_up"] = joined(("q", "k", "v")), joined(("gate", "up"))
    return {**params, "layers": layers}


@contextlib.contextmanager
def _patched(variant: str):
    from compress.models import attention, decoder

    saved = decoder.decoder_layer, decoder.rms_norm, decoder.apply_rope, decoder.CALL_ORDER
    layer, cached_attention = saved[0], attention.cached_attention
    try:
        if variant == "one-matrix":
            decoder.decoder_layer, decoder.CALL_ORDER = _one_matrix_layer, ("qkv", "o", "gate_up", "down")
        elif variant == "no-norm":
            decoder.rms_norm = lambda x, scale, eps: x * scale.astype(x.dtype)
        elif variant == "no-rope":
            decoder.apply_rope = lambda x, cos, sin: x
        elif variant == "no-attention-kernel":
            attention.cached_attention = lambda q, *args, **kwargs: q
        elif variant == "no-attention":
            decoder.decoder_layer = lambda p, x, c, cos, sin, attend: layer(p, x, c, cos, sin, lambda q, k, v: q)
        yield
    finally:
        decoder.decoder_layer, decoder.rms_norm, decoder.apply_rope, decoder.CALL_ORDER = saved
        attention.cached_attention = cached_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model directory; one-matrix needs int8 projections")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=40, help="calls a round, of which the median counts")
    parser.add_argument("--out", default="bench-results/step-ablation.json")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    from serve.engine import Engine

    steps, engines = {}, []
    for variant in variants:
        engine = Engine.from_pretrained(args.model, max_slots=16, max_seq_len=256)
        engines.append(engine)
        if variant == "one-matrix":
            engine.params = _one_matrix_params(engine.params)
        step = functools.partial(decode_step_seconds, engine, 1, 64)
        with _patched(variant):
            for _ in range(3):  # the first compiles it, under the patch
                step()
        steps[variant] = step
    rounds = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            rounds[v].append(statistics.median(steps[v]() for _ in range(args.steps)))
    for engine in engines:
        engine.close()
    base = statistics.median(rounds[variants[0]])
    result = {"model": args.model, "rows": 1, "width": 64, "rounds": args.rounds, "steps_per_round": args.steps,
              "step_ms": {}, "over_first": {}, "rounds_ms": {}}
    for v in variants:
        median = statistics.median(rounds[v])
        result["step_ms"][v], result["over_first"][v] = 1e3 * median, median / base
        result["rounds_ms"][v] = [1e3 * t for t in rounds[v]]
        log(f"step_ablation: {v}: {1e3 * median:.2f} ms ({median / base:.3f}x {variants[0]})")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
