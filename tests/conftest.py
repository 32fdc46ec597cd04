"""Shared pytest fixtures: a GCS emulator on loopback, free ports, and a throwaway tfloop state folder."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def gcs_emulator_host() -> Iterator[str]:
    """A gcp-storage-emulator serving the GCS JSON API on loopback, honouring ``ifGenerationMatch``
    (tests/gcs_emulator.py); yields its base URL."""
    from gcp_storage_emulator.server import create_server

    from tests import gcs_emulator

    gcs_emulator.install()

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    host = f"http://127.0.0.1:{port}"
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    try:
        yield host
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture
def gcs_bucket(gcs_emulator_host: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the emulator; yields ``gs://<name>``."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(project="tfloop-test", credentials=AnonymousCredentials())
    name = "tfloop-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{name}-{free_port()}"
    client.create_bucket(name)
    return f"gs://{name}"


@pytest.fixture
def tfloop_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty tfloop state folder, exported as TFLOOP_HOME for code and CLIs under test."""
    home = tmp_path / "tfloop-home"
    home.mkdir()
    monkeypatch.setenv("TFLOOP_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_ephemeral_servers() -> Iterator[None]:
    """Stop Prefect's in-process temporary servers while pytest's output streams are still open.

    Prefect stops them at interpreter exit otherwise, and its log line then hits a closed stream.
    """
    yield
    import sys

    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is not None:
        for server in list(server_module.SubprocessASGIServer._instances.values()):
            server.stop()
