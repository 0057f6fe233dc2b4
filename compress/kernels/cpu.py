"""Native CPU kernels: matmuls of a few rows of activations against stored int8, packed int4,
float32 or bfloat16 weights, and attention of a few query positions over the KV cache where it lies.

Batch-1 decoding reads every weight once per token, so its speed is the rate at which the
weights stream from memory. XLA's CPU backend does not fuse the integer-to-float conversion
into its dot: `x @ (q.astype(f32) * scale)` writes and reads a float copy of the weights (four
times the int8 bytes), and runs slower than float weights would (BENCHMARKS.md, issue 16).
cpu.cc streams the integers once, widens them in registers and keeps the accumulators there;
`jax.ffi` makes it an XLA custom call. Float models' decode steps use the same loops on float32
weights (`f32_matmul`): XLA's dot of 1-24 rows against one layer of a stacked kernel streamed
it at 6-16 GB/s, a quarter of the read rate; bfloat16 weights (a model loaded with
`param_dtype=bfloat16`) stream at half those bytes, widened to float32 in registers, where XLA's
dot would first convert the whole stack to float32. Its calls are split between the calling thread and
workers of its own that spin between calls (waking a sleeping pool thread for each of a decode
step's ~200 calls cost more than the half it took over; cpu.cc says how they work).

Decode attention is the same story at long contexts: XLA slices the attended slots out of the
cache (a copy), moves heads ahead of slots (another) and runs small batched dots at a few GB/s;
at 512 slots that is half of a SmolLM2 decode step. `decode_attention` reads one layer's rows of
the cache in place (float32, or int8 with its scales) with an online softmax, one pass over the
keys and values (compress/models/attention.py calls it).

Built on first use with the machine's C++ compiler (`$CXX`, else c++ or g++; `-O3
-march=native`, so it uses AVX-512 or AVX2 where the CPU has them) into the press cache
(`$PRESS_CACHE_DIR/kernels`, keyed by the source, the compiler, jax and the CPU), written
beside and renamed so concurrent processes never load half a file. Where it cannot be built
or loaded (no compiler, not a CPU backend, `PRESS_CPU_KERNELS=0`), `available()` is False and
compress/quant/matmul.py keeps the plain JAX path; `status()` says why.

`PRESS_CPU_KERNELS_ISA` picks the instruction set the kernels are built for: `native` (the
default: AVX-512 where the CPU has it, else AVX2), `avx2` (AVX-512 off, for a library that also
runs on CPUs without it, and so that tests can check the AVX2 paths on a CPU with AVX-512) or
`portable` (the plain C++ loops, vectorised by the compiler).

  python -m compress.kernels.cpu    # build now (make install does) and report
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu.cc")
MAX_ROWS = 64  # rows of activations the kernels take; more (prefill, training) stay on XLA's dot
WIDE = 4096  # outputs from which the kernels split a matrix's columns between threads (cpu.cc kWide)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")
# What each PRESS_CPU_KERNELS_ISA adds to FLAGS: cpu.cc picks its paths by the compiler's macros.
ISA_FLAGS = {"native": (), "avx2": ("-mno-avx512f",), "portable": ("-mno-avx2", "-mno-avx512f", "-mno-fma", "-mno-f16c")}
_TARGETS = ("press_int8_matmul", "press_int4_matmul", "press_f32_matmul", "press_bf16_matmul", "press_attention_f32",
            "press_attention_s8", "press_argmax")
FLOAT_WEIGHTS = {jnp.dtype(jnp.float32): "press_f32_matmul", jnp.dtype(jnp.bfloat16): "press_bf16_matmul"}
MAX_QUERIES = 64  # query positions per row decode attention takes (a decode step, a verify pass, a chunk)
MAX_GROUP = 16  # query heads per key/value head
_status = "not loaded yet"
_path: str | None = None  # the library loaded, once loaded
_isa: str | None = None  # the instruction-set path it runs, once loaded


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _flags() -> tuple[str, ...]:
    isa = os.environ.get("PRESS_CPU_KERNELS_ISA", "native")
    if isa not in ISA_FLAGS:
        raise RuntimeError(f"PRESS_CPU_KERNELS_ISA={isa!r} is not one of {', '.join(ISA_FLAGS)}")
    return FLAGS + ISA_FLAGS[isa]


def _library_path(compiler: str) -> str:
    # The press cache (compress.formats.tokenizer.cache_root, which this layer cannot import).
    cache_root = os.environ.get("PRESS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "press")
    with open(SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), jax.__version__.encode(), " ".join(_flags()).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:20]
    return os.path.join(cache_root, "kernels", f"press-cpu-kernels-{key}.so")


def _build(compiler: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        command = [compiler, *_flags(), f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)  # atomic: another process sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.cache
def _load() -> ctypes.CDLL | None:
    global _status, _path, _isa
    if os.environ.get("PRESS_CPU_KERNELS", "1") == "0":
        _status = "switched off (PRESS_CPU_KERNELS=0)"
        return None
    if jax.default_backend() != "cpu":
        _status = f"not a CPU backend ({jax.default_backend()})"
        return None
    compiler = _compiler()
    if compiler is None:
        _status = "no C++ compiler found (set CXX)"
        return None
    try:
        path = os.environ.get("PRESS_CPU_KERNELS_LIB") or _library_path(compiler)  # a library built elsewhere
        if not os.path.exists(path):
            _build(compiler, path)
        library = ctypes.cdll.LoadLibrary(path)
        targets = _TARGETS + (("press_w8a8_matmul",) if library.press_cpu_kernels_vnni() else ()) \
            + (("press_w4a8_matmul",) if _w4a8_in(library) else ()) \
            + (("press_w8a8g_matmul",) if _w8a8g_in(library) else ())
        for target in targets:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
        for name in ("press_workers_selftest", "press_kernel_workers"):
            getattr(library, name).restype = ctypes.c_int64
        library.press_workers_selftest.argtypes = [ctypes.c_int64] * 3
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        _status = f"unavailable: {type(e).__name__}: {e}"
        return None
    avx2 = getattr(library, "press_cpu_kernels_avx2", None)  # absent from a library built before it
    isa = "AVX-512" if library.press_cpu_kernels_avx512() else "AVX2" if avx2 and avx2() else "portable C++"
    _isa = isa
    isa += ", VNNI w8a8" if library.press_cpu_kernels_vnni() else ", no w8a8 kernel (no AVX-512 VNNI)"
    isa += ", w4a8" if _w4a8_in(library) else ", no w4a8 kernel"
    isa += ", w8a8-gN" if _w8a8g_in(library) else ", no w8a8-gN kernel"
    workers = library.press_kernel_workers()
    _status = f"loaded ({isa}, {workers} worker thread{'s' * (workers != 1)}) from {path}"
    _path = path
    return library


def available() -> bool:
    """Whether the native kernels are built and registered (builds them on the first call)."""
    return _load() is not None


def library_path() -> str | None:
    """The kernels' library file this process loaded (another process on this machine can load it
    through PRESS_CPU_KERNELS_LIB), or None where they are not in use."""
    _load()
    return _path


def instruction_set() -> str | None:
    """The path the loaded library runs ("AVX-512", "AVX2" or "portable C++"), or None where the
    kernels are not in use."""
    _load()
    return _isa


def status() -> str:
    """Why the kernels are or are not in use."""
    _load()
    return _status


def usable(rows: int, out_width: int) -> bool:
    """Whether a matmul of `rows` activation rows and `out_width` outputs runs natively."""
    return 1 <= rows <= MAX_ROWS and out_width % 16 == 0 and available()


def has_w8a8() -> bool:
    """Whether the w8a8 kernel is built here (the CPU has AVX-512 VNNI's integer dot products)."""
    library = _load()
    return library is not None and bool(library.press_cpu_kernels_vnni())


def _w4a8_in(library: ctypes.CDLL) -> bool:
    """Whether a loaded library has the w4a8 kernel: AVX-512 or AVX2 (a library built before its
    AVX2 path says so by VNNI alone)."""
    w4a8 = getattr(library, "press_cpu_kernels_w4a8", None)
    return bool(w4a8()) if w4a8 is not None else bool(library.press_cpu_kernels_vnni())


def _w8a8g_in(library: ctypes.CDLL) -> bool:
    """Whether a loaded library has the w8a8-gN kernel (AVX2, or AVX-512 with VNNI)."""
    w8a8g = getattr(library, "press_cpu_kernels_w8a8g", None)
    return w8a8g is not None and bool(w8a8g())


def has_w8a8g() -> bool:
    """Whether the w8a8-gN kernel is built here: integer products of int8 weights and int8
    activations per group (vpsignb, vpmaddubsw and vpmaddwd on AVX2; vpdpbusd on AVX-512 VNNI)."""
    library = _load()
    return library is not None and _w8a8g_in(library)


def has_w4a8() -> bool:
    """Whether the w4a8 kernel is built here: integer products of int4 codes and int8 activations
    (vpdpbusd on AVX-512 VNNI; vpmaddubsw and vpmaddwd on other AVX-512 and on AVX2 CPUs)."""
    library = _load()
    return library is not None and _w4a8_in(library)


def w8a8_usable(rows: int, k: int, out_width: int) -> bool:
    """Whether a w8a8 matmul (int8 activations per row, int8 weights) runs natively: the kernel
    is built here, k % 4 == 0 and out_width % 64 == 0."""
    return 1 <= rows <= MAX_ROWS and k % 4 == 0 and out_width % 64 == 0 and has_w8a8()


def _require() -> None:
    if not available():
        raise RuntimeError(f"press CPU kernels: {status()}")


def _threads() -> np.int64:
    return np.int64(int(os.environ.get("PRESS_CPU_KERNEL_THREADS", "0")))  # 0: the caller and one worker per further CPU


def _next_operands(after, dtype=jnp.int8) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The weights the next call reads, (a stack [L, ...] of int8 codes, or of float32 weights for
    the f32 kernel: `dtype`, its layer), as the kernels take them: they prefetch its first bytes
    while they finish (none, or another dtype: a dummy)."""
    if after is None or after[0].dtype != dtype:
        return jnp.zeros((1,), dtype), jnp.int32(0)
    stack, layer = after
    return stack, jnp.asarray(layer, jnp.int32)


def int8_matmul(x: jnp.ndarray, q: jnp.ndarray, scale: jnp.ndarray, layer=0, after=None,
                tiled: bool = False) -> jnp.ndarray:
    """x [M, K] float32 @ (q[layer] int8 [K, N] * scale[layer] [N]) -> [M, N] float32, where q is
    [L, K, N] and scale [L, N] (a stack of layers; read in place) or [K, N] and [N].
    after: (stack, layer), the int8 weights the model reads next, to prefetch, or None. tiled: q's
    layers hold the tiled layout (as f32_matmul's)."""
    return _int8_weights_call("press_int8_matmul", x, q, scale, layer, *_next_operands(after), tiled=bool(tiled))


def f32_matmul(x: jnp.ndarray, w: jnp.ndarray, layer=0, after=None, tiled: bool = False) -> jnp.ndarray:
    """x [M, K] float32 @ w[layer] [K, N] -> [M, N] float32, where w is float32 or bfloat16 and
    [L, K, N] (a stack of layers; read in place) or [K, N]: a float model's decode-step matmul,
    one pass over w (bfloat16 weights widened to float32 in registers, so the product is
    x @ w.astype(float32)). after: (stack, layer), the weights the model reads next (of w's
    dtype), to prefetch, or None. tiled: w's layers hold the tiled layout (compress/quant/matmul.py
    `tile`; K % 16 == 0, N % 64 == 0, N < WIDE)."""
    _require()
    if w.ndim == 2:
        w = w[None]
    if w.dtype not in FLOAT_WEIGHTS:
        raise ValueError(f"press float kernel: weights of {w.dtype}; it takes {', '.join(map(str, FLOAT_WEIGHTS))}")
    call = jax.ffi.ffi_call(FLOAT_WEIGHTS[w.dtype], jax.ShapeDtypeStruct((x.shape[0], w.shape[2]), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), w, jnp.asarray(layer, jnp.int32), *_next_operands(after, w.dtype),
                threads=_threads(), tiled=bool(tiled))


def w8a8_matmul(x: jnp.ndarray, q: jnp.ndarray, scale: jnp.ndarray, layer=0) -> jnp.ndarray:
    """The w8a8 scheme's product: each row of x [M, K] quantized to int8 with its own absmax scale
    (AQT's per-token numerics), times q[layer] int8 [K, N] * scale[layer] [N], on integer dot
    products -> [M, N] float32; q and scale stacked [L, K, N], [L, N] (read in place) or not."""
    return _int8_weights_call("press_w8a8_matmul", x, q, scale, layer)


def w8a8g_matmul(x: jnp.ndarray, q: jnp.ndarray, scale: jnp.ndarray, group: int, layer=0, after=None) -> jnp.ndarray:
    """The w8a8-gN schemes' product: each group of `group` activations of a row of x [M, K]
    quantized to int8 with its own step (max |x| / 127, round half to even), times int8_matmul's
    weights in the w8a8-gN tiled layout (compress/quant/matmul.py `w8a8g_tile`) with a scale per
    output, on integer dot products (AVX2, or AVX-512 VNNI: has_w8a8g) -> [M, N] float32.
    group % 4 == 0 dividing K, N % 64 == 0, N < WIDE; after: as int8_matmul's."""
    return _int8_weights_call("press_w8a8g_matmul", x, q, scale, layer, *_next_operands(after), group=int(group))


def _int8_weights_call(target: str, x, q, scale, layer, *extra, **attributes) -> jnp.ndarray:
    """The custom call `target` on x [M, K], int8 weights q [L, K, N] or [K, N] with scales, the
    layer, and any further operands -> [M, N] float32."""
    _require()
    if q.ndim == 2:
        q, scale = q[None], scale.reshape(1, -1)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], q.shape[2]), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), q, scale.astype(jnp.float32), jnp.asarray(layer, jnp.int32), *extra,
                threads=_threads(), **attributes)


