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

Three things a schema can say beyond its types:

* ``Annotated[A | B | C, Tagged("kind", "stages")]``: a *tagged union* of dataclasses, each with a
  field ``kind: Literal[...]``. The mapping's ``kind`` picks the arm, so a mistake inside it is
  reported by that arm alone, and a key that only another arm has says which arms it applies to.
* ``settings: EvalSettings = inline(EvalSettings)``: a nested dataclass whose keys sit in the
  enclosing mapping (the YAML stays flat; :func:`config_to_dict` writes them flat too).
* ``raise InvalidValue("batch_size", value, ">= 1")`` in ``__post_init__``: the error then names
  the full dotted key and the layer that set it, not only the enclosing section.
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
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml

from core.config_layers import (
    DEFAULTS_SOURCE,
    INLINE,
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
    "InvalidValue",
    "Tagged",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "inline",
    "load_config",
    "parse_overrides",
    "with_values",
]

T = TypeVar("T")

# YAML 1.1 (PyYAML) reads `1e9` and `3e-4` as *strings* because it wants a dot in the mantissa.
# Numeric fields accept exactly this shape of string so configs can say `lr: 3e-4`.
_SCI_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)[eE][+-]?\d+")
# Refuse to materialise absurd integers like 1e1000000 from a typo.
_MAX_SCI_INT_DIGITS = 100


# --------------------------------------------------------------------------------------------
# What schemas use beyond types.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tagged:
    """``Annotated[A | B, Tagged("kind", "stages")]``: the arm is the one whose ``kind: Literal[...]``
    holds the mapping's ``kind``. ``noun`` (plural) names the arms in messages: "applies to evaluate
    stages"."""

    field: str
    noun: str = "kinds"


class InvalidValue(ValueError):
    """Raised by a schema's ``__post_init__`` for the value of one of its fields, so that a loaded
    config's error names the full dotted key and where it was set."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        super().__init__(f"{field} must be {expected}, got {value!r}")
        self.field, self.value, self.expected = field, value, expected


def inline(default_factory: Callable[[], T]) -> Any:
    """A nested dataclass field whose keys sit in the enclosing mapping (``batch_size: 4`` beside
    the other keys, not under the field's name); filled from ``default_factory()`` where unset."""
    return dataclasses.field(default_factory=default_factory, metadata={INLINE: True})


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
    def inline(self) -> bool:
        return bool(self.field.metadata.get(INLINE))

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
    # get_type_hints resolves string annotations (`from __future__ import annotations`);
    # include_extras keeps Annotated (tagged unions).
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple(
        _FieldSpec(f.name, hints.get(f.name, Any), f) for f in dataclasses.fields(cls) if f.init
    )


@functools.cache
def _config_keys(cls: type) -> tuple[str, ...]:
    """The keys a mapping for ``cls`` may hold: its fields, with inline fields' keys in their place."""
    keys: list[str] = []
    for spec in _field_specs(cls):
        keys += _config_keys(spec.hint) if spec.inline else [spec.name]
    return tuple(keys)


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
    if origin is Annotated:
        return _describe(args[0])
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
    if origin is Annotated:
        tagged = next((m for m in tp.__metadata__ if isinstance(m, Tagged)), None)
        if tagged is None:
            return _coerce(node, args[0], key, expected)
        return _coerce_tagged(node, args[0], tagged, key, expected)
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


def _tag_values(arm: type, tag: str) -> tuple[Any, ...]:
    hint = typing.get_type_hints(arm).get(tag)
    if not dataclasses.is_dataclass(arm) or typing.get_origin(hint) is not Literal:
        raise TypeError(f"tagged union arm {arm!r} needs a field '{tag}: Literal[...]'")  # a schema bug
    return typing.get_args(hint)


def _coerce_tagged(node: Node, union: Any, tagged: Tagged, key: str, expected: str | None) -> Any:
    """Build the arm of ``union`` that the mapping's tag names; keys of other arms say so."""
    arms = {value: arm for arm in typing.get_args(union) for value in _tag_values(arm, tagged.field)}
    if not isinstance(node, Map):
        raise _type_error(node, key, expected or f"a mapping with '{tagged.field}'")
    tag_key = join_key(key, tagged.field)
    tag_node = node.items.get(tagged.field)
    if tag_node is None:
        raise ConfigError(f"missing required key '{tag_key}' (not set in {where(node.sources)}): "
                          f"one of {', '.join(repr(v) for v in arms)}")
    value = _coerce(tag_node, Literal[tuple(arms)], tag_key)
    arm = arms[value]
    for name, child in node.items.items():
        others = [str(v) for v, a in arms.items() if name in _config_keys(a)]
        if name not in _config_keys(arm) and others:
            raise ConfigError(f"key '{join_key(key, name)}' applies to {'/'.join(others)} {tagged.noun}; it is "
                              f"not used by {value} {tagged.noun} (set in {node_where(child)})")
    return _build(node, arm, key)


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
    allowed = list(_config_keys(cls))
    for name in node.items:
        if name not in allowed:
            raise _unknown_key_error(node, key, name, allowed)
    kwargs: dict[str, Any] = {}
    for spec in specs:
        if spec.inline:
            kwargs[spec.name] = _build_inline(node, spec, key)
            continue
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
    except InvalidValue as err:
        child = node.items.get(err.field)
        raise ConfigError(
            f"key '{join_key(key, err.field)}' in {node_where(child) if child else where(node.sources)} "
            f"must be {err.expected}; got {describe_value(err.value)}"
        ) from err
    except (ValueError, TypeError) as err:
        # __post_init__ validation: say which part of the config and which layers it came from.
        what = f"'{key}' ({cls.__name__})" if key else f"config ({cls.__name__})"
        raise ConfigError(f"invalid {what} in {where(node.sources)}: {err}") from err


def _build_inline(node: Map, spec: _FieldSpec, key: str) -> Any:
    """An inline field from its keys in ``node``, completing the field's default instance."""
    keys = set(_config_keys(spec.hint))
    own: Node = Map({k: v for k, v in node.items.items() if k in keys}, node.sources)
    default = spec.default_value()
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        own = merge(to_tree(default, SCHEMA_DEFAULTS_SOURCE, key), own)
    assert isinstance(own, Map)
    return _build(own, spec.hint, key)


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


def with_values(cfg: T, values: Mapping[str, Any]) -> T:
    """``cfg`` with dotted keys set (``{"data.manifest": uri}``) by ``dataclasses.replace`` along each
    path: typed values, nothing re-parsed; every rebuilt dataclass runs its ``__post_init__`` again."""
    for dotted, value in values.items():
        cfg = _with_value(cfg, dotted.split("."), value, dotted)
    return cfg


def _with_value(obj: Any, path: list[str], value: Any, dotted: str) -> Any:
    name, *rest = path
    if not (dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}):
        raise TypeError(f"cannot set '{dotted}': {type(obj).__name__} has no field '{name}'")  # a caller's bug
    return dataclasses.replace(obj, **{name: _with_value(getattr(obj, name), rest, value, dotted) if rest else value})


def dump_config(cfg: Any) -> str:
    """YAML text of :func:`config_to_dict`; loads back with ``yaml.safe_load``."""
    return yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
