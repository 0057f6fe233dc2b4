"""Typed configs: frozen dataclasses are the schema, YAML files give values, `key=value` overrides them.

    config = load(GenerateConfig, "configs/generate.yaml", ["max_new_tokens=64", "model.dtype=bfloat16"])

Values are applied in order: the dataclass defaults, then the YAML file, then each override.
Nested dataclasses are sections: nested mappings in YAML, dotted keys in overrides. Every
value is checked against its field's type before the dataclass is built, and `__post_init__`
runs last, so `load` returns only a fully validated config or raises `ConfigError`.

Field types: int, float (ints accepted), str, bool, `X | None`, `Literal[...]`, `tuple[X, ...]`,
`tuple[X, Y]`, `list[X]`, `dict[K, V]`, `enum.Enum` (by name or value) and nested dataclasses.
A dict field's YAML mapping or `key.name=value` overrides update its default's entries.

YAML values must already have the field's type (`steps: "3"` is an error). Override values are
text, read as YAML (`mesh=[1,2,4]`, `steps=3`), with three allowances for the command line:
bools also accept true/false/1/0/yes/no, `null`/`none`/`~` (any case) set an optional field to
None, and a str field takes the text as typed unless it reads as a YAML string
(`prompt="a: b"` and `prompt=a: b` both give 'a: b').
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import os
import re
import types
import typing
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from compress.errors import InputError

T = TypeVar("T")

_NONE_WORDS = {"null", "none", "~"}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class ConfigError(InputError):
    """A config value, key or file is wrong. Says which key, where it came from, and what to do.

    key: the dotted key at fault, if any. source: a file path or "override 'k=v'", if known.
    """

    def __init__(self, problem: str, *, key: str | None = None, source: str | None = None):
        self.key, self.source = key, source
        message = f"key '{key}': {problem}" if key else problem
        super().__init__(f"{source}: {message}" if source else message)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` and `1.0e3` as floats (PyYAML's YAML 1.1 wants `1.0e-3`)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings _Loader would read as floats, so dump/load round-trips."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
del _cls


@dataclasses.dataclass(frozen=True)
class _Override:
    """One override's value text, kept as text until its field's type is known."""

    text: str
    source: str  # "override 'k=v'"


# ----------------------------------------------------------------------------- public API


def from_dict(schema: type[T], data: Mapping[str, Any], *, source: str = "<dict>") -> T:
    """Builds `schema` from plain (YAML-typed) values; missing fields take their defaults.

    source names where `data` came from in error messages (a file path, say).
    """
    return _build(schema, data, "", source)


def load(schema: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """The dataclass defaults, then the YAML file at `path` (if given), then `overrides` in order."""
    if path is None:
        data, source = {}, "<defaults>"
    else:
        data, source = _read_yaml(path), os.fspath(path)
    return _build(schema, _with_overrides(schema, data, overrides), "", source)


def apply_overrides(config: T, overrides: Sequence[str]) -> T:
    """A copy of `config` with `key=value` overrides applied, validated like `load`."""
    schema = type(config)
    return _build(schema, _with_overrides(schema, to_dict(config), overrides), "", "<config>")


def to_dict(config: Any) -> dict:
    """Plain nested dicts, lists and scalars (enums by name) that `from_dict` reads back."""
    if not _is_dataclass_type(type(config)):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(config).__name__}")
    return _plain(config)


def dump(config: Any) -> str:
    """YAML text of `config`, in field order, that `load` reads back to an equal config."""
    return yaml.dump(to_dict(config), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def full_matches(pattern: str, names: Sequence[str], key: str) -> list[str]:
    """The names a regular expression matches whole (in order); an InputError naming `key` when
    the pattern is not a regular expression. (Freeze patterns, LoRA targets.)"""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise InputError(f"{key} pattern {pattern!r} is not a regular expression: {e}") from None
    return [name for name in names if regex.fullmatch(name)]


def require_at_least(config: Any, minimum: int, *names: str) -> None:
    """For a schema's __post_init__: ValueError unless each named field is >= minimum."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")


# ----------------------------------------------------------------------------- reading input


