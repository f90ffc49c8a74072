"""Tests for core.config: typed dataclass configs from YAML, _base_ chains and overrides."""

from __future__ import annotations

import dataclasses
import enum
import os
import pathlib
import textwrap
from typing import Annotated, Literal, Optional

import pytest
import yaml

from core.config import (
    ConfigError,
    InvalidValue,
    Tagged,
    config_from_dict,
    config_to_dict,
    dump_config,
    inline,
    load_config,
    parse_overrides,
    with_values,
)

# --------------------------------------------------------------------------------------------
# Test schemas. Module level, with string annotations (future import), as real schemas will be.
# --------------------------------------------------------------------------------------------


class Split(enum.Enum):
    TRAIN = "train"
    VAL = "val"


@dataclasses.dataclass(frozen=True)
class Shard:
    maxcount: int = 1000
    maxsize: int = 3_000_000_000


@dataclasses.dataclass(frozen=True)
class Validate:
    decode: Literal["header", "full"] = "header"
    sample_rate: float = 1.0


@dataclasses.dataclass(frozen=True)
class Storage:
    endpoint_url: Optional[str] = None
    bucket: str = "data"
    retries: int = 3


@dataclasses.dataclass(frozen=True)
class Data:
    name: str = "coco"
    split: Split = Split.TRAIN
    shard: Shard = dataclasses.field(default_factory=Shard)
    validate: Validate = dataclasses.field(default_factory=Validate)
    storage: Storage | None = None
    image_size: tuple[int, ...] = (1024, 1024)
    classes: list[str] = dataclasses.field(default_factory=list)
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    lr: float = 1e-4
    shuffle: bool = True
    crop: tuple[int, int] | None = None


@dataclasses.dataclass
class Job:
    """A plain (not frozen) schema with a required field and __post_init__ validation."""

    name: str
    workers: int = 2
    data: Data = dataclasses.field(default_factory=lambda: Data(shard=Shard(maxcount=10)))

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclasses.dataclass(frozen=True)
class Window:
    start: int = 0
    stop: int = 10

    def __post_init__(self) -> None:
        if self.stop <= self.start:
            raise ValueError("stop must be greater than start\n(second line)")


@dataclasses.dataclass(frozen=True)
class Sched:
    window: Window = dataclasses.field(default_factory=Window)
    windows: list[Window] = dataclasses.field(default_factory=list)
    mode: Literal["a", "b"] | None = None
    size: int | str = 0
    anything: object = None


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("config error: ")
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# Defaults, files, _base_ chains.
# --------------------------------------------------------------------------------------------


def test_defaults_without_file() -> None:
    assert load_config(Data) == Data()


def test_field_default_instance_is_completed_not_replaced() -> None:
    # Job.data defaults to Data(shard=Shard(maxcount=10)); setting maxsize keeps maxcount=10.
    cfg = load_config(Job, overrides=["name=x", "data.shard.maxsize=5"])
    assert cfg.data.shard == Shard(maxcount=10, maxsize=5)
    assert load_config(Job, overrides=["name=x"]).data.shard.maxcount == 10


def test_file_values_and_types(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        """
        name: o365
        split: val
        shard: {maxcount: 500}
        validate: {decode: full, sample_rate: 1}
        storage: {endpoint_url: "http://s3"}
        image_size: [800, 1333]
        classes: [cat, dog]
        weights: {cat: 2, dog: 0.5}
        lr: 3e-4
        crop: [10, 20]
        """,
    )
    cfg = load_config(Data, path)
    assert cfg.name == "o365" and cfg.split is Split.VAL
    assert cfg.shard == Shard(maxcount=500)
    assert cfg.validate == Validate("full", 1.0) and isinstance(cfg.validate.sample_rate, float)
    assert cfg.storage == Storage(endpoint_url="http://s3")
    assert cfg.image_size == (800, 1333) and cfg.classes == ["cat", "dog"]
    assert cfg.weights == {"cat": 2.0, "dog": 0.5}
    assert cfg.lr == pytest.approx(3e-4)  # PyYAML reads 3e-4 as a string
    assert cfg.crop == (10, 20)


def test_empty_file_is_empty_mapping(tmp_path: pathlib.Path) -> None:
    assert load_config(Data, write(tmp_path / "e.yaml", "")) == Data()


