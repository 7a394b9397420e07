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
- Every number is checked against `RANGES`, the allowed values of each recipe field by name (one
  name means one thing in every section: `steps` >= 1, `*_every` >= 0 with 0 = off, ...), and a
  float must be finite. Fields in `FILE_NAMES` (`output.name`, `model.scheduler`) must be plain file
  names: no folder separators, no `..`, so an output cannot land outside its folder.
- Untrusted YAML is bounded: at most `MAX_RECIPE_BYTES`, `MAX_ALIASES` aliases and `MAX_NODES` nodes
  once the aliases are expanded (a 671-byte alias bomb expands to gigabytes), and error messages show
  values shortened, never expanded in full.
- The dataclass's own `__post_init__` checks run last; their errors get the section's path.

One coherent thing over 450 lines: the recipe loader (YAML limits, overrides, types, ranges);
its parts share the path-naming of every error.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~"}


class ConfigError(ValueError):
    """A config that does not fit its dataclasses; the message names the dotted key."""


MAX_RECIPE_BYTES = 1 << 20         # recipes are a few KB; a bigger file is not one
MAX_ALIASES = 100                  # YAML `*name` references in one document
MAX_NODES = 100_000                # scalars + lists + mappings after the aliases are expanded


@dataclass(frozen=True)
class Range:
    """The allowed values of a number: low <= x <= high, with `open` ends excluded; `note` says what
    an edge value means ("0 = off")."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, x: float) -> bool:
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        return self.high is None or (x < self.high or (not self.high_open and x == self.high))

    def __str__(self) -> str:
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        text = " and ".join(t for t in (low, high) if t) or "any finite number"
        return text + (f" ({self.note})" if self.note else "")


_COUNT = Range(1)
_POSITIVE = Range(0, low_open=True)
_FRACTION = Range(0, 1, high_open=True)
_SEED = Range(0, 2**63 - 1)
_FINITE = Range()

# Every numeric field of the recipes, by field name: what values make sense. A tuple field's range
# applies to each item. tests/train/test_config_ranges.py checks that every numeric recipe field is here.
RANGES: dict[str, Range] = {
    # counts and sizes
    "steps": _COUNT, "batch_size": _COUNT, "grad_accum": _COUNT, "rank": _COUNT, "conv_rank": _COUNT,
    "control_lora_rank": _COUNT, "train_rank": _COUNT, "resolution": _COUNT, "bucket_step": _COUNT,
    "min_bucket_side": _COUNT, "max_bucket_side": _COUNT, "min_side": _COUNT, "max_pixels": _COUNT,
    "image_size": _COUNT, "pixel_patch": _COUNT, "channels": _COUNT, "text_layers": _COUNT,
    "text_width": _COUNT, "text_heads": _COUNT, "num_hints": _COUNT,
    # intervals and amounts where 0 means "none"
    "checkpoint_every": Range(0, note="0 = only at the end"), "every": Range(0, note="0 = only at the end"),
    "log_every": Range(0, note="the trackers get the loss every N steps and at the last; 0 = the last only"),
    "keep_checkpoints": Range(0, note="0 = keep all"), "warmup_steps": Range(0),
    "stop_after_steps": Range(0, note="0 = trains to the end"),
    "pool_size": Range(0, note="0 = render every image online"), "workers": Range(0),
    "hint_cache_mb": Range(0, note="0 = no cache"), "cache_memory_mb": Range(0, note="0 = disk only"),
    "seed": _SEED, "seeds": _SEED, "factor": Range(-1, note="-1 = LoKr's near-square split"),
    "min_bucket_area": Range(0, 1, low_open=True, note="a fraction of resolution**2"),
    # rates, weights and scales
    "lr": Range(0), "lr_end": Range(0), "power": _POSITIVE, "restarts": _COUNT,
    "weight_decay": Range(0), "eps": _POSITIVE, "betas": _FRACTION,
    "max_grad_norm": Range(0, note="0 = no clipping"), "min_snr_gamma": _POSITIVE, "noise_offset": Range(0),
    "alpha": _POSITIVE, "conv_alpha": _POSITIVE, "loraplus_lr_ratio": _POSITIVE, "dropout": _FRACTION,
    "caption_dropout": Range(0, 1),
    "tag_dropout": Range(0, 1), "keep_tokens": Range(0, note="0 = every tag may move"),
    "ema_decay": _FRACTION, "guidance": Range(0), "conditioning_scale": _POSITIVE,
    "canny_low": Range(0), "canny_high": Range(0), "alpha_background": Range(0, 255),
    "lora_scales": _FINITE, "control_scales": _FINITE,
    # data.datasets entries (train/data/entries.py)
    "repeats": _COUNT, "weight": Range(0, low_open=True, note="the entry's share: weight / sum of weights"),
    "prior_loss_weight": Range(0, note="0 = regularisation pictures give no gradient"),
    "fraction": Range(0, 1, high_open=True, note="0 = no held-out share"), "timesteps": Range(0),
    "patience": Range(0, note="0 = never stop early"), "min_delta": Range(0),
    "decay": Range(0, 1, high_open=True, note="the EMA's; 0.999 averages over ~1000 steps"),
    # timestep sampling (train/pipeline/schedule.py TimestepSampling)
    "min_timestep": Range(0), "max_timestep": Range(1, note="exclusive; None = the schedule's T"),
    "logit_mean": _FINITE, "logit_std": _POSITIVE,
    "mode_scale": Range(-1, 2 / (math.pi - 2), note="where f_mode is monotone"),
}

# Fields that name a file inside a folder the program chooses; they must not lead out of it.
FILE_NAMES = {"name": "the file name of the outputs", "scheduler": "a file in configs/schedulers/"}


# Recipe keys that name something to read. A relative one written in a recipe file that is not found
# from the working directory is looked for beside the recipe, then (`assets/...`, `configs/...`) in the
# bundled data folders, so a recipe works from any directory. Outputs (`output.dir`) stay relative to
# the working directory; command-line overrides are taken as given.
INPUT_PATHS = ("model.base", "model.tokenizer", "model.config_dir", "data.root", "data.validation.folder",
               "control.folder", "control.lora")          # and each data.datasets[i].root
BUNDLED = ("assets", "configs")


def load_config(source: str | os.PathLike | Mapping[str, Any], cls: type[T],
                overrides: Sequence[str] = ()) -> T:
    """Build `cls` from a YAML file (or an already-parsed mapping), then apply `key=value` overrides."""
    if isinstance(source, Mapping):
        data, where = _copy(source), ""
    else:
        data, where = _read_yaml(Path(source)), f"{source}: "
    if not isinstance(data, dict):
        raise ConfigError(f"{where}the top level must be a mapping of keys, got {type(data).__name__}")
    if not isinstance(source, Mapping):
        _resolve_inputs(data, Path(source).parent)
    for item in overrides:
        _apply_override(data, cls, item)
    try:
        return _build(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def _resolve_inputs(data: dict, recipe_dir: Path) -> None:
    for key in INPUT_PATHS:
        *sections, name = key.split(".")
        values = data
        for section in sections:
            values = values.get(section) if isinstance(values, dict) else None
        if isinstance(values, dict) and isinstance(values.get(name), str):
            values[name] = resolve_input(values[name], recipe_dir)
    data_section = data.get("data")
    entries = data_section.get("datasets") if isinstance(data_section, dict) else None
    for entry in entries if isinstance(entries, list) else ():     # data.datasets[i].root
        if isinstance(entry, dict) and isinstance(entry.get("root"), str):
            entry["root"] = resolve_input(entry["root"], recipe_dir)


def resolve_input(value: str, recipe_dir: Path) -> str:
    """`value` (a path, or `path:weight` as control.lora takes it) as found from the working directory,
    else beside the recipe, else in the bundled data folders; unchanged when none has it."""
    from adapterkit.train.paths import data_dir
    path, sep, weight = value.rpartition(":")
    if not (sep and _is_number(weight)):
        path, sep, weight = value, "", ""
    p = Path(path)
    if not path or p.is_absolute() or p.exists():
        return value
    candidates = [recipe_dir / p]
    if p.parts[0] in BUNDLED:
        candidates.append(data_dir(p.parts[0]).joinpath(*p.parts[1:]))
    found = next((c for c in candidates if c.exists()), None)
    return value if found is None else f"{found}{sep}{weight}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
    """PyYAML's safe loader (plain data, no Python objects) that refuses duplicate keys and counts
    aliases."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases (*name): recipes need a few at most",
                    self.peek_event().start_mark)
        return super().compose_node(parent, index)

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
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give the recipe's .yaml file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path} is over {MAX_RECIPE_BYTES // 1024} KiB: too large to be a recipe "
                          "(they are a few KB); check that CONFIG names the YAML recipe")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    data = _safe_yaml(text, str(path))
    return {} if data is None else data   # an empty recipe means "all defaults"


