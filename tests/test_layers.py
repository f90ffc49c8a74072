"""The layers (docs/architecture.md#layers), checked by parsing every import of every source file,
function-local ("lazy") imports included:

    core  <-  data_prep  <-  pipeline  <-  orchestration  <-  cli        model <- csrc

Each package may import only those to its left (pipeline also imports model); model imports nothing
of ours but csrc, and no distributed, storage or tracking package; no two files import each other,
directly or through others; and a lazy import of our own code or of a light module is a smell: lazy
imports are for keeping a heavy dependency out of a light command's start-up, and say so."""
from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "csrc", "model", "data_prep", "pipeline", "orchestration", "cli")
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "csrc": set(),
    "model": {"csrc"},
    "data_prep": {"core"},
    "pipeline": {"core", "data_prep", "model", "csrc"},
    "orchestration": {"core", "data_prep", "pipeline"},
    "cli": {"core", "data_prep", "model", "pipeline", "orchestration", "csrc"},
}
FORBIDDEN_IN_MODEL = ("deepspeed", "ray", "mlflow", "boto3", "botocore", "webdataset", "torch.distributed")
HEAVY = ("torch", "torchvision", "timm", "ray", "deepspeed", "mlflow", "matplotlib", "webdataset", "safetensors",
         "pycocotools", "scipy", "onnxruntime", "transformers", "cv2")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    """Module name -> file, for every .py file of our packages."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, lazy) for every import statement in ``path``; ``from a import b``
    yields ``a.b`` (a module or a name in ``a``)."""
    module = _module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    lazy_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    type_only = {n.lineno for i in ast.walk(tree) if isinstance(i, ast.If) and "TYPE_CHECKING" in ast.unparse(i.test)
                 for n in ast.walk(i) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, path.name == "__init__.py")
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        if node.lineno in type_only:
            continue  # annotations only: no import at run time
        for name in names:
            yield name, node.lineno, node.lineno in lazy_lines


def _ours(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that ``name`` imports (``a.b.c`` may name ``a.b``'s attribute c)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (lazy imports included)."""
    modules = source_files()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {_ours(name, modules) for name, _line, _lazy in imports(path)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def layer_table() -> dict[str, dict[str, int]]:
    """Package -> {package it imports: number of import edges between files} (the closing-note table)."""
    table: dict[str, dict[str, int]] = {}
    for module, targets in import_graph().items():
        row = table.setdefault(module.split(".")[0], {})
        for target in targets:
            pkg = target.split(".")[0]
            if pkg != module.split(".")[0]:
                row[pkg] = row.get(pkg, 0) + 1
    return table


def test_no_package_imports_upward():
    bad = []
    for module, path in source_files().items():
        pkg = module.split(".")[0]
        for name, line, _lazy in imports(path):
            top = name.split(".")[0]
            if top in PACKAGES and top != pkg and top not in ALLOWED[pkg]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} ({pkg} may import {sorted(ALLOWED[pkg])})")
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_files():
    # A package's __init__ re-exporting its own modules is not a cycle between files of different concepts.
    graph = {m: {t for t in ts if not (source_files()[t].name == "__init__.py" and m.startswith(t + "."))}
             for m, ts in import_graph().items()}
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_model_has_no_distributed_or_storage_imports():
    """model/ is single-device PyTorch: parallelism and storage are applied from outside."""
    for path in (ROOT / "model").rglob("*.py"):
        bad = sorted(n for n, _line, _lazy in imports(path) for f in FORBIDDEN_IN_MODEL if n == f or n.startswith(f + "."))
        assert not bad, f"{path} imports {bad}"


def _pulls_in_heavy(modules: dict[str, Path]) -> dict[str, bool]:
    """Module of ours -> whether importing it imports a HEAVY package (through its top-level imports)."""
    eager: dict[str, set[str]] = {}
    direct: dict[str, bool] = {}
    for module, path in modules.items():
        names = [n for n, _line, lazy in imports(path) if not lazy]
        direct[module] = any(n.split(".")[0] in HEAVY for n in names)
        eager[module] = {t for t in (_ours(n, modules) for n in names) if t and t != module}
        parts = module.split(".")  # importing a.b.c runs a/__init__ and a/b/__init__ first
        eager[module] |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules}
    heavy: dict[str, bool] = {}

    def visit(m: str, seen: set[str]) -> bool:
        if m not in heavy:
            seen.add(m)
            heavy[m] = direct[m] or any(visit(t, seen) for t in eager[m] if t not in seen)
        return heavy[m]

    for m in modules:
        visit(m, set())
    return heavy


def _is_heavy(name: str, modules: dict[str, Path], heavy: dict[str, bool]) -> bool:
    ours = _ours(name, modules)
    return heavy[ours] if ours else name.split(".")[0] in HEAVY


def test_lazy_imports_are_only_for_heavy_dependencies_and_say_so():
    """A function-local import keeps torch, ray, deepspeed, mlflow (and the like) out of a light
    command's start-up: it imports such a package, or our module that pulls one in, and carries a
    comment saying so on its line or the line above. Anything else belongs at the top of the file."""
    modules = source_files()
    heavy = _pulls_in_heavy(modules)
    bad = []
    for module, path in modules.items():
        lines = path.read_text().splitlines()
        for name, line, lazy in imports(path):
            if not lazy:
                continue
            where = f"{path.relative_to(ROOT)}:{line} imports {name} inside a function"
            if not _is_heavy(name, modules, heavy):
                bad.append(f"{where}, but it is light: import it at the top")
            elif "#" not in " ".join(lines[max(0, line - 2):line]):
                bad.append(f"{where} without a comment saying what heavy package it keeps out")
    assert not bad, "\n".join(bad)


def test_the_import_parser_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n\ndef f():\n    from pipeline import x  # heavy\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert sorted(imports(pkg / "a.py")) == [("core.b", 1, False), ("pipeline.x", 4, True)]


def test_data_prep_needs_no_training_stack():
    """Sharding runs on CPU-only data nodes: no torch, deepspeed or mlflow in core or data_prep."""
    for pkg in ("core", "data_prep"):
        for path in (ROOT / pkg).rglob("*.py"):
            names = {n.split(".")[0] for n, _line, _lazy in imports(path)}
            assert not (names & {"torch", "torchvision", "deepspeed", "mlflow", "timm"}), path


def test_cli_help_lists_every_subcommand(capsys):
    from cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for command in ("make-synthetic", "shard", "verify-shards", "model-info", "convert-checkpoint"):
        assert command in out


def test_sharding_does_not_import_torch():
    """Every Ray shard worker imports the writer: webdataset (which imports torch) would cost each
    one ~0.5 GB and seconds of start-up."""
    code = ("import sys, data_prep.shard, data_prep.verify, data_prep.writer, data_prep.fanout; "
            "print(sorted(m for m in ('torch', 'webdataset', 'mlflow', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


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


if __name__ == "__main__":  # prints the layer table: python tests/test_layers.py
    for package, row in sorted(layer_table().items(), key=lambda kv: PACKAGES.index(kv[0])):
        print(f"{package:14s} " + ", ".join(f"{p} {n}" for p, n in sorted(row.items(), key=lambda kv: PACKAGES.index(kv[0]))))