def test_base_chain_two_levels_deep_merge_and_list_replacement(tmp_path: pathlib.Path) -> None:
    write(
        tmp_path / "base.yaml",
        """
        name: base
        shard: {maxcount: 1, maxsize: 2}
        classes: [a, b, c]
        weights: {a: 1.0, b: 2.0}
        """,
    )
    write(tmp_path / "mid.yaml", "_base_: base.yaml\nshard: {maxcount: 5}\nclasses: [z]\n")
    top = write(tmp_path / "top.yaml", "_base_: mid.yaml\nweights: {b: 3.0}\n")
    cfg = load_config(Data, top)
    assert cfg.name == "base"
    assert cfg.shard == Shard(maxcount=5, maxsize=2)  # mapping merged key by key
    assert cfg.classes == ["z"]  # list replaced whole
    assert cfg.weights == {"a": 1.0, "b": 3.0}


def test_list_of_bases_later_wins_and_file_on_top(tmp_path: pathlib.Path) -> None:
    write(tmp_path / "a.yaml", "name: a\nshard: {maxcount: 1}\nlr: 0.5\n")
    write(tmp_path / "b.yaml", "name: b\nshard: {maxsize: 7}\n")
    top = write(tmp_path / "top.yaml", "_base_: [a.yaml, b.yaml]\nlr: 0.25\n")
    cfg = load_config(Data, top)
    assert (cfg.name, cfg.shard, cfg.lr) == ("b", Shard(1, 7), 0.25)


def test_diamond_bases_are_not_a_cycle(tmp_path: pathlib.Path) -> None:
    write(tmp_path / "root.yaml", "name: root\n")
    write(tmp_path / "l.yaml", "_base_: root.yaml\nlr: 0.1\n")
    write(tmp_path / "r.yaml", "_base_: root.yaml\nshuffle: false\n")
    cfg = load_config(Data, write(tmp_path / "top.yaml", "_base_: [l.yaml, r.yaml]\n"))
    assert (cfg.name, cfg.lr, cfg.shuffle) == ("root", 0.1, False)