def _read_yaml(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML file (empty for an empty file)."""
    source = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError("config file not found", source=source) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror}", source=source) from None
    except UnicodeDecodeError:
        raise ConfigError("config file is not UTF-8 text", source=source) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"invalid YAML{where}: {problem}", source=source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping of keys to values at the top level, got {type(data).__name__}", source=source
        )
    return data


def _with_overrides(schema: type, data: Mapping, overrides: Sequence[str]) -> dict:
    """A copy of `data` with each override's text placed at its dotted key (checked against schema)."""
    data = dict(data)
    for text in overrides:
        source = f"override {text!r}"
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("expected key=value, e.g. 'sampling.temperature=0.7'", source=source)
        node, section, names = data, schema, key.split(".")
        for depth, name in enumerate(names):
            path = ".".join(names[: depth + 1])
            hints = _field_types(section)
            if name not in hints:
                raise _unknown_key(path, hints, source)
            if depth == len(names) - 1:
                node[name] = _Override(value, source)
                break
            if _is_dict_type(hints[name]) and depth == len(names) - 2:  # one entry of a dict field
                child = node.get(name)
                node[name] = {**(dict(child) if isinstance(child, Mapping) else {}), names[-1]: _Override(value, source)}
                break
            section = _section_type(hints[name])
            if section is None:
                raise ConfigError(
                    f"is a {_type_name(hints[name])}, not a section; set it with '{path}=...'", key=path, source=source
                )
            child = node.get(name)
            node[name] = node = dict(child) if isinstance(child, Mapping) else {}
    return data


# ----------------------------------------------------------------------------- building


def _build(schema: type[T], data: Mapping, path: str, source: str) -> T:
    """Checks and converts `data` for every field of `schema`, then constructs it."""
    if not isinstance(data, Mapping):
        problem = f"expected a mapping of {schema.__name__} keys, got {data!r}"
        raise ConfigError(problem, key=path or None, source=source)
    hints = _field_types(schema)
    for name in data:
        if name not in hints:
            raise _unknown_key(_join(path, name), hints, source)
    kwargs = {}
    for field in dataclasses.fields(schema):
        if field.name not in data:
            continue
        value, default = data[field.name], _default(field)
        if isinstance(value, Mapping) and _is_dataclass_type(type(default)):
            value = _deep_merge(to_dict(default), value)  # a partial section overrides the default's values
        elif isinstance(value, Mapping) and isinstance(default, Mapping):
            value = {**_plain(default), **value}  # a dict field: the given entries update the default's
        kwargs[field.name] = _convert(hints[field.name], value, _join(path, field.name), source)
    required = [f.name for f in dataclasses.fields(schema)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [_join(path, name) for name in required if name not in kwargs]
    if missing:
        raise ConfigError(
            f"missing required key(s) {', '.join(map(repr, missing))}; set them in the YAML file or with "
            f"an override such as '{missing[0]}=...'",
            source=source,
        )
    try:
        return schema(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a check in the schema's __post_init__
        overrides = ", ".join(dict.fromkeys(_override_sources(data)))
        source = f"{source} with {overrides}" if overrides else source
        raise ConfigError(str(e), key=path or None, source=source) from None


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """`value` (a YAML/Python value, or an _Override's text) as type `tp`, or ConfigError."""
    if isinstance(value, _Override):
        return _convert_text(tp, value.text, key, value.source)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return _convert(members[0], value, key, source)
        for member in members:
            try:
                return _convert(member, value, key, source)
            except ConfigError:
                pass
    elif origin is Literal:
        for allowed in args:  # compare types too: True == 1, but True is no Literal[1]
            if value == allowed and type(value) is type(allowed):
                return allowed
        raise ConfigError(f"expected one of {', '.join(map(repr, args))}, got {value!r}", key=key, source=source)
    elif origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, (list, tuple)):
            return (origin or tp)(_convert_items(tp, value, key, source))
    elif origin is dict or tp is dict:
        if isinstance(value, Mapping):
            key_type, value_type = args or (Any, Any)
            return {_convert(key_type, k, key, source): _convert(value_type, v, _join(key, k), source)
                    for k, v in value.items()}
    elif _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, key, source)
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and value in tp.__members__:
            return tp[value]
        for member in tp:
            if value == member.value and type(value) is type(member.value):
                return member
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is Any:
        return value
    else:
        raise TypeError(f"{key}: field type {tp!r} is not supported by compress.config")
    raise ConfigError(
        f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})", key=key, source=source
    )


