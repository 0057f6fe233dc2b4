"""Several `press` processes of one multi-process job on localhost (jax.distributed, CPU collectives)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from typing import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(arguments: list[str], processes: int, env: dict[str, str], timeout: float = 600) -> tuple[list[int], list[str]]:
    """`press ARGUMENTS --distributed ...` as `processes` processes; (exit codes, outputs), every one
    killed if the job outlives `timeout` or the test fails."""
    command = [sys.executable, "-m", "serve.cli", *arguments, "--distributed", "--coordinator-address",
               f"127.0.0.1:{free_port()}", "--num-processes", str(processes)]
    started = [subprocess.Popen([*command, "--process-id", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in started]
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in started], logs


@contextlib.contextmanager
def lock_held_elsewhere(path: str) -> Iterator[None]:
    """compress/file_locks.py's lock of `path` held by another process (a writer at work) until the
    block ends, when that process is killed with -9."""
    code = ("import time\nfrom compress import file_locks\n"
            f"with file_locks.exclusive({os.fspath(path)!r}):\n    print('held', flush=True)\n    time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
