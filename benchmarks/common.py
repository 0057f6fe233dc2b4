"""What every benchmark script shares: progress lines and writing its results."""

from __future__ import annotations

import json
import os
import sys


def log(line: str) -> None:
    """A progress line on stderr (stdout carries the results)."""
    print(line, file=sys.stderr, flush=True)


def write_result(path: str, result: dict) -> None:
    """The results as JSON at `path` (folders made as needed) and on stdout."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps(result, indent=2, default=str))