def _convert_text(tp: Any, text: str, key: str, source: str) -> Any:
    """An override's text as type `tp`: read as YAML, with the command-line allowances above."""
    word = text.strip().lower()
    if typing.get_origin(tp) in (Union, types.UnionType):
        if word in _NONE_WORDS and type(None) in typing.get_args(tp):
            return None
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return _convert_text(members[0], text, key, source)
    if tp is bool and word in _BOOL_WORDS:
        return _BOOL_WORDS[word]
    if tp is str:
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError:
            return text
        return value if isinstance(value, str) else text
    if _is_dataclass_type(tp):
        first = dataclasses.fields(tp)[0].name
        raise ConfigError(f"is a section; set its keys one at a time, e.g. '{key}.{first}=...'", key=key, source=source)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if text.strip() in (member.name, str(member.value)):
                return member
    if typing.get_origin(tp) is Literal:
        for allowed in typing.get_args(tp):
            if isinstance(allowed, str) and text.strip() == allowed:
                return allowed
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        problem = f"cannot read {text!r} as YAML: {getattr(e, 'problem', e)}"
        raise ConfigError(problem, key=key, source=source) from None
    return _convert(tp, value, key, source)


def _convert_items(tp: Any, items: Sequence, key: str, source: str) -> list:
    """Converts the items of a tuple[X, ...], tuple[X, Y], list[X] (or bare tuple/list) value."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        if len(items) != len(args):
            raise ConfigError(
                f"expected {_type_name(tp)} ({len(args)} items), got {list(items)!r}", key=key, source=source
            )
        item_types = args
    else:
        item_types = [args[0] if args else Any] * len(items)
    return [_convert(t, v, f"{key}[{i}]", source) for i, (t, v) in enumerate(zip(item_types, items))]


# ----------------------------------------------------------------------------- small pieces


def _field_types(schema: type) -> dict[str, Any]:
    """{field name: resolved type} of the fields a config sets (those in __init__)."""
    try:
        hints = typing.get_type_hints(schema)
    except NameError as e:
        raise TypeError(f"cannot resolve the field types of {schema.__name__} ({e}); define the schema "
                        "and the classes it names at module level") from None
    return {f.name: hints[f.name] for f in dataclasses.fields(schema) if f.init}


def _section_type(tp: Any) -> type | None:
    """The dataclass a field holds (also through `X | None`), or None for a plain value."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = members[0] if len(members) == 1 else None
    return tp if _is_dataclass_type(tp) else None


def _is_dict_type(tp: Any) -> bool:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_is_dict_type(a) for a in typing.get_args(tp))
    return tp is dict or typing.get_origin(tp) is dict


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _unknown_key(key: str, hints: Mapping[str, Any], source: str) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(str(name), list(hints), n=1)
    hint = f"did you mean '{_join(key.rpartition('.')[0], close[0])}'? " if close else ""
    return ConfigError(f"unknown key; {hint}valid keys here: {', '.join(hints)}", key=key, source=source)


