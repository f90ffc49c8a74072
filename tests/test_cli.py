"""The `maskdino` command line as a new user meets it: `--help` opens with a quick start and lists `run`
first; every command's help says what it does, what it needs and gives an example that parses; help
and a config error start without torch."""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser, name: str = "maskdino") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command line prefix, parser) of every command and subcommand, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield f"{name} {sub_name}", sub
                yield from _commands(sub, f"{name} {sub_name}")


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_opens_with_a_quick_start_and_lists_run_first(capsys):
    out = _help([], capsys)
    quick_start = out[out.index("quick start"):out.index("positional arguments")]
    for step in ("maskdino make-synthetic", "maskdino shard", "maskdino train", "maskdino evaluate",
                 "maskdino run configs/pipeline/demo.yaml"):
        assert step in quick_start, step
    listed = out[out.index("COMMAND\n"):].split()
    assert listed[1] == "run"
    commands = [line.strip() for line in quick_start.replace("\\\n", " ").splitlines()
                if line.strip().startswith("maskdino ")]
    assert len(commands) == 6
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])  # SystemExit (exit 2) if it does not parse


@pytest.mark.parametrize("command, parser", list(_commands(build_parser())),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_help_says_what_the_command_does_what_it_needs_and_an_example_that_parses(command, parser):
    assert parser.description and len(parser.description.split()) >= 4, command
    epilog = parser.epilog or ""
    assert "required: " in epilog, command
    example = epilog[epilog.index("example:\n") + len("example:\n"):].strip().splitlines()[0]
    argv = shlex.split(example)
    assert " ".join(argv[:len(command.split())]) == command, example
    build_parser().parse_args(argv[1:])  # SystemExit (exit 2) if the example does not parse


def test_run_help_says_force_reruns_the_stage_and_its_dependents(capsys):
    out = " ".join(_help(["run"], capsys).split())
    assert "rerun STAGE and the stages that depend on it" in out
    assert "every stage after it" not in out


def test_train_help_says_run_dir_is_required(capsys):
    out = " ".join(_help(["train"], capsys).split())
    assert "run_dir is required" in out and "run_dir=PATH" in out
    assert "example: maskdino train configs/train/" in out


@pytest.mark.parametrize("argv", [["--help"], ["jobs", "list"], ["shard", "--config", "nowhere.yaml"]],
                         ids=["help", "no address", "missing config"])
def test_help_and_user_errors_start_without_torch(argv):
    """Prints the exit code and which heavy packages were imported by then."""
    code = ("import sys\nfrom cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    code = e.code\n"
            "print(code, sorted(m for m in ('torch', 'deepspeed', 'mlflow', 'ray') if m in sys.modules))")
    no_address = {"RAY_ADDRESS": "", "RAY_API_SERVER_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False, cwd=ROOT,
                          env={**os.environ, **no_address}, timeout=120)
    last = done.stdout.strip().splitlines()[-1]
    assert last.split(" ", 1)[1] == "[]", (last, done.stderr)
    if argv != ["--help"]:
        assert last.startswith("2 ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("error: ")


# ----------------------------------------------------------------------------------------- --dry-run


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*"))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    from data_prep.synthetic import SyntheticSpec, make_synthetic

    root = tmp_path_factory.mktemp("raw")
    make_synthetic(root, SyntheticSpec(train_images=4, val_images=2, min_size=96, max_size=128, seed=3,
                                       formats=("coco_instances",)))
    return root


@pytest.fixture(scope="module")
def shards(raw, tmp_path_factory) -> Path:
    from tests.shard_helpers import run_shard

    out = tmp_path_factory.mktemp("shards")
    run_shard(out, format="coco_instances", root=str(raw / "coco"), split="train")
    return out


@pytest.fixture()
def no_sharding(monkeypatch):
    """Starting Ray or sharding anything fails the test."""
    import data_prep.fanout
    import data_prep.shard

    def refuse(*_args, **_kwargs):
        raise AssertionError("--dry-run started Ray or sharded")

    monkeypatch.setattr(data_prep.fanout, "ray_session", refuse)
    monkeypatch.setattr(data_prep.shard, "shard_dataset", refuse)


def _shard_args(raw: Path, output: str) -> list[str]:
    return ["shard", "--dry-run", "--splits", "train,val", "source.format=coco_instances",
            f"source.root={raw / 'coco'}", f"output={output}"]


def test_shard_dry_run_checks_every_split_and_writes_nothing(raw, tmp_path, capsys, no_sharding):
    before = _files(raw) + _files(tmp_path)
    assert main(_shard_args(raw, str(tmp_path / "out" / "coco"))) == 0
    out = capsys.readouterr().out
    for split in ("train", "val"):
        assert f"split {split} into {tmp_path / 'out' / 'coco' / split}" in out
        assert f"instances_{split}2017.json" in out
    assert f"will be created under {tmp_path}" in out
    assert _files(raw) + _files(tmp_path) == before


@pytest.mark.parametrize("case", ["missing annotation file", "empty image folder", "output is a file",
                                  pytest.param("missing bucket", marks=pytest.mark.s3)])
def test_shard_dry_run_with_a_bad_input_or_output_exits_2_naming_it(case, raw, tmp_path, capsys, no_sharding, request):
    args = _shard_args(raw, str(tmp_path / "out"))
    if case == "missing annotation file":
        args.append(f"source.annotation={tmp_path / 'instances_nowhere.json'}")
        expect = f"annotation file {tmp_path / 'instances_nowhere.json'} not found"
    elif case == "empty image folder":
        (tmp_path / "empty").mkdir()
        args.append(f"source.images={tmp_path / 'empty'}")
        expect = f"image folder {tmp_path / 'empty'} is empty or missing"
    elif case == "output is a file":
        (tmp_path / "taken").write_text("")
        args.append(f"output={tmp_path / 'taken' / 'shards'}")
        expect = f"{tmp_path / 'taken'} is a file, not a folder"
    else:
        endpoint = request.getfixturevalue("s3_server")
        args += ["output=s3://no-such-bucket-for-dry-run/shards", f"storage.endpoint_url={endpoint}",
                 "storage.region=us-east-1"]
        expect = "bucket 'no-such-bucket-for-dry-run' does not exist"
    assert main(args) == 2
    assert expect in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.s3
def test_shard_dry_run_into_an_existing_bucket_writes_nothing_there(raw, s3_bucket, capsys, no_sharding):
    storage, bucket = s3_bucket
    endpoint = storage.config.endpoint_url
    assert main([*_shard_args(raw, f"{bucket}/shards"), f"storage.endpoint_url={endpoint}",
                 "storage.region=us-east-1"]) == 0
    assert f"bucket '{bucket[5:]}' exists" in capsys.readouterr().out
    assert list(storage.list(bucket)) == []


TRAIN_CONFIG = str(ROOT / "configs" / "train" / "tiny_instance.yaml")


def _train_args(shards: Path, tmp_path: Path) -> list[str]:
    return ["train", TRAIN_CONFIG, "--dry-run", f"run_dir={tmp_path / 'run'}",
            f"data.manifest={shards / 'manifest.json'}", f"checkpoint.local_dir={tmp_path / 'local'}",
            "schedule.max_steps=3"]


def test_train_dry_run_checks_the_inputs_and_writes_nothing(shards, tmp_path, capsys):
    import torch.distributed as dist

    assert main(_train_args(shards, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "would train to step 3" in out and "4 samples" in out and "start: from scratch" in out
    assert f"{tmp_path / 'run'} will be created under {tmp_path}" in out
    assert _files(tmp_path) == []  # no run_dir, no local checkpoint folder
    assert not dist.is_initialized()


@pytest.mark.parametrize("case", ["missing manifest", "num_classes mismatch", "init_from not a bundle",
                                  pytest.param("missing bucket", marks=pytest.mark.s3)])
def test_train_dry_run_with_a_bad_input_or_output_exits_2_naming_it(case, shards, tmp_path, capsys, request):
    args = _train_args(shards, tmp_path)
    if case == "missing manifest":
        args.append(f"data.manifest={tmp_path / 'nowhere' / 'manifest.json'}")
        expect = f"cannot read the training manifest {tmp_path / 'nowhere' / 'manifest.json'}"
    elif case == "num_classes mismatch":
        args.append("model.num_classes=3")
        expect = "set model.num_classes=8"
    elif case == "init_from not a bundle":
        args.append(f"init_from={shards}")
        expect = f"init_from={shards} is not a model bundle"
    else:
        endpoint = request.getfixturevalue("s3_server")
        args += ["run_dir=s3://no-such-bucket-for-dry-run/runs/tiny", f"storage.endpoint_url={endpoint}",
                 "storage.region=us-east-1"]
        expect = "bucket 'no-such-bucket-for-dry-run' does not exist"
    assert main(args) == 2
    assert expect in _one_error_line(capsys)
    assert _files(tmp_path) == []


def test_options_may_come_between_and_after_the_overrides():
    parse = build_parser().parse_args
    for argv in (["run", "p.yaml", "--dry-run", "a=1", "b=2"], ["run", "p.yaml", "a=1", "--dry-run", "b=2"],
                 ["run", "p.yaml", "a=1", "b=2", "--dry-run"]):
        args = parse(argv)
        assert (args.pipeline, args.overrides, args.dry_run) == ("p.yaml", ["a=1", "b=2"], True), argv
    assert parse(["run", "p.yaml", "--force", "shard", "run_root=/r"]).overrides == ["run_root=/r"]
    assert parse(["submit", "p.yaml", "--wait", "--", "--dry-run"]).extra == ["--dry-run"]
