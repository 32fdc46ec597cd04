"""Opt-in end-to-end rollout against a real cluster from the current kubeconfig (kind, minikube, GKE).

Runs only with ``TFLOOP_K8S_E2E=1`` or ``-m cluster``; skips with the reason when no cluster answers or no
serving image is given. It rolls a real serving image out (smoke test through a real port-forward), then
rolls out an image that cannot be pulled and checks that tfloop rolled back and the old version serves.

    kind create cluster && kind load docker-image tfloop-classifier:v1
    TFLOOP_K8S_E2E=1 TFLOOP_K8S_E2E_IMAGE=tfloop-classifier:v1 TFLOOP_K8S_E2E_MODEL=tfloop-classifier \
        TFLOOP_K8S_E2E_VERSION=1 .venv/bin/python -m pytest tests/test_k8s_cluster.py -m cluster -v -rs

Optional: ``TFLOOP_K8S_CONTEXT`` (default: current context), ``TFLOOP_K8S_NAMESPACE`` (default
``tfloop-e2e``, created and deleted by the test).
"""

from __future__ import annotations

import os

import pytest

from k8s.client import call, connect
from k8s.errors import ClusterError
from k8s.rollout import deploy
from k8s.settings import ClusterSettings, DeployTarget, ServingSpec
from k8s.smoke import SmokeSettings, forward_service, smoke_test

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def real_cluster(request):
    opted_in = os.environ.get("TFLOOP_K8S_E2E") == "1" or "cluster" in (request.config.getoption("-m") or "")
    if not opted_in:
        pytest.skip("opt-in real-cluster test: set TFLOOP_K8S_E2E=1 or run with -m cluster")
    image = os.environ.get("TFLOOP_K8S_E2E_IMAGE")
    if not image:
        pytest.skip(
            "set TFLOOP_K8S_E2E_IMAGE to a tfloop serving image the cluster can run "
            "(e.g. `kind load docker-image tfloop-classifier:v1`)"
        )
    namespace = os.environ.get("TFLOOP_K8S_NAMESPACE", "tfloop-e2e")
    settings = ClusterSettings(
        context=os.environ.get("TFLOOP_K8S_CONTEXT"), namespace=namespace, poll_interval_s=1.0
    )
    try:
        cluster = connect(settings=settings)
        call(cluster, cluster.core.list_namespace, verb="list", resource="namespaces", namespaced=False)
    except ClusterError as error:
        pytest.skip(f"no Kubernetes cluster reachable from the current kubeconfig: {error}")
    created = False
    try:
        call(
            cluster,
            cluster.core.create_namespace,
            {"metadata": {"name": namespace}},
            verb="create",
            resource="namespaces",
            namespaced=False,
        )
        created = True
    except ClusterError:
        pass  # it exists already
    try:
        yield settings, cluster, image
    finally:
        if created:
            call(
                cluster,
                cluster.core.delete_namespace,
                namespace,
                verb="delete",
                resource="namespaces",
                namespaced=False,
            )
        cluster.close()


def test_real_rollout_smoke_test_and_rollback(real_cluster):
    settings, cluster, image = real_cluster
    model = os.environ.get("TFLOOP_K8S_E2E_MODEL", "tfloop-classifier")
    version = int(os.environ.get("TFLOOP_K8S_E2E_VERSION", "1"))
    spec = ServingSpec(replicas=2, cpu_request="100m", memory_request="256Mi", progress_deadline_s=120)
    good = deploy(
        DeployTarget(image=image, model_name=model, version=version),
        settings=settings,
        spec=spec,
        timeout_s=300,
        smoke=SmokeSettings(),
        allow_pod_local_feedback=True,
        on_progress=print,
    )
    assert good.ok, good.reason
    assert good.smoke is not None and good.smoke.ok

    bad = deploy(
        DeployTarget(image="registry.invalid/tfloop/none:v0", model_name=model, version=version + 1),
        settings=settings,
        spec=spec,
        timeout_s=180,
        smoke=SmokeSettings(),
        allow_pod_local_feedback=True,
        on_progress=print,
    )
    assert not bad.ok and bad.outcome == "rolled_back" and bad.rolled_back and bad.rollback_ok, bad.reason
    assert "ErrImagePull" in bad.reason or "ImagePullBackOff" in bad.reason
    with forward_service(cluster, service_name=spec.app_name, port=spec.port) as url:
        assert smoke_test(base_url=url, model_name=model, expected_version=version).ok
