"""Delivering an exported version: the checks that refuse a delivery that cannot work (before training),
the serving image build, the rollout through :mod:`k8s.rollout`, and the smoke test of the candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import storage
from pipeline.options import DeliveryOptions


@dataclass(frozen=True)
class DeliveryRequest:
    """Which exported version to build, roll out and smoke-test, and how."""

    model_name: str
    model_base: str
    version: int
    run_id: str
    tracking_uri: str
    options: DeliveryOptions
    feedback_uri: str | None = None


@dataclass(frozen=True)
class StepOutcome:
    """A delivery step that ran (``value`` is its product, e.g. the image reference) or was skipped.

    ``digest`` is the pushed image's manifest digest (``sha256:...``), what the rollout pins.
    """

    ran: bool
    detail: str
    value: str | None = None
    digest: str | None = None


class DeliveryError(storage.TfloopError):
    """A rollout or smoke test failed (the previous version keeps serving)."""


class RolledBackError(DeliveryError):
    """A rollout failed and was rolled back: retrying it would repeat the same rollout, so it is final."""


def cluster_configured(options: DeliveryOptions) -> str | None:
    """Why no cluster is configured (None when a kubeconfig or in-cluster config exists)."""
    import os

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    if options.kubeconfig:
        path = Path(options.kubeconfig).expanduser()
    else:
        entries = [entry for entry in os.environ.get("KUBECONFIG", "").split(os.pathsep) if entry]
        path = Path(entries[0]).expanduser() if entries else Path("~/.kube/config").expanduser()
    if path.is_file():
        return None
    return f"no cluster configured (no kubeconfig at {path}, not in a pod)"


REGISTRY_REQUIRED = (
    "a cluster pulls images from a registry: set delivery.registry=HOST[:PORT] or delivery.rollout=false"
)


class DeliveryConfigError(DeliveryError):
    """The delivery options cannot work (checked before training, so no training time is spent)."""


def check_delivery(options: DeliveryOptions) -> None:
    """Refuse delivery options that cannot succeed, before anything is trained.

    With a cluster configured (kubeconfig or in a pod), rollout not disabled and an image to be built, the
    image must be pushed to a registry the cluster can pull from.
    """
    if options.rollout is False or options.build_image is False:
        return
    if cluster_configured(options) is not None:
        return
    where = "" if options.kubeconfig is None else f" (kubeconfig {options.kubeconfig})"
    if not options.registry:
        raise DeliveryConfigError(f"{REGISTRY_REQUIRED}{where}")
    if options.push is False:
        raise DeliveryConfigError(
            f"delivery.push=false with a cluster configured: the image would stay on this machine; "
            f"{REGISTRY_REQUIRED} (and leave delivery.push unset)"
        )


def image_builder_missing() -> str | None:
    """Why no image can be built here (None when Docker or buildah is available)."""
    from export.image import buildah_available, docker_available

    if docker_available() or buildah_available():
        return None
    return "no image builder (no Docker Engine answers, buildah is not installed)"


def build_serving_image(request: DeliveryRequest) -> StepOutcome:
    """Build the serving image of the version when asked to, or when a builder and a cluster exist."""
    options = request.options
    local_note = (
        f"; a serving process on {request.model_base} loads version {request.version} as its candidate "
        "(pinned routes) and serves it once it is promoted"
    )
    if options.build_image is False:
        return StepOutcome(ran=False, detail="image build disabled (delivery.build_image=false)" + local_note)
    missing = image_builder_missing()
    if missing:
        return StepOutcome(ran=False, detail=f"image build skipped: {missing}" + local_note)
    if options.build_image is None and options.registry is None:
        no_cluster = cluster_configured(options)
        if no_cluster:
            return StepOutcome(
                ran=False,
                detail=f"image build skipped: {no_cluster} and no registry given; set "
                "delivery.build_image=true to build anyway" + local_note,
            )
    from export.image import ImageSpec, build_image

    spec_fields: dict[str, Any] = {
        "model_base": request.model_base,
        "model_name": request.model_name,
        "version": request.version,
        "registry": options.registry,
        "push": options.push,
        "mlflow_tracking_uri": request.tracking_uri,
    }
    if options.base_image:
        spec_fields["base_image"] = options.base_image
    built = build_image(ImageSpec(**spec_fields))
    pinned = f"; pushed as {built.pinned}" if built.pinned else " (not pushed)"
    return StepOutcome(
        ran=True,
        detail=f"built {built.image} ({built.digest}) with {built.builder}{pinned}",
        value=built.image,
        digest=built.digest if built.pushed else None,
    )


def roll_out_image(request: DeliveryRequest, *, image: str | None, digest: str | None = None) -> StepOutcome:
    """Roll ``image`` out (with its smoke test and automatic rollback); skip without an image or cluster.

    ``digest`` pins the image: the Deployment runs ``repo@digest``. A failed rollout raises
    :class:`RolledBackError` when it was rolled back (final: not retried), :class:`DeliveryError` otherwise.
    """
    options = request.options
    if options.rollout is False:
        return StepOutcome(ran=False, detail="rollout disabled (delivery.rollout=false)")
    if image is None:
        return StepOutcome(ran=False, detail="rollout skipped: no image was built")
    no_cluster = cluster_configured(options)
    if no_cluster:
        return StepOutcome(ran=False, detail=f"rollout skipped: {no_cluster}")
    from k8s.rollout import deploy
    from k8s.settings import ClusterSettings, DeployTarget, ServingSettings
    from k8s.smoke import SmokeSettings

    settings = ClusterSettings(
        kubeconfig=Path(options.kubeconfig) if options.kubeconfig else None,
        context=options.kube_context,
        namespace=options.namespace,
    )
    target = DeployTarget(
        image=image,
        model_name=request.model_name,
        version=request.version,
        run_id=request.run_id,
        digest=digest,
    )
    # The pods take their corrections to the queue this loop trains from, when it is one they can reach.
    shared_queue = (
        request.feedback_uri if request.feedback_uri and storage.is_gcs(request.feedback_uri) else None
    )
    result = deploy(
        target,
        settings=settings,
        serving=ServingSettings(feedback_uri=shared_queue) if shared_queue else None,
        timeout_s=options.rollout_timeout_s,
        smoke=SmokeSettings(),
    )
    if not result.ok:
        if result.rolled_back:
            raise RolledBackError(
                f"rollout of {target.reference} failed: {result.reason} (rolled back; the previous version "
                "keeps serving). Not retried: fix the cause and start a new run."
            )
        raise DeliveryError(f"rollout of {target.reference} failed: {result.reason}")
    smoke = f"; smoke test: {result.smoke.message}" if result.smoke else ""
    return StepOutcome(
        ran=True,
        detail=f"rolled out {target.reference} to {result.namespace}/{result.deployment}{smoke}",
        value="smoke-tested" if result.smoke else None,
    )


def smoke_test_serving(request: DeliveryRequest, *, rollout: StepOutcome) -> StepOutcome:
    """After a rollout its own smoke test counts; else smoke-test the candidate on a serving URL.

    The candidate is asked on its pinned routes (``/v1/models/<name>/versions/<N>``): a serving process
    loads a published version as candidate and answers pinned requests for it, while unpinned requests
    keep getting the live version until promotion. Waits up to ``delivery.smoke_timeout_s`` for it to load.
    """
    if rollout.ran:
        return StepOutcome(ran=True, detail=rollout.detail.split("; smoke test: ")[-1], value=rollout.value)
    url = request.options.serving_url
    if not url:
        return StepOutcome(
            ran=False, detail="smoke test skipped: no rollout and no serving URL (delivery.serving_url)"
        )
    from k8s.smoke import smoke_test

    deadline = time.monotonic() + request.options.smoke_timeout_s
    while True:
        result = smoke_test(
            base_url=url,
            model_name=request.model_name,
            expected_version=request.version,
            timeout_s=10.0,
            pinned=True,
        )
        if result.ok:
            return StepOutcome(ran=True, detail=f"{url} (candidate, pinned): {result.message}", value=url)
        if time.monotonic() >= deadline:
            raise DeliveryError(
                f"smoke test of candidate version {request.version} at {url} failed after "
                f"{request.options.smoke_timeout_s:.0f} s: {result.message}; is the serving process "
                f"watching {request.model_base}? Nothing was promoted."
            )
        time.sleep(1.0)
