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


@pytest.mark.parametrize("command, parser", list(_commands(build_parser())), ids=lambda v: v if isinstance(v, str) else "")
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
            "    code = e.code\nprint(code, sorted(m for m in ('torch', 'deepspeed', 'mlflow', 'ray') if m in sys.modules))")
    no_address = {"RAY_ADDRESS": "", "RAY_API_SERVER_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False, cwd=ROOT,
                          env={**os.environ, **no_address}, timeout=120)
    last = done.stdout.strip().splitlines()[-1]
    assert last.split(" ", 1)[1] == "[]", (last, done.stderr)
    if argv != ["--help"]:
        assert last.startswith("2 ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("error: ")


def test_options_may_come_between_and_after_the_overrides():
    parse = build_parser().parse_args
    for argv in (["run", "p.yaml", "--dry-run", "a=1", "b=2"], ["run", "p.yaml", "a=1", "--dry-run", "b=2"],
                 ["run", "p.yaml", "a=1", "b=2", "--dry-run"]):
        args = parse(argv)
        assert (args.pipeline, args.overrides, args.dry_run) == ("p.yaml", ["a=1", "b=2"], True), argv
    assert parse(["run", "p.yaml", "--force", "shard", "run_root=/r"]).overrides == ["run_root=/r"]
    assert parse(["submit", "p.yaml", "--wait", "--", "--dry-run"]).extra == ["--dry-run"]
