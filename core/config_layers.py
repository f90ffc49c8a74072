"""The layers a config is merged from, before any schema is applied: the sourced tree (every leaf
knows which layer set it), YAML files with their ``_base_`` chains, and ``key=value`` overrides.

YAML is read with a loader that refuses duplicate keys and any document whose aliases expand to more
than :data:`MAX_YAML_VALUES` values: PyYAML shares aliased nodes, but everything downstream (merging,
validation, error messages) walks the expanded tree, so a "billion laughs" document would take minutes
and gigabytes. The check counts the expanded size on the composed node graph, where aliases are still
shared, so it costs time proportional to the document's text, whatever the document holds."""

from __future__ import annotations

import dataclasses
import enum
import os
import pathlib
import re
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any, Union

import yaml

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"
DEFAULTS_SOURCE = "defaults"
SCHEMA_DEFAULTS_SOURCE = "schema defaults"
OVERRIDE_SOURCE = "command line override"
# Far above any real config (the Swin-L train config has a few hundred values), far below what
# makes merging or an error message slow.
MAX_YAML_VALUES = 100_000
# dataclasses.field metadata key of an inline field (core.config.inline): a nested dataclass whose
# keys sit in the enclosing mapping, so its values read and dump beside the enclosing fields.
INLINE = "core.config.inline"

_OVERRIDE_KEY = re.compile(r"[^\s.=]+(?:\.[^\s.=]+)*")
_YAML_NULLS = frozenset({"null", "Null", "NULL", "~"})
_MAX_REPR = 80
_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple = 3, 8, 8, 8
_REPR.maxstring = _REPR.maxother = _MAX_REPR


class ConfigError(ValueError):
    """A config could not be loaded. The message is one line and starts with ``config error: ``."""

    def __init__(self, message: str) -> None:
        # One line whatever the cause says (YAML errors and __post_init__ messages span lines).
        message = re.sub(r"\s*\n\s*", " ", message.strip())
        if not message.startswith("config error: "):
            message = "config error: " + message
        super().__init__(message)



def describe_value(value: Any) -> str:
    """``kind repr`` of a value for error messages, cut to about 80 characters."""
    if value is None:
        return "null"
    kind = {dict: "mapping", list: "list"}.get(type(value), type(value).__name__)
    # Containers through reprlib (a few items per level), so the cost does not grow with their size.
    text = _REPR.repr(value) if isinstance(value, (dict, list, tuple, set)) else repr(value)
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return f"{kind} {text}"


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if f.init and f.metadata.get(INLINE):
                out.update(_to_plain(getattr(value, f.name)))
            elif f.init:
                out[f.name] = _to_plain(getattr(value, f.name))
        return out
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



# --------------------------------------------------------------------------------------------
# Sourced tree: the merged, not yet validated config. Every leaf knows which layer set it.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A scalar or a list (lists are replaced whole, never merged) and the layer that set it."""

    value: Any
    source: str


@dataclasses.dataclass(frozen=True)
class Map:
    """A mapping; ``sources`` lists every layer that contributed to it, in merge order."""

    items: dict[Any, Node]
    sources: tuple[str, ...]
    # From `_delete_: true`: this mapping replaces whatever lies below it. It stays set after
    # merging so that it also wins over schema defaults of nested dataclasses.
    replace: bool = False


Node = Union[Leaf, Map]


def join_key(key: str, name: object) -> str:
    return f"{key}.{name}" if key else str(name)


def where(sources: Sequence[str]) -> str:
    unique = list(dict.fromkeys(sources))
    if len(unique) > 1 and SCHEMA_DEFAULTS_SOURCE in unique:
        # Blame the layers the user wrote; schema defaults only when nothing else is involved.
        unique.remove(SCHEMA_DEFAULTS_SOURCE)
    return " + ".join(unique) if unique else "<empty config>"


def node_where(node: Node) -> str:
    return node.source if isinstance(node, Leaf) else where(node.sources)