def test_base_paths_relative_to_including_file(tmp_path: pathlib.Path, monkeypatch) -> None:
    write(tmp_path / "configs" / "base.yaml", "shard: {maxcount: 7}\n")
    write(tmp_path / "configs" / "data" / "common" / "c.yaml", "_base_: ../../base.yaml\nlr: 0.5\n")
    write(tmp_path / "configs" / "data" / "coco.yaml", "_base_: common/c.yaml\nname: coco2\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Data, "configs/data/coco.yaml")
    assert (cfg.shard.maxcount, cfg.lr, cfg.name) == (7, 0.5, "coco2")
    # Works from another working directory too, with a PathLike.
    monkeypatch.chdir(tmp_path / "configs")
    assert load_config(Data, pathlib.Path("data/coco.yaml")) == cfg


def test_base_file_errors_name_the_base_file(tmp_path: pathlib.Path, monkeypatch) -> None:
    write(tmp_path / "configs" / "base.yaml", "shard: {maxcout: 7}\n")
    write(tmp_path / "configs" / "data" / "coco.yaml", "_base_: ../base.yaml\n")
    monkeypatch.chdir(tmp_path)
    msg = error_of(load_config, Data, "configs/data/coco.yaml")
    assert "unknown key 'shard.maxcout' in configs/base.yaml" in msg
    assert "allowed keys under 'shard': maxcount, maxsize" in msg
    assert "did you mean 'maxcount'" in msg


def test_delete_replaces_instead_of_merging(tmp_path: pathlib.Path) -> None:
    write(tmp_path / "base.yaml", "weights: {a: 1.0, b: 2.0}\nshard: {maxcount: 1}\n")
    top = write(
        tmp_path / "top.yaml",
        """
        _base_: base.yaml
        weights: {_delete_: true, c: 3.0}
        shard: {_delete_: true, maxsize: 9}
        """,
    )
    cfg = load_config(Data, top)
    assert cfg.weights == {"c": 3.0}
    assert cfg.shard == Shard(maxsize=9)  # maxcount back to the schema default, not 1


def test_delete_also_drops_field_default_instance() -> None:
    cfg = load_config(Job, overrides=["name=x", "data.shard={_delete_: true, maxsize: 5}"])
    assert cfg.data.shard == Shard(maxsize=5)  # not maxcount=10 from Job's default Data


def test_base_cycle_is_detected(tmp_path: pathlib.Path) -> None:
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: sub/c.yaml\n")
    write(tmp_path / "sub" / "c.yaml", "_base_: ../a.yaml\n")
    msg = error_of(load_config, Data, tmp_path / "a.yaml")
    assert "cycle" in msg
    assert msg.index("a.yaml") < msg.index("b.yaml") < msg.index("c.yaml")
    assert msg.rstrip().endswith("a.yaml")


def test_self_include_is_a_cycle(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "a.yaml", "_base_: [a.yaml]\n")
    assert "cycle" in error_of(load_config, Data, path)


def test_missing_base_file(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "a.yaml", "_base_: nope.yaml\n")
    msg = error_of(load_config, Data, path)
    assert "nope.yaml" in msg and "included from" in msg and "a.yaml" in msg


def test_bad_base_value(tmp_path: pathlib.Path) -> None:
    msg = error_of(load_config, Data, write(tmp_path / "a.yaml", "_base_: 3\n"))
    assert "'_base_'" in msg and "a.yaml" in msg


def test_invalid_yaml_and_non_mapping_and_duplicates(tmp_path: pathlib.Path) -> None:
    msg = error_of(load_config, Data, write(tmp_path / "bad.yaml", "a: 1\nshard: {maxcount: 1\n"))
    assert "invalid YAML in" in msg and "bad.yaml" in msg and "line 3" in msg
    msg = error_of(load_config, Data, write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert "top level of" in msg and "list.yaml" in msg and "mapping" in msg
    msg = error_of(load_config, Data, write(tmp_path / "dup.yaml", "lr: 1.0\nlr: 2.0\n"))
    assert "duplicate key 'lr'" in msg and "dup.yaml" in msg and "line 2" in msg
    # YAML merge keys may legitimately repeat a key.
    merged = write(tmp_path / "merge.yaml", "weights: {<<: {a: 1.0, b: 1.0}, a: 2.0}\n")
    assert load_config(Data, merged).weights == {"a": 2.0, "b": 1.0}


def test_missing_file(tmp_path: pathlib.Path) -> None:
    msg = error_of(load_config, Data, tmp_path / "absent.yaml")
    assert "cannot read config file" in msg and "absent.yaml" in msg


# --------------------------------------------------------------------------------------------
# Layers and overrides.
# --------------------------------------------------------------------------------------------


def test_layer_priority_defaults_file_overrides(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "c.yaml", "name: file\nlr: 0.5\n")
    base = {"name": "defaults", "lr": 0.1, "shuffle": False, "shard": {"maxcount": 3}}
    cfg = load_config(Data, path, ["lr=0.9", "lr=0.7"], base=base)
    assert (cfg.name, cfg.lr, cfg.shuffle, cfg.shard.maxcount) == ("file", 0.7, False, 3)


def test_overrides_nested_flow_null_list() -> None:
    cfg = load_config(
        Data,
        overrides=[
            "shard.maxcount=500",
            "storage={endpoint_url: http://x:9000, bucket: b}",
            "storage.retries=5",
            "classes=[a, b]",
            "image_size=[1, 2, 3]",
            "split=val",
            "weights.cat=2",
            "crop=null",
        ],
    )
    assert cfg.shard == Shard(maxcount=500)
    assert cfg.storage == Storage(endpoint_url="http://x:9000", bucket="b", retries=5)
    assert cfg.classes == ["a", "b"] and cfg.image_size == (1, 2, 3)
    assert cfg.split is Split.VAL and cfg.weights == {"cat": 2.0} and cfg.crop is None


def test_override_creates_nested_dataclass_from_null(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "c.yaml", "storage: null\n")
    cfg = load_config(Data, path, ["storage.bucket=x"])
    assert cfg.storage == Storage(bucket="x")
    assert load_config(Data, overrides=["storage=null"]).storage is None


def test_override_flow_mapping_merges_with_file(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "c.yaml", "storage: {bucket: keep, retries: 9}\n")
    cfg = load_config(Data, path, ["storage={endpoint_url: http://x}"])
    assert cfg.storage == Storage(endpoint_url="http://x", bucket="keep", retries=9)


def test_parse_overrides_values() -> None:
    assert parse_overrides(
        ["a=3", "b=1.5", "c=1e9", "d=[1,2]", "e=null", "f=x", "g.h={k: v}", "i=", "j=#tag",
         "k=true", "l=a=b", " m = 'q' ", "n=~"]
    ) == [
        ("a", 3), ("b", 1.5), ("c", "1e9"), ("d", [1, 2]), ("e", None), ("f", "x"),
        ("g.h", {"k": "v"}), ("i", ""), ("j", "#tag"), ("k", True), ("l", "a=b"), ("m", "q"),
        ("n", None),
    ]


@pytest.mark.parametrize("item", ["shard.maxcount", "=3", "a..b=1", ".a=1", "a b=1"])
def test_parse_overrides_rejects_malformed(item: str) -> None:
    assert repr(item) in error_of(parse_overrides, [item])


def test_parse_overrides_bad_yaml_value() -> None:
    msg = error_of(parse_overrides, ["classes=[a, b"])
    assert "classes=[a, b" in msg


def test_malformed_override_fails_before_reading_files(tmp_path: pathlib.Path) -> None:
    msg = error_of(load_config, Data, tmp_path / "absent.yaml", ["oops"])
    assert "'oops'" in msg


# --------------------------------------------------------------------------------------------
# Error messages: key, source, allowed values.
# --------------------------------------------------------------------------------------------


def test_unknown_key_in_file(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "coco.yaml", "shard:\n  maxcout: 3\n")
    msg = error_of(load_config, Data, path)
    assert f"unknown key 'shard.maxcout' in {path}" in msg
    assert "allowed keys under 'shard': maxcount, maxsize" in msg


def test_unknown_top_level_key() -> None:
    msg = error_of(config_from_dict, Data, {"nam": "x"}, "my.yaml")
    assert "unknown key 'nam' in my.yaml" in msg and "did you mean 'name'" in msg
    assert "allowed keys at top level: name, split, shard, validate, storage" in msg


def test_unknown_key_in_override() -> None:
    msg = error_of(load_config, Data, None, ["shard.maxcout=5"])
    assert "unknown key 'shard.maxcout' in command line override" in msg
    assert "maxcount, maxsize" in msg
    msg = error_of(load_config, Data, None, ["storage.region=eu"])
    assert "unknown key 'storage.region'" in msg and "endpoint_url, bucket, retries" in msg


def test_literal_error() -> None:
    msg = error_of(load_config, Data, None, ["validate.decode=fast"])
    assert "key 'validate.decode' in command line override" in msg
    assert "must be one of 'header', 'full'" in msg and "'fast'" in msg


def test_optional_literal_error_mentions_null() -> None:
    msg = error_of(config_from_dict, Sched, {"mode": "c"})
    assert "must be one of 'a', 'b' or null" in msg


def test_enum_error_lists_values() -> None:
    msg = error_of(config_from_dict, Data, {"split": "test"}, "x.yaml")
    assert "key 'split' in x.yaml must be one of 'train', 'val'" in msg


def test_int_field_rejects_str(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "x.yaml", "shard: {maxcount: many}\n")
    msg = error_of(load_config, Data, path)
    assert f"key 'shard.maxcount' in {path} must be int; got str 'many'" in msg


def test_bool_and_int_do_not_mix() -> None:
    msg = error_of(load_config, Data, None, ["shard.maxcount=true"])
    assert "'shard.maxcount'" in msg and "must be int" in msg and "bool True" in msg
    msg = error_of(load_config, Data, None, ["shuffle=1"])
    assert "'shuffle'" in msg and "must be bool" in msg and "int 1" in msg
    msg = error_of(load_config, Data, None, ["validate.sample_rate=false"])
    assert "must be float" in msg


def test_str_field_accepts_only_str() -> None:
    assert "key 'name' in command line override must be str; got int 3" in error_of(
        load_config, Data, None, ["name=3"]
    )
    assert load_config(Data, overrides=["name='3'"]).name == "3"
    assert "must be str or null" in error_of(load_config, Data, None, ["storage.endpoint_url=1"])


def test_container_errors_name_the_item() -> None:
    msg = error_of(load_config, Data, None, ["image_size=[1, x]"])
    assert "key 'image_size[1]' in command line override must be int; got str 'x'" in msg
    msg = error_of(load_config, Data, None, ["weights={a: 1, b: heavy}"])
    assert "key 'weights.b'" in msg and "must be float" in msg
    msg = error_of(load_config, Data, None, ["classes=cat"])
    assert "key 'classes'" in msg and "must be a list of str" in msg
    msg = error_of(load_config, Data, None, ["crop=[1, 2, 3]"])
    assert "key 'crop'" in msg and "a list of 2 items" in msg
    msg = error_of(load_config, Data, None, ["shard=5"])
    assert "key 'shard'" in msg and "must be a mapping (Shard); got int 5" in msg
    msg = error_of(load_config, Data, None, ["shard.maxcount={a: 1}"])
    assert "key 'shard.maxcount'" in msg and "got mapping" in msg


def test_list_of_dataclasses() -> None:
    cfg = config_from_dict(Sched, {"windows": [{"stop": 3}, {"start": 1, "stop": 2}]})
    assert cfg.windows == [Window(0, 3), Window(1, 2)]
    msg = error_of(config_from_dict, Sched, {"windows": [{}, {"stp": 2}]}, "s.yaml")
    assert "unknown key 'windows[1].stp' in s.yaml" in msg
    assert "allowed keys under 'windows[1]': start, stop" in msg


def test_general_union_and_any() -> None:
    assert config_from_dict(Sched, {"size": 4}).size == 4
    assert config_from_dict(Sched, {"size": "big"}).size == "big"
    assert "must be int or str" in error_of(config_from_dict, Sched, {"size": 1.5})
    assert config_from_dict(Sched, {"anything": {"x": [1]}}).anything == {"x": [1]}


def test_missing_required_key(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "job.yaml", "workers: 3\n")
    msg = error_of(load_config, Job, path)
    assert "missing required key 'name'" in msg and str(path) in msg
    assert "missing required key 'name'" in error_of(load_config, Job)
    assert load_config(Job, path, ["name=j"]).workers == 3


def test_post_init_error_names_key_and_source(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "s.yaml", "window: {start: 10}\n")
    msg = error_of(load_config, Sched, path)
    assert f"invalid 'window' (Window) in {path}: stop must be greater than start" in msg
    msg = error_of(load_config, Job, None, ["name=x", "workers=0"])
    assert "workers must be >= 1" in msg and "command line override" in msg


def test_bad_delete_flag() -> None:
    msg = error_of(config_from_dict, Data, {"shard": {"_delete_": "yes"}}, "d.yaml")
    assert "'shard._delete_' in d.yaml" in msg


# --------------------------------------------------------------------------------------------
# Numeric coercion.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [("shard.maxsize=3e9", 3_000_000_000), ("shard.maxsize=1.5e3", 1500),
     ("shard.maxsize=2E+2", 200), ("shard.maxsize=-4e0", -4), ("shard.maxsize=10", 10)],
)
def test_sci_notation_into_int(override: str, expected: int) -> None:
    value = load_config(Data, overrides=[override]).shard.maxsize
    assert value == expected and type(value) is int


