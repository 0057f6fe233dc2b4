"""The suite's child processes get their own device count and keep every other XLA flag the
suite runs under (tests/conftest.py's code-generation flags), in the environment they start with."""

import os
import subprocess
import sys

from tests.devices import xla_flags


def test_a_child_gets_its_own_device_count_and_keeps_the_suites_other_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                    "--xla_llvm_disable_expensive_passes=true")
    flags = xla_flags(2).split()
    assert flags[0] == "--xla_force_host_platform_device_count=2"
    assert sorted(flags[1:]) == ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    assert len([f for f in flags if "device_count" in f]) == 1


def test_the_flags_the_suite_runs_under_reach_a_child_process():
    """A child started with `xla_flags` sees every flag of this process's XLA_FLAGS (conftest.py's,
    unless the caller set their own) but the device count, and jax there has the count asked for."""
    ours = {f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f}
    code = "import os, jax; print(len(jax.devices())); print(os.environ['XLA_FLAGS'])"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLA_FLAGS": xla_flags(3)},
                          capture_output=True, text=True, timeout=120, check=True)
    count, flags = done.stdout.splitlines()[:2]
    assert count == "3"
    assert ours <= set(flags.split())


def test_a_flag_is_added_only_where_this_jaxlib_knows_it():
    """conftest.py asks before adding a flag that newer XLA may drop (XLA aborts on an unknown one)."""
    from tests.conftest import _xla_knows

    assert _xla_knows("xla_force_host_platform_device_count")
    assert not _xla_knows("xla_press_no_such_flag_anywhere")
