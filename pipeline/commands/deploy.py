"""CLI for the deploy stage: ``tfloop deploy`` rolls a model version out to Kubernetes (k8s/rollout.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.commands._output import emit_json, info


def register(app: typer.Typer) -> None:
    """Add this stage's commands to app."""
    app.command("deploy")(deploy)


def deploy(
    image: Annotated[
        str,
        typer.Option(
            "--image",
            help="Serving image: REPO:TAG, REPO@sha256:DIGEST or REPO:TAG@sha256:DIGEST (runs by digest).",
        ),
    ],
    model_name: Annotated[str, typer.Option("--model-name", help="Model name served by the image.")],
    version: Annotated[int, typer.Option("--version", min=1, help="Model version the image carries.")],
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "-n", help="Target namespace (default: the context's, else 'default')."),
    ] = None,
    context: Annotated[
        str | None, typer.Option("--context", help="kubeconfig context (default: the current one).")
    ] = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)."),
    ] = None,
    in_cluster: Annotated[
        bool, typer.Option("--in-cluster", help="Use the pod's service account instead of a kubeconfig.")
    ] = False,
    digest: Annotated[
        str | None,
        typer.Option(
            "--digest", help="sha256:... of --image REPO:TAG: the pods run REPO@sha256:..., the tag is kept."
        ),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="MLflow run id, recorded as an annotation.")
    ] = None,
    feedback_uri: Annotated[
        str | None,
        typer.Option(
            "--feedback-uri",
            help="Serving's feedback queue, gs://bucket/prefix (kept by later deploys; '' resets it).",
        ),
    ] = None,
    allow_pod_local_feedback: Annotated[
        bool,
        typer.Option(
            "--allow-pod-local-feedback",
            help="Accept a feedback queue inside the pods (lost with them; demos and tests only).",
        ),
    ] = False,
    prefect_api_url: Annotated[
        str | None,
        typer.Option("--prefect-api-url", help="Prefect API for feedback events (kept; '' removes it)."),
    ] = None,
    prefect_api_key_secret: Annotated[
        str | None,
        typer.Option(
            "--prefect-api-key-secret",
            help="Secret NAME[:KEY] (key default api-key) holding PREFECT_API_KEY (kept; '' removes it).",
        ),
    ] = None,
    token_secret: Annotated[
        str | None,
        typer.Option(
            "--token-secret",
            help="Secret NAME[:KEY] (key default token): the /feedback bearer token (kept; '' removes).",
        ),
    ] = None,
    feedback_secret: Annotated[
        str | None,
        typer.Option(
            "--feedback-secret",
            help="Secret NAME[:KEY] (key default secret): the prediction-id signing key replicas share.",
        ),
    ] = None,
    gcp_service_account: Annotated[
        str | None,
        typer.Option(
            "--gcp-service-account",
            help="Workload Identity: SA@PROJECT.iam.gserviceaccount.com the pods act as (kept; '' removes).",
        ),
    ] = None,
    gcp_key_secret: Annotated[
        str | None,
        typer.Option(
            "--gcp-key-secret",
            help="Secret NAME[:KEY] (key default key.json) with a service-account key, mounted for GCS.",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=1, help="Seconds to wait for the rollout (and again for a rollback)."),
    ] = 600.0,
    smoke_url: Annotated[
        str | None,
        typer.Option(
            "--smoke-url", help="Base URL of the Service for the smoke test (default: port-forward)."
        ),
    ] = None,
    smoke_grpc: Annotated[
        bool,
        typer.Option(
            "--smoke-grpc",
            help="Smoke-test over TF Serving's gRPC API (port grpc, 8500) instead of REST; --smoke-url is "
            "then HOST:PORT.",
        ),
    ] = False,
    no_smoke: Annotated[
        bool, typer.Option("--no-smoke", help="Skip the smoke test after the rollout.")
    ] = False,
    network_policy: Annotated[
        bool, typer.Option("--network-policy", help="Also apply the optional NetworkPolicy.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print a diff of what would change; change nothing.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON line on stdout.")
    ] = False,
) -> None:
    """Roll a model version out to Kubernetes, verify it, and roll back automatically on failure.

    Creates or updates the serving stack, waits like `kubectl rollout status`, smoke-tests the Service.
    Serving settings (feedback queue, Prefect, Secrets, credentials) persist: pass only what changes.

    On failure every object it changed is restored. Exit code 0 when the new version serves, else 1.
    """
    from k8s.rollout import deploy as run_rollout
    from k8s.settings import ClusterSettings, DeployTarget, ServingSettings
    from k8s.smoke import SmokeSettings

    target = DeployTarget(image=image, model_name=model_name, version=version, run_id=run_id, digest=digest)
    serving = ServingSettings.parse(
        feedback_uri=feedback_uri,
        prefect_api_url=prefect_api_url,
        prefect_api_key_secret=prefect_api_key_secret,
        token_secret=token_secret,
        feedback_secret=feedback_secret,
        gcp_service_account=gcp_service_account,
        gcp_key_secret=gcp_key_secret,
    )
    settings = ClusterSettings(
        kubeconfig=kubeconfig, context=context, namespace=namespace, in_cluster=in_cluster
    )
    result = run_rollout(
        target,
        settings=settings,
        timeout_s=timeout,
        dry_run=dry_run,
        smoke=SmokeSettings(enabled=not no_smoke, url=smoke_url, protocol="grpc" if smoke_grpc else "rest"),
        serving=serving,
        allow_pod_local_feedback=allow_pod_local_feedback,
        network_policy=network_policy,
        on_progress=lambda message: info(message),
    )
    if dry_run:
        typer.echo(result.diff or "no changes", err=as_json)
    if result.ok:
        info(f"ok: {result.reason}")
    else:
        info(f"rollout failed: {result.reason}")
        for line in [*(problem.describe() for problem in result.pod_problems), *result.events]:
            info(f"  {line}")
    for note in result.notes:
        info(f"note: {note}")
    if as_json:
        emit_json(result.to_dict())
    if not result.ok:
        raise typer.Exit(1)