@pytest.mark.parametrize("value", ["2.5e0", "1e-1", "3.5", "1.0", "1e200", "nan", "3e9x"])
def test_int_rejects_non_integral_or_non_numeric(value: str) -> None:
    msg = error_of(load_config, Data, None, [f"shard.maxsize={value}"])
    assert "key 'shard.maxsize'" in msg and "must be int" in msg


def test_float_field_accepts_int_and_sci_strings(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "f.yaml", "lr: 1e-4\nvalidate: {sample_rate: 2}\n")
    cfg = load_config(Data, path)
    assert cfg.lr == pytest.approx(1e-4) and type(cfg.validate.sample_rate) is float
    assert load_config(Data, overrides=["lr=5E-3"]).lr == pytest.approx(5e-3)
    assert "must be float; got str 'fast'" in error_of(load_config, Data, None, ["lr=fast"])


def test_sci_strings_stay_strings_in_str_fields() -> None:
    assert load_config(Data, overrides=["name=1e9"]).name == "1e9"


# --------------------------------------------------------------------------------------------
# config_to_dict / dump_config / config_from_dict round trips.
# --------------------------------------------------------------------------------------------


FULL = Data(
    name="ade",
    split=Split.VAL,
    shard=Shard(7, 8),
    validate=Validate("full", 0.5),
    storage=Storage("http://x", "b", 1),
    image_size=(512, 512),
    classes=["wall", "sky"],
    weights={"wall": 1.5},
    lr=2e-4,
    shuffle=False,
    crop=(1, 2),
)


