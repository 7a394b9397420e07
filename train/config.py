"""YAML recipes -> typed (nested) dataclasses, with `key=value` overrides from the command line.

    cfg = load_config("configs/lora.yaml", TrainConfig, ["optim.lr=1e-4", 'data.trigger="sks style"'])
    header["adapterkit.config"] = json.dumps(to_dict(cfg))     # the config travels with its output

Rules:
- Every key must be a field: an unknown one fails with its dotted path and the closest valid name
  (`data.resolutoin: unknown key; did you mean 'resolution'?`). Duplicate YAML keys fail too (PyYAML
  would keep the last one silently). A field without a default is required.
- Values are checked against the field annotation: int, float, bool, str, pathlib.Path,
  Optional[...] / `X | None`, Literal[...] (the choices are named in the error), tuple/list of a
  type, dict[str, ...], and nested dataclasses. The error names the key, the value and the type.
- Overrides are typed from the same annotation, not guessed from the text: `data.trigger=no` is the
  string "no", `flip=yes` the bool True, `sizes=512,768` or `sizes=[512, 768]` a tuple,
  `x=null` / `none` / `~` is None for an Optional field. Quotes around a string are removed.
- A float field accepts `1e-4`, which PyYAML (YAML 1.1) reads as a string; an int field accepts an
  integral float (`1e4`, `1000.0`) and refuses `1.5`. A str field refuses numbers and bools: YAML
  turns `trigger: no` into False, so the error says to quote it.
- The dataclass's own `__post_init__` checks run last; their errors get the section's path.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~"}


class ConfigError(ValueError):
    """A config that does not fit its dataclasses; the message names the dotted key."""


def load_config(source: str | os.PathLike | Mapping[str, Any], cls: type[T],
                overrides: Sequence[str] = ()) -> T:
    """Build `cls` from a YAML file (or an already-parsed mapping), then apply `key=value` overrides."""
    if isinstance(source, Mapping):
        data, where = _copy(source), ""
    else:
        data, where = _read_yaml(Path(source)), f"{source}: "
    if not isinstance(data, dict):
        raise ConfigError(f"{where}the top level must be a mapping of keys, got {type(data).__name__}")
    for item in overrides:
        _apply_override(data, cls, item)
    try:
        return _build(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def to_dict(cfg: Any) -> Any:
    """Dataclasses -> plain dicts/lists/scalars (JSON and YAML safe); load_config reads it back."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    return cfg


def to_yaml(cfg: Any) -> str:
    """The config as a YAML recipe, fields in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


# -- reading --------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return {} if data is None else data   # an empty recipe means "all defaults"


def _copy(data: Any) -> Any:
    """Deep copy of plain containers: never mutate the caller's mapping."""
    if isinstance(data, Mapping):
        return {k: _copy(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_copy(v) for v in data]
    return data


# -- building -------------------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _unknown(path: str, key: Any, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"{_join(path, key)}: unknown key; {hint}")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _build(cls: type, data: Any, path: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of {cls.__name__} keys, "
                          f"got {type(data).__name__} {data!r}")
    fields = _fields(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError("\n".join(str(_unknown(path, k, list(fields))) for k in unknown))
    kwargs, missing = {}, []
    for name, (f, tp) in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], tp, _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(_join(path, name))
    if missing:
        raise ConfigError("; ".join(f"{p}: required key is missing" for p in missing))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:   # the dataclass's own checks
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (tuple, list, Sequence) and args:
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"list of {_type_name(args[0])}"
    if origin in (dict, Mapping):
        return f"mapping of {_type_name(args[1])}" if args else "mapping"
    return getattr(tp, "__name__", str(tp))


def _bad(path: str, value: Any, tp: Any, why: str = "") -> ConfigError:
    return ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}{why}")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """A parsed YAML value checked (and, where lossless, converted) against annotation `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else _bad(path, value, tp)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise _bad(path, value, tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _bad(path, value, tp, f" ({len(value)} items)")
            items = [_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            items = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _bad(path, value, tp)
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, f"{path} key"): _coerce(v, vt, _join(path, k)) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _bad(path, value, tp, " (use true/false)")
    if tp is int:
        if isinstance(value, str):
            value = _number(value, path, tp)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad(path, value, tp)
    if tp is float:
        if isinstance(value, str):
            value = _number(value, path, tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad(path, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(path, value, tp, " (quote it in YAML)")
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _bad(path, value, tp)
    raise ConfigError(f"{path}: field type {tp!r} is not supported by the config loader")


def _number(text: str, path: str, tp: type) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{path}: cannot read {text!r} as {tp.__name__}") from None


# -- overrides ------------------------------------------------------------------------------------


def _apply_override(data: dict, cls: type, item: str) -> None:
    """Put one `dotted.key=value` into the raw dict, typed by the field it names."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
    parts = key.split(".")
    node, tp, path = data, cls, ""
    for i, part in enumerate(parts):
        tp = _unwrap_optional(tp)
        if dataclasses.is_dataclass(tp):
            fields = _fields(tp)
            if part not in fields:
                raise _unknown(path, part, list(fields))
            tp = fields[part][1]
        elif typing.get_origin(tp) in (dict, Mapping):
            tp = (typing.get_args(tp) or (Any, Any))[1]
        else:
            raise ConfigError(f"{key}: {path} is a {_type_name(tp)} value, not a section")
        path = _join(path, part)
        if i == len(parts) - 1:
            node[part] = _parse_text(text, tp, path)
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _parse_text(text: str, tp: Any, path: str) -> Any:
    """Command-line text -> a value for `_coerce`, read the way the field's type asks."""
    raw = text.strip()
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and raw.lower() in _NONE:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(_parse_text(text, a, path), a, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: cannot read {text!r} as {_type_name(tp)}")
    if origin is Literal:
        for choice in args:
            try:
                if _coerce(_parse_text(text, type(choice), path), type(choice), path) == choice:
                    return choice
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {raw!r} is not one of {', '.join(repr(a) for a in args)}")
    if dataclasses.is_dataclass(tp) or origin in (dict, Mapping):
        return _yaml_value(raw, path)
    if origin in (tuple, list, Sequence):
        if raw.startswith("["):
            return _yaml_value(raw, path)
        items = [] if not raw else raw.split(",")
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        types_ = args if fixed else [args[0] if args else Any] * len(items)
        if fixed and len(items) != len(args):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {len(items)} items from {text!r}")
        return [_parse_text(s, a, f"{path}[{i}]") for i, (s, a) in enumerate(zip(items, types_))]
    if tp is str:
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
            return raw[1:-1]
        return raw
    if tp is bool:
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"{path}: cannot read {text!r} as bool (true/false/yes/no/1/0)")
    if tp in (int, float):
        value = _number(raw, path, tp)
        return _coerce(value, tp, path) if tp is float else _int_or_fail(value, text, path)
    if tp is Any:
        return _yaml_value(raw, path)
    return raw   # Path and the like: _coerce decides


def _int_or_fail(value: int | float, text: str, path: str) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{path}: cannot read {text!r} as int")
    return int(value)


def _yaml_value(text: str, path: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot read {text!r} as YAML: {e}") from None
