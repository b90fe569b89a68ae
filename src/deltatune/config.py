"""Base config dataclass: strict JSON/YAML round trip and ``key=value`` overrides.

Every deltatune config (a method's, the trainer's, a whole run's) is a dataclass deriving from
:class:`BaseConfig`. Reading one is strict: an unknown key is a :class:`ConfigError` that names
the key, where it was, and the nearest valid key; a value of the wrong type names the field,
the value and the type it needs. Field names follow Hugging Face PEFT where PEFT has the field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

import yaml

from deltatune.errors import ConfigError, did_you_mean

C = TypeVar("C", bound="BaseConfig")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise a ConfigError naming ``where``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1 and isinstance(value, Mapping):
            # `X | None`: the error about X itself (e.g. a nested unknown key) is the useful one.
            return _coerce(value, non_null[0], where)
        errors = []
        # Try exact-type matches first so that "3" stays a str in `str | int`.
        for arg in sorted(
            args, key=lambda a: 0 if isinstance(a, type) and isinstance(value, a) else 1
        ):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}: value {value!r} is not {_type_name(tp)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{where}: value {value!r} is not one of {', '.join(map(repr, allowed))}"
                + did_you_mean(str(value), [str(a) for a in allowed])
            )
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            # `key=a,b` on the command line, or a single item where a list is expected.
            value = [v.strip() for v in value.split(",")] if isinstance(value, str) else [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: value {value!r} is not a list")
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: value {value!r} is not a mapping")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()
        }
    if isinstance(tp, type) and issubclass(tp, BaseConfig):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return tp.from_dict(value, where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: value {value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: value {value!r} is not an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: value {value!r} is not a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: value {value!r} is not a string")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: value {value!r} is not {_type_name(tp)}")
    return value


@dataclasses.dataclass
class BaseConfig:
    """A strict, typed, serialisable config. Subclasses are plain dataclasses."""

    #: Keys accepted on read and dropped (e.g. derived fields written for readers' benefit).
    ignored_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, where: str = "") -> C:
        """Build from a mapping; unknown keys and wrong types raise :class:`ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
        types_ = cls.field_types()
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in cls.ignored_keys:
                continue
            if key not in types_:
                place = f" in {where}" if where else f" for {cls.__name__}"
                raise ConfigError(
                    f"unknown config key '{key}'{place}"
                    + did_you_mean(str(key), types_)
                    + f" (valid keys: {', '.join(sorted(types_))})"
                )
            field_where = f"{where}.{key}" if where else key
            kwargs[key] = _coerce(value, types_[key], field_where)
        try:
            return cls(**kwargs)  # __post_init__ validates
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"{where or cls.__name__}: {exc}") from None

    def __post_init__(self) -> None:
        # Validate on every construction path: from_dict, YAML, and plain Python calls.
        self.validate()

    def validate(self) -> None:
        """Check values; subclasses raise :class:`ConfigError` naming the field and the fix."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if isinstance(value, BaseConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def replace(self: C, **changes: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_file(cls: type[C], path: str | Path) -> C:
        """Read a ``.json`` or ``.yaml``/``.yml`` file (YAML with the safe loader)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        text = p.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(
                f"config file '{p}' is not valid {p.suffix[1:].upper()}: {exc}"
            ) from None
        return cls.from_dict(data or {}, where=p.name)


def read_config_mapping(path: str | Path, holds: str) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; ``holds`` completes the error for a file
    whose top level is not a mapping (``"a mapping of sections (model, data, ...)"``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        user = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"config file '{p}' must hold {holds}")
    return user


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], value); the value is read as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a nested dict (validation happens in from_dict)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data