def test_config_to_dict_is_plain() -> None:
    plain = config_to_dict(FULL)
    assert plain["split"] == "val" and plain["image_size"] == [512, 512]
    assert plain["shard"] == {"maxcount": 7, "maxsize": 8}
    assert list(plain) == [f.name for f in dataclasses.fields(Data)]


@pytest.mark.parametrize("cfg", [Data(), FULL, Sched(windows=[Window(1, 2)], mode="b", size="s")])
def test_round_trip_through_dict_and_yaml(cfg) -> None:
    schema = type(cfg)
    assert config_from_dict(schema, config_to_dict(cfg)) == cfg
    text = dump_config(cfg)
    assert yaml.safe_load(text) == config_to_dict(cfg)
    assert config_from_dict(schema, yaml.safe_load(text)) == cfg


def test_dump_config_keys_in_schema_order() -> None:
    text = dump_config(FULL)
    top_level = [line.split(":")[0] for line in text.splitlines() if line[:1].isalpha()]
    assert top_level == [f.name for f in dataclasses.fields(Data)]
    assert list(yaml.safe_load(text)["shard"]) == ["maxcount", "maxsize"]


def test_dumped_file_loads_back(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(FULL), encoding="utf-8")
    assert load_config(Data, path) == FULL


def test_config_from_dict_accepts_nested_instances_and_tuples() -> None:
    cfg = config_from_dict(Data, {"shard": Shard(1, 2), "image_size": (3, 4), "split": Split.VAL})
    assert cfg.shard == Shard(1, 2) and cfg.image_size == (3, 4) and cfg.split is Split.VAL


