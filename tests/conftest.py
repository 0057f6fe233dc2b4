"""Test set-up: 8 simulated CPU devices, so sharding is tested without accelerators, and XLA's
CPU code generation at its quickest."""

import os

# Most of the suite's time is XLA compiling small programs (the engine's many shapes on tiny
# models), not running them; matmuls and convolutions call library code whatever LLVM does. With
# LLVM's optimisation off, a compile-bound engine test ran in 0.74x the time (34.8 -> 25.6 s,
# test_chunked_prefill's nine-row warmup, a fresh compilation cache) and a training-bound one in
# 1.05x (test_finetune_run's LoRA runs). Nothing is timed in the tests (benchmarks/ times).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
