"""Typed configuration: dataclass schemas loaded from YAML, ``_base_`` inheritance, CLI overrides.

A *schema* is any tree of ``@dataclasses.dataclass`` classes (frozen or not); this module knows
nothing about particular schemas. A config is assembled from layers, lowest priority first:

1. ``base``: embedded defaults passed by the caller as a plain nested dict (source ``"defaults"``);
2. a YAML file, after resolving its ``_base_`` chain (source: the file's path); a nested mapping may
   name ``_base_`` files too, loaded as that key's value (paths relative to the including file);
3. ``key.sub=value`` overrides from the command line, in order (source ``"command line override"``).

Layers are deep-merged: mappings merge key by key, while lists and scalars are replaced whole. A
mapping that contains ``_delete_: true`` replaces everything below it instead of merging (as in
mmcv). The merged tree is then checked against the schema in one pass and turned into dataclass
instances, so unknown keys, wrong types, missing required keys and ``__post_init__`` failures all
surface before any work starts, as a one-line :class:`ConfigError` naming the dotted key, where
the value came from, and what would have been accepted.

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``pathlib.Path``, ``Any``,
``X | None`` (and other unions, tried in order), ``Literal[...]``, ``Enum`` subclasses (by value),
``tuple[T, ...]`` / fixed tuples, ``list[T]``, ``dict[K, V]`` / ``Mapping[K, V]`` and nested
dataclasses. Coercion is deliberately strict; see :func:`_scalar` for the few exceptions.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import os
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
]

T = TypeVar("T")

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"
DEFAULTS_SOURCE = "defaults"
SCHEMA_DEFAULTS_SOURCE = "schema defaults"
OVERRIDE_SOURCE = "command line override"

# YAML 1.1 (PyYAML) reads `1e9` and `3e-4` as *strings* because it wants a dot in the mantissa.
# Numeric fields accept exactly this shape of string so configs can say `lr: 3e-4`.
_SCI_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)[eE][+-]?\d+")
# Refuse to materialise absurd integers like 1e1000000 from a typo.
_MAX_SCI_INT_DIGITS = 100
_OVERRIDE_KEY = re.compile(r"[^\s.=]+(?:\.[^\s.=]+)*")
_YAML_NULLS = frozenset({"null", "Null", "NULL", "~"})
_MAX_REPR = 80


class ConfigError(ValueError):
    """A config could not be loaded. The message is one line and starts with ``config error: ``."""

    def __init__(self, message: str) -> None:
        # One line whatever the cause says (YAML errors and __post_init__ messages span lines).
        message = re.sub(r"\s*\n\s*", " ", message.strip())
        if not message.startswith("config error: "):
            message = "config error: " + message
        super().__init__(message)


# --------------------------------------------------------------------------------------------
# Sourced tree: the merged, not yet validated config. Every leaf knows which layer set it.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """A scalar or a list (lists are replaced whole, never merged) and the layer that set it."""

    value: Any
    source: str


@dataclasses.dataclass(frozen=True)
class _Map:
    """A mapping; ``sources`` lists every layer that contributed to it, in merge order."""

    items: dict[Any, _Node]
    sources: tuple[str, ...]
    # From `_delete_: true`: this mapping replaces whatever lies below it. It stays set after
    # merging so that it also wins over schema defaults of nested dataclasses.
    replace: bool = False


_Node = Union[_Leaf, _Map]


def _join(key: str, name: object) -> str:
    return f"{key}.{name}" if key else str(name)


def _where(sources: Sequence[str]) -> str:
    unique = list(dict.fromkeys(sources))
    if len(unique) > 1 and SCHEMA_DEFAULTS_SOURCE in unique:
        # Blame the layers the user wrote; schema defaults only when nothing else is involved.
        unique.remove(SCHEMA_DEFAULTS_SOURCE)
    return " + ".join(unique) if unique else "<empty config>"


def _node_where(node: _Node) -> str:
    return node.source if isinstance(node, _Leaf) else _where(node.sources)


def _to_tree(value: Any, source: str, key: str = "") -> _Node:
    """Wrap plain data (as read from YAML or given as a dict) into a sourced tree."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = config_to_dict(value)
    if not isinstance(value, Mapping):
        return _Leaf(value, source)
    items = dict(value)
    replace = items.pop(DELETE_KEY, False)
    if not isinstance(replace, bool):
        raise ConfigError(
            f"key '{_join(key, DELETE_KEY)}' in {source} must be true or false; "
            f"got {_describe_value(replace)}"
        )
    children = {k: _to_tree(v, source, _join(key, k)) for k, v in items.items()}
    return _Map(children, (source,), replace)