def int4_matmul(x: jnp.ndarray, q: jnp.ndarray, scale: jnp.ndarray, offset: jnp.ndarray | None,
                zero_point: bool, layer=0, after=None, tiled: bool = False) -> jnp.ndarray:
    """x [M, G*S] float32 against packed codes q[layer] [G, S/2, N] with float16 group scales
    (and offsets) [G, N] (compress/quant/packed_int4.py's layout) -> [M, N] float32; q, scale
    and offset have a leading axis of stacked layers, or none. after: as int8_matmul's. tiled:
    each group's S/2 byte rows of 64 columns one contiguous run (compress/quant/matmul.py `tile`)."""
    return _int4_call("press_int4_matmul", x, q, scale, offset, zero_point, layer, after, tiled=bool(tiled))


def w4a8_matmul(x: jnp.ndarray, q: jnp.ndarray, scale: jnp.ndarray, offset: jnp.ndarray | None,
                zero_point: bool, layer=0, after=None) -> jnp.ndarray:
    """The w4a8-gN schemes' product: each group of S activations of a row of x quantized to int8
    with its own step (max |x| / 127, round half to even), times int4_matmul's packed codes in
    the w4a8 tiled layout (compress/quant/matmul.py `w4a8_tile`), on integer dot products (AVX-512
    or AVX2: has_w4a8) -> [M, N] float32. Operands as int4_matmul's; S % 8 == 0, N % 64 == 0, N < WIDE."""
    return _int4_call("press_w4a8_matmul", x, q, scale, offset, zero_point, layer, after)