def test_non_dataclass_schema_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        load_config(dict)  # type: ignore[type-var]
    with pytest.raises(TypeError):
        config_to_dict(3)


def test_paths_in_messages_are_as_given(tmp_path: pathlib.Path) -> None:
    # Relative paths stay relative in messages (no surprise absolutisation).
    write(tmp_path / "x.yaml", "lr: fast\n")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        msg = error_of(load_config, Data, "x.yaml")
    finally:
        os.chdir(old)
    assert "key 'lr' in x.yaml must be float" in msg


@dataclasses.dataclass
class _Inner:
    lr: float = 0.1
    names: list[str] = dataclasses.field(default_factory=list)
    depth: int = 1


@dataclasses.dataclass
class _Outer:
    run: str = ""
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_nested_base_loads_a_file_as_one_key(tmp_path: pathlib.Path) -> None:
    write(tmp_path / "model" / "root.yaml", "lr: 0.5\nnames: [a]\ndepth: 3\n")
    write(tmp_path / "model" / "small.yaml", "_base_: root.yaml\ndepth: 2\n")
    top = write(tmp_path / "train" / "run.yaml",
                "run: r1\ninner:\n  _base_: ../model/small.yaml\n  lr: 0.25\n")
    cfg = load_config(_Outer, top, ["inner.names=[b, c]"])
    assert cfg == _Outer("r1", _Inner(lr=0.25, names=["b", "c"], depth=2))


def test_nested_base_with_delete_drops_the_enclosing_layers_only(tmp_path: pathlib.Path) -> None:
    write(tmp_path / "m.yaml", "lr: 0.5\n")
    write(tmp_path / "parent.yaml", "inner: {depth: 7, names: [x]}\n")
    top = write(tmp_path / "top.yaml", "_base_: parent.yaml\ninner: {_base_: m.yaml, _delete_: true}\n")
    assert load_config(_Outer, top).inner == _Inner(lr=0.5)


def test_nested_base_errors_name_the_key_and_file(tmp_path: pathlib.Path) -> None:
    write(tmp_path / "m.yaml", "lr: 0.5\nwidth: 3\n")
    msg = error_of(load_config, _Outer, write(tmp_path / "top.yaml", "inner: {_base_: m.yaml}\n"))
    assert "inner.width" in msg and "m.yaml" in msg
    write(tmp_path / "loop.yaml", "inner: {_base_: loop.yaml}\n")
    assert "cycle" in error_of(load_config, _Outer, tmp_path / "loop.yaml")


# --------------------------------------------------------------------------------------------
# Tagged unions, inline fields, field-level __post_init__ errors.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Limits:
    batch_size: int = 1
    limit: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidValue("batch_size", self.batch_size, ">= 1")


@dataclasses.dataclass(frozen=True)
class Copy:
    kind: Literal["copy"]
    source: str = ""
    splits: tuple[str, ...] = ("train",)


@dataclasses.dataclass(frozen=True)
class Score:
    kind: Literal["score", "rescore"]
    split: str = "val"
    limits: Limits = inline(lambda: Limits(batch_size=2))


Step = Annotated[Copy | Score, Tagged("kind", "steps")]


