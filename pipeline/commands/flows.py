"""CLI for the orchestration stage: a local Prefect server, deployments from flows.yaml, runs and a worker.

``tfloop flows server`` starts Prefect's server with its home in the state folder; ``tfloop flows deploy``
deploys flows.yaml to it (creating the work pool); ``tfloop flows worker`` starts a process worker that runs
the deployments' flow runs; ``tfloop flows run NAME`` starts one deployment (or, with ``--local``, runs
the flow in this process without a server).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.commands._output import emit_json, fail, info

flows_app = typer.Typer(
    help="Prefect orchestration: local server, deployments from flows.yaml, runs and workers.",
    no_args_is_help=True,
)

FLOW_OF_DEPLOYMENT = {
    "nightly-retrain": "train-and-deploy",
    "train-and-deploy": "train-and-deploy",
    "feedback-retrain": "retrain-from-feedback",
}


def _settings() -> Any:
    from pipeline.settings import TfloopSettings

    return TfloopSettings()


def _project_dir() -> Path:
    return Path(__file__).resolve().parents[2]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@flows_app.command("server")
def server(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the API and UI.")] = 4200,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Serve Prefect's web UI too.")] = True,
) -> None:
    """Start a local Prefect server (events, triggers, automations, scheduler on) until Ctrl-C.

    Its database and logs live in <state folder>/prefect/. Other tfloop commands find it there; for
    other tools, export the PREFECT_API_URL it prints.
    """
    from pipeline.prefect_server import start_server

    settings = _settings()
    info(f"starting a Prefect server with PREFECT_HOME={settings.prefect_home} (first start: ~20 s)")
    running = start_server(home=settings.prefect_home, host=host, port=port, ui=ui)
    signal.signal(signal.SIGTERM, _interrupt)
    typer.echo(f"Prefect server ready: {running.ui_url}")
    typer.echo(f"export PREFECT_API_URL={running.api_url}")
    try:
        while running.process.poll() is None:
            time.sleep(1.0)
        fail(f"the Prefect server exited with code {running.process.returncode}; see {running.log_path}")
    except KeyboardInterrupt:
        info("stopping the Prefect server")
    finally:
        running.stop()


@flows_app.command("deploy")
def deploy(
    flows_file: Annotated[Path, typer.Option("--file", help="Deployment file (prefect.yaml schema).")] = Path(
        "flows.yaml"
    ),
    pool: Annotated[
        str, typer.Option(help="Work pool kind from flows.yaml definitions: local or kubernetes-gpu.")
    ] = "local",
    feedback_threshold: Annotated[
        int | None, typer.Option(help="Corrections that start feedback-retrain (flows.yaml: 50).")
    ] = None,
    feedback_within: Annotated[
        int | None, typer.Option(help="Window in seconds for the threshold (flows.yaml: 86400).")
    ] = None,
    name: Annotated[list[str] | None, typer.Option("--name", help="Only these deployments (repeat).")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", help="Default flow parameter key=value for every deployment (JSON ok)."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON line on stdout at the end.")
    ] = False,
) -> None:
    """Deploy flows.yaml to the Prefect server (like `prefect deploy --prefect-file flows.yaml --all`).

    Creates the work pool when missing (process pool `tfloop-local`, or the Kubernetes GPU pool from
    k8s/manifests/prefect/gpu-job-template.json with --pool kubernetes-gpu), applies each deployment's
    concurrency limit (one run at a time; a colliding run is enqueued) and creates the model's global
    concurrency limit tfloop-loop-<model> that all loop runs of the model share. Start a worker afterwards
    with `tfloop flows worker`.
    """
    from pipeline.locking import loop_limit_name
    from pipeline.prefect_server import DeployOptions, deploy_flows, require_server

    settings = _settings()
    api_url = require_server(home=settings.prefect_home)
    options = DeployOptions(
        pool=pool,
        feedback_threshold=feedback_threshold,
        feedback_within_s=feedback_within,
        names=tuple(name or ()),
        parameters=_parse_params(param or []),
    )
    project = _project_dir()
    path = flows_file if flows_file.is_absolute() else (Path.cwd() / flows_file)
    if not path.exists():
        path = project / flows_file
    info(f"deploying {path} to {api_url}")
    deployed = deploy_flows(
        flows_file=path,
        project_dir=project,
        api_url=api_url,
        home=settings.prefect_home,
        options=options,
        model_name=settings.model_name,
    )
    for deployment in deployed:
        info(f"deployed {FLOW_OF_DEPLOYMENT.get(deployment, '?')}/{deployment}")
    info(
        "one run at a time per deployment (a colliding run waits: ENQUEUE) and per model "
        f"(global concurrency limit {loop_limit_name(settings.model_name)})"
    )
    info("start a worker to run them: tfloop flows worker")
    if as_json:
        emit_json(
            {
                "api_url": api_url,
                "deployments": deployed,
                "pool": pool,
                "concurrency_limit": loop_limit_name(settings.model_name),
            }
        )


def _parse_params(values: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"--param {item!r} must look like key=value (value parsed as JSON when it can be)")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


@flows_app.command("run")
def run(
    name: Annotated[
        str, typer.Argument(help="Deployment: nightly-retrain, feedback-retrain or train-and-deploy.")
    ],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="Flow parameter key=value (JSON values ok).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the run to finish.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 3600.0,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Run the flow in this process (no server or worker needed; one run per model at a time on "
            "this machine, by a file lock in the Prefect home).",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON line on stdout at the end.")
    ] = False,
) -> None:
    """Start one run of a deployment and (by default) wait for it; --local runs the flow right here."""
    params = _parse_params(param or [])
    flow_name = FLOW_OF_DEPLOYMENT.get(name)
    if flow_name is None:
        fail(f"unknown deployment {name!r}; choose one of {', '.join(FLOW_OF_DEPLOYMENT)}")
    settings = _settings()
    if local:
        from pipeline import flows, summary

        os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home))
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
        flow_fn = (
            flows.retrain_from_feedback if flow_name == "retrain-from-feedback" else flows.train_and_deploy
        )
        result = flow_fn(**params)
        typer.echo(summary.format_summary(summary.LoopResult.from_dict(result)), err=True)
        if as_json:
            emit_json(result)
        return

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline.prefect_server import require_server

    api_url = require_server(home=settings.prefect_home)
    info(f"starting {flow_name}/{name} on {api_url}")
    with temporary_settings({PREFECT_API_URL: api_url}):
        flow_run = run_deployment(
            f"{flow_name}/{name}", parameters=params, timeout=timeout if wait else 0, as_subflow=False
        )
    state = flow_run.state.name if flow_run.state else "unknown"
    info(f"flow run {flow_run.name} ({flow_run.id}): {state}")
    if as_json:
        emit_json({"flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name, "state": state})
    if (
        wait
        and flow_run.state is not None
        and flow_run.state.is_final()
        and not flow_run.state.is_completed()
    ):
        raise typer.Exit(1)


@flows_app.command("worker")
def worker(
    pool: Annotated[str, typer.Option(help="Work pool to poll.")] = "tfloop-local",
    limit: Annotated[int | None, typer.Option(help="Most flow runs at once.")] = 1,
) -> None:
    """Start a Prefect process worker that runs the deployments' flow runs (Ctrl-C stops it).

    Same as `prefect worker start --pool tfloop-local --type process` with this project's settings.
    """
    from pipeline.prefect_server import prefect_env, require_server

    settings = _settings()
    api_url = require_server(home=settings.prefect_home)
    env = dict(os.environ)
    env.update(prefect_env(home=settings.prefect_home, api_url=api_url))
    env.setdefault("TFLOOP_HOME", str(settings.home_dir))
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    if limit:
        command += ["--limit", str(limit)]
    info(f"starting a worker for {pool} on {api_url}")
    try:
        completed = subprocess.run(command, env=env, cwd=_project_dir(), check=False)
    except KeyboardInterrupt:
        return
    if completed.returncode not in (0, 130, -2):
        raise typer.Exit(completed.returncode)


def register(app: typer.Typer) -> None:
    """Add the ``flows`` command group to app."""
    app.add_typer(flows_app, name="flows")
