"""The error press raises for bad input, as opposed to a bug.

`InputError` (a ValueError) means the user gave press something it cannot use: a config
key or value, a file, a tensor, a request. The `press` command prints it as one line naming
what was wrong and exits 2; any other exception is a bug in press and is printed with its
traceback. Subclasses: `compress.config.ConfigError`, `compress.formats.tensor_source.FormatError`.
"""


class InputError(ValueError):
    """Bad input: says what was wrong, where (file, key, tensor) and what to do instead."""


def check_unicode(text: str, what: str, hint: str = "send valid Unicode text", error: type = InputError) -> None:
    """`error` naming `what` and the place of a lone surrogate in `text`, if it holds one.

    No UTF-8 encoder, tokenizer or SQLite text takes a lone surrogate, yet Python makes them of
    valid input: JSON's unpaired "\\ud800" escapes, and bytes that are not UTF-8 in a file name
    or a command-line argument (os.fsdecode's surrogateescape).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{what} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}); {hint}") \
            from None


def check_json_unicode(value, what: str, hint: str = "send valid Unicode text", error: type = InputError,
                       quote: bool = False) -> None:
    """check_unicode on every string of a decoded JSON value, keys included; `what` is the value's
    path, extended as `what[i]`, `what.key` and `what (a key)` (each quoted with quote=True)."""
    if isinstance(value, str):
        check_unicode(value, f"'{what}'" if quote else what, hint, error)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json_unicode(item, f"{what}[{i}]", hint, error, quote)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_json_unicode(key, f"{what} (a key)", hint, error, quote)
            check_json_unicode(item, f"{what}.{key}", hint, error, quote)