def _safe_yaml(text: str, where: str) -> Any:
    """YAML -> plain data with the limits above checked on the node graph, before anything is built."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {_clip(str(e), 400)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


def _check_expanded_size(root: yaml.Node, where: str) -> None:
    """Count the nodes the document has once every alias is expanded (an alias shares its anchor's
    node, so the count is a walk of the graph with each shared node's size remembered), without
    expanding anything; refuse a recursive alias or more than MAX_NODES."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = _children(node)
        if finished:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_NODES:
                raise ConfigError(f"{where}: the YAML expands to more than {MAX_NODES:,} values through its "
                                  "aliases (*name): a recipe is far smaller; this looks like an alias bomb")
            continue
        if id(node) in sizes:
            continue
        on_path.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise ConfigError(f"{where}: a YAML alias refers to a value that contains it (line "
                                  f"{child.start_mark.line + 1}); a recipe cannot be recursive")
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _short(value: Any) -> str:
    """repr for a message, at most about a line: never a huge (alias-expanded) value in full."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, 60, 60
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 4
    return _clip(short.repr(value), 120)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


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
                          f"got {type(data).__name__} {_short(data)}")
    fields = _fields(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError("\n".join(str(_unknown(path, k, list(fields))) for k in unknown))
    kwargs, missing = {}, []
    for name, (f, tp) in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], tp, _join(path, name))
            _check_value(name, kwargs[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(_join(path, name))
    if missing:
        raise ConfigError("; ".join(f"{p}: required key is missing" for p in missing))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, ArithmeticError) as e:   # the dataclass's own checks
        raise ConfigError(f"{path or cls.__name__}: {_clip(str(e), 400)}") from None


def _check_value(name: str, value: Any, path: str) -> None:
    """A field's value against RANGES (numbers, also inside lists) and FILE_NAMES."""
    if name in FILE_NAMES and isinstance(value, str):
        if (not value or "/" in value or "\\" in value or value in (".", "..") or "\0" in value
                or len(value) > 200):
            raise ConfigError(f"{path}: {_short(value)} must be a plain file name ({FILE_NAMES[name]}): "
                              "no folders, no '..'")
    items = value if isinstance(value, (list, tuple)) else [value]
    for i, x in enumerate(items):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        where = f"{path}[{i}]" if items is value else path
        if isinstance(x, float) and not math.isfinite(x):
            raise ConfigError(f"{where}: {x} is not a finite number")
        allowed = RANGES.get(name)
        if allowed is not None and x not in allowed:
            raise ConfigError(f"{where}: must be {allowed}, got {_short(x)}")


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
    return ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {_short(value)}{why}")


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
        raise ConfigError(f"{path}: {_short(value)} is not one of {', '.join(repr(a) for a in args)}")
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
    return _safe_yaml(text, f"{path}={_clip(text, 60)}")
