"""pyproject.toml says what the code needs: every third-party package the source imports (lazy imports
too) is a declared dependency, every declared runtime dependency is used, and the metadata is in the
current standard form (an SPDX license string: the table form makes pip warn on every install)."""
from __future__ import annotations

import importlib.metadata
import re
import sys

import pytest

from tests.test_layers import PACKAGES, ROOT, imports, source_files

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

# Declared but not imported by our code, and why they are needed anyway.
USED_INDIRECTLY = {
    "torchvision": "timm's models need it; pinned beside torch so both come from the same build",
    "nvidia-ml-py": "MLflow's system metrics read GPU utilisation through it (pipeline/mlflow_tracking.py)",
    "psutil": "MLflow's system metrics read CPU, memory and disk through it",
}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> set[str]:
    return {_dist_name(r) for r in _pyproject()["project"]["dependencies"]}


def _imported_distributions() -> dict[str, set[str]]:
    """Distribution -> the source files that import it."""
    by_module = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for _module, path in source_files().items():
        for name, _line, _lazy in imports(path):
            top = name.split(".")[0]
            if top in PACKAGES or top in sys.stdlib_module_names or top == "__future__":
                continue
            dists = by_module.get(top)
            assert dists, f"{path.relative_to(ROOT)} imports {top}, which no installed distribution provides"
            # e.g. mlflow is provided by mlflow and mlflow-skinny: the one we declare counts
            dist = next((d.lower() for d in dists if d.lower() in _declared()), dists[0].lower())
            found.setdefault(dist.replace("_", "-"), set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    missing = {d: sorted(files)[:3] for d, files in _imported_distributions().items() if d not in _declared()}
    assert not missing, f"imported but not in [project].dependencies: {missing}"


def test_every_declared_dependency_is_used():
    imported = set(_imported_distributions())
    unused = sorted(d for d in _declared() if d not in imported and d not in USED_INDIRECTLY)
    assert not unused, f"declared but never imported (drop them, or say why in USED_INDIRECTLY): {unused}"


def test_license_is_an_spdx_string():
    assert isinstance(_pyproject()["project"]["license"], str)
