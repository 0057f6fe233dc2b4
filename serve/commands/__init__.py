"""The `press` commands that run models: generate, batch, serve, ask and eval (its decode speed
comes from the engine). Each module holds its command's typed config, its arguments and the
code it runs; the dispatcher (serve/cli.py) imports them."""
