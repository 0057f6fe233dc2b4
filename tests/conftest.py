"""Test set-up: 8 simulated CPU devices, so sharding is tested without accelerators, and XLA's
CPU code generation at its quickest."""

import os

# Most of the suite's time is XLA compiling small programs (the engine's many shapes on tiny
# models), not running them, so LLVM's optimisation is off, as JAX's own test harness turns it
# off (--jax_disable_most_optimizations). From a cold compilation cache the suite took 21m55s
# instead of 25m08s: compile-bound files 0.55-0.75x their time, training- and encoding-bound ones
# 1.1-1.5x. Level 1 instead of 0 was slower over the suite. Nothing is timed in the tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
