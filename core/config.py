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

from core.config_layers import (
    DEFAULTS_SOURCE,
    OVERRIDE_SOURCE,
    SCHEMA_DEFAULTS_SOURCE,
    ConfigError,
    Leaf,
    Map,
    Node,
    config_to_dict,
    describe_value,
    join_key,
    load_file,
    merge,
    node_where,
    override_tree,
    parse_overrides,
    plain,
    to_tree,
    where,
)

__all__ = [
    "OVERRIDE_SOURCE",
    "ConfigError",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
]

T = TypeVar("T")

# YAML 1.1 (PyYAML) reads `1e9` and `3e-4` as *strings* because it wants a dot in the mantissa.
# Numeric fields accept exactly this shape of string so configs can say `lr: 3e-4`.
_SCI_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)[eE][+-]?\d+")
# Refuse to materialise absurd integers like 1e1000000 from a typo.
_MAX_SCI_INT_DIGITS = 100


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


def _type_error(node: Node, key: str, expected: str) -> ConfigError:
    return ConfigError(
        f"key '{key or '<top level>'}' in {node_where(node)} must be {expected}; "
        f"got {describe_value(plain(node))}"
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


def _coerce(node: Node, tp: Any, key: str, expected: str | None = None) -> Any:
    """Turn a node into a value of type ``tp``; ``expected`` overrides the described type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return plain(node)
    if _is_union(tp):
        return _coerce_union(node, tp, key)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(node, Map):
            raise _type_error(node, key, expected or _describe(tp))
        return _build(node, tp, key)
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        if not isinstance(node, Map):
            raise _type_error(node, key, expected or _describe(tp))
        key_tp, value_tp = args or (Any, Any)
        return {
            _coerce(Leaf(k, node_where(child)), key_tp, join_key(key, k)): (
                _coerce(child, value_tp, join_key(key, k))
            )
            for k, child in node.items.items()
        }
    if tp in (list, tuple) or origin in (list, tuple):
        return _coerce_sequence(node, tp, key, expected)
    if not isinstance(node, Leaf):
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


def _coerce_union(node: Node, tp: Any, key: str) -> Any:
    arms = [a for a in typing.get_args(tp) if a is not type(None)]
    nullable = len(arms) < len(typing.get_args(tp))
    if nullable and isinstance(node, Leaf) and node.value is None:
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


def _coerce_sequence(node: Node, tp: Any, key: str, expected: str | None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    container = tuple if (tp is tuple or origin is tuple) else list
    if not isinstance(node, Leaf) or not isinstance(node.value, (list, tuple)):
        raise _type_error(node, key, expected or _describe(tp))
    items = node.value
    if container is tuple and args and args[-1] is not Ellipsis:
        if len(items) != len(args):
            raise _type_error(node, key, expected or _describe(tp))
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(items)
    return container(
        _coerce(to_tree(item, node.source, f"{key}[{i}]"), item_tp, f"{key}[{i}]")
        for i, (item, item_tp) in enumerate(zip(items, item_types))
    )


def _unknown_key_error(node: Map, key: str, name: Any, allowed: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(str(name), allowed, n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    level = f"under '{key}'" if key else "at top level"
    return ConfigError(
        f"unknown key '{join_key(key, name)}' in {node_where(node.items[name])}{did_you_mean}; "
        f"allowed keys {level}: {', '.join(allowed) or '(none)'}"
    )


def _build(node: Map, cls: type[T], key: str) -> T:
    """Validate a mapping against dataclass ``cls`` and construct it."""
    specs = _field_specs(cls)
    allowed = [spec.name for spec in specs]
    for name in node.items:
        if name not in allowed:
            raise _unknown_key_error(node, key, name, allowed)
    kwargs: dict[str, Any] = {}
    for spec in specs:
        child_key = join_key(key, spec.name)
        child = node.items.get(spec.name)
        if child is None:
            if spec.required:
                raise ConfigError(
                    f"missing required key '{child_key}' (not set in {where(node.sources)})"
                )
            continue  # the dataclass applies its own default
        if isinstance(child, Map):
            # A partial mapping for a nested dataclass completes the field's *default instance*
            # (which may differ from the nested class's own defaults), not a blank one.
            default = spec.default_value()
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                child = merge(to_tree(default, SCHEMA_DEFAULTS_SOURCE, child_key), child)
        kwargs[spec.name] = _coerce(child, spec.hint, child_key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        # __post_init__ validation: say which part of the config and which layers it came from.
        what = f"'{key}' ({cls.__name__})" if key else f"config ({cls.__name__})"
        raise ConfigError(f"invalid {what} in {where(node.sources)}: {err}") from err


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
    tree: Node = Map({}, ())
    if base is not None:
        tree = merge(tree, to_tree(base, DEFAULTS_SOURCE))
    if path is not None:
        tree = merge(tree, load_file(os.fspath(path)))
    for key, value in parsed:
        tree = merge(tree, override_tree(key, value))
    if not isinstance(tree, Map):  # only if a layer replaced the root, e.g. base was not a dict
        raise _type_error(tree, "", _describe(schema))
    return _build(tree, schema, "")


def config_from_dict(schema: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Validate plain nested data (e.g. from :func:`config_to_dict`) against ``schema``."""
    _check_schema(schema)
    tree = to_tree(data, source)
    if not isinstance(tree, Map):
        raise _type_error(tree, "", _describe(schema))
    return _build(tree, schema, "")


def dump_config(cfg: Any) -> str:
    """YAML text of :func:`config_to_dict`; loads back with ``yaml.safe_load``."""
    return yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
