"""The float kernel against XLA's dot, one projection at a time: where float_rows() comes from.

Each of SmolLM2-135M's projection shapes as a stack of 30 random float32 layers; rows of
activations 1..64 against one layer of it, read in place by the kernel (`f32_matmul`) or sliced
and multiplied by XLA (`x @ w[layer]`, what the decoder ran before), both jitted, the median of
`--repeats` calls on each of two layers, alternating. Reported: microseconds each, the weights'
GB/s and XLA's time over the kernel's (above 1: the kernel is faster). compress/quant/matmul.py
uses the kernel up to `float_rows()` rows (by the kernels' instruction set).

  .venv/bin/python benchmarks/float_kernel.py [--rows 1,4,8,16,24,32,48,64] [--out bench-results/float-kernel.json]
"""

from __future__ import annotations

import argparse

from common import log, median_seconds, write_result

SHAPES = [(576, 576), (576, 1536), (1536, 576)]  # q/o, gate/up, down (k/v are 576 x 192)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,16,24,32,48,64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench-results/float-kernel.json")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from compress.kernels import cpu as cpu_kernels
    from compress.quant.matmul import float_rows

    log(f"float_kernel: {cpu_kernels.status()}")
    xla = jax.jit(lambda x, w, layer: x @ jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False))
    native = jax.jit(cpu_kernels.f32_matmul)
    rng = np.random.default_rng(0)
    results = []
    for k, n in SHAPES:
        w = jnp.asarray(rng.standard_normal((30, k, n), np.float32))
        for m in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((m, k), np.float32))
            timings = {"xla": [], "kernel": []}
            for layer in (3, 17):
                for name, fn in (("xla", xla), ("kernel", native)):
                    timings[name].append(median_seconds(fn, (x, w, jnp.int32(layer)), args.repeats))
            t_xla, t_kernel = min(timings["xla"]), min(timings["kernel"])
            row = {"k": k, "n": n, "rows": m, "xla_us": t_xla * 1e6, "kernel_us": t_kernel * 1e6,
                   "kernel_GB_s": k * n * 4 / t_kernel / 1e9, "xla_GB_s": k * n * 4 / t_xla / 1e9,
                   "xla_over_kernel": t_xla / t_kernel}
            log(f"float_kernel: {k}x{n} rows {m}: XLA {row['xla_us']:.0f} us, kernel {row['kernel_us']:.0f} us "
                f"({row['xla_over_kernel']:.2f}x)")
            results.append(row)
    write_result(args.out, {"float_rows": float_rows(), "instruction_set": cpu_kernels.instruction_set(), "layers": 30, "results": results})


if __name__ == "__main__":
    main()
