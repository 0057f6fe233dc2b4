"""The standard library's docstrings: a corpus of English about Python (about 1.7 MB on 3.11).

One document per module: its docstring, then every class's and function's docstring in
source order, each under its dotted name,

    json.decoder
    Implementation of JSONDecoder

    json.decoder.JSONDecoder
    Simple JSON <https://json.org> decoder
    ...

Modules are found by walking the standard library's directory (sysconfig's "stdlib" path)
in sorted order, and are never imported: a file is parsed with `ast` only when its document
is read, so nothing runs (no `antigravity` opening a browser, no `this` printing, no GUI)
and the walk is the same on every run of the same Python. A file that does not parse gives
an empty document. Left out: tests, installed packages, GUI and demo code (idlelib,
tkinter, turtledemo), bundled tools, the generated codecs of `encodings`, and `pydoc_data`,
the language reference, whose held-out part must never be trained on (corpus.py).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sysconfig

STDLIB_SOURCE = "stdlib"
# Directories (at any depth) the walk does not enter.
SKIPPED_DIRS = frozenset({
    "__pycache__", "site-packages", "dist-packages",  # installed packages, not the standard library
    "test", "tests", "idle_test",  # test suites
    "idlelib", "tkinter", "turtledemo",  # GUI and demo code
    "ensurepip", "lib2to3", "venv",  # bundled tools and templates
    "encodings",  # 120 generated codec modules with the same boilerplate docstrings
    "pydoc_data",  # the language reference: its held-out part stays held out
})


@dataclasses.dataclass(frozen=True)
class ModuleDocstrings:
    """A standard library module's docstrings, read from its source file when asked for."""

    module: str  # dotted name, e.g. "json.decoder"
    path: str  # its .py file

    @property
    def where(self) -> str:
        return f"{STDLIB_SOURCE} module {self.module} ({self.path})"

    @property
    def text(self) -> str:
        """The document's text; empty when the file has no docstring or does not parse."""
        try:
            with open(self.path, "rb") as f:
                tree = ast.parse(f.read(), self.path)
        except (OSError, SyntaxError, ValueError):
            return ""  # a file this Python cannot parse (a template, a newer syntax) adds nothing
        return "\n\n".join(f"{name}\n{doc}" for name, doc in _docstrings(tree, self.module))


def stdlib_modules(root: str | None = None) -> list[ModuleDocstrings]:
    """Every module of the standard library under `root` (default: this Python's), sorted by path."""
    root = root or sysconfig.get_paths()["stdlib"]
    modules = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(("test", ".", "config-")))
        package = os.path.relpath(dirpath, root).replace(os.sep, ".").removeprefix(".")
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith(("test_", ".")):
                continue
            stem = name[: -len(".py")]
            module = package if stem == "__init__" else ".".join(p for p in (package, stem) if p)
            modules.append(ModuleDocstrings(module, os.path.join(dirpath, name)))
    return sorted(modules, key=lambda m: m.path)


_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(node: ast.AST, name: str):
    """(dotted name, docstring) of `node` and the classes and functions in it, in source order.

    Definitions inside `if`, `try`, `with` and other blocks count, under the enclosing name.
    """
    if isinstance(node, (ast.Module, *_DEFINITIONS)):
        doc = ast.get_docstring(node)
        if doc and doc.strip():
            yield name, doc.strip()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DEFINITIONS):
            yield from _docstrings(child, f"{name}.{child.name}")
        elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
            yield from _docstrings(child, name)
