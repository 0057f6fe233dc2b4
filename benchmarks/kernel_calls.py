"""The native kernels one call at a time: each instruction-set path against the others, or one
library file against another, in one process with their calls interleaved.

Every library is loaded into this process with its custom calls registered under names of its
own, and each measurement alternates between them round by round, so that the machine's drift
(these machines are shared) falls on all of them alike. What is timed: each of SmolLM2-135M's
projection shapes as a stack of layers larger than the last-level cache (int8 with a scale per
output; w8a8, the same weights against activations quantized per row in the call, in each library
that has integer dot products and as AQT's path on XLA, which w8a8 takes without them; int4
groups of 32 with scales and offsets; w4a8, the same codes in its own tiled layout against
activations quantized per group of 32, and w8a8-g32, the int8 weights so, in each library that has
them; float32 and bfloat16 up to 24 rows), a jitted scan calling the kernel
once per layer with the next layer's prefetch hint (none for w8a8), as the decoder does; and
decode attention over a float32 and an int8 cache of 30 layers x 512 slots at SmolLM2's heads
(9 query heads on 3 of 64 dimensions), 1 and 16 rows. One thread by default (`--threads`), so
the figures compare the loops, not the workers (XLA, the w8a8 peer, takes the process's CPUs:
under `taskset -c 0` it has one core too). Reported: microseconds per call (the median of
`--rounds` scans over all layers, divided by the layers), the weights' or cache's GB/s, and each
library's time over the first one's. With `--tiled`, each library's matmuls also read the same
weights in the tiled layout that engines of few rows store (compress/quant/matmul.py `tile`), as a
variant named "LIBRARY tiled" interleaved with the rest.

  .venv/bin/python benchmarks/kernel_calls.py [--isas native,avx2,portable] [--out bench-results/kernels.json]
  .venv/bin/python benchmarks/kernel_calls.py --libraries before.so,after.so   # a kernel change, A/B
  .venv/bin/python benchmarks/kernel_calls.py --isas native --tiled --rows 1,8,16   # rows against tiles
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time

from common import log, write_result

SHAPES = {"q/o": (576, 576), "gate/up": (576, 1536), "down": (1536, 576)}
STACK_BYTES = 96 << 20  # each stack spans at least this much, beyond a 32 MB last-level cache
HEADS, KV_HEADS, HEAD_DIM, LAYERS, SLOTS = 9, 3, 64, 30, 512
TARGETS = ("press_int8_matmul", "press_int4_matmul", "press_f32_matmul", "press_bf16_matmul", "press_attention_f32",
           "press_attention_s8", "press_w8a8_matmul", "press_w4a8_matmul", "press_w8a8g_matmul")  # not in every library
XLA_PEER = "AQT on XLA"  # w8a8's plain path (compress/quant/aqt_matmul.py), timed beside the kernel


def _built_library(isa: str) -> tuple[str | None, str | None]:
    """(the library compress/kernels/cpu.py builds for PRESS_CPU_KERNELS_ISA=isa, the path it
    runs: cpu.instruction_set()), or Nones where it cannot be built here."""
    code = ("from compress.kernels import cpu; print(cpu.library_path() or ''); print(cpu.instruction_set() or '');"
            " print(cpu.status())")
    env = {**os.environ, "PRESS_CPU_KERNELS_ISA": isa}
    env.pop("PRESS_CPU_KERNELS_LIB", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path, runs, status = (done.stdout.splitlines() + ["", "", ""])[:3]
    log(f"kernels: {isa}: {status or done.stderr[-500:]}")
    return path or None, runs or None


def _cases(names: list[str], threads: int, matmul_rows: list[int], with_w8a8: list[str],
           with_bf16: list[str], tiled: bool = False, with_w4a8: tuple[str, ...] = (),
           with_w8a8g: tuple[str, ...] = ()) -> list[tuple[str, dict, int, dict]]:
    """(label, what it measures, calls per scan, {variant: (jitted scan, its operands)}) for each
    case; w8a8 cases for the libraries in `with_w8a8` only (w4a8: `with_w4a8`, w8a8-g32: `with_w8a8g`), bfloat16
    weights for those in `with_bf16`;
    tiled: a "NAME tiled" variant of each library's int8, int4, float32 and bfloat16 matmuls."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from compress.quant import matmul, packed_int4

    t = np.int64(threads)

    def call(target, name, shape, *operands, **attributes):
        return jax.ffi.ffi_call(f"{target}_{name}", jax.ShapeDtypeStruct(shape, jnp.float32))(*operands, threads=t,
                                                                                              **attributes)

    def scans(layers, body, among=names):
        """{name: jit(operands -> the sum over layers of body(name, x, layer, *stacks))}."""
        def make(name):
            def run(x, *stacks):
                step = lambda total, i: (total + body(name, x, i, *stacks).sum(), None)  # noqa: E731
                return jax.lax.scan(step, jnp.float32(0), jnp.arange(layers, dtype=jnp.int32))[0]
            return jax.jit(run)
        return {name: make(name) for name in among}

    def int8(name, x, i, q, s, tiled=False):
        return call("press_int8_matmul", name, (x.shape[0], q.shape[2]), x, q, s, i, q, i + 1, tiled=tiled)

    def int4(name, x, i, q, s, o, tiled=False):
        return call("press_int4_matmul", name, (x.shape[0], q.shape[3]), x, q, s, o, i, q, i + 1, zero_point=True,
                    has_offset=True, tiled=tiled)

    def w8a8(name, x, i, q, s):  # each row quantized to int8 in the call, integer dot products
        return call("press_w8a8_matmul", name, (x.shape[0], q.shape[2]), x, q, s, i)

    def w4a8(name, x, i, q, s, o):  # each group of 32 inputs quantized to int8 in the call, integer dot products
        return call("press_w4a8_matmul", name, (x.shape[0], q.shape[3]), x, q, s, o, i, q, i + 1, zero_point=True,
                    has_offset=True)

    def w8a8g(name, x, i, q, s):  # each group of 32 inputs quantized to int8 in the call, integer dot products
        return call("press_w8a8g_matmul", name, (x.shape[0], q.shape[2]), x, q, s, i, q, i + 1, group=np.int64(32))

    def aqt_w8a8(name, x, i, q, s):  # AQT's per-token int8 activations and its integer dot on XLA
        from compress.quant import aqt_matmul

        return aqt_matmul.int_weight_einsum("mk,kn->mn", x, q[i], s[i][None], 8, 8)

    def f32(name, x, i, w, tiled=False):
        return call("press_f32_matmul", name, (x.shape[0], w.shape[2]), x, w, i, w, i + 1, tiled=tiled)

    def bf16(name, x, i, w, tiled=False):  # bfloat16 weights widened in registers
        return call("press_bf16_matmul", name, (x.shape[0], w.shape[2]), x, w, i, w, i + 1, tiled=tiled)

    def tiled_stacks(kind, stack):
        """The kind's stacked operands with the weights in the tiled layout (the rest unchanged)."""
        weights, *rest = stack
        rows = weights.shape[2] if kind == "int4" else matmul.TILE_ROWS  # int4: a group's byte rows a tile
        return (matmul.tile(weights, 2 if kind == "int4" else 1, lead=1, rows=rows), *rest)

    rng = np.random.default_rng(0)
    cases = []
    for label, (k, n) in SHAPES.items():
        bytes_per_layer = {"int8": k * n + 4 * n, "int4": k * n // 2 + 4 * (k // 32) * n, "f32": 4 * k * n, "bf16": 2 * k * n}
        layers = {kind: max(4, -(-STACK_BYTES // size)) for kind, size in bytes_per_layer.items()}
        stacks = {
            "int8": (jnp.asarray(rng.integers(-127, 128, (layers["int8"], k, n), np.int8)),
                     jnp.asarray(rng.random((layers["int8"], n), np.float32) + 0.5)),
            "int4": (packed_int4.pack(jnp.asarray(rng.integers(-8, 8, (layers["int4"], k // 32, 32, n), np.int8)), 2),
                     jnp.asarray(rng.random((layers["int4"], k // 32, n)) + 0.5, jnp.float16),
                     jnp.asarray(rng.standard_normal((layers["int4"], k // 32, n)), jnp.float16)),
            "f32": (jnp.asarray(rng.standard_normal((layers["f32"], k, n), np.float32)),),
            "bf16": (jnp.asarray(rng.standard_normal((layers["bf16"], k, n), np.float32), jnp.bfloat16),),
        }
        bodies = {"int8": int8, "int4": int4, "f32": f32, "bf16": bf16, "w8a8": w8a8, "w4a8": w4a8, "w8a8g": w8a8g}
        layers["w8a8"], stacks["w8a8"], bytes_per_layer["w8a8"] = layers["int8"], stacks["int8"], bytes_per_layer["int8"]
        layers["w4a8"], bytes_per_layer["w4a8"] = layers["int4"], bytes_per_layer["int4"]
        stacks["w4a8"] = (matmul.w4a8_tile(stacks["int4"][0], 1), *stacks["int4"][1:])
        layers["w8a8g"], bytes_per_layer["w8a8g"] = layers["int8"], bytes_per_layer["int8"]
        stacks["w8a8g"] = (matmul.w8a8g_tile(stacks["int8"][0], 1, 32, lead=1), stacks["int8"][1])
        for kind in ("int8", "w8a8", "w8a8g", "int4", "w4a8", "f32", "bf16"):
            among = {"w8a8": with_w8a8, "w4a8": list(with_w4a8), "w8a8g": list(with_w8a8g),
                     "bf16": with_bf16}.get(kind, names)
            if not among:
                continue
            fns = {name: (fn, stacks[kind]) for name, fn in scans(layers[kind], bodies[kind], among).items()}
            if kind == "w8a8":  # the path w8a8 takes without the kernel, as the peer
                fns[XLA_PEER] = (scans(layers[kind], aqt_w8a8, [XLA_PEER])[XLA_PEER], stacks[kind])
            elif tiled and kind not in ("w4a8", "w8a8g") and matmul.tileable(k, n):
                body = lambda name, *operands, body=bodies[kind]: body(name[: -len(" tiled")], *operands,  # noqa: E731
                                                                       tiled=True)
                tiles = tiled_stacks(kind, stacks[kind])
                fns.update({name: (fn, tiles) for name, fn in
                            scans(layers[kind], body, [f"{name} tiled" for name in among]).items()})
            for rows in matmul_rows:
                if kind == "f32" and rows > matmul.float_rows():
                    continue  # more rows stay on XLA's dot (compress/quant/matmul.py float_rows)
                x = jnp.asarray(rng.standard_normal((rows, k), np.float32))
                what = {"kernel": kind, "shape": label, "k": k, "n": n, "rows": rows, "bytes": bytes_per_layer[kind]}
                cases.append((f"{kind} {label} {k}x{n} rows {rows}", what, layers[kind],
                              {name: (fn, (x, *operands)) for name, (fn, operands) in fns.items()}))
    scale = np.float32(HEAD_DIM ** -0.5)
    for rows in (1, 16):
        shape = (LAYERS, rows, SLOTS, KV_HEADS, HEAD_DIM)
        q = jnp.asarray(rng.standard_normal((rows, 1, HEADS, HEAD_DIM), np.float32))
        allowed = jnp.ones((rows, 1, SLOTS), bool)
        floats = tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(2))
        codes = tuple(jnp.asarray(rng.integers(-127, 128, shape, np.int8)) for _ in range(2))
        scales = tuple(jnp.asarray(rng.random(shape[:-1], np.float32) / 100) for _ in range(2))

        def f32_attention(name, x, i, k, v, allowed=allowed):
            return call("press_attention_f32", name, x.shape, x, k, v, allowed, i, jnp.int32(0), scale=scale)

        def s8_attention(name, x, i, k, v, ks, vs, allowed=allowed):
            return call("press_attention_s8", name, x.shape, x, k, v, ks, vs, allowed, i, jnp.int32(0), scale=scale)

        for kind, body, operands, size in (("float32", f32_attention, floats, 2 * 4 * HEAD_DIM),
                                           ("int8", s8_attention, codes + scales, 2 * (HEAD_DIM + 4))):
            what = {"kernel": f"attention-{kind}", "rows": rows, "slots": SLOTS, "bytes": rows * SLOTS * KV_HEADS * size}
            cases.append((f"attention {kind} rows {rows} x {SLOTS} slots", what, LAYERS,
                          {name: (fn, (q, *operands)) for name, fn in scans(LAYERS, body).items()}))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isas", default="native,avx2,portable", help="paths to build and compare (PRESS_CPU_KERNELS_ISA)")
    parser.add_argument("--libraries", help="library files to compare instead, comma-separated (the first is the base)")
    parser.add_argument("--rows", default="1,4,16", help="activation rows of the matmuls")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--only", default="", help="run only the cases whose label contains this")
    parser.add_argument("--tiled", action="store_true", help="also each library's matmuls on tiled weights")
    parser.add_argument("--out", default="bench-results/kernels.json")
    args = parser.parse_args()

    if args.libraries:
        libraries = {f"lib{i}": path for i, path in enumerate(args.libraries.split(","))}
    else:
        libraries = {}
        for isa in args.isas.split(","):
            path, runs = _built_library(isa)
            if path in libraries.values():  # on a CPU without AVX-512, avx2 builds what native does
                log(f"kernels: {isa} builds the same {runs} library as another path, measured once")
            elif path:
                libraries[runs] = path  # named by what it runs, not by what was asked
    if not libraries:
        raise SystemExit("kernels: no library to measure (see the lines above)")
    import jax

    w8a8, bf16, w4a8, w8a8g = [], [], [], []  # the libraries with the w8a8 kernel, bfloat16 weights, w4a8, w8a8-gN
    for name, path in libraries.items():
        library = ctypes.CDLL(path)  # its own copy of the kernels, workers included
        for target in TARGETS:
            if hasattr(library, target):
                jax.ffi.register_ffi_target(f"{target}_{name}", jax.ffi.pycapsule(getattr(library, target)),
                                            platform="cpu")
        if hasattr(library, "press_w8a8_matmul"):
            w8a8.append(name)
        if hasattr(library, "press_bf16_matmul"):
            bf16.append(name)
        if hasattr(library, "press_w4a8_matmul"):
            w4a8.append(name)
        if hasattr(library, "press_w8a8g_matmul"):
            w8a8g.append(name)
    names = list(libraries)
    results = []
    for label, what, calls, fns in _cases(names, args.threads, [int(r) for r in args.rows.split(",")], w8a8, bf16,
                                          args.tiled, tuple(w4a8), tuple(w8a8g)):
        if args.only not in label:
            continue
        times = {name: [] for name in fns}
        for fn, operands in fns.values():
            fn(*operands).block_until_ready()
        for _ in range(args.rounds):
            for name, (fn, operands) in fns.items():
                start = time.perf_counter()
                fn(*operands).block_until_ready()
                times[name].append(time.perf_counter() - start)
        us = {name: statistics.median(times[name]) / calls * 1e6 for name in fns}
        first = next(iter(us))
        entry = {**what, "us": us, "GB_s": {name: what["bytes"] / t / 1e3 for name, t in us.items()},
                 "over_first": {name: us[name] / us[first] for name in us}}
        results.append(entry)
        log(f"kernels: {label}: " + ", ".join(f"{name} {us[name]:.1f} us ({entry['over_first'][name]:.2f}x)"
                                               for name in us))
    ratios = {name: statistics.geometric_mean([r["over_first"][name] for r in results if name in r["over_first"]])
              for name in [*names, *(f"{n} tiled" for n in names)] if any(name in r["over_first"] for r in results)}
    log("kernels: geometric mean over the first: " + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()))
    write_result(args.out, {"libraries": libraries, "threads": args.threads, "rounds": args.rounds, "tiled": args.tiled,
                            "stack_bytes": STACK_BYTES, "geomean_over_first": ratios, "results": results})


if __name__ == "__main__":
    main()
