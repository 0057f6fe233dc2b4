"""Speculative decoding at batch 1 (or `--batch`): the press engine with and without a draft, in one run.

The target is SmolLM2-135M-Instruct (fp32, the bundled GGUF dequantized); the draft is any model
`--model` takes with the same tokenizer (a student `press distill` wrote, a `press quantize`
directory; the target itself shows the cost of a draft that is always right), or `ngram`, the
lookup draft that proposes from each request's own context. Each engine is warmed up
(`Engine.warmup` and one short untimed request) before it is timed. Every chat prompt generates
exactly `--new-tokens` greedy tokens (EOS ignored), one request at a time (`--batch` at a time,
all submitted together, the draft speculating at every row: its `draft_max_rows`). The prompts
(`--task`): `chat`, decode.py's eight questions; `rag`, eight questions about a statement of
the language reference, each with that statement's section (pydoc_data.topics, its first 900
characters) as the numbered source, as `press serve --index` puts it in front of a question. Reported: tokens/s end to end (prefill included) and while
decoding (after the first token), their ratios draft over plain, the acceptance rate of the
timed requests, tokens per target pass, and whether the two engines' tokens are identical
(greedy speculative decoding must give exactly the target's; the script exits 1 if they differ).

  .venv/bin/python benchmarks/speculative.py --draft out/distill-smollm2/hf [--draft-tokens 4] [--prompts 8]
      [--new-tokens 128] [--task chat|rag] [--batch 1] [--out bench-results/speculative.json]
"""

from __future__ import annotations

import argparse
import sys
import time

from common import log, write_result
from decode import PROMPTS

TARGET = "smollm2-135m-instruct"
RAG_TOPICS = ("assert", "pass", "del", "return", "break", "continue", "global", "nonlocal")
SOURCE_CHARS = 900


def rag_chats() -> list[list[dict]]:
    """A question about each of RAG_TOPICS' statements with its section as source [1], in
    serve/rag.py's prompt (its system prompt, then the numbered sources and the question)."""
    from compress.data import corpus
    from serve.rag import SYSTEM_PROMPT

    topics = corpus.pydoc_topics()
    chats = []
    for name in RAG_TOPICS:
        source = topics[name][:SOURCE_CHARS].strip()
        question = f"What does the {name} statement do, and what is its syntax?"
        chats.append([{"role": "system", "content": SYSTEM_PROMPT},
                      {"role": "user", "content": f"Sources:\n\n[1] (pydoc:topics/{name})\n{source}\n\n"
                                                  f"Question: {question}"}])
    return chats


