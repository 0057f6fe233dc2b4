"""Distillation against CE-only training of the same student (issue 14), through the press commands.

Teacher SmolLM2-135M-Instruct; student cut from it with configs/distill-smollm2.yaml (20 of 30
layers chosen greedily, MLPs pruned to 608 channels: half the parameters). Arms (`--arms`), the same
student init, data, steps, learning rate and seed:

  kd-t1  `press distill configs/distill-smollm2.yaml` as it is: forward KL at T=1 from the online
         teacher (loss.alpha=0)
  kd-t2  the same at T=2
  kd-mix loss.alpha=0.5: half hard-label CE, half forward KL at T=1
  ce     loss.alpha=1: hard-label cross-entropy only (the teacher is never run)

  kd-mix-hid  kd-mix and the hidden-state loss (cosine) on the layers copied from the teacher

then `press eval --compare TEACHER ARM... --json` on the whole held-out text of the language
reference (33 windows of 512 tokens): perplexity, top-1 agreement with the teacher, bytes and
batch-1 decode tokens/s; and `kl_to_teacher` on it in windows of 256 (KL to the teacher, data
cross-entropy, and that per quarter of the text). Each arm's
train tokens/s is the median of its metrics.jsonl lines (the first, with compilation, left out).

Part "cache" (`--parts cache`): the online teacher against a cached one on the same text (the
first `--cache-chars` characters of the language reference's train part, as JSONL documents): `press
teacher-cache` over it (top-32, rows of 256 tokens; its wall time reported), then `--cache-steps`
steps of `press distill` on the same rows in the same order (no shuffle): the teacher online
with its full distribution, online keeping its top 32 (`loss.top_k=32`), and read from the
cache; train tokens/s, the train losses and held-out perplexity of each.

Part "init" (`--parts init`): the held-out cross-entropy each student starts from, before any
training (8 windows of 256 tokens): every third layer and the last; the config's layers at full
width; the config's student (layers and widths). `--search` also runs the greedy layer search
(students.select_layers, 4 calibration windows of 256 tokens) down to the config's layer count
and reports its choice (about 15 minutes on 2 cores).

--teacher-steps N first adapts the teacher to the training text (Minitron's "teacher correction"):
`press train configs/train-smollm2.yaml` from the bundled weights for N steps of the same data
and batch (learning rate 2e-5), and every part then uses its export as the teacher (students cut
from it, evaluated against it).

  .venv/bin/python benchmarks/distill.py [--steps 120] [--arms kd-t1,kd-t2,ce] [--reuse] [--set key=value ...]

--reuse keeps an arm whose run is already in --work (its figures read from its metrics.jsonl).
  .venv/bin/python benchmarks/distill.py --parts cache --out bench-results/distill-cache.json
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

import numpy as np

from common import log, write_result

PRESS = os.path.join(os.path.dirname(sys.executable), "press")
CONFIG = "configs/distill-smollm2.yaml"
TEACHER = "smollm2-135m-instruct"


ARMS = {"kd-t1": ["loss.temperature=1.0"], "kd-t2": ["loss.temperature=2.0"],
        "kd-mix": ["loss.temperature=1.0", "loss.alpha=0.5"],
        "kd-mix-hid": ["loss.temperature=1.0", "loss.alpha=0.5", "loss.hidden_weight=1.0"],
        "ce": ["loss.alpha=1.0"]}


def run_once(name: str, out: str, command: list[str], reuse: bool) -> tuple[float | None, list[dict]]:
    """Run a press training command writing to `out` (unless `reuse` and it exported already):
    (its wall seconds, None if reused; its metrics.jsonl lines)."""
    seconds = None
    if not (reuse and os.path.isdir(os.path.join(out, "hf"))):
        log(f"--- {name}: {' '.join(command)}")
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        seconds = round(time.perf_counter() - start, 1)
    return seconds, [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def arm(name: str, out: str, args, extra: list[str], steps: int | None = None) -> dict:
    steps = steps or args.steps
    command = [PRESS, "distill", CONFIG, "--no-progress", f"out={out}", f"steps={steps}",
               f"optimizer.total_steps={steps}", f"optimizer.warmup_steps={max(1, steps // 12)}",
               f"eval_every={steps}", "save_every=0", *args.set, *extra]
    seconds, lines = run_once(name, out, command, args.reuse)
    speeds = [line["tokens_per_s"] for line in lines if "tokens_per_s" in line][1:]
    train = [line for line in lines if line.get("split") != "eval"]
    return {"command": " ".join(command), "seconds": seconds,
            "eval_loss": next(line["loss"] for line in reversed(lines) if line.get("split") == "eval"),
            "train_tokens_per_s": statistics.median(speeds) if speeds else None,
            "last": train[-1] if train else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for both arms")
    p.add_argument("--windows", type=int, default=64,
                   help="held-out windows for press eval (at most; the whole held-out text is 33 of 512 tokens)")
    p.add_argument("--work", default="out/bench-distill")
    p.add_argument("--out", default="bench-results/distill.json")
    p.add_argument("--parts", default="kd-ce", help="kd-ce, cache, init, comma-separated")
    p.add_argument("--search", action="store_true", help="init: also run the greedy layer search")
    p.add_argument("--teacher-steps", type=int, default=0, help="adapt the teacher first (0: as bundled)")
    p.add_argument("--arms", default="kd-t1,kd-t2,ce", help=f"of {', '.join(ARMS)}; ce last is the baseline")
    p.add_argument("--reuse", action="store_true", help="keep arms already run in --work")
    p.add_argument("--cache-chars", type=int, default=120_000)
    p.add_argument("--cache-steps", type=int, default=20)
    args = p.parse_args()
    result = {}
    args.teacher = TEACHER
    if args.teacher_steps:
        result["teacher_correction"] = correct_teacher(args)
        args.teacher = result["teacher_correction"]["teacher"]
    args.set = [f"teacher.name={args.teacher}", *args.set]
    if "kd-ce" in args.parts:
        result.update(kd_against_ce(args))
    if "cache" in args.parts:
        result["cache"] = online_against_cached(args)
    if "init" in args.parts:
        result["init"] = student_inits(args)
    write_result(args.out, result)


def correct_teacher(args) -> dict:
    """`press train` from the bundled weights on the distillation data; its export is the teacher."""
    out = os.path.join(args.work, f"teacher-{args.teacher_steps}")
    n = args.teacher_steps
    command = [PRESS, "train", "configs/train-smollm2.yaml", "--no-progress", f"out={out}", "data.sources=[pydoc]",
               "data.seq_len=256", "data.batch_size=4", f"steps={n}", f"optimizer.total_steps={n}",
               f"optimizer.warmup_steps={max(1, n // 6)}", "remat=none", f"eval_every={n}", "save_every=0"]
    seconds, lines = run_once("teacher correction", out, command, args.reuse)
    return {"command": " ".join(command), "seconds": seconds, "teacher": os.path.abspath(os.path.join(out, "hf")),
            "eval_loss": next(line["loss"] for line in reversed(lines) if line.get("split") == "eval")}


def online_against_cached(args) -> dict:
    from compress.data import corpus

    os.makedirs(args.work, exist_ok=True)
    text, _ = corpus.train_text()
    path = os.path.abspath(os.path.join(args.work, "cache-text.jsonl"))
    with open(path, "w") as f:  # documents of about 2,000 characters (paragraphs kept whole)
        document = ""
        for paragraph in text[: args.cache_chars].split("\n\n"):
            document += paragraph + "\n\n"
            if len(document) > 2000:
                f.write(json.dumps({"text": document}) + "\n")
                document = ""
        if document.strip():
            f.write(json.dumps({"text": document}) + "\n")
    cache = os.path.join(args.work, "teacher-cache")
    command = [PRESS, "teacher-cache", "--teacher", args.teacher, "--top-k", "32", "--out", cache, "data.seq_len=256",
               "data.batch_size=1", "data.epochs=1", "data.shuffle=false", f"--data={path}", "--batch-size=4"]
    if not (args.reuse and os.path.isdir(cache)):
        log(f"--- cache: {' '.join(command)}")
        start = time.perf_counter()
        summary = json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()[-1])
        cache_seconds = round(time.perf_counter() - start, 1)
    else:
        summary, cache_seconds = None, None
    # The same text in the same order for all three (documents as written, no shuffle). The rows
    # differ: a cache holds one stream of rows, read four at a time, while the online pipeline
    # packs each of a batch's four rows from its own stream. The cache against the online
    # teacher's top 32 is the same loss (float16 top-k read back; tests/test_distill_run.py
    # checks the step loss equal on one batch); the full distribution shows what the top 32 costs.
    last = f"eval_every={args.cache_steps}"  # after --set, which may name a longer run's interval
    same_order = [f"data.sources=[{path}]", "data.shuffle=false", last]
    arms = {"online": arm("online", os.path.join(args.work, "online"), args, same_order, args.cache_steps),
            "online-top32": arm("online-top32", os.path.join(args.work, "online-top32"), args,
                                [*same_order, "loss.top_k=32"], args.cache_steps),
            "cached": arm("cached", os.path.join(args.work, "cached"), args,
                          [f"teacher_cache={cache}", "data.shuffle=false", last], args.cache_steps)}
    losses = {name: [line["loss"] for line in map(json.loads, open(os.path.join(args.work, name, "metrics.jsonl")))
                     if line.get("split") != "eval" and "loss" in line] for name in arms}
    return {"cache_command": " ".join(command), "cache_seconds": cache_seconds, "cache": summary, **arms,
            "train_losses": losses,
            "cached_minus_online_top32_max_train_loss": max(abs(a - b) for a, b in zip(losses["cached"],
                                                                                       losses["online-top32"])),
            "cached_over_online_tokens_per_s": arms["cached"]["train_tokens_per_s"] / arms["online"]["train_tokens_per_s"],
            "perplexity": {name: math.exp(a["eval_loss"]) for name, a in arms.items()}}


def kd_against_ce(args) -> dict:
    names = args.arms.split(",")
    arms = {name: arm(name, os.path.join(args.work, name), args, ARMS[name]) for name in names}
    command = [PRESS, "eval", "--compare", args.teacher, *(os.path.join(args.work, a, "hf") for a in arms),
               "--windows", str(args.windows), "--json", "--plot", os.path.join(args.work, "compare.png")]
    log(f"--- eval: {' '.join(command)}")
    rows = [json.loads(line) for line in subprocess.run(command, check=True, stdout=subprocess.PIPE,
                                                        text=True).stdout.splitlines() if line.startswith("{")]
    teacher, students = rows[0], dict(zip(names, rows[1:]))
    result = {"arms": arms, "eval": rows, "eval_command": " ".join(command)}
    for name, row in students.items():
        result[f"{name}_over_teacher_perplexity"] = row["perplexity"] / teacher["perplexity"]
        if "ce" in students and name != "ce":
            result[f"{name}_over_ce_perplexity"] = row["perplexity"] / students["ce"]["perplexity"]
    result["student_over_teacher_bytes"] = rows[1]["bytes"] / teacher["bytes"]
    result["kl_to_teacher"] = kl_to_teacher(args.teacher, {name: os.path.join(args.work, name, "hf") for name in names})
    return result


def student_inits(args) -> dict:
    """Held-out cross-entropy (nats/token) of students cut from the teacher, before training."""
    import jax
    import jax.numpy as jnp

    from compress import config as cfg
    from compress.data import corpus
    from compress.distill import students
    from compress.distill.job import DistillConfig, make_student
    from compress.distill.pruning import calibration_windows
    from compress.models import decoder
    from compress.pretrained import load_decoder

    teacher = load_decoder(args.teacher)
    text, source = corpus.held_out_text()
    w = jnp.asarray(corpus.token_windows(teacher.tokenizer.encode(text), 257, 8, source)[:8])

    def loss(config, params):
        log_probs = jax.nn.log_softmax(decoder.forward(params, w[:, :-1], config).logits)
        return float(-jnp.mean(jnp.take_along_axis(log_probs, w[:, 1:, None], axis=-1)))

    student = cfg.load(DistillConfig, CONFIG, args.set).student
    every = students.every_nth_layer(teacher.config.num_layers, 3)
    out = {"teacher": loss(teacher.config, teacher.params),
           "every_third_and_last": {"layers": every, "loss": loss(*students.keep_layers(teacher.config, teacher.params, every))},
           "config_layers_full_width": {"layers": student.layers,
                                        "loss": loss(*students.keep_layers(teacher.config, teacher.params, student.layers))}}
    config, params, _ = make_student(student, teacher.config, teacher.params, teacher.tokenizer, log)
    out["config_student"] = {"loss": loss(config, params), "mlp_dim": config.mlp_dim, "num_heads": config.num_heads}
    if args.search:
        windows = calibration_windows(teacher.tokenizer, 8, 257, seed=1)[:4]
        start = time.perf_counter()
        kept, losses = students.select_layers(teacher.config, teacher.params, windows, len(student.layers), log=log)
        out["search"] = {"layers": kept, "calibration_losses": losses, "seconds": round(time.perf_counter() - start, 1),
                         "loss": loss(*students.keep_layers(teacher.config, teacher.params, kept))}
    return out


def kl_to_teacher(teacher: str, students: dict[str, str], windows: int = 1000, length: int = 256) -> dict:
    """KL(teacher || student) and the data cross-entropy, nats per token, of each student and the
    teacher on the first `windows` held-out windows of `length` + 1 tokens (all of them by
    default: 66), 8 at a time, in this process; and the data cross-entropy of each quarter of
    those windows in order (the held-out topics differ: which model leads can change along the
    text, so a few windows from its start are not the whole picture)."""
    import jax
    import jax.numpy as jnp

    from compress.data import corpus
    from compress.models import decoder
    from compress.pretrained import load_decoder

    teacher = load_decoder(teacher)
    text, source = corpus.held_out_text()
    w = corpus.token_windows(teacher.tokenizer.encode(text), length + 1, windows, source)[:windows]
    tokens, targets = jnp.asarray(w[:, :-1]), jnp.asarray(w[:, 1:])

    forward = jax.jit(lambda params, config, x: jax.nn.log_softmax(decoder.forward(params, x, config).logits),
                      static_argnums=1)

    def scores(model, reference=None):
        """Per window: the data cross-entropy, and KL(reference || model) if a reference is given."""
        ce, kl = [], []
        for i in range(0, len(tokens), 8):
            q = forward(model.params, model.config, tokens[i:i + 8])
            ce.append(-jnp.take_along_axis(q, targets[i:i + 8, :, None], axis=-1).mean(axis=(1, 2)))
            if reference is not None:
                p = forward(reference.params, reference.config, tokens[i:i + 8])
                kl.append(jnp.sum(jnp.exp(p) * (p - q), axis=-1).mean(axis=1))
        ce = np.asarray(jnp.concatenate(ce))
        out = {"data_ce": float(ce.mean()), "data_ce_quarters": [round(float(x.mean()), 4) for x in np.array_split(ce, 4)]}
        if reference is not None:
            out["kl"] = float(jnp.concatenate(kl).mean())
        return out

    out = {"windows": len(tokens), "length": length, "teacher": scores(teacher)}
    for name, path in students.items():
        out[name] = scores(load_decoder(path, with_tokenizer=False), teacher)
    return out


if __name__ == "__main__":
    main()
