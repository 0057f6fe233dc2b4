"""The benchmark scripts' names shadow no installed module.

`python benchmarks/x.py` puts benchmarks/ first on sys.path, so a script named like a package
that some dependency imports replaces it there: benchmarks/kernels.py once hid Hugging Face's
`kernels` package, and every benchmark that built a tokenizer from a GGUF file on a fresh cache
failed inside transformers ("cannot import name 'CUDAProperties' from 'kernels'").
"""

import importlib.util
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def test_no_benchmark_script_shadows_an_installed_module():
    stems = sorted(name[:-3] for name in os.listdir(BENCHMARKS) if name.endswith(".py"))
    assert "roofline" in stems  # the folder was found
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != BENCHMARKS]
    saved = sys.path[:]
    try:
        sys.path[:] = path
        shadowed = {}
        for stem in stems:
            spec = importlib.util.find_spec(stem) if stem not in sys.modules else sys.modules[stem].__spec__
            if spec is not None and os.path.dirname(os.path.abspath(spec.origin or "")) != BENCHMARKS:
                shadowed[stem] = spec.origin
    finally:
        sys.path[:] = saved
    assert not shadowed, f"benchmarks/ scripts named like installed modules (rename them): {shadowed}"