def _int4_call(target: str, x, q, scale, offset, zero_point, layer, after, **attributes) -> jnp.ndarray:
    _require()
    if q.ndim == 3:
        q, scale, offset = q[None], scale[None], None if offset is None else offset[None]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], q.shape[3]), jnp.float32),
                            vmap_method="sequential")
    has_offset = offset is not None
    offset = offset.astype(jnp.float16) if has_offset else jnp.zeros((1,), jnp.float16)
    return call(x.astype(jnp.float32), q, scale.astype(jnp.float16), offset, jnp.asarray(layer, jnp.int32),
                *_next_operands(after), threads=_threads(), zero_point=bool(zero_point), has_offset=has_offset,
                **attributes)


def argmax_usable(x: jnp.ndarray) -> bool:
    """Whether `argmax` takes x: float32 with a last axis of 1 .. 2**31 - 1, on the native kernels."""
    return x.dtype == jnp.float32 and x.ndim >= 1 and 0 < x.shape[-1] < 2**31 and x.size > 0 and available()


def argmax(x: jnp.ndarray) -> jnp.ndarray:
    """jnp.argmax(x, axis=-1) as int32 (the lowest index among ties, the first NaN where there is
    one) for float32 x [..., V], in one native pass per row."""
    _require()
    rows = x.reshape(-1, x.shape[-1])
    call = jax.ffi.ffi_call("press_argmax", jax.ShapeDtypeStruct((rows.shape[0],), jnp.int32),
                            vmap_method="sequential")
    return call(rows, threads=_threads()).reshape(x.shape[:-1])


