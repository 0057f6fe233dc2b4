"""Training SmolLM2-135M: train-step tokens/s with and without remat, XLA's memory analysis of the step, and continued pretraining.

Three parts, one process, one machine (compress/train is the code measured):

1. The train step (compress.train.step.make_train_step with causal_lm_loss(config, remat=...),
   AdamW, clipping, donated state) for each of `--remats` ("none" keeps every activation,
   "full" recomputes each layer in the backward pass, "dots" keeps the projections' outputs).
   Each policy's step is compiled once (`step.lower(state, batch).compile()`, the time
   reported); then `--warmup` untimed and `--steps` timed rounds, each round one real packed
   batch of `--batch-size` rows x `--seq-len` tokens from the "pydoc" source (the language
   reference's train part; read before timing, so the data pipeline is not in the timings)
   through every policy's step in turn, so a slow spell of a shared machine slows all of them
   alike. Each step is timed to `block_until_ready` of the new state and the metrics; tokens/s
   is rows x tokens over the policy's median step, and each policy's ratio to "none" is reported.
   Model TFLOP/s counts 6 x parameters x tokens per step (attention's own FLOPs and remat's
   recomputation left out, the usual "model FLOPs"); with `--peak-tflops` (the device's
   dense peak in the dtype used) the model FLOPs utilisation is that over the peak.
2. The same compiled step's `memory_analysis()`: argument, output, alias (donated) and
   temporary bytes and the generated code, in MiB and as multiples of the parameter bytes,
   beside the optimizer state's bytes. "unavailable" where the backend gives none.
3. Continued pretraining: `compress.train.loop.train` (what `press train` runs) on the
   "pydoc" source only, `--train-steps` updates at `--lr` (linear warmup `--warmup-steps`,
   cosine to 10%), weight decay 0, no checkpoints, no export. Held-out perplexity on the first
   `--eval-windows` windows of seq-len + 1 tokens of the language reference's held-out part
   (every fifth topic), before training and after it, both by the loop's own held-out
   evaluation on the same windows; the "before" figure is cross-checked with press eval's
   scorer (compress.eval.perplexity.score_windows) on the same windows.

Parameters are stored in float32; `--dtype` is the compute dtype (bfloat16 on accelerators,
as `model.dtype` in configs/train-smollm2.yaml).

  .venv/bin/python benchmarks/train.py [--batch-size 4 --seq-len 256 --steps 5 --train-steps 30] [--out bench-results/train.json]
  .venv/bin/python benchmarks/train.py --quick --out /tmp/train-quick.json   # a smoke check, tiny sizes
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

from common import log, write_result

MIB = 2**20
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "peak_memory_in_bytes")


def tree_bytes(tree) -> int:
    import jax

    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


def device_info() -> dict:
    import jax

    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "count": len(devices),
            "jax": jax.__version__, "cpu_count": os.cpu_count()}


def data_config(args):
    from compress.data.pipeline import DataConfig

    return DataConfig(sources=("pydoc",), seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)


def optimizer_config(args):
    from compress.train.optimizer import OptimizerConfig

    # Part 1 needs a valid schedule without part 3 too (--train-steps 0); its steps' rates do not matter.
    total = max(args.train_steps, args.warmup_steps + 1)
    return OptimizerConfig(learning_rate=args.lr, warmup_steps=args.warmup_steps, total_steps=total,
                           schedule="cosine", weight_decay=0.0)


def train_config(args, out: str):
    """The continued-pretraining run of part 3 (also what part 1's state and the "before" evaluation mirror)."""
    from compress.pretrained import ModelConfig
    from compress.train.loop import TrainConfig

    return TrainConfig(model=ModelConfig(name=args.model, dtype=args.dtype), init="pretrained", data=data_config(args),
                       optimizer=optimizer_config(args), steps=args.train_steps, remat=args.train_remat, out=out,
                       save_every=0, log_every=1, eval_every=args.train_steps, eval_windows=args.eval_windows,
                       export=False, progress=False)


def memory_figures(compiled, parameter_bytes: int) -> dict | str:
    """XLA's memory analysis of a compiled step: bytes, MiB and multiples of the parameter bytes."""
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - a backend without the analysis raises rather than returning None
        log(f"memory_analysis() failed: {type(e).__name__}: {e}")
        stats = None
    if stats is None:
        return "unavailable"
    out = {}
    for field in MEMORY_FIELDS:
        value = getattr(stats, field, None)
        if value is None:
            continue
        out[field] = int(value)
        out[field.replace("_in_bytes", "_mib")] = value / MIB
        out[field.replace("_in_bytes", "_over_params")] = value / parameter_bytes
    if {"argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes"} <= out.keys():
        # What the step holds at once at most: inputs, outputs not written over donated inputs, temporaries.
        live = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                + out["temp_size_in_bytes"])
        out.update(arguments_outputs_temporaries_bytes=live, arguments_outputs_temporaries_mib=live / MIB,
                   arguments_outputs_temporaries_over_params=live / parameter_bytes)
    return out


