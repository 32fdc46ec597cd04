"""Write requirements/serving.txt: the serving image's pinned dependencies, taken from requirements/lock.txt.

The roots are the packages the serving app and the storage package import; their dependency closure is read
from the installed distributions' metadata (run with the project's .venv) and every pin is taken from the
lock, so the image and the development environment agree.
Usage: .venv/bin/python scripts/serving-requirements.py
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = (
    "tensorflow-cpu",
    "fastapi",
    "uvicorn",
    "uvloop",
    "httptools",
    "starlette",
    "pydantic",
    "pydantic-settings",
    "pillow",
    "numpy",
    "prometheus-client",
    "python-multipart",
    "httpx",
    "google-cloud-storage",
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
)
# TF Serving's protos and stubs for the gRPC API. Its wheel depends on the full `tensorflow` build, so it
# is pinned apart from the lock (the Makefile's TFSA) and installed with --no-deps, as in the Makefile.
NO_DEPS = ("tensorflow-serving-api",)
# Declared by tensorflow-cpu (and its dependencies) but never imported when a SavedModel is loaded and
# called: the Keras training stack, the C++ parser bindings and build tools. Leaving them out keeps
# the image under 1 GB; Dockerfile.serve installs with --no-deps and smoke-tests the imports instead.
NOT_SERVED = ("keras", "h5py", "libclang", "setuptools", "wheel")
REPO = Path(__file__).resolve().parent.parent


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def closure(roots: tuple[str, ...]) -> dict[str, str]:
    found: dict[str, str] = {}
    pending = list(roots)
    while pending:
        name = normalize(pending.pop())
        if name in found or name in NOT_SERVED:
            continue
        distribution = metadata.distribution(name)
        found[name] = distribution.version
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


def makefile_pins(path: Path) -> dict[str, str]:
    """Pins the Makefile installs with --no-deps (``TFSA := name==version``)."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        found = re.fullmatch(r"\w+\s*:?=\s*([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if found:
            pins[normalize(found.group(1))] = found.group(2)
    return pins


def main() -> int:
    lock = read_lock(REPO / "requirements" / "lock.txt")
    extra = makefile_pins(REPO / "Makefile")
    lines = [
        "# Serving image dependency set (Dockerfile.serve). Derived from requirements/lock.txt; regenerate:",
        "#   .venv/bin/python scripts/serving-requirements.py",
        f"# Roots: {', '.join(ROOTS)}. No training, prefect or mlflow.",
        "# Left out (declared by tensorflow-cpu, unused for serving; install with --no-deps):",
        f"#   {', '.join(NOT_SERVED)}.",
        f"# Pinned by the Makefile, not the lock (the wheel wants full tensorflow): {', '.join(NO_DEPS)}.",
    ]
    for name, installed in sorted(closure(ROOTS).items()):
        version = lock.get(name)
        if version is None:
            print(
                f"error: {name} {installed} is not pinned in requirements/lock.txt; run `make lock`",
                file=sys.stderr,
            )
            return 1
        lines.append(f"{name}=={version}")
    for name in NO_DEPS:
        if name not in extra:
            print(f"error: the Makefile pins no {name} (TFSA := {name}==VERSION)", file=sys.stderr)
            return 1
        lines.append(f"{name}=={extra[name]}")
    (REPO / "requirements" / "serving.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote requirements/serving.txt ({len(lines) - 6} pins)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
