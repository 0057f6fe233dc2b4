"""Test set-up: 8 simulated CPU devices, so sharding is tested without accelerators, and XLA's
CPU code generation at its quickest."""

import glob
import mmap
import os


def _xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA has `flag` (XLA aborts on an unknown one in XLA_FLAGS): its name
    in the library that holds XLA's flags. False where that library is not found."""
    import importlib.util

    spec = importlib.util.find_spec("jaxlib")
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "*.so")) if spec and spec.origin else []:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(flag.encode()) >= 0:
                return True
    return False


# Most of the suite's time is XLA compiling small programs (the engine's many shapes on tiny
# models), not running them, so LLVM's optimisation is off, as JAX's own test harness turns it
# off (--jax_disable_most_optimizations). From a cold compilation cache the suite took 21m55s
# instead of 25m08s: compile-bound files 0.55-0.75x their time, training- and encoding-bound ones
# 1.1-1.5x. Level 1 instead of 0 was slower over the suite. XLA's MLIR fusion emitters took half
# of what remained of a compile: a tiny decoder's 22 serving programs compiled in 15.2 s with
# them and 7.1 s with the older emitters, the same tokens out; the suite from a cold cache then
# took 13m58s instead of 22m48s (2,640 s of test time down to 1,588; the text encoder's tests,
# compute-bound, ran 1.5x longer). Nothing is timed in the tests.
if "XLA_FLAGS" not in os.environ:  # a caller's own flags are kept as they are
    _flags = ["--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_llvm_disable_expensive_passes=true"]
    if _xla_knows("xla_cpu_use_fusion_emitters"):
        _flags.append("--xla_cpu_use_fusion_emitters=false")
    os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402 - after the environment above, which jax reads when first imported


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> str:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, an EOS token and tied
    embeddings, exported once as a Hugging Face directory (tests/tiny_decoder.py). Read only:
    a test that writes beside a model exports its own."""
    from tests.tiny_decoder import export_tiny_decoder

    return export_tiny_decoder(str(tmp_path_factory.mktemp("tiny-chat") / "tiny"), with_eos=True,
                               tie_word_embeddings=True)