def held_out_before(args, model, state, shardings, mesh) -> dict:
    """Held-out loss of the loaded weights: the loop's evaluation (as part 3 runs it) and press eval's scorer."""
    from compress import sharding as shd
    from compress.data import corpus
    from compress.eval.perplexity import score_windows
    from compress.train import loop
    from compress.train.loss import causal_lm_loss

    config = train_config(args, out="unused")
    loss_fn = causal_lm_loss(model.config, remat=config.remat)
    batch_sharding = shd.batch_sharding(mesh, 2, rules=config.rules)
    evaluate = loop.held_out_eval(config, loss_fn, model.tokenizer, shardings, batch_sharding)
    start = time.perf_counter()
    loss = evaluate(state.params)
    seconds = time.perf_counter() - start

    # The same windows (loop.held_out_eval: the first eval_windows of seq_len + 1 tokens, whole batches) scored
    # by `press eval`'s function, which takes no segment ids: a check that the two agree.
    text, source = corpus.held_out_text()
    windows = corpus.token_windows(model.tokenizer.encode(text), args.seq_len + 1, args.eval_windows, source)
    windows = windows[: len(windows) - len(windows) % args.batch_size]
    scores = score_windows(state.params, model.config, windows, args.batch_size)
    return {"loss": loss, "perplexity": math.exp(loss), "seconds": seconds, "windows": int(len(windows)),
            "window_tokens": args.seq_len + 1, "predictions": int(scores.argmax.size), "source": source,
            "perplexity_press_eval_score_windows": scores.perplexity}