def _type_name(tp: Any) -> str:
    """A readable name for a field type: 'int | None', "one of 'a', 'b'", 'tuple[int, ...]'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return f"one of {', '.join(map(repr, args))}"
    if origin in (tuple, list):
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "a mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"{tp.__name__} (one of {', '.join(tp.__members__)})"
    if _is_dataclass_type(tp):
        return f"a {tp.__name__} section (a mapping)"
    return getattr(tp, "__name__", repr(tp))


def _plain(value: Any) -> Any:
    if _is_dataclass_type(type(value)):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _deep_merge(base: dict, top: Mapping) -> dict:
    merged = dict(base)
    for name, value in top.items():
        both_sections = isinstance(value, Mapping) and isinstance(merged.get(name), Mapping)
        merged[name] = _deep_merge(merged[name], value) if both_sections else value
    return merged


def _override_sources(data: Any) -> list[str]:
    if isinstance(data, _Override):
        return [data.source]
    if isinstance(data, Mapping):
        return [s for value in data.values() for s in _override_sources(value)]
    return []


def _join(path: str, name: Any) -> str:
    return f"{path}.{name}" if path else str(name)


# ----------------------------------------------------------------------------- command lines


CONFIG_PREFIX = "config:"  # argparse dest of a flag that sets a config key


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")  # key=value (a dotted key, then '=')


def add_config_arguments(parser, schema: type, *, positional: str | None = None) -> "ConfigFlags":
    """Give a command's parser the typed config: `[CONFIG.yaml] [key=value ...]` positionals and
    `--config PATH`. Returns a ConfigFlags to declare shorthand flags for config keys with.

    positional: a config key that a bare word on the command line sets (e.g. 'question' for
    `press ask ... "What is X?"`); a YAML file must then end in .yaml or .yml.
    A command line reads as: the dataclass defaults, then the YAML file, then the flags, then
    the key=value overrides. `config_from_args` builds the config.
    """
    example = positional or next((f.name for f in dataclasses.fields(schema) if f.init), "key")
    words = f"[CONFIG.yaml] [{positional.upper()}] [key=value]" if positional else "[CONFIG.yaml] [key=value]"
    parser.add_argument("config_args", nargs="*", metavar=words,
                        help=f"a YAML file of {schema.__name__} values, then overrides such as {example}=... "
                             "(dotted keys for sections)" + (f"; a bare word is the {positional}" if positional else ""))
    parser.add_argument("--config", dest="config_file", metavar="CONFIG.yaml", help="the YAML file (as a flag)")
    parser.set_defaults(config_schema=schema, config_positional=positional)
    return ConfigFlags(parser, schema, argparse.SUPPRESS)


@dataclasses.dataclass
class ConfigFlags:
    """Declares flags that are shorthands for config keys (their defaults stay in the dataclass)."""

    parser: Any
    schema: type
    _suppress: Any

    def flag(self, *names: str, key: str, help: str = "", **kwargs) -> None:
        """`--flag VALUE` sets config key `key` (dotted for sections); the help shows the default."""
        default = default_of(self.schema, key)
        shown = ("" if kwargs.get("action") in ("store_true", "store_false") or default is dataclasses.MISSING
                 else f" (default: {default!r})")
        if kwargs.get("action") not in ("store_true", "store_false"):
            kwargs.setdefault("metavar", key.rsplit(".", 1)[-1].upper())
        self.parser.add_argument(*names, dest=CONFIG_PREFIX + key, default=self._suppress,
                                 help=f"{help}{shown}", **kwargs)


def default_of(schema: type, key: str) -> Any:
    """The default of dotted `key` in `schema` (dataclasses.MISSING for a required key)."""
    value: Any = schema
    for name in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(value)}
        if name not in fields:
            raise KeyError(f"{getattr(schema, '__name__', schema)} has no key {key!r}")
        field = fields[name]
        if isinstance(value, type):
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                return dataclasses.MISSING
            value = _default(field)
        else:
            value = getattr(value, name)
    return value


def split_config_args(words: Sequence[str], positional: str | None = None) -> tuple[str | None, list[str]]:
    """(YAML path or None, key=value overrides) of a command's positional words.

    Words like key=value are overrides. Without `positional`, the first other word is the YAML
    file. With it, a word ending in .yaml/.yml is the file and one other word sets `positional`.
    """
    path, overrides, free = None, [], []
    for word in words:
        if _OVERRIDE.match(word):
            overrides.append(word)
        elif path is None and (positional is None or word.lower().endswith((".yaml", ".yml"))) and not overrides:
            path = word
        else:
            free.append(word)
    if free and positional and len(free) == 1:
        return path, [f"{positional}={_as_yaml(free[0])}", *overrides]
    if free:
        expected = f"[CONFIG.yaml] [{positional.upper()}] [key=value ...]" if positional else "[CONFIG.yaml] [key=value ...]"
        raise ConfigError(f"unexpected word(s) {', '.join(map(repr, free))} on the command line; it reads {expected}")
    return path, overrides


def config_from_args(args, schema: type[T] | None = None, extra_overrides: Sequence[str] = ()) -> T:
    """The typed config of a parsed command line (see add_config_arguments).

    extra_overrides: key=value text the command derives itself, applied after the flags.
    """
    schema = schema or args.config_schema
    path, overrides = split_config_args(getattr(args, "config_args", ()), getattr(args, "config_positional", None))
    file_flag = getattr(args, "config_file", None)
    if path and file_flag:
        raise ConfigError(f"two config files: {file_flag} (--config) and {path}; give one")
    flags = [f"{dest[len(CONFIG_PREFIX):]}={_as_yaml(value)}" for dest, value in vars(args).items()
             if dest.startswith(CONFIG_PREFIX)]
    return load(schema, path or file_flag, [*flags, *extra_overrides, *overrides])


def _as_yaml(value: Any) -> str:
    """A parsed value as override text that reads back as the same value. Strings are written as
    YAML's own double-quoted scalars: JSON's spelling leaves DEL, C1 controls, U+FFFF and lone
    surrogates bare, which YAML's reader refuses (a query then kept its JSON quotes) or folds
    (NEL became a space)."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return yaml.dump(value, Dumper=_Dumper, allow_unicode=True, default_flow_style=True, default_style='"',
                         width=float("inf")).strip()
    return json.dumps(value, ensure_ascii=False)
