"""The kernels' other instruction-set paths, on whatever CPU runs the tests: cpu.cc has an AVX-512,
an AVX2 and a plain C++ version of each loop, and `-march=native` compiles only one of them, so
the rest would ship untested wherever the tests run on a single kind of CPU. Each path here is
built with PRESS_CPU_KERNELS_ISA and the kernels' exactness tests run against it in a process of
their own (the products against float64, attention against float64, the native argmax)."""

import os
import subprocess
import sys

import pytest

from compress.kernels import cpu as cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXACTNESS = ["tests/test_cpu_kernels.py", "tests/test_decode_attention.py", "tests/test_sampling.py",
             "-k", "products_equal_float64 or the_kernel_equals_float64 or greedy_is_jnp_argmax"]
# w4a8's and w8a8-gN's integer products (vpmaddubsw and vpmaddwd on AVX2); the portable loops have neither.
EXTRA = {"avx2": " or w4a8_products or w8a8g_products", "portable": ""}
NAMES = {"avx2": "AVX2", "portable": "portable C++"}  # what instruction_set() says each built library runs


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def _run(args: list[str], isa: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRESS_CPU_KERNELS_ISA": isa}
    env.pop("PRESS_CPU_KERNELS_LIB", None)  # a library built elsewhere would be loaded whatever the ISA
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_each_instruction_set_path_computes_what_float64_does(isa):
    if not cpu_kernels.available():
        pytest.skip(f"no native kernels here: {cpu_kernels.status()}")
    if isa == "avx2" and not {"avx2", "fma", "f16c"} <= _cpu_flags():
        pytest.skip("this CPU has no AVX2 with FMA and F16C")
    if cpu_kernels.instruction_set() == NAMES[isa]:
        pytest.skip(f"the native build already runs the {NAMES[isa]} path (tests/test_cpu_kernels.py)")
    # One process builds the library, says which path it runs, then runs the tests on it.
    code = ("import sys, pytest; from compress.kernels import cpu; print(cpu.instruction_set()); print(cpu.status());"
            f" sys.exit(pytest.main({['-q', '-p', 'no:cacheprovider', *EXACTNESS[:-1], EXACTNESS[-1] + EXTRA[isa]]!r}))")
    tests = _run(["-c", code], isa)
    assert tests.stdout.splitlines()[:1] == [NAMES[isa]], tests.stdout[-2000:] + tests.stderr[-2000:]
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and " skipped" not in tests.stdout, tests.stdout[-2000:]


def test_an_unknown_instruction_set_is_named_and_the_plain_path_runs():
    done = _run(["-c", "from compress.kernels import cpu; print(cpu.available(), cpu.status())"], "avx9000")
    assert done.stdout.startswith("False unavailable") and "PRESS_CPU_KERNELS_ISA='avx9000'" in done.stdout, done
