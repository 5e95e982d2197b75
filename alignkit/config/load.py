"""How alignkit reads, checks and describes its dataclass configs: YAML files plus dotted `key=value`
overrides (unknown keys are errors), values coerced to the fields' types, range checks (the `ranges` and
`relations` each config class declares), and `--help` text from the docstring under every field. The configs
themselves are in the other modules of alignkit.config; this module imports none of them.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import json
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from alignkit.io import atomic_write

# Organisational sections a YAML file may group top-level keys under (`train: {lr: ...}` or
# `train.lr=...` on the command line both set `lr`).
SECTION_ALIASES = ("train",)


class _YAML12Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.2): `mixed_precision: no` stays the string 'no'."""


_YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text):
    """YAML 1.2 booleans only (see _YAML12Loader): what alignkit reads config files and values with."""
    return yaml.load(text, Loader=_YAML12Loader)


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, bad value or type."""


# ---------------------------------------------------------------------------------------------------
# Ranges: checked when a config loads (and again when a run starts), so a bad value fails at once, naming
# its key. Each config class declares its own as class attributes, after its fields; a class is checked
# against its own and its bases' (read through its MRO), so a subclass declares only what it adds:
#
#     ranges: ClassVar[dict] = {"field": at_least(1), "mode": ("a", "b")}  # a Range or the accepted values
#     relations: ClassVar[tuple] = (check,)  # across fields: check(cfg) -> a message, or None when it holds
#
# A field whose value is None (an optional setting left unset) or a bool is not range-checked.


@dataclass(frozen=True)
class Range:
    """The numbers a field accepts: an interval (either end open or closed), plus special values."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    """Values accepted outside the interval, e.g. -1 meaning "derive from epochs"."""

    def accepts(self, value) -> bool:
        if value in self.also:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below and not (isinstance(value, float) and math.isnan(value))

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {num(self.low)}"
        elif self.low == -math.inf:
            text = f"{'<' if self.high_open else '<='} {num(self.high)}"
        else:
            brackets = ("(" if self.low_open else "[", ")" if self.high_open else "]")
            text = f"in {brackets[0]}{num(self.low)}, {num(self.high)}{brackets[1]}"
        return text + "".join(f" or {num(v)}" for v in self.also)


def at_least(low: float, *also) -> Range:
    """value >= low (or one of `also`)."""
    return Range(low, also=also)


def above(low: float, *also) -> Range:
    """value > low (or one of `also`)."""
    return Range(low, low_open=True, also=also)


def between(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Range:
    """low <= value <= high (either end open on request)."""
    return Range(low, high, low_open=low_open, high_open=high_open)


FRACTION = between(0, 1)


def range_problems(cfg: Any, prefix: str = "") -> list[str]:
    """Every value of `cfg` (and of its nested settings) outside the `ranges` its class or a base declares,
    and every failed `relations` check, as one message each."""
    problems = []
    for klass in type(cfg).__mro__:
        declared = vars(klass)  # the class's own declarations only: its bases' come in their turn
        for name, rule in declared.get("ranges", {}).items():
            value = getattr(cfg, name, None)
            if value is None or isinstance(value, bool):
                continue
            key = prefix + name
            if isinstance(rule, tuple):
                if value not in rule:
                    problems.append(f"'{key}' must be one of {', '.join(map(str, rule))}, got {value!r}")
            elif not rule.accepts(value):
                problems.append(f"'{key}' must be {rule}, got {value!r}")
        problems += [p for check in declared.get("relations", ()) if (p := check(cfg))]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            problems += range_problems(value, f"{prefix}{f.name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    problems += range_problems(item, f"{prefix}{f.name}[{i}].")
    return problems


def validate(cfg: Any, where: str = "") -> Any:
    """`cfg` itself if every value is in range (see range_problems); else ConfigError listing every one that is not
    (`where` prefixes the keys, e.g. 'rewards[1]')."""
    problems = list(dict.fromkeys(range_problems(cfg, f"{where}." if where else "")))
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it, for `cls` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = nxt.value.value.strip()
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/command-line value to the field's type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"'{key}': expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}': expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}': expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}': expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"'{key}': expected a string, got {value!r}")
        return str(value)
    if origin is list:
        # A YAML list (e.g. `rewards: [{type: vader}, ...]`); each element is checked as its own key.
        if not isinstance(value, list):
            raise ConfigError(f"'{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping of key: value, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        # An element of a list of settings (e.g. one of `constraints: [{type: ..., weight: ...}]`).
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping of key: value, got {value!r}")
        return from_mapping(annotation, value, key)
    return value


def from_mapping(cls: type, mapping: dict, where: str = ""):
    """A `cls` dataclass built from a mapping, with load_config's key and type checks.

    For configs held inside a list (e.g. one reward source of `rewards: [...]`) or a mapping (a sweep's
    `eval:`). An unknown key is an error naming the closest valid one and listing them all. A section (a
    nested dataclass: `generation`) is given as a mapping or by dotted keys, set key by key on `cls`'s own
    defaults for it. `where` names the mapping in messages: 'rewards[1]' gives "rewards[1]: unknown key
    'lable' ..." and "'rewards[1].weight': expected ...".
    """
    cfg = cls()
    names = [f.name for f in dataclasses.fields(cls)]
    hints = _field_types(cls)
    prefix = f"{where}." if where else ""
    for key, value in mapping.items():
        key = str(key)
        head = key.partition(".")[0]
        if (moved := moved_key(cls, head, prefix)) is not None:
            raise moved
        if head not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{where + ': ' if where else ''}unknown key '{key}' for {cls.__name__}.{hint} Valid keys: "
                f"{', '.join(names)}."
            )
        if head != key or (dataclasses.is_dataclass(getattr(cfg, key)) and isinstance(value, dict)):
            _set(cfg, key, value, prefix)  # a section's keys, on the command's defaults for it
            continue
        setattr(cfg, key, _coerce(value, hints[key], prefix + key))
    return validate(cfg, where)


def moved_key(cls: type, key: str, prefix: str = "") -> ConfigError | None:
    """The error for a key that `cls` no longer takes because it moved, or None. A config class declares its
    moved keys as a class attribute, old key -> the key to write now, or (that key, a note):

        moved: ClassVar[dict] = {"temperature": "generation.temperature"}
    """
    new = getattr(cls, "moved", {}).get(key)
    if new is None:
        return None
    new, note = new if isinstance(new, tuple) else (new, "")
    section = f" (a `{new.split('.')[0]}:` section in YAML)" if "." in new else ""
    return ConfigError(f"'{prefix}{key}' moved: write {new}{section}" + (f"; {note}" if note else ""))


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{where}.{hint} Run with --help to list the valid keys.")


def _set(cfg: Any, dotted: str, value: Any, prefix: str = "") -> None:
    """Set `dotted` (e.g. 'lora.r' or 'train.lr') on the dataclass `cfg`, validating key and type."""
    head, _, rest = dotted.partition(".")
    names = [f.name for f in dataclasses.fields(cfg)]
    if head in SECTION_ALIASES and head not in names and rest and not prefix:
        return _set(cfg, rest, value, prefix)
    if head not in names and (moved := moved_key(type(cfg), head, prefix)) is not None:
        raise moved
    if head not in names:
        valid = [prefix + n for n in names] + [
            f"{prefix}{n}.{s.name}"
            for n in names
            if dataclasses.is_dataclass(getattr(cfg, n))
            for s in dataclasses.fields(getattr(cfg, n))
        ]
        raise _unknown_key(prefix + dotted, valid, f" for {type(cfg).__name__}")
    current = getattr(cfg, head)
    if dataclasses.is_dataclass(current):
        if rest:
            return _set(current, rest, value, prefix + head + ".")
        if not isinstance(value, dict):
            raise ConfigError(f"'{prefix}{head}' is a section: give it as a mapping or set {head}.<key>")
        for k, v in value.items():
            _set(current, str(k), v, prefix + head + ".")
        return None
    annotation = _field_types(type(cfg))[head]
    if rest and _takes_mapping(annotation):  # a free-form mapping field (e.g. a judge spec): key by key
        mapping = dict(current or {})
        inner = mapping
        *path, last = rest.split(".")
        for key in path:
            inner[key] = dict(inner.get(key) or {}) if isinstance(inner.get(key), dict | None) else {}
            inner = inner[key]
        inner[last] = value
        setattr(cfg, head, mapping)
        return None
    if rest:
        raise ConfigError(f"'{prefix}{head}' is not a section; '{prefix}{dotted}' is not a valid key")
    setattr(cfg, head, _coerce(value, annotation, prefix + head))
    return None


def _takes_mapping(annotation: Any) -> bool:
    """Whether a field's type is a dict (or a dict or None)."""
    if annotation is dict or typing.get_origin(annotation) is dict:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_mapping(a) for a in typing.get_args(annotation))
    return False


