"""DESIGN.md section 1: who may import whom, checked by parsing imports."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"data_prep", "model", "pipeline", "orchestration", "csrc"}


def _imports(package: str, dotted: bool = False) -> dict[str, set[str]]:
    """Per file, the top-level packages it imports; with dotted=True the full module names instead
    (`import a.b` -> a.b; `from a.b import c` -> a.b and a.b.c)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
        found[str(path.relative_to(ROOT))] = names if dotted else {n.split(".")[0] for n in names}
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
    for command in ("make-synthetic", "shard", "verify-shards", "model-info", "convert-checkpoint"):
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


FORBIDDEN_IN_MODEL = ("deepspeed", "ray", "mlflow", "boto3", "botocore", "webdataset", "torch.distributed")


def test_model_has_no_distributed_or_storage_imports():
    """model/ is single-device PyTorch: parallelism and storage are applied from outside."""
    for path, names in _imports("model", dotted=True).items():
        bad = sorted(n for n in names for f in FORBIDDEN_IN_MODEL if n == f or n.startswith(f + "."))
        assert not bad, f"{path} imports {bad}"


def test_model_imports_nothing_of_ours_but_the_kernel_loader():
    for path, names in _imports("model").items():
        assert not (names & (OURS - {"model", "csrc"})), f"{path} imports {names & OURS}"


def test_model_never_picks_a_device():
    """No `.cuda()` / `.to("cuda")` in model code: devices come from the inputs."""
    for path in (ROOT / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr != "cuda", f"{path}:{node.lineno} calls .cuda()"
                if node.func.attr == "to":
                    literal = [a.value for a in node.args if isinstance(a, ast.Constant)]
                    assert not any(isinstance(v, str) and v.startswith("cuda") for v in literal), \
                        f"{path}:{node.lineno} moves to cuda"