def _merge(lower: _Node, upper: _Node) -> _Node:
    """Deep-merge ``upper`` on top of ``lower`` without mutating either."""
    if not (isinstance(lower, _Map) and isinstance(upper, _Map)) or upper.replace:
        return upper
    items = dict(lower.items)
    for k, node in upper.items.items():
        items[k] = _merge(items[k], node) if k in items else node
    return _Map(items, lower.sources + upper.sources, lower.replace)


def _plain(node: _Node) -> Any:
    """The plain data held by a node (for ``Any`` fields and for error messages)."""
    if isinstance(node, _Leaf):
        return node.value
    return {k: _plain(v) for k, v in node.items.items()}


# --------------------------------------------------------------------------------------------
# Reading YAML files and command line overrides.
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let SafeLoader report it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _one_line_yaml_error(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        # str(err) repeats the file name and draws a caret over several lines; keep the facts.
        mark = err.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f"{err.context}: " if err.context else ""
        return f"{context}{err.problem}{at}"
    return " ".join(str(err).split())


def _read_yaml(path: str, included_from: str | None) -> dict[Any, Any]:
    context = f" (included from {included_from})" if included_from else ""
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_StrictLoader)
    except OSError as err:
        reason = err.strerror or err
        raise ConfigError(f"cannot read config file {path}{context}: {reason}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {path}{context}: {_one_line_yaml_error(err)}") from err
    if data is None:  # an empty file is an empty mapping
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"top level of {path} must be a mapping of keys; got {_describe_value(data)}"
        )
    return data


def _base_paths(data: dict[Any, Any], path: str) -> list[str]:
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(
            f"key '{BASE_KEY}' in {path} must be a path or a list of paths; "
            f"got {_describe_value(bases)}"
        )
    # Relative to the including file, not the working directory, so configs move as a tree.
    here = os.path.dirname(path)
    return [os.path.normpath(os.path.join(here, os.path.expanduser(b))) for b in bases]


def _load_file(path: str, chain: tuple[tuple[str, str], ...] = ()) -> _Node:
    """Load ``path`` and its ``_base_`` chain; ``chain`` holds (real path, shown path) ancestors."""
    real = os.path.realpath(path)
    if any(real == seen for seen, _ in chain):
        names = [shown for _, shown in chain] + [path]
        raise ConfigError(f"{BASE_KEY} cycle: {' -> '.join(names)}")
    data = _read_yaml(path, chain[-1][1] if chain else None)
    return _file_tree(data, path, chain + ((real, path),))


def _file_tree(data: Any, path: str, chain: tuple[tuple[str, str], ...], key: str = "") -> _Node:
    """The sourced tree of one file's data. A mapping at any depth may name ``_base_`` files: they
    are loaded (with their own chains) as the value of that key, and the mapping merges on top, so
    a run config can say ``model: {_base_: ../model/tiny_instance.yaml, num_classes: 3}``."""
    if not isinstance(data, Mapping):
        return _Leaf(data, path)
    items = dict(data)
    merged: _Node = _Map({}, ())
    if BASE_KEY in items:
        for base in _base_paths(items, path):
            merged = _merge(merged, _load_file(base, chain))
    replace = items.pop(DELETE_KEY, False)
    if not isinstance(replace, bool):
        raise ConfigError(
            f"key '{_join(key, DELETE_KEY)}' in {path} must be true or false; "
            f"got {_describe_value(replace)}"
        )
    children = {k: _file_tree(v, path, chain, _join(key, k)) for k, v in items.items()}
    tree = _merge(merged, _Map(children, (path,)))
    # `_delete_` drops what the *enclosing* layers put here, not this mapping's own `_base_`.
    return dataclasses.replace(tree, replace=True) if replace and isinstance(tree, _Map) else tree


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """Parse ``["a.b=3", "c=[1, 2]"]`` into ``[("a.b", 3), ("c", [1, 2])]``.

    Values are read as YAML (so ``3`` is an int, ``[1,2]`` a list, ``{k: v}`` a mapping,
    ``null`` is None); ``key=`` gives the empty string. Like in YAML files, ``1e9`` stays the
    string ``'1e9'``; numeric fields convert it when the schema is applied.
    """
    if isinstance(items, str):  # a lone string would otherwise be split into characters
        raise TypeError("parse_overrides expects a sequence of 'key=value' strings, not a str")
    parsed: list[tuple[str, Any]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not _OVERRIDE_KEY.fullmatch(key):
            raise ConfigError(
                f"override {item!r} must look like dotted.key=value (e.g. shard.maxcount=500)"
            )
        parsed.append((key, _parse_override_value(item, text)))
    return parsed


def _parse_override_value(item: str, text: str) -> Any:
    try:
        value = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"cannot parse the value of override {item!r} as YAML: {_one_line_yaml_error(err)}"
        ) from err
    # YAML reads "" and "#tag" as null; on a command line they mean the text itself.
    if value is None and text.strip() not in _YAML_NULLS:
        return text
    return value


