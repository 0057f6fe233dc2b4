"""The `press` commands whose work is all in retrieval/: `press index build|add|remove|search`.

`press ask` (retrieval plus generation) lives in serve/commands/ask.py.
"""
