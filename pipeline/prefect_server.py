"""Start, find and stop a local Prefect server whose home (database, logs) lives in the tfloop state folder.

A running server is what evaluates deployment triggers (its event and automation services): the ephemeral
server that an in-process flow call starts does not. ``tfloop flows server`` and the integration tests use
:func:`start_server`; other commands find a running one with :func:`locate_server`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from pipeline.feedback_queue import FEEDBACK_EVENT
from storage import TfloopError

SERVER_INFO_FILE = "tfloop-server.json"


class PrefectServerError(TfloopError):
    """A local Prefect server could not be started or reached."""


def prefect_env(*, home: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment variables that point Prefect at ``home`` (and at a server, when ``api_url`` is given)."""
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_is_healthy(api_url: str, *, timeout: float = 2.0) -> bool:
    """True when ``GET <api_url>/health`` answers 200."""
    try:
        return httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class PrefectServer:
    """A Prefect server subprocess started by tfloop; a context manager that stops it on exit."""

    api_url: str
    home: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def env(self) -> dict[str, str]:
        """Environment for clients, workers and flows that should use this server."""
        return prefect_env(home=self.home, api_url=self.api_url)

    def stop(self, *, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``) and forget its info file."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        info = self.home / SERVER_INFO_FILE
        if info.exists() and _read_info(info).get("pid") == self.process.pid:
            info.unlink()

    def __enter__(self) -> PrefectServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _read_info(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def start_server(
    *,
    home: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    ui: bool = False,
    startup_timeout: float = 180.0,
    extra_env: Mapping[str, str] | None = None,
) -> PrefectServer:
    """Start ``prefect server start`` with all services (events, triggers, automations, scheduler) on.

    The database is SQLite under ``home``; the server's output goes to ``home/server.log``. Returns once
    ``/api/health`` answers; raises :class:`PrefectServerError` with the log's tail if it does not.
    """
    home = home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = port or _free_port(host)
    api_url = f"http://{host}:{port}/api"
    if server_is_healthy(api_url):
        raise PrefectServerError(
            f"something already answers at {api_url}; stop it or choose another port with --port"
        )
    # The user's PREFECT_* settings (e.g. a PostgreSQL database URL) apply; a client API URL must not.
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(prefect_env(home=home))
    env.update(
        {
            "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
            "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "true",
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "true",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
        }
    )
    # SQLite waits for its write lock; on a busy machine Prefect's 10 s default times out.
    env.setdefault("PREFECT_SERVER_DATABASE_TIMEOUT", "60")
    env.update(extra_env or {})
    log_path = home / "server.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PrefectServer(api_url=api_url, home=home, process=process, log_path=log_path)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PrefectServerError(
                f"the Prefect server exited with code {process.returncode} while starting; "
                f"its log ({log_path}) ends with:\n{_tail(log_path)}"
            )
        if server_is_healthy(api_url):
            (home / SERVER_INFO_FILE).write_text(json.dumps({"api_url": api_url, "pid": process.pid}))
            return server
        time.sleep(0.5)
    server.stop()
    raise PrefectServerError(
        f"the Prefect server did not answer at {api_url} within {startup_timeout:.0f} s; "
        f"see {log_path}:\n{_tail(log_path)}"
    )


