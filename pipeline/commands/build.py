"""CLI command ``tfloop build``: build (and push) the serving image of one exported model version."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, cast

import typer

from pipeline.commands._output import emit_json, info

BuilderChoice = Literal["auto", "docker", "buildah"]


def _default_ca_bundle() -> Path | None:
    for name in ("TFLOOP_BUILD_CA_BUNDLE", "PIP_CERT", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return None


def _build(
    model_base: Annotated[
        str | None,
        typer.Option(
            "--model-base",
            help="Export base holding <name>/<version>/ (path or gs://). Default: state folder.",
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="Model to package (image name).")
    ] = None,
    version: Annotated[
        int | None,
        typer.Option("--version", min=1, help="Version to bake in (default: the latest complete one)."),
    ] = None,
    base_image: Annotated[
        str | None,
        typer.Option(
            "--base-image",
            help="Base image with Python 3.11 (default python:3.11-slim-bookworm; a local one from "
            "scripts/make-base-image.sh where no registry is reachable).",
        ),
    ] = None,
    builder_image: Annotated[
        str | None,
        typer.Option(
            "--builder-image",
            help="Base of the build stages: the same Python as --base-image, ideally with binutils "
            "(default: --base-image).",
        ),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry", help="Registry HOST:PORT (or HOST:PORT/path): tags <registry>/<name>:v<version>."
        ),
    ] = None,
    push: Annotated[
        bool | None,
        typer.Option("--push/--no-push", help="Push the tags (default: push when --registry is given)."),
    ] = None,
    tls_verify: Annotated[
        bool | None,
        typer.Option(
            "--tls-verify/--no-tls-verify", help="Check the registry's TLS (default: not for loopback)."
        ),
    ] = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port the server listens on.")] = 8501,
    ca_bundle: Annotated[
        Path | None,
        typer.Option(
            "--ca-bundle",
            exists=True,
            dir_okay=False,
            help="CA bundle for a TLS-intercepting proxy, passed as build secret 'cacert' "
            "(default: $TFLOOP_BUILD_CA_BUNDLE, $PIP_CERT or $REQUESTS_CA_BUNDLE).",
        ),
    ] = None,
    builder: Annotated[
        str,
        typer.Option(
            "--builder", help="auto (Docker when a daemon answers, else buildah), docker or buildah."
        ),
    ] = "auto",
    storage_driver: Annotated[
        str | None,
        typer.Option(
            "--storage-driver", envvar="STORAGE_DRIVER", help="buildah storage driver (e.g. vfs, overlay)."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON line: image, digest, size_bytes, builder.")
    ] = False,
) -> None:
    """Build the serving image (Dockerfile.serve) with one model version baked in; push it when asked.

    Build output streams to stderr. The image is tagged <registry>/<name>:v<version> and with a content tag,
    and its reference is set as a tag on the MLflow run that produced the version.
    """
    from export.image import ImageBuildError, ImageSpec, build_image
    from pipeline.settings import TfloopSettings

    if builder not in {"auto", "docker", "buildah"}:
        raise ImageBuildError(f"--builder must be auto, docker or buildah, not {builder!r}")
    settings = TfloopSettings()
    spec = ImageSpec(
        model_base=model_base or settings.models_uri,
        model_name=model_name or settings.model_name,
        version=version,
        base_image=base_image or ImageSpec.base_image,
        builder_image=builder_image,
        registry=registry,
        push=push,
        tls_verify=tls_verify,
        port=port,
        ca_bundle=ca_bundle or _default_ca_bundle(),
        builder=cast(BuilderChoice, builder),
        storage_driver=storage_driver,
        mlflow_tracking_uri=settings.tracking_uri,
    )
    built = build_image(spec, on_log=lambda line: info(line))
    info(f"built {built.image} ({built.size_bytes / 1e6:.0f} MB, {built.digest}) with {built.builder}")
    if built.pushed:
        info(f"pushed {', '.join(built.tags)}")
    if as_json:
        emit_json(built.as_json())


def register(app: typer.Typer) -> None:
    """Add this stage's commands to app."""
    app.command("build")(_build)
