"""The error press raises for bad input, as opposed to a bug.

`InputError` (a ValueError) means the user gave press something it cannot use: a config
key or value, a file, a tensor, a request. The `press` command prints it as one line naming
what was wrong and exits 2; any other exception is a bug in press and is printed with its
traceback. Subclasses: `compress.config.ConfigError`, `compress.formats.tensor_source.FormatError`.
"""


class InputError(ValueError):
    """Bad input: says what was wrong, where (file, key, tensor) and what to do instead."""
