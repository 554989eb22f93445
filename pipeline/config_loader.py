"""The one typed loader behind every settings file: training configs, cluster profiles, study specs.

A frozen dataclass declares the keys, their types and their defaults (each default written once,
as the field's default). `from_mapping(cls, values)` builds an instance from plain YAML/JSON
values: unknown keys and wrong types are refused with the dotted key in the message, and values
are converted only where lossless (int → float, list → tuple); a list, mapping or section given as
null (a YAML key with nothing under it) is empty. `load_yaml_mapping(path)` reads a
file through a YAML loader bounded in size and aliases. Callers put where the values came from
(the file, a `--set` override) in front of the messages, and add their own range checks.

    raw = load_yaml_mapping(path, what="cluster profile")
    profile = from_mapping(ClusterProfile, raw)   # ConfigError "nodes: expected an integer, ..."
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


MAX_YAML_BYTES = 1 << 20  # a config or profile is a few KB; more is a mistake or an attack
MAX_YAML_ALIASES = 64  # anchors for reuse are fine; thousands are an alias bomb
MAX_SHOWN_CHARS = 120  # of a value echoed in an error message

# field(metadata=NOT_A_KEY): a dataclass field the program sets, which no file may name
NOT_A_KEY = {"config_key": False}


def shown(value: Any) -> str:
    """`repr(value)`, cut to a readable length for an error message."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


# --------------------------------------------------------------------------- YAML


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents with more than MAX_YAML_ALIASES aliases.

    Hand-written (PyYAML has no such limit): a 1 KB "billion laughs" document of nested
    aliases expands to gigabytes once anything walks or prints it.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name): refused")
        return super().compose_node(parent, index)


def load_yaml_file(path: str | Path, what: str = "config") -> Any:
    """A YAML file's content, bounded in size and aliases; ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {size} bytes; a {what} file is at most {MAX_YAML_BYTES} bytes")
    try:
        return yaml.load(path.read_text(), Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {shown(str(exc))}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None


def load_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    loaded = load_yaml_file(path, what)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return loaded


# --------------------------------------------------------------------------- typed building


_EXPECTED = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _expected(annotation: Any) -> str:
    """What a value of `annotation` looks like, in words: "an integer", "a list of strings", ..."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        item = _expected(typing.get_args(annotation)[0])
        return f"a list of {item.removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return "a mapping"
    if origin in (typing.Union, types.UnionType):
        words = [_expected(option) for option in typing.get_args(annotation)]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    return _EXPECTED.get(annotation, str(annotation))


def _refuse(path: str, annotation: Any, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {_expected(annotation)}, got {type(value).__name__} {shown(value)}")


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """Check `value` against a type annotation, converting only where lossless (int → float, list → tuple)."""
    origin = typing.get_origin(annotation)
    if value is None and (origin in (tuple, dict) or dataclasses.is_dataclass(annotation)):
        value = {} if origin is not tuple else ()  # a key with nothing under it: empty
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise _refuse(path, annotation, value)
        return from_mapping(annotation, value, path)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{path}: {shown(value)} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise _refuse(path, annotation, value)
        return tuple(_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise _refuse(path, annotation, value)
        return {
            _coerce(k, key_type, f"{path} key"): _coerce(v, value_type, f"{path}.{k}")
            for k, v in value.items()
        }
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, path)
            except ConfigError:
                continue
        raise _refuse(path, annotation, value)
    if annotation is type(None):
        if value is not None:
            raise _refuse(path, annotation, value)
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise _refuse(path, annotation, value)
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _refuse(path, annotation, value)
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _refuse(path, annotation, value)
        if not math.isfinite(value):
            raise ConfigError(f"{path}: {value} is not a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise _refuse(path, annotation, value)
        return value
    raise ConfigError(f"{path}: unsupported annotation {annotation}")  # pragma: no cover


def config_keys(cls: type) -> list[str]:
    """The keys a file may hold for dataclass `cls`, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("config_key", True)]


def from_mapping(cls: type[T], values: dict[str, Any], path: str = "") -> T:
    """An instance of dataclass `cls` from plain values; missing keys take the field defaults.

    ConfigError "KEY: what is wrong" (KEY dotted below `path`) for an unknown key, a missing
    required key or a value of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    known = config_keys(cls)
    prefix = f"{path}." if path else ""
    unknown = sorted(str(k) for k in set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{prefix}{shown(unknown[0]).strip(chr(39))}: unknown key (known: {', '.join(known)})"
        )
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in values:
            raise ConfigError(f"{prefix}{f.name}: missing (a required key)")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in values.items()}
    return cls(**kwargs)


def to_plain(value: Any) -> Any:
    """A dataclass instance as plain nested dicts/lists (YAML-, JSON- and checkpoint-safe)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- dotted overrides


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value` into the dotted key and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=0.05")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {shown(text)}: cannot parse value: {shown(str(exc))}") from None
    return key, value


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree[a][b] = value for `dotted` = "a.b", creating sections on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or a section with nothing under it
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value