def _override_tree(key: str, value: Any) -> _Node:
    nested = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return _to_tree(nested, OVERRIDE_SOURCE)


# --------------------------------------------------------------------------------------------
# Applying a schema to the merged tree.
# --------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """Internal: a value does not fit a scalar type; the caller turns it into a ConfigError."""


@dataclasses.dataclass(frozen=True)
class _FieldSpec:
    name: str
    hint: Any
    field: dataclasses.Field[Any]

    @property
    def required(self) -> bool:
        return (
            self.field.default is dataclasses.MISSING
            and self.field.default_factory is dataclasses.MISSING
        )

    def default_value(self) -> Any:
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return dataclasses.MISSING


@functools.cache
def _field_specs(cls: type) -> tuple[_FieldSpec, ...]:
    # get_type_hints resolves string annotations (`from __future__ import annotations`).
    hints = typing.get_type_hints(cls)
    return tuple(
        _FieldSpec(f.name, hints.get(f.name, Any), f) for f in dataclasses.fields(cls) if f.init
    )


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _describe(tp: Any) -> str:
    """What a type accepts, in config words (used after 'must be')."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return "any value"
    if tp is type(None):
        return "null"
    if _is_union(tp):
        arms = [_describe(a) for a in args if a is not type(None)]
        if type(None) in args:
            arms.append("null")
        return " or ".join(arms)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_enum(tp):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if tp in (list, tuple) or origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0])}" if args else "a list"
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}" if args else "a mapping"
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        return "str (a path)"
    return getattr(tp, "__name__", repr(tp))


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    kind = {dict: "mapping", list: "list"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return f"{kind} {text}"


def _type_error(node: _Node, key: str, expected: str) -> ConfigError:
    return ConfigError(
        f"key '{key or '<top level>'}' in {_node_where(node)} must be {expected}; "
        f"got {_describe_value(_plain(node))}"
    )


def _sci_number(value: str) -> Decimal | None:
    if not _SCI_NUMBER.fullmatch(value):
        return None
    try:
        return Decimal(value)
    except InvalidOperation:  # pragma: no cover - the regex only admits valid decimals
        return None


def _scalar(value: Any, tp: type) -> Any:
    """Check ``value`` against a scalar type; raise _Mismatch if it does not fit.

    Exceptions to exact type matching: an int fits a float field, and a string in scientific
    notation fits a float field, or an int field when its value is integral (``3e9``).
    bool is never an int here and vice versa, although Python says ``True == 1``.
    """
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _sci_number(value) if isinstance(value, str) else None
        if (
            number is not None
            and number == number.to_integral_value()
            and number.adjusted() < _MAX_SCI_INT_DIGITS
        ):
            return int(number)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _sci_number(value) is not None:
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif issubclass(tp, pathlib.PurePath):
        if isinstance(value, (str, pathlib.PurePath)):
            return tp(value)
    elif _is_enum(tp):
        if isinstance(value, tp):
            return value
        for member in tp:
            # Same type as well as equal value, so that true does not select a member 1.
            if type(member.value) is type(value) and member.value == value:
                return member
    elif isinstance(value, tp):  # any other plain class: take instances as they are
        return value
    raise _Mismatch


def _coerce(node: _Node, tp: Any, key: str, expected: str | None = None) -> Any:
    """Turn a node into a value of type ``tp``; ``expected`` overrides the described type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return _plain(node)
    if _is_union(tp):
        return _coerce_union(node, tp, key)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(node, _Map):
            raise _type_error(node, key, expected or _describe(tp))
        return _build(node, tp, key)
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        if not isinstance(node, _Map):
            raise _type_error(node, key, expected or _describe(tp))
        key_tp, value_tp = args or (Any, Any)
        return {
            _coerce(_Leaf(k, _node_where(child)), key_tp, _join(key, k)): (
                _coerce(child, value_tp, _join(key, k))
            )
            for k, child in node.items.items()
        }
    if tp in (list, tuple) or origin in (list, tuple):
        return _coerce_sequence(node, tp, key, expected)
    if not isinstance(node, _Leaf):
        raise _type_error(node, key, expected or _describe(tp))
    if tp is type(None):
        if node.value is None:
            return None
        raise _type_error(node, key, expected or "null")
    if origin is Literal:
        for choice in args:
            if type(choice) is type(node.value) and choice == node.value:
                return choice
        raise _type_error(node, key, expected or _describe(tp))
    if not isinstance(tp, type):
        # A schema bug rather than a config error, so not a ConfigError.
        raise TypeError(f"unsupported field type {tp!r} for config key '{key}'")
    try:
        return _scalar(node.value, tp)
    except _Mismatch:
        raise _type_error(node, key, expected or _describe(tp)) from None


