"""DESIGN.md section 1: who may import whom, checked by parsing imports."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"data_prep", "model", "pipeline", "orchestration", "csrc"}


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_data_prep_imports_nothing_of_ours_but_itself():
    for path, names in _imports("data_prep").items():
        assert not (names & (OURS - {"data_prep"})), f"{path} imports {names & OURS}"


def test_data_prep_needs_no_training_stack():
    """Sharding runs on CPU-only data nodes: no torch, deepspeed or mlflow in data_prep."""
    for path, names in _imports("data_prep").items():
        assert not (names & {"torch", "torchvision", "deepspeed", "mlflow", "timm"}), path


def test_cli_help_lists_every_subcommand(capsys):
    import pytest

    from pipeline.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for command in ("make-synthetic", "shard", "verify-shards"):
        assert command in out


def test_sharding_does_not_import_torch():
    """Every Ray shard worker imports the writer: webdataset (which imports torch) would cost each
    one ~0.5 GB and seconds of start-up."""
    import subprocess
    import sys

    code = ("import sys, data_prep.shard, data_prep.verify, data_prep.writer, data_prep.fanout; "
            "print(sorted(m for m in ('torch', 'webdataset', 'mlflow', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