def run(target: str, draft: str | None, draft_tokens: int, chats: list, lengths: list[int], new_tokens: int,
        batch: int = 1) -> dict:
    """Generate for the chats (of `lengths` tokens) `batch` at a time through an engine (with
    `draft`, speculating at every row busy, or none); timings and tokens."""
    from serve.engine import Engine, power_of_two_at_least
    from serve.sampling import SamplingParams

    greedy = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    label = f"draft {draft}" if draft else "no draft"
    # Slots for the longest prompt's bucket, its tokens and one speculative step past them.
    max_seq_len = power_of_two_at_least(power_of_two_at_least(max(lengths), 16) + new_tokens + draft_tokens + 1)
    start = time.perf_counter()
    with Engine.from_pretrained(target, max_slots=batch, max_seq_len=max_seq_len, draft=draft,
                                draft_tokens=draft_tokens, draft_max_rows=batch if draft else None) as engine:
        log(f"{label}: loaded in {time.perf_counter() - start:.1f} s; compiling")
        start = time.perf_counter()
        # Every prompt bucket, whole or after the chat template's cached prefix (the prefix cache is on).
        buckets = sorted({*lengths, 16, 32, 64})
        programs = engine.warmup(prompt_lengths=buckets, prefix_lengths=engine.chat_prefix_lengths())
        # Each timed chat once untimed (see serve/decode_speed.py), then the prefix cache emptied: the
        # timed prefills then reuse the prefixes these did, at lengths compiled here (the grounded
        # prompts share a longer prefix than the chat template's, which warmup does not know of).
        groups = [chats[i : i + batch] for i in range(0, len(chats), batch)]
        for group in groups:
            engine.generate(group, SamplingParams(max_new_tokens=4, ignore_eos=True))
        engine.prefix_cache.clear()
        log(f"{label}: {programs} programs compiled in {time.perf_counter() - start:.1f} s; timing")
        before = dict(engine.stats)
        outputs, wall, decoding = [], 0.0, 0.0
        for group in groups:
            start = time.perf_counter()
            done = engine.generate(group, greedy)
            wall += time.perf_counter() - start
            # Decoding: from the last row's first token to the last row's end (all submitted at once).
            decoding += max(o.total_seconds for o in done) - max(o.time_to_first_token for o in done)
            outputs.extend(done)
        stats = {key: engine.stats[key] - before[key] for key in ("drafted_tokens", "accepted_tokens", "decode_steps")}
    tokens = sum(len(o.token_ids) for o in outputs)
    result = {
        "tokens_per_s": tokens / wall,
        "decode_tokens_per_s": sum(len(o.token_ids) - 1 for o in outputs) / decoding,  # at batch > 1, roughly
        "wall_s": wall,
        "tokens": tokens,
        "target_passes": stats["decode_steps"],  # decode steps of the target (each one pass over its weights)
        "token_ids": [o.token_ids for o in outputs],
    }
    if draft:
        result["acceptance_rate"] = stats["accepted_tokens"] / stats["drafted_tokens"] if stats["drafted_tokens"] else None
        result["tokens_per_target_pass"] = sum(len(o.token_ids) - 1 for o in outputs) / stats["decode_steps"]
    log(f"{label}: {result['tokens_per_s']:.1f} tokens/s ({result['decode_tokens_per_s']:.1f} decoding)")
    return result


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (None if they are equal)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=TARGET, help="the model served (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--draft", required=True,
                        help="the draft: a directory (distilled, quantized), name or .gguf; or ngram (lookups)")
    parser.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"chat prompts, 1..{len(PROMPTS)}")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--task", choices=("chat", "rag"), default="chat", help="the prompts (see above)")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together (the draft speculates at all)")
    parser.add_argument("--out", default="bench-results/speculative.json")
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be 1..{len(PROMPTS)}")
    if args.task == "rag" and args.prompts > len(RAG_TOPICS):
        parser.error(f"--task rag has {len(RAG_TOPICS)} prompts")

    from compress.formats.registry import resolve
    from compress.formats.tokenizer import load_tokenizer

    chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS] if args.task == "chat" else rag_chats()
    chats = chats[: args.prompts]
    tokenizer = load_tokenizer(resolve(args.target))
    # Text first, then ids: with tokenize=True, newer transformers return a dict (whose len is 2).
    lengths = [len(tokenizer(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False)["input_ids"]) for chat in chats]
    plain = run(args.target, None, args.draft_tokens, chats, lengths, args.new_tokens, args.batch)
    drafted = run(args.target, args.draft, args.draft_tokens, chats, lengths, args.new_tokens, args.batch)
    differences = [first_difference(a, b) for a, b in zip(plain.pop("token_ids"), drafted.pop("token_ids"))]
    result = {
        "target": args.target,
        "draft": args.draft,
        "draft_tokens": args.draft_tokens,
        "task": args.task,
        "batch": args.batch,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "greedy": True,
        "without_draft": plain,
        "with_draft": drafted,
        "speedup_tokens_per_s": drafted["tokens_per_s"] / plain["tokens_per_s"],
        "speedup_decode_tokens_per_s": drafted["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
        "acceptance_rate": drafted["acceptance_rate"],
        "outputs_identical": all(d is None for d in differences),
        "first_difference": differences,  # per prompt: the first token where the outputs part (null: none)
    }
    write_result(args.out, result)
    if not result["outputs_identical"]:
        sys.exit("speculative greedy output differs from the target's: see first_difference")


if __name__ == "__main__":
    main()
