"""The `press` commands whose work is all in compress/: `press models` and `press quantize`.

Each module holds its command's typed config, its arguments and the code it runs; the
dispatcher (serve/cli.py) imports them.
"""
