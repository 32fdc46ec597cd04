"""Code tier: the architecture's import boundaries and the thin-flow rule hold.

import-linter checks the contracts in pyproject.toml (only pipeline/ imports prefect, only k8s/ imports
kubernetes, serving/ carries no training stack). A second, AST-level check pins what the serving image may
import at all, and that every Prefect task is a short wrapper over a plain function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.code

ROOT = Path(__file__).resolve().parent.parent
SERVING_ALLOWED = {
    "serving",
    "storage",
    "tensorflow",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic_settings",
    "PIL",
    "numpy",
    "prometheus_client",
    "httpx",
    "google",
    "anyio",
    "grpc",  # grpcio: the gRPC front end
    "grpc_health",  # grpcio-health-checking
    "grpc_reflection",  # grpcio-reflection
    "tensorflow_serving",  # tensorflow-serving-api: TF Serving's protos and stubs
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_import_linter_contracts_hold() -> None:
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_serving_imports_only_what_its_image_carries() -> None:
    stdlib = set(sys.stdlib_module_names)
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "serving").rglob("*.py")
        for name in _imports(path)
        if name not in stdlib and name not in SERVING_ALLOWED
    }
    assert not offenders, f"serving/ imports packages its image does not carry: {sorted(offenders)}"


@pytest.mark.parametrize("package", ["training", "export", "serving", "k8s", "storage"])
def test_only_pipeline_imports_prefect(package: str) -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py") if "prefect" in _imports(p)]
    assert not offenders


def test_prefect_tasks_are_thin_wrappers() -> None:
    tasks_file = ROOT / "pipeline" / "tasks.py"
    tree = ast.parse(tasks_file.read_text())
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        decorators = {ast.unparse(d).split("(")[0] for d in node.decorator_list}
        if decorators & {"task", "prefect.task"}:
            body = [
                s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
            ]
            assert len(body) <= 6, (
                f"task {node.name} has {len(body)} statements: move the logic to a plain function"
            )