def step_and_memory(args, result: dict) -> None:
    """Parts 1 and 2 (and the "before" evaluation of part 3, on the same loaded weights)."""
    import jax

    from compress import sharding as shd
    from compress.data.pipeline import train_batches
    from compress.models import decoder
    from compress.pretrained import load_decoder
    from compress.train.loss import causal_lm_loss
    from compress.train.optimizer import learning_rate_schedule, make_optimizer
    from compress.train.step import init_train_state, make_train_step

    mesh = shd.make_mesh(1, -1, 1)
    start = time.perf_counter()
    model = load_decoder(args.model, mesh=mesh, param_dtype="float32", dtype=args.dtype)
    log(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    optimizer = make_optimizer(optimizer_config(args))
    state, shardings = init_train_state(model.params, optimizer, jax.random.key(0), mesh=mesh,
                                        param_axes=decoder.param_axes(model.config), strict=True)
    parameters = int(sum(leaf.size for leaf in jax.tree.leaves(state.params)))
    parameter_bytes, optimizer_bytes = tree_bytes(state.params), tree_bytes(state.opt_state)
    tokens_per_step = args.batch_size * args.seq_len
    result.update(parameters=parameters, parameter_bytes=parameter_bytes, parameter_mib=parameter_bytes / MIB,
                  optimizer_state_bytes=optimizer_bytes, optimizer_state_mib=optimizer_bytes / MIB,
                  optimizer_state_over_params=optimizer_bytes / parameter_bytes, tokens_per_step=tokens_per_step)
    log(f"{parameters:,} parameters, {parameter_bytes / MIB:.1f} MiB; optimizer state {optimizer_bytes / MIB:.1f} MiB")

    if args.train_steps:  # before any step: the steps below update (and donate) these parameters
        result["held_out_before"] = held_out_before(args, model, state, shardings, mesh)
        log(f"held-out before: perplexity {result['held_out_before']['perplexity']:.4f} (loop's evaluation), "
            f"{result['held_out_before']['perplexity_press_eval_score_windows']:.4f} (press eval's scorer)")

    batch_sharding = shd.batch_sharding(mesh, 2)
    batches = iter(train_batches(data_config(args), model.tokenizer))
    local = [next(batches) for _ in range(args.warmup + args.steps)]
    batches.close()
    device_batches = [{k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in b.items()}
                      for b in local]
    counted = [float(b["loss_mask"].sum()) for b in local[args.warmup:]]
    model_config = model.config
    del model

    remats = args.remats.split(",")
    compiled, compile_seconds, memory = {}, {}, {}
    for remat in remats:
        step = make_train_step(causal_lm_loss(model_config, remat=remat), optimizer, mesh, shardings,
                               batch_sharding, learning_rate=learning_rate_schedule(optimizer_config(args)))
        start = time.perf_counter()
        compiled[remat] = step.lower(state, device_batches[0]).compile()
        compile_seconds[remat] = time.perf_counter() - start
        memory[remat] = memory_figures(compiled[remat], parameter_bytes)
        log(f"remat {remat}: compiled in {compile_seconds[remat]:.1f} s")
        if isinstance(memory[remat], dict):
            m = memory[remat]
            log("  memory: " + ", ".join(
                f"{f.replace('_size_in_bytes', '').replace('_in_bytes', '')} {m[f] / MIB:.1f} MiB "
                f"({m[f] / parameter_bytes:.2f}x params)" for f in MEMORY_FIELDS if f in m))
        else:
            log(f"  memory: {memory[remat]}")

    # Round-robin: each batch goes through every policy's step in turn, so a slow spell of a shared
    # machine slows all of them alike rather than whichever policy it falls on. The state threads
    # through every step (donated each time); what the steps learn does not change their cost.
    seconds = {remat: [] for remat in remats}
    losses = {remat: [] for remat in remats}
    for i, batch in enumerate(device_batches):
        took = {}
        for remat in remats:
            start = time.perf_counter()
            state, metrics = compiled[remat](state, batch)
            jax.block_until_ready((state, metrics))
            took[remat] = time.perf_counter() - start
            if i >= args.warmup:
                seconds[remat].append(took[remat])
                losses[remat].append(float(metrics["loss"]))
        log(f"round {i + 1}/{len(device_batches)}" + (" (warm-up)" if i < args.warmup else "") + ": "
            + ", ".join(f"{remat} {t:.2f} s" for remat, t in took.items()))
    del compiled

    throughput = {}
    for remat in remats:
        median = statistics.median(seconds[remat])
        row = {"compile_s": compile_seconds[remat], "median_step_s": median, "min_step_s": min(seconds[remat]),
               "step_s": seconds[remat], "tokens_per_s": tokens_per_step / median,
               "loss_tokens_per_s": statistics.mean(counted) / median, "losses": losses[remat],
               "model_tflops_per_s": 6 * parameters * tokens_per_step / median / 1e12}
        if args.peak_tflops:
            row["model_flops_utilisation"] = row["model_tflops_per_s"] / args.peak_tflops
        throughput[remat] = row
        log(f"remat {remat}: median step {median:.2f} s, {row['tokens_per_s']:.1f} tokens/s"
            + (f", MFU {row['model_flops_utilisation']:.1%}" if args.peak_tflops else ""))
    if "none" in throughput:
        for row in throughput.values():
            row["tokens_per_s_over_none"] = row["tokens_per_s"] / throughput["none"]["tokens_per_s"]
        for m in memory.values():
            base = memory["none"]
            if isinstance(m, dict) and isinstance(base, dict) and base.get("temp_size_in_bytes"):
                m["temp_over_none"] = m["temp_size_in_bytes"] / base["temp_size_in_bytes"]
    result["throughput"], result["memory"] = throughput, memory
    del state


def continued_pretraining(args, result: dict) -> None:
    """Part 3: `press train`'s loop on the pydoc source; held-out perplexity after, against before."""
    from compress.train.loop import train
    from compress.train.metrics import read_metrics

    with tempfile.TemporaryDirectory() as out:
        config = train_config(args, out)
        start = time.perf_counter()
        outcome = train(config, log=log)
        wall = time.perf_counter() - start
        train_metrics = read_metrics(out)
        evals = read_metrics(out, split="eval")
    before = result.get("held_out_before", {}).get("perplexity")
    after = math.exp(outcome.eval_loss) if outcome.eval_loss is not None else None
    tokens = args.train_steps * args.batch_size * args.seq_len
    steady = [m["tokens_per_s"] for s, m in train_metrics.items() if s > 1]  # step 1 includes the compile
    result["continued_pretraining"] = {
        "source": "pydoc (the language reference's train part)", "steps": outcome.steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "tokens": tokens,
        "learning_rate": args.lr, "warmup_steps": args.warmup_steps, "schedule": "cosine to 0.1x",
        "remat": args.train_remat, "wall_s": wall, "stopped": outcome.stopped,
        "median_tokens_per_s_after_step_1": statistics.median(steady) if steady else None,
        "held_out_loss_after": outcome.eval_loss, "held_out_perplexity_before": before,
        "held_out_perplexity_after": after,
        "held_out_perplexity_change": after / before - 1 if before and after else None,
        "train_losses": [m["loss"] for m in train_metrics.values()],
        "eval_records": list(evals.values()),
    }
    log(f"continued pretraining: {outcome.steps} steps ({tokens:,} tokens) in {wall:.1f} s; held-out perplexity "
        f"{before:.4f} -> {after:.4f}" if before and after else f"continued pretraining: {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype (parameters stay float32)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--remats", default="none,full,dots", help="remat policies to time, comma-separated")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (a step of each policy) after the compiles")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (a step of each policy)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak TFLOP/s in --dtype; gives model FLOPs utilisation")
    parser.add_argument("--train-steps", type=int, default=30, help="continued-pretraining updates; 0 skips part 3")
    parser.add_argument("--train-remat", default="none", help="remat policy of the continued-pretraining run")
    parser.add_argument("--lr", type=float, default=2e-5, help="peak learning rate of the continued pretraining")
    parser.add_argument("--warmup-steps", type=int, default=5, help="linear warmup of the learning rate")
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows of seq-len + 1 tokens")
    parser.add_argument("--seed", type=int, default=0, help="of the data's shuffle")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke check of every part")
    parser.add_argument("--out", default="bench-results/train.json")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.seq_len, args.warmup, args.steps = 2, 32, 1, 2
        args.train_steps, args.warmup_steps, args.eval_windows = 3, 1, 2
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    start = time.perf_counter()
    result = {"model": args.model, "dtype": args.dtype, "param_dtype": "float32", "devices": device_info(),
              "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup_steps_untimed": args.warmup,
              "timed_steps": args.steps, "peak_tflops": args.peak_tflops, "quick": args.quick}
    step_and_memory(args, result)
    write_result(args.out, result)  # after each part: a later failure keeps what was measured
    if args.train_steps:
        continued_pretraining(args, result)
    result["total_wall_s"] = time.perf_counter() - start
    write_result(args.out, result)


if __name__ == "__main__":
    main()