def to_tree(value: Any, source: str, key: str = "") -> Node:
    """Wrap plain data (as read from YAML or given as a dict) into a sourced tree."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = config_to_dict(value)
    if not isinstance(value, Mapping):
        return Leaf(value, source)
    items = dict(value)
    replace = items.pop(DELETE_KEY, False)
    if not isinstance(replace, bool):
        raise ConfigError(
            f"key '{join_key(key, DELETE_KEY)}' in {source} must be true or false; "
            f"got {describe_value(replace)}"
        )
    children = {k: to_tree(v, source, join_key(key, k)) for k, v in items.items()}
    return Map(children, (source,), replace)


def merge(lower: Node, upper: Node) -> Node:
    """Deep-merge ``upper`` on top of ``lower`` without mutating either."""
    if not (isinstance(lower, Map) and isinstance(upper, Map)) or upper.replace:
        return upper
    items = dict(lower.items)
    for k, node in upper.items.items():
        items[k] = merge(items[k], node) if k in items else node
    return Map(items, lower.sources + upper.sources, lower.replace)


def plain(node: Node) -> Any:
    """The plain data held by a node (for ``Any`` fields and for error messages)."""
    if isinstance(node, Leaf):
        return node.value
    return {k: plain(v) for k, v in node.items.items()}


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

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _check_expanded_size(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand to more than MAX_YAML_VALUES values, or refer to
    themselves. Sizes are memoised per node, so shared (aliased) nodes are counted once each:
    the work is linear in the composed graph, not in its expansion."""
    size: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        children = _children(node)
        if children_done:
            open_nodes.discard(id(node))
            total = 1 + sum(size[id(c)] for c in children)
            if total > MAX_YAML_VALUES:
                mark = node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"the value starting here expands to more than {MAX_YAML_VALUES:,} values "
                    "through aliases (an alias bomb?); write the values out or use fewer aliases", mark)
            size[id(node)] = total
            continue
        if id(node) in open_nodes:
            raise yaml.constructor.ConstructorError(None, None, "an alias refers to a value that contains it "
                                                    "(a recursive structure); configs must be trees",
                                                    node.start_mark)
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


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
            f"top level of {path} must be a mapping of keys; got {describe_value(data)}"
        )
    return data


def _base_paths(data: dict[Any, Any], path: str) -> list[str]:
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(
            f"key '{BASE_KEY}' in {path} must be a path or a list of paths; "
            f"got {describe_value(bases)}"
        )
    # Relative to the including file, not the working directory, so configs move as a tree.
    here = os.path.dirname(path)
    return [os.path.normpath(os.path.join(here, os.path.expanduser(b))) for b in bases]


def load_file(path: str, chain: tuple[tuple[str, str], ...] = ()) -> Node:
    """Load ``path`` and its ``_base_`` chain; ``chain`` holds (real path, shown path) ancestors."""
    real = os.path.realpath(path)
    if any(real == seen for seen, _ in chain):
        names = [shown for _, shown in chain] + [path]
        raise ConfigError(f"{BASE_KEY} cycle: {' -> '.join(names)}")
    data = _read_yaml(path, chain[-1][1] if chain else None)
    return _file_tree(data, path, chain + ((real, path),))


def _file_tree(data: Any, path: str, chain: tuple[tuple[str, str], ...], key: str = "") -> Node:
    """The sourced tree of one file's data. A mapping at any depth may name ``_base_`` files: they
    are loaded (with their own chains) as the value of that key, and the mapping merges on top, so
    a run config can say ``model: {_base_: ../model/tiny_instance.yaml, num_classes: 3}``."""
    if not isinstance(data, Mapping):
        return Leaf(data, path)
    items = dict(data)
    merged: Node = Map({}, ())
    if BASE_KEY in items:
        for base in _base_paths(items, path):
            merged = merge(merged, load_file(base, chain))
    replace = items.pop(DELETE_KEY, False)
    if not isinstance(replace, bool):
        raise ConfigError(
            f"key '{join_key(key, DELETE_KEY)}' in {path} must be true or false; "
            f"got {describe_value(replace)}"
        )
    children = {k: _file_tree(v, path, chain, join_key(key, k)) for k, v in items.items()}
    tree = merge(merged, Map(children, (path,)))
    # `_delete_` drops what the *enclosing* layers put here, not this mapping's own `_base_`.
    return dataclasses.replace(tree, replace=True) if replace and isinstance(tree, Map) else tree


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


def override_tree(key: str, value: Any) -> Node:
    nested = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return to_tree(nested, OVERRIDE_SOURCE)