def attention_usable(q: jnp.ndarray, cache: jnp.ndarray) -> bool:
    """Whether `decode_attention` takes queries q [B, T, N, H] over a cache [L, R, S, K, H]."""
    _, t, n, h = q.shape
    kv_heads = cache.shape[3]
    return (q.dtype == jnp.float32 and cache.dtype in (jnp.float32, jnp.int8) and 1 <= t <= MAX_QUERIES
            and h % 16 == 0 and n % kv_heads == 0 and n // kv_heads <= MAX_GROUP and available())


def decode_attention(q: jnp.ndarray, keys: jnp.ndarray, values: jnp.ndarray, k_scale: jnp.ndarray | None,
                     v_scale: jnp.ndarray | None, allowed: jnp.ndarray, layer, first_row=0) -> jnp.ndarray:
    """Softmax attention of q [B, T, N, H] float32 (scores q.k / sqrt(H)) over slots [0, W) of
    cache rows first_row .. first_row + B of layer `layer`, read in place.

    keys, values: [L, R, S, K, H] float32, or int8 with k_scale, v_scale [L, R, S, K]
    (vector = int8 * scale). allowed: [B, T, W] bool. Returns [B, T, N, H] float32; a query that
    may see no slot gets the mean of the W slots' values, as grouped_query_attention does.
    """
    _require()
    scale = np.float32(q.shape[-1] ** -0.5)
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    index = (jnp.asarray(layer, jnp.int32), jnp.asarray(first_row, jnp.int32))
    if keys.dtype == jnp.int8:
        call = jax.ffi.ffi_call("press_attention_s8", out, vmap_method="sequential")
        return call(q, keys, values, k_scale.astype(jnp.float32), v_scale.astype(jnp.float32), allowed, *index,
                    threads=_threads(), scale=scale)
    call = jax.ffi.ffi_call("press_attention_f32", out, vmap_method="sequential")
    return call(q, keys, values, allowed, *index, threads=_threads(), scale=scale)


if __name__ == "__main__":
    print(f"press CPU kernels: {status()}")
    sys.exit(0)
