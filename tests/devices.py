"""XLA_FLAGS for the suite's child processes: their own count of simulated CPU devices, with the
other flags the suite runs under (tests/conftest.py)."""

from __future__ import annotations

import os
import re


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a child process with `devices` simulated CPU devices."""
    others = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).split()
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *others])
