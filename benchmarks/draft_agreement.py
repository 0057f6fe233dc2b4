"""How often candidate drafts agree with the target: per-token agreement and tokens per target pass.

Greedy speculative decoding keeps a draft token while it equals the target's argmax, so along
the target's own greedy output a draft's proposals can be scored exactly without running the
speculative engine: the target (fp32 SmolLM2-135M-Instruct) answers decode.py's eight chat
prompts greedily (`--new-tokens`, EOS ignored, as benchmarks/speculative.py decodes), then each
candidate runs once over prompt + answer and its argmax at every answer position is compared
with the target's next token. A speculative step from position i keeps the run of matches
from i (at most K) and gains it plus one token; walking the answer so gives the tokens per
target pass a draft would reach at each K, the number speculative.py's speedup is made of.

Candidates: any model directory or name (`--drafts`: a `press quantize` directory of the target,
a distilled student) and students cut from the target by keeping layers at full width
(`--layers NAME=0,1,2,...`, untrained: where distillation would start).

  .venv/bin/python benchmarks/draft_agreement.py [--drafts out/smollm2-int8+embed-int8,...]
      [--layers 20=0,1,2,8,...] [--new-tokens 128] [--out bench-results/draft-agreement.json]
"""

from __future__ import annotations

import argparse

import numpy as np

from common import log, write_result
from decode import PROMPTS

TARGET = "smollm2-135m-instruct"
# configs/distill-smollm2.yaml's 20 layers (greedy removal on calibration text), and with layers added back.
CONFIG_LAYERS = (0, 1, 2, 8, 9, 10, 11, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 27, 28, 29)
DEFAULT_LAYERS = {
    "20 layers (the distillation config's), full width": CONFIG_LAYERS,
    "24 layers (+3, 12, 25, 26)": tuple(sorted(CONFIG_LAYERS + (3, 12, 25, 26))),
    "26 layers (+3, 4, 12, 13, 25, 26)": tuple(sorted(CONFIG_LAYERS + (3, 4, 12, 13, 25, 26))),
}
MAX_K = 6


def target_answers(new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy answer ids) of the target for each chat prompt."""
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    with Engine.from_pretrained(TARGET, max_slots=len(chats), max_seq_len=512) as engine:
        outputs = engine.generate(chats, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return [(o.prompt_token_ids, o.token_ids) for o in outputs]


def matches(config, params, sequences) -> list[np.ndarray]:
    """Per sequence, whether the model's argmax at each answer position is the target's next token."""
    import jax
    import jax.numpy as jnp

    from compress.models import decoder

    forward = jax.jit(lambda p, t: jnp.argmax(decoder.forward(p, t, config).logits[0], -1))
    out = []
    for prompt, answer in sequences:
        predicted = np.asarray(forward(params, jnp.asarray([prompt + answer], jnp.int32)))
        out.append(predicted[len(prompt) - 1 : len(prompt) - 1 + len(answer)] == np.asarray(answer))
    return out


def tokens_per_pass(hits: list[np.ndarray], k: int) -> float:
    """Mean tokens a greedy speculative step of K proposals gains along the answers."""
    gained, passes = 0, 0
    for row in hits:
        i = 0
        while i < len(row):
            kept = 0
            while kept < k and i + kept < len(row) and row[i + kept]:
                kept += 1
            i += kept + 1
            gained += kept + 1
            passes += 1
    return gained / passes


def score(hits: list[np.ndarray]) -> dict:
    every = np.concatenate(hits)
    return {"agreement": float(every.mean()),
            "tokens_per_target_pass": {k: tokens_per_pass(hits, k) for k in range(1, MAX_K + 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafts", default="", help="comma-separated model directories or names")
    parser.add_argument("--layers", action="append", default=[], metavar="NAME=I,J,...",
                        help="a student of the target's layers I, J, ... (untrained); default: three sets")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default="bench-results/draft-agreement.json")
    args = parser.parse_args()
    layer_sets = dict(DEFAULT_LAYERS)
    if args.layers:
        layer_sets = {}
        for item in args.layers:
            name, _, numbers = item.partition("=")
            layer_sets[name] = tuple(int(n) for n in numbers.split(","))

    from compress.distill.students import keep_layers
    from compress.pretrained import load_decoder

    sequences = target_answers(args.new_tokens)
    log(f"draft_agreement: {sum(len(a) for _, a in sequences)} answer tokens of the target")
    target = load_decoder(TARGET, with_tokenizer=False)
    results = {"target, float (the check: 1.0)": score(matches(target.config, target.params, sequences))}
    for name, layers in layer_sets.items():
        config, params = keep_layers(target.config, target.params, layers)
        results[f"student of {name}, untrained"] = score(matches(config, params, sequences))
        log(f"draft_agreement: {name}: {results[f'student of {name}, untrained']['agreement']:.3f}")
    for draft in filter(None, args.drafts.split(",")):
        model = load_decoder(draft, with_tokenizer=False)
        results[draft] = score(matches(model.config, model.params, sequences))
        log(f"draft_agreement: {draft}: {results[draft]['agreement']:.3f}")
    write_result(args.out, {"target": TARGET, "prompts": len(PROMPTS), "new_tokens": args.new_tokens,
                            "drafts": results})


if __name__ == "__main__":
    main()