def _tail(path: Path, *, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def locate_server(*, home: Path, environ: Mapping[str, str] | None = None) -> str | None:
    """The URL of a reachable Prefect API: ``PREFECT_API_URL``, else a server tfloop started in ``home``."""
    environ = os.environ if environ is None else environ
    candidates = [environ.get("PREFECT_API_URL")]
    info = _read_info(home.expanduser().resolve() / SERVER_INFO_FILE)
    candidates.append(str(info["api_url"]) if info.get("api_url") else None)
    for url in candidates:
        if url and server_is_healthy(url):
            return url
    return None


def require_server(*, home: Path) -> str:
    """Like :func:`locate_server`, but a clear error that says how to start one when none answers."""
    url = locate_server(home=home)
    if url is None:
        raise PrefectServerError(
            "no Prefect server answers: start one with `tfloop flows server` (it keeps its database in "
            f"{home}) or set PREFECT_API_URL to your server's API URL"
        )
    return url


def ensure_concurrency_limit(*, name: str, limit: int = 1, api_url: str | None = None) -> bool:
    """Create the global concurrency limit ``name`` with ``limit`` slots when missing; True when created.

    An existing limit is left as it is (an operator may have deactivated it on purpose). ``api_url`` None
    uses the current Prefect settings (inside a flow run: the run's server).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(updates), get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:
            return False
        return True


# --- deployments from flows.yaml ----------------------------------------------------------------------------

FEEDBACK_TRIGGER_DEPLOYMENT = "feedback-retrain"
POOLS = ("local", "kubernetes-gpu")


@dataclass(frozen=True)
class DeployOptions:
    """What ``tfloop flows deploy`` may change in flows.yaml before deploying it (``parameters`` are
    merged into every selected deployment's default parameters)."""

    pool: str = "local"
    feedback_threshold: int | None = None
    feedback_within_s: int | None = None
    names: tuple[str, ...] = ()
    parameters: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise PrefectServerError(
                f"unknown work pool kind {self.pool!r}; choose one of {', '.join(POOLS)}"
            )
        if self.feedback_threshold is not None and self.feedback_threshold < 1:
            raise PrefectServerError("--feedback-threshold must be at least 1")
        if self.feedback_within_s is not None and self.feedback_within_s < 1:
            raise PrefectServerError("--feedback-within must be at least 1 second")


def load_flows_file(path: Path) -> dict[str, Any]:
    """The parsed deployment file (YAML anchors resolved); a clear error when it is missing or malformed."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise PrefectServerError(f"cannot read {path}: {error}; run from the repository root") from error
    except yaml.YAMLError as error:
        raise PrefectServerError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        raise PrefectServerError(f"{path} has no `deployments:` list; it must follow the prefect.yaml schema")
    return data


def _resolve_env_templates(value: Any, environ: Mapping[str, str]) -> Any:
    """Replace ``"{{ $VAR }}"`` by the variable's value; drop entries whose variable is unset."""
    if isinstance(value, dict):
        resolved = {key: _resolve_env_templates(item, environ) for key, item in value.items()}
        return {key: item for key, item in resolved.items() if item is not _UNSET}
    if isinstance(value, str):
        match = _ENV_TEMPLATE.fullmatch(value.strip())
        if match:
            return environ.get(match.group(1), _UNSET)
    return value


_UNSET = object()
_ENV_TEMPLATE = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def apply_deploy_options(
    config: dict[str, Any], options: DeployOptions, *, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A copy of the parsed flows.yaml with the pool, the feedback threshold and the selection applied."""
    environ = os.environ if environ is None else environ
    result = copy.deepcopy(config)
    pools = result.get("definitions", {}).get("work_pools", {})
    if options.pool not in pools:
        raise PrefectServerError(
            f"flows.yaml defines no work pool {options.pool!r} under definitions.work_pools"
        )
    pool = _resolve_env_templates(copy.deepcopy(pools[options.pool]), environ)
    deployments = []
    for deployment in result["deployments"]:
        if options.names and deployment.get("name") not in options.names:
            continue
        deployment["work_pool"] = copy.deepcopy(pool)
        if options.parameters:
            deployment["parameters"] = {**(deployment.get("parameters") or {}), **options.parameters}
        for trigger in deployment.get("triggers") or []:
            if FEEDBACK_EVENT not in (trigger.get("expect") or []):
                continue  # the drift trigger fires on one event, whatever the feedback threshold
            if options.feedback_threshold is not None:
                trigger["threshold"] = options.feedback_threshold
            if options.feedback_within_s is not None:
                trigger["within"] = options.feedback_within_s
        deployments.append(deployment)
    if options.names and len(deployments) != len(set(options.names)):
        known = ", ".join(str(d.get("name")) for d in config["deployments"])
        raise PrefectServerError(f"unknown deployment name in {list(options.names)}; flows.yaml has: {known}")
    result["deployments"] = deployments
    return result


def ensure_work_pool(*, name: str, kind: str, api_url: str, project_dir: Path) -> bool:
    """Create the work pool if it does not exist; True when it was created.

    ``kind`` ``local`` makes a process pool with Prefect's default template; ``kubernetes-gpu`` makes a
    Kubernetes pool whose base job template is ``k8s/manifests/prefect/gpu-job-template.json``.
    """
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if kind == "local":
        from prefect.workers.process import ProcessWorker

        pool = WorkPoolCreate(
            name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
        )
    else:
        template_path = project_dir / "k8s" / "manifests" / "prefect" / "gpu-job-template.json"
        try:
            template = yaml.safe_load(template_path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise PrefectServerError(f"cannot read the GPU job template {template_path}: {error}") from error
        pool = WorkPoolCreate(name=name, type="kubernetes", base_job_template=template)
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(pool)
            return True


def deploy_flows(
    *,
    flows_file: Path,
    project_dir: Path,
    api_url: str,
    home: Path,
    options: DeployOptions,
    timeout_s: float = 300.0,
    model_name: str | None = None,
) -> list[str]:
    """Deploy flows.yaml (with ``options`` applied) with ``prefect deploy --all``; the deployed names.

    The work pool is created first when missing. ``prefect deploy`` runs in ``project_dir`` so the
    entrypoints and the default pull step (the working directory) point at this checkout. Each
    deployment's ``concurrency_limit`` (flows.yaml: one run at a time, ENQUEUE) is applied by Prefect;
    with ``model_name`` the model's cross-deployment limit ``tfloop-loop-<model>`` is created too.
    """
    import yaml

    config = apply_deploy_options(load_flows_file(flows_file), options)
    pool_name = str(config["deployments"][0]["work_pool"]["name"]) if config["deployments"] else ""
    if pool_name:
        ensure_work_pool(name=pool_name, kind=options.pool, api_url=api_url, project_dir=project_dir)
    home.mkdir(parents=True, exist_ok=True)
    generated = home / "flows.deploy.yaml"
    generated.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(prefect_env(home=home, api_url=api_url))
    command = [
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "--prefect-file",
        str(generated),
        "--all",
    ]
    try:
        completed = subprocess.run(
            command, cwd=project_dir, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise PrefectServerError(f"`prefect deploy` did not finish within {timeout_s:.0f} s") from error
    output = (completed.stdout or "") + (completed.stderr or "")
    if completed.returncode != 0 or "Skipping deployment configuration" in output:
        tail = "\n".join(output.splitlines()[-25:])
        raise PrefectServerError(f"`prefect deploy` failed (exit {completed.returncode}):\n{tail}")
    if model_name:
        from pipeline.locking import loop_limit_name

        ensure_concurrency_limit(name=loop_limit_name(model_name), limit=1, api_url=api_url)
    return [str(deployment["name"]) for deployment in config["deployments"]]