@dataclasses.dataclass(frozen=True)
class Flow:
    steps: dict[str, Step] = dataclasses.field(default_factory=dict)
    first: Step | None = None


def test_tagged_union_picks_the_arm_its_tag_names() -> None:
    cfg = config_from_dict(Flow, {"steps": {"a": {"kind": "copy", "splits": ["x"]},
                                            "b": {"kind": "rescore", "limit": 3}}})
    assert cfg.steps == {"a": Copy("copy", splits=("x",)), "b": Score("rescore", limits=Limits(2, 3))}
    assert config_from_dict(Flow, {"first": {"kind": "score"}}).first == Score("score")
    assert config_from_dict(Flow, {"first": None}).first is None


def test_tagged_union_errors_come_from_the_chosen_arm() -> None:
    msg = error_of(config_from_dict, Flow, {"steps": {"a": {"kind": "copy", "splits": "x"}}}, "f.yaml")
    assert "key 'steps.a.splits' in f.yaml must be a list of str" in msg  # not "must be Copy or Score"
    msg = error_of(config_from_dict, Flow, {"steps": {"a": {"kind": "cpy"}}}, "f.yaml")
    assert "key 'steps.a.kind' in f.yaml must be one of 'copy', 'score', 'rescore'; got str 'cpy'" in msg
    msg = error_of(config_from_dict, Flow, {"steps": {"a": {"source": "s"}}}, "f.yaml")
    assert "missing required key 'steps.a.kind' (not set in f.yaml): one of 'copy', 'score', 'rescore'" in msg
    msg = error_of(config_from_dict, Flow, {"steps": {"a": "copy"}}, "f.yaml")
    assert "key 'steps.a' in f.yaml must be a mapping with 'kind'; got str 'copy'" in msg
    msg = error_of(config_from_dict, Flow, {"steps": {"a": {"kind": "copy", "sorce": "s"}}}, "f.yaml")
    assert "unknown key 'steps.a.sorce' in f.yaml (did you mean 'source'?)" in msg
    assert "allowed keys under 'steps.a': kind, source, splits" in msg


def test_a_key_of_another_arm_says_which_arms_it_applies_to() -> None:
    msg = error_of(config_from_dict, Flow, {"steps": {"a": {"kind": "copy", "limit": 4}}}, "f.yaml")
    assert ("key 'steps.a.limit' applies to score/rescore steps; it is not used by copy steps "
            "(set in f.yaml)") in msg
    msg = error_of(load_config, Flow, None, ["first={kind: score, source: s}"])
    assert "key 'first.source' applies to copy steps; it is not used by score steps" in msg


def test_inline_fields_read_and_dump_flat_and_complete_the_default_instance() -> None:
    score = config_from_dict(Score, {"kind": "score", "limit": 5})
    assert score.limits == Limits(batch_size=2, limit=5)  # batch_size from the field's default, not Limits'
    assert config_to_dict(score) == {"kind": "score", "split": "val", "batch_size": 2, "limit": 5}
    assert config_from_dict(Score, config_to_dict(score)) == score
    msg = error_of(config_from_dict, Score, {"kind": "score", "limits": {"limit": 1}}, "s.yaml")
    assert "unknown key 'limits' in s.yaml" in msg and "allowed keys at top level: kind, split, batch_size, limit" in msg


def test_invalid_value_names_the_dotted_key_and_the_layer_that_set_it(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "flow.yaml", "steps: {a: {kind: score, batch_size: 4}}\n")
    msg = error_of(load_config, Flow, path, ["steps.a.batch_size=0"])
    assert "key 'steps.a.batch_size' in command line override must be >= 1; got int 0" in msg
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):  # constructed in code
        Limits(batch_size=0)


def test_with_values_replaces_dotted_keys_and_checks_again() -> None:
    job = Job("j", data=Data(shard=Shard(maxcount=3)))
    changed = with_values(job, {"workers": 5, "data.shard.maxcount": 7, "data.name": "ade"})
    assert changed == Job("j", 5, Data(name="ade", shard=Shard(maxcount=7)))
    assert job.data.shard.maxcount == 3  # the original is untouched
    with pytest.raises(ValueError, match="workers must be >= 1"):
        with_values(job, {"workers": 0})
    with pytest.raises(TypeError, match="cannot set 'data.shard.maxcont': Shard has no field 'maxcont'"):
        with_values(job, {"data.shard.maxcont": 1})
