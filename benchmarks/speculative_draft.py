"""The draft model of the speculative-decoding benchmark: a student distilled on its target's own chat answers.

A draft pays only where it predicts what the target will say, so it is trained on what the
target says: SmolLM2-135M-Instruct answers chat prompts (`press synthesize`, greedy, as the
benchmark decodes), and the half-size student of configs/distill-smollm2.yaml (20 of 30
layers, MLPs cut to 608 channels) learns the target's distribution over those answers
(`press distill`, forward KL, loss on the answers). The student is then stored as int8 with its
table (`press quantize`, `--scheme`), so that a draft step reads about a sixth of the target's
fp32 bytes (an int4 table costs the student more agreement than it saves: BENCHMARKS.md). Each
stage is skipped when its output exists (rerun to continue).

Prompts: the language reference's questions (pydoc-qa's train part and press's retrieval
questions) and templated everyday requests, about 1,100; none is one of the benchmark's eight
(benchmarks/decode.py's PROMPTS) or about their subjects.

  .venv/bin/python benchmarks/speculative_draft.py [--work out/draft] [--steps 200] [--new-tokens 128]
      [--scheme int8+embed-int8]
  .venv/bin/python benchmarks/speculative.py --draft out/draft/student-int8+embed-int8 --draft-tokens 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys

from common import log

TEMPLATES = ["Explain {}.", "Describe {} in a few sentences.", "Tell me about {}.", "Write a short story about {}.",
             "Give three facts about {}.", "What is the history of {}?", "Write a short poem about {}.",
             "What should a beginner know about {}?", "List the pros and cons of {}."]
SUBJECTS = ["the moon", "volcanoes", "coffee", "the Roman Empire", "electric cars", "photosynthesis", "chess",
            "the ocean tides", "bees", "the printing press", "bicycles", "rainbows", "the internet", "penguins",
            "the Great Wall of China", "solar panels", "jazz music", "the human heart", "earthquakes", "tea",
            "the piano", "black holes", "recycling", "the Olympic Games", "trains", "mushrooms", "glaciers",
            "the violin", "honey", "deserts", "the microscope", "sleep", "democracy", "owls", "bread baking",
            "the Amazon rainforest", "robots", "the telephone", "coral reefs", "gardening", "the Eiffel Tower",
            "wolves", "chocolate", "lighthouses", "the stock market", "origami", "comets", "the camera",
            "friendship", "mountains", "sharks", "libraries", "the wheel", "clouds", "electricity", "pizza",
            "the Renaissance", "spiders", "airplanes", "meditation", "elephants", "maps", "the guitar", "snow",
            "ancient Egypt", "wind turbines", "cheese", "the brain", "kites", "the compass", "rivers", "soap",
            "the Moon landing", "octopuses", "castles", "recipes for soup", "the calendar", "whales", "deserts at night",
            "public transport", "the alphabet", "magnets", "lightning", "cats", "dogs", "running", "the zoo",
            "paper", "clocks", "islands", "knitting", "the Sahara", "telescopes", "football", "salt", "forests"]
EXCLUDED = ("dragon", "hash table", "french revolution", "autumn", "vaccine", "water cycle", "python code", "sky")


def prompts() -> list[dict]:
    from compress.data.instructions import pydoc_qa

    questions = [example["prompt"] for example in pydoc_qa()]
    with open(os.path.join(os.path.dirname(__file__), "..", "compress", "data", "pydoc_questions.jsonl")) as f:
        questions += [json.loads(line)["question"] for line in f if line.strip()]
    questions += [t.format(s) for t, s in itertools.product(TEMPLATES, SUBJECTS)]
    kept = [q for q in dict.fromkeys(questions) if not any(word in q.lower() for word in EXCLUDED)]
    return [{"id": f"p{i}", "messages": [{"role": "user", "content": q}]} for i, q in enumerate(kept)]


def press(*args: str) -> None:
    command = [os.path.join(os.path.dirname(sys.executable), "press"), *args]
    log("speculative_draft: " + " ".join(command))
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="out/draft")
    parser.add_argument("--steps", type=int, default=200, help="distillation steps (4 x 256 tokens each)")
    parser.add_argument("--new-tokens", type=int, default=128, help="longest teacher answer")
    parser.add_argument("--scheme", default="int8+embed-int8", help="the stored draft's scheme")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    prompt_file, answers = os.path.join(args.work, "prompts.jsonl"), os.path.join(args.work, "answers.jsonl")
    with open(prompt_file, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts())
    press("synthesize", "configs/synthesize.yaml", f"prompts={prompt_file}", f"out={answers}",
          f"sampling.max_new_tokens={args.new_tokens}", "sampling.temperature=0.0", "keep_truncated=true",
          "max_slots=32", "max_seq_len=512", "progress=false")
    student = os.path.join(args.work, "student")
    if not os.path.exists(os.path.join(student, "hf", "config.json")):
        press("distill", "configs/distill-smollm2.yaml", f"data.sources=[{answers}]", f"steps={args.steps}",
              f"optimizer.total_steps={args.steps}", f"out={student}", "eval_every=0", "save_every=50",
              "--no-progress")
    stored = os.path.join(args.work, f"student-{args.scheme}")
    if not os.path.exists(os.path.join(stored, "config.json")):
        press("quantize", "--model", os.path.join(student, "hf"), "--scheme", args.scheme, "--out", stored)
    log(f"speculative_draft: the draft is {stored} (float: {student}/hf)")


if __name__ == "__main__":
    main()