def flatten_settings(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in mapping.items():
        if isinstance(v, dict):
            items.extend(flatten_settings(v, f"{prefix}{k}."))
        else:
            items.append((f"{prefix}{k}", v))
    return items


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """{dotted key: its 1-based line} of a composed YAML mapping node, keyed as `flatten_settings` keys it."""
    lines: dict[str, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key, value in node.value:
        name = f"{prefix}{key.value}"
        lines[name] = key.start_mark.line + 1
        lines.update(_key_lines(value, name + "."))
    return lines


def _apply_file(cfg: Any, path: str | Path) -> None:
    """Set on `cfg` every setting of the YAML file `path` (file, line and key named in errors)."""
    try:
        text = Path(path).read_text()
        data = load_yaml(text) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    lines = _key_lines(yaml.compose(text, Loader=_YAML12Loader))
    for key, value in flatten_settings(data):
        try:
            _set(cfg, key, value)
        except ConfigError as e:
            where = f"{path}:{lines[key]}" if key in lines else str(path)
            raise ConfigError(f"{where}: {e}") from None


def build_config(cls: type, source: Any = None, overrides: dict | None = None):
    """A validated `cls` config for the Python API, with load_config's key, type and range checks.

    source: None (the defaults), a `cls` instance (copied, never changed), a mapping of settings (nested
    sections or dotted keys, as in a YAML file), or the path of a YAML file. overrides: settings applied
    after it, as keyword arguments give them (`max_steps=20`, `lora={"enabled": True}` or
    `**{"lora.r": 8}`); later wins."""
    if isinstance(source, cls):
        cfg = copy.deepcopy(source)
    elif dataclasses.is_dataclass(source):
        raise ConfigError(
            f"expected a {cls.__name__} (or a mapping, or a YAML path), got a {type(source).__name__}"
        )
    else:
        cfg = cls()
        if isinstance(source, (str, Path)):
            _apply_file(cfg, source)
        elif isinstance(source, dict):
            for key, value in flatten_settings(source):
                _set(cfg, key, value)
        elif source is not None:
            raise ConfigError(
                f"expected a {cls.__name__}, a mapping or a YAML path, got {type(source).__name__}"
            )
    for key, value in flatten_settings(overrides or {}):
        _set(cfg, key, value)
    return validate(cfg)


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None):
    """Build a `cls` config from an optional YAML file and `key=value` overrides (later wins)."""
    cfg = cls()
    if path:
        _apply_file(cfg, path)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        _set(cfg, key.strip(), load_yaml(raw) if raw.strip() else "")
    return validate(cfg)


def config_to_dict(cfg: Any) -> dict:
    """The config as plain data (nested dicts)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, output_dir: str | Path) -> Path:
    """Write the resolved config to output_dir/config.yaml (and return the path)."""
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# resolved {type(cfg).__name__}\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write(path, text)


def describe(cls: type) -> str:
    """Help text: every field with its default and docstring; a section's (a nested dataclass: `lora`,
    `generation`, ...) under its own docstring, as `section.key`, at this command's defaults."""
    return "\n".join(_describe_fields(cls(), ""))


def _describe_fields(default: Any, prefix: str) -> list[str]:
    docs = field_docs(type(default))
    lines = []
    for f in dataclasses.fields(default):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"  {prefix}{f.name}.*\n      {docs.get(f.name, '')}")
            lines += _describe_fields(value, f"{prefix}{f.name}.")
            continue
        lines.append(f"  {prefix}{f.name} = {json.dumps(value)}\n      {docs.get(f.name, '')}")
    return lines