def _coerce_union(node: _Node, tp: Any, key: str) -> Any:
    arms = [a for a in typing.get_args(tp) if a is not type(None)]
    nullable = len(arms) < len(typing.get_args(tp))
    if nullable and isinstance(node, _Leaf) and node.value is None:
        return None
    if len(arms) == 1:
        # `X | None`: errors nested inside X stay precise; a mismatch here says "X or null".
        return _coerce(node, arms[0], key, expected=_describe(tp))
    for arm in arms:  # general unions: first arm that accepts the value wins
        try:
            return _coerce(node, arm, key)
        except ConfigError:
            continue
    raise _type_error(node, key, _describe(tp))


def _coerce_sequence(node: _Node, tp: Any, key: str, expected: str | None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    container = tuple if (tp is tuple or origin is tuple) else list
    if not isinstance(node, _Leaf) or not isinstance(node.value, (list, tuple)):
        raise _type_error(node, key, expected or _describe(tp))
    items = node.value
    if container is tuple and args and args[-1] is not Ellipsis:
        if len(items) != len(args):
            raise _type_error(node, key, expected or _describe(tp))
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(items)
    return container(
        _coerce(_to_tree(item, node.source, f"{key}[{i}]"), item_tp, f"{key}[{i}]")
        for i, (item, item_tp) in enumerate(zip(items, item_types))
    )


def _unknown_key_error(node: _Map, key: str, name: Any, allowed: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(str(name), allowed, n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    level = f"under '{key}'" if key else "at top level"
    return ConfigError(
        f"unknown key '{_join(key, name)}' in {_node_where(node.items[name])}{did_you_mean}; "
        f"allowed keys {level}: {', '.join(allowed) or '(none)'}"
    )


def _build(node: _Map, cls: type[T], key: str) -> T:
    """Validate a mapping against dataclass ``cls`` and construct it."""
    specs = _field_specs(cls)
    allowed = [spec.name for spec in specs]
    for name in node.items:
        if name not in allowed:
            raise _unknown_key_error(node, key, name, allowed)
    kwargs: dict[str, Any] = {}
    for spec in specs:
        child_key = _join(key, spec.name)
        child = node.items.get(spec.name)
        if child is None:
            if spec.required:
                raise ConfigError(
                    f"missing required key '{child_key}' (not set in {_where(node.sources)})"
                )
            continue  # the dataclass applies its own default
        if isinstance(child, _Map):
            # A partial mapping for a nested dataclass completes the field's *default instance*
            # (which may differ from the nested class's own defaults), not a blank one.
            default = spec.default_value()
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                child = _merge(_to_tree(default, SCHEMA_DEFAULTS_SOURCE, child_key), child)
        kwargs[spec.name] = _coerce(child, spec.hint, child_key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        # __post_init__ validation: say which part of the config and which layers it came from.
        what = f"'{key}' ({cls.__name__})" if key else f"config ({cls.__name__})"
        raise ConfigError(f"invalid {what} in {_where(node.sources)}: {err}") from err


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def _check_schema(schema: type) -> None:
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")


def load_config(
    schema: type[T],
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> T:
    """Build ``schema`` from ``base`` < YAML file (after its ``_base_`` chain) < ``overrides``.

    Raises :class:`ConfigError` on any problem, before anything is constructed.
    """
    _check_schema(schema)
    parsed = parse_overrides(overrides)  # bad syntax fails before any file is read
    tree: _Node = _Map({}, ())
    if base is not None:
        tree = _merge(tree, _to_tree(base, DEFAULTS_SOURCE))
    if path is not None:
        tree = _merge(tree, _load_file(os.fspath(path)))
    for key, value in parsed:
        tree = _merge(tree, _override_tree(key, value))
    if not isinstance(tree, _Map):  # only if a layer replaced the root, e.g. base was not a dict
        raise _type_error(tree, "", _describe(schema))
    return _build(tree, schema, "")


def config_from_dict(schema: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Validate plain nested data (e.g. from :func:`config_to_dict`) against ``schema``."""
    _check_schema(schema)
    tree = _to_tree(data, source)
    if not isinstance(tree, _Map):
        raise _type_error(tree, "", _describe(schema))
    return _build(tree, schema, "")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f for f in dataclasses.fields(value) if f.init]
        return {f.name: _to_plain(getattr(value, f.name)) for f in fields}
    if isinstance(value, enum.Enum):
        return _to_plain(value.value)
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, pathlib.PurePath):
        return str(value)
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dicts/lists (tuples become lists, enums their values), keys in schema order."""
    plain = _to_plain(cfg)
    if not isinstance(plain, dict):
        raise TypeError(f"expected a dataclass instance or a mapping, got {type(cfg).__name__}")
    return plain


def dump_config(cfg: Any) -> str:
    """YAML text of :func:`config_to_dict`; loads back with ``yaml.safe_load``."""
    return yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
