"""Rollouts through the official client against a Kubernetes API emulator on loopback (tests/k8s_sim.py).

The emulator is kmock's ``KubernetesEmulator`` with generations, resourceVersion preconditions, namespaces,
RBAC refusals, Secrets and Leases added; a simulated Deployment controller (an asyncio task beside it) rolls
pods that become ready, crash-loop, fail to pull (``ErrImagePull``, zero restarts), miss a Secret
(``CreateContainerConfigError``) or never get ready, as each test chooses. Covered here: rollouts and
rollbacks of every changed object, serving settings that persist across deploys, the pod-local feedback
refusal, images by digest, the rollout Lease, and ``tfloop deploy`` itself. Known gaps of the emulator, all
documented in tests/k8s_sim.py: JSON merge patches only (tfloop sends nothing else), no server-side
selectors (tfloop filters lists itself too). The serving pods are played by loopback HTTP servers that answer
for the model version their pod's image carries (the test says what each image it built carries); the smoke
test reaches them by a given URL or through the emulator's websocket ``pods/portforward``.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from k8s import manifests
from k8s.errors import (
    ClusterUnreachableError,
    ForbiddenError,
    KubeconfigMissingError,
    NamespaceMissingError,
    PodLocalFeedbackError,
    RolloutInProgressError,
    UnknownContextError,
)
from k8s.rollout import deploy
from k8s.settings import ClusterSettings, DeployTarget, SecretRef, ServingSettings, ServingSpec
from k8s.smoke import SmokeSettings, sample_png, smoke_test
from tests.k8s_sim import (
    CONFIGMAPS,
    DEPLOYMENTS,
    HPAS,
    LEASES,
    NETWORKPOLICIES,
    PODS,
    REPLICASETS,
    SECRETS,
    SERVICEACCOUNTS,
    PodPlan,
    RunningCluster,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "tfloop"


def target(version: int, *, run_id: str | None = None) -> DeployTarget:
    return DeployTarget(
        image=f"reg.example/tfloop-classifier:v{version}",
        model_name="tfloop-classifier",
        version=version,
        run_id=run_id,
    )


class FakeServing:
    """Answers like the serving API, for the model versions that the images of the ready pods carry.

    What a pod serves comes from its image (``RunningCluster.build_image``: the test says which version
    each image it built carries), never from the version labels tfloop wrote. ``url`` answers for every
    ready pod behind the Service; ``pod_listener`` gives each pod its own loopback server answering for
    that pod alone, which the emulator's ``pods/portforward`` relays to.
    """

    def __init__(self, cluster: RunningCluster) -> None:
        self.cluster = cluster
        self.override_versions: list[str] | None = None
        self.version_routes = True
        self.requests: list[str] = []
        self.servers: list[ThreadingHTTPServer] = []
        self.pod_servers: dict[str, tuple[str, int]] = {}
        self.url = self._serve(pod=None)
        cluster.emulator.pod_listener = self.pod_listener

    def _serve(self, *, pod: str | None) -> str:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _version_route(self):
                """The version a /versions/N route names, or None; answers 404 when it is not served."""
                match = re.match(r"^/v1/models/[^/:]+/versions/(\d+)", self.path)
                if match is None:
                    return None
                if not owner.version_routes or match[1] not in owner.versions(pod=pod):
                    self._send(404, {"error": f"Servable not found for request: Specific(m, {match[1]})"})
                    return False
                return match[1]

            def do_GET(self):
                owner.requests.append(f"GET {self.path}" + (f" via {pod}" if pod else ""))
                pinned = self._version_route()
                if pinned is False:
                    return
                versions = [pinned] if pinned else owner.versions(pod=pod)
                self._send(
                    200,
                    {
                        "model_version_status": [
                            {
                                "version": v,
                                "state": "AVAILABLE",
                                "status": {"error_code": "OK", "error_message": ""},
                            }
                            for v in versions
                        ]
                    },
                )

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(f"POST {self.path} {len(body['instances'])}")
                if self._version_route() is False:
                    return
                self._send(200, {"predictions": [{"classes": ["cat"], "scores": [0.9]}]})

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    def pod_listener(self, pod: str, _port: int) -> tuple[str, int]:
        """The loopback (host, port) playing ``pod``'s serving port (started on first use)."""
        if pod not in self.pod_servers:
            url = self._serve(pod=pod)
            self.pod_servers[pod] = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        return self.pod_servers[pod]

    def versions(self, *, pod: str | None = None) -> list[str]:
        if self.override_versions is not None:
            return self.override_versions

        def ready_versions():
            found = set()
            for (resource, _, name), obj in list(self.cluster.emulator.objects.items()):
                if resource != PODS or obj.deleted or (pod is not None and name != pod):
                    continue
                ready = any(
                    c["type"] == "Ready" and c["status"] == "True" for c in obj.raw["status"]["conditions"]
                )
                carried = self.cluster.version_in(obj.raw["spec"]["containers"][0]["image"])
                if ready and carried is not None:
                    found.add(str(carried))
            return sorted(found)

        return self.cluster.locked(ready_versions)

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def cluster(tmp_path):
    running = RunningCluster().start()
    running.emulator.namespaces.add(NAMESPACE)
    running.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def serving(cluster):
    fake = FakeServing(cluster)
    yield fake
    fake.stop()


def settings_for(cluster: RunningCluster, **overrides) -> ClusterSettings:
    return ClusterSettings(
        kubeconfig=cluster.kubeconfig, poll_interval_s=0.05, request_timeout_s=5, **overrides
    )


def run(
    cluster,
    fake,
    version,
    *,
    spec=None,
    timeout_s=20.0,
    messages=None,
    dry_run=False,
    allow_pod_local_feedback=True,
    forward=False,
    **kwargs,
):
    cluster.images.setdefault(target(version).image, version)  # the image built for this version
    return deploy(
        target(version, run_id=kwargs.pop("run_id", None)),
        settings=settings_for(cluster),
        spec=spec or ServingSpec(),
        timeout_s=timeout_s,
        dry_run=dry_run,
        smoke=SmokeSettings(url=None if forward else fake.url, timeout_s=5),
        on_progress=(messages.append if messages is not None else None),
        allow_pod_local_feedback=allow_pod_local_feedback,
        **kwargs,
    )


def live_deployment(cluster) -> dict:
    return cluster.locked(lambda: cluster.emulator.objects[DEPLOYMENTS, NAMESPACE, "tfloop-serving"].raw)


def replicasets(cluster) -> list[dict]:
    return cluster.locked(
        lambda: [
            obj.raw
            for (res, _, _), obj in list(cluster.emulator.objects.items())
            if res == REPLICASETS and not obj.deleted
        ]
    )


def fail_image(cluster, suffix: str, behaviour: str) -> None:
    cluster.controller.plan_for = lambda pod: (
        PodPlan(behaviour) if pod["spec"]["containers"][0]["image"].endswith(suffix) else PodPlan()
    )


def samples_since(cluster, start: int):
    return cluster.controller.log[start:]


def test_first_rollout_creates_the_stack_and_smoke_tests_it(cluster, serving):
    messages: list[str] = []
    result = run(cluster, serving, 1, messages=messages, run_id="run-1")
    assert result.ok, result.reason
    assert result.revision == 1 and result.previous_image is None and not result.rolled_back
    assert result.smoke is not None and result.smoke.ok and result.smoke.reported_versions == ["1"]
    # The smoke test asks the rolled-out version's own routes.
    assert "GET /v1/models/tfloop-classifier/versions/1" in serving.requests
    assert "POST /v1/models/tfloop-classifier/versions/1:predict 1" in serving.requests
    assert result.smoke.route == "/v1/models/tfloop-classifier/versions/1"
    kinds = cluster.locked(
        lambda: sorted(
            obj.raw["kind"]
            for obj in cluster.emulator.objects.values()
            if not obj.deleted and obj.raw.get("kind") not in {"Pod", "ReplicaSet"}
        )
    )
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Lease",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    deployment = live_deployment(cluster)
    assert deployment["metadata"]["annotations"][manifests.RUN_ID_ANNOTATION] == "run-1"
    assert any("rollout to finish" in message for message in messages)
    assert any("successfully rolled out" in message for message in messages)


def test_healthy_upgrade_keeps_every_replica_available(cluster, serving):
    assert run(cluster, serving, 1).ok
    start = len(cluster.controller.log)
    result = run(cluster, serving, 2)
    assert result.ok, result.reason
    assert result.previous_image.endswith(":v1") and result.previous_model_version == 1
    assert result.revision == 2 and result.smoke.reported_versions == ["2"]
    deployment = live_deployment(cluster)
    assert manifests.serving_container(deployment)["image"].endswith(":v2")
    assert deployment["metadata"]["labels"][manifests.MODEL_VERSION_LABEL] == "2"
    # The Deployment was patched without spec.replicas, so the HPA keeps owning the replica count.
    samples = samples_since(cluster, start)
    assert samples and min(sample.available for sample in samples) >= 2


def assert_rolled_back_to_v1(cluster, start):
    deployment = live_deployment(cluster)
    sets = replicasets(cluster)
    v1 = next(rs for rs in sets if manifests.serving_container(rs)["image"].endswith(":v1"))
    # The Deployment runs exactly the previous ReplicaSet's template again (minus pod-template-hash).
    assert deployment["spec"]["template"] == manifests.template_without_hash(v1["spec"]["template"])
    assert deployment["metadata"]["labels"][manifests.MODEL_VERSION_LABEL] == "1"
    assert deployment["metadata"]["annotations"][manifests.MODEL_VERSION_ANNOTATION] == "1"
    assert manifests.revision(v1) == 3  # the controller reuses the old ReplicaSet under a new revision
    samples = samples_since(cluster, start)
    assert samples and min(sample.available for sample in samples) >= samples[0].desired
    # Every ready pod at the end serves v1 again.
    assert all(image.endswith(":v1") for image in samples[-1].images)


def test_crash_looping_rollout_is_rolled_back(cluster, serving):
    assert run(cluster, serving, 1).ok
    fail_image(cluster, ":v2", "crashloop")
    start = len(cluster.controller.log)
    messages: list[str] = []
    result = run(cluster, serving, 2, messages=messages)
    assert not result.ok and result.rolled_back and result.rollback_ok
    assert result.outcome == "rolled_back" and result.restored == ["Deployment/tfloop-serving"]
    assert (
        "CrashLoopBackOff" in result.reason
        and "rolled back to reg.example/tfloop-classifier:v1" in result.reason
    )
    assert result.pod_problems and result.pod_problems[0].pod in result.reason
    assert any("BackOff" in event and result.pod_problems[0].pod in event for event in result.events)
    assert any("rolling back" in message for message in messages)
    assert result.smoke is None
    assert_rolled_back_to_v1(cluster, start)


def test_stalled_rollout_stops_at_the_progress_deadline_and_rolls_back(cluster, serving):
    spec = ServingSpec(progress_deadline_s=1)
    assert run(cluster, serving, 1, spec=spec).ok
    fail_image(cluster, ":v2", "never-ready")
    start = len(cluster.controller.log)
    result = run(cluster, serving, 2, spec=spec)
    assert not result.ok and result.rolled_back and result.rollback_ok
    assert "ProgressDeadlineExceeded" in result.reason and "timed out progressing" in result.reason
    assert_rolled_back_to_v1(cluster, start)


def test_image_pull_failure_is_caught_at_once_with_zero_restarts(cluster, serving):
    assert run(cluster, serving, 1).ok
    # The kubelet reports ErrImagePull (restartCount 0) and never anything else: waiting for restarts or for
    # ImagePullBackOff would run into the (long) timeout instead.
    fail_image(cluster, ":v2", "image-pull")
    result = run(cluster, serving, 2, timeout_s=120.0)
    assert not result.ok and result.rolled_back and result.rollback_ok, result.reason
    assert result.outcome == "rolled_back"
    assert "ErrImagePull (restarts: 0)" in result.reason and "timed out" not in result.reason
    assert [problem.restarts for problem in result.pod_problems] == [0]
    assert any("Failed to pull image" in event for event in result.events)
    assert result.duration_s < 60


def test_callers_timeout_rolls_back(cluster, serving):
    assert run(cluster, serving, 1).ok
    fail_image(cluster, ":v3", "never-ready")
    start = len(cluster.controller.log)
    result = run(cluster, serving, 3, timeout_s=1.0)
    assert not result.ok and result.rollback_ok and "timed out after 1 s" in result.reason
    samples = samples_since(cluster, start)
    assert min(sample.available for sample in samples) >= 2


def test_failed_smoke_test_rolls_back(cluster, serving):
    assert run(cluster, serving, 1).ok
    serving.override_versions = ["1"]  # the Service still answers with the old model
    result = run(cluster, serving, 2)
    assert not result.ok and result.rolled_back and result.rollback_ok
    assert "smoke test failed" in result.reason and "not 2" in result.reason
    assert live_deployment(cluster)["metadata"]["labels"][manifests.MODEL_VERSION_LABEL] == "1"


def test_an_image_that_carries_another_model_version_fails_the_smoke_test_and_rolls_back(cluster, serving):
    # The image tagged for v2 was baked with model v1: the Deployment says v2, the pods serve v1.
    assert run(cluster, serving, 1).ok
    cluster.build_image(target(2).image, carries=1)
    result = run(cluster, serving, 2)
    assert not result.ok and result.rolled_back and result.rollback_ok
    assert "smoke test failed" in result.reason and "not 2" in result.reason
    assert result.smoke is not None and result.smoke.reported_versions == ["1"]  # what the pods serve
    assert live_deployment(cluster)["metadata"]["labels"][manifests.MODEL_VERSION_LABEL] == "1"


def test_the_smoke_test_reaches_a_pod_through_port_forward(cluster, serving):
    # No smoke URL: tfloop port-forwards to a ready pod through the API (the websocket pods/portforward of
    # the emulator, relayed to the loopback server that plays that pod), as `kubectl port-forward` does.
    first = run(cluster, serving, 1, forward=True)
    assert first.ok and first.smoke is not None and first.smoke.reported_versions == ["1"]
    pod_requests = [request for request in serving.requests if " via " in request]
    assert pod_requests and pod_requests[0].startswith("GET /v1/models/tfloop-classifier/versions/1 via ")
    cluster.build_image(target(2).image, carries=1)
    second = run(cluster, serving, 2, forward=True)
    assert not second.ok and second.rolled_back and "not 2" in second.reason
    assert live_deployment(cluster)["metadata"]["labels"][manifests.MODEL_VERSION_LABEL] == "1"


def test_dry_run_prints_a_diff_and_changes_nothing(cluster, serving):
    first = run(cluster, serving, 1, dry_run=True)
    assert (
        first.ok
        and first.dry_run
        and "--- /dev/null" in first.diff
        and "Deployment/tfloop-serving" in first.diff
    )
    assert cluster.locked(lambda: len(cluster.emulator.objects)) == 0
    assert run(cluster, serving, 1).ok
    before = live_deployment(cluster)
    writes_before = sum(1 for r in list(cluster.emulator) if r.method in {"POST", "PATCH", "PUT", "DELETE"})
    result = run(cluster, serving, 2, dry_run=True)
    assert result.ok and result.changed == ["Deployment/tfloop-serving"]
    assert "-        image: reg.example/tfloop-classifier:v1" in result.diff
    assert "+        image: reg.example/tfloop-classifier:v2" in result.diff
    writes_after = sum(1 for r in list(cluster.emulator) if r.method in {"POST", "PATCH", "PUT", "DELETE"})
    assert writes_after == writes_before
    assert live_deployment(cluster)["spec"] == before["spec"]


def test_redeploying_the_same_version_changes_nothing(cluster, serving):
    assert run(cluster, serving, 1).ok
    generation = live_deployment(cluster)["metadata"]["generation"]
    result = run(cluster, serving, 1)
    assert result.ok and result.changed == [] and not result.rolled_back
    assert live_deployment(cluster)["metadata"]["generation"] == generation


# ---- clear errors ----------------------------------------------------------------------------------------


def test_missing_kubeconfig(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nope" / "config"))
    with pytest.raises(KubeconfigMissingError, match=r"no kubeconfig at .*nope/config.*--kubeconfig"):
        deploy(target(1), settings=ClusterSettings(), timeout_s=1)


def test_unknown_context(cluster):
    with pytest.raises(UnknownContextError, match=r"no context 'prod' \(known: emulator\).*--context"):
        deploy(target(1), settings=settings_for(cluster, context="prod"), timeout_s=1)


def test_unreachable_api_server(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "gone",
                "clusters": [{"name": "gone", "cluster": {"server": f"http://127.0.0.1:{closed_port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}],
            }
        )
    )
    with pytest.raises(
        ClusterUnreachableError, match=rf"cannot reach .*127.0.0.1:{closed_port}.*kubectl cluster-info"
    ):
        deploy(target(1), settings=ClusterSettings(kubeconfig=kubeconfig, request_timeout_s=2), timeout_s=1)


def test_rbac_refusal_names_verb_and_resource(cluster, serving):
    assert run(cluster, serving, 1).ok
    cluster.emulator.forbidden.add(("patch", "deployments"))
    with pytest.raises(ForbiddenError) as caught:
        run(cluster, serving, 2, serving=ServingSettings(feedback_uri="gs://tfloop-test/feedback"))
    message = str(caught.value)
    assert "refused to patch deployments 'tfloop-serving' in namespace 'tfloop'" in message
    assert (
        'cannot patch resource "deployments"' in message and "kubectl auth can-i patch deployments" in message
    )
    assert manifests.serving_container(live_deployment(cluster))["image"].endswith(":v1")
    # The ConfigMap it had already changed is put back.
    data = cluster.locked(
        lambda: cluster.emulator.objects[CONFIGMAPS, NAMESPACE, "tfloop-serving-settings"].raw
    )
    assert data["data"]["TFLOOP_SERVE_FEEDBACK_URI"] == "/cache/feedback"

    cluster.emulator.forbidden = {("patch", "leases")}
    with pytest.raises(
        ForbiddenError, match=r"refused to patch leases 'tfloop-serving-rollout'.*can-i patch leases"
    ):
        run(cluster, serving, 2)


def test_missing_namespace(cluster):
    with pytest.raises(
        NamespaceMissingError, match=r"namespace 'elsewhere' does not exist.*kubectl create namespace"
    ):
        deploy(target(1), settings=settings_for(cluster, namespace="elsewhere"), timeout_s=1)


def test_smoke_test_against_a_plain_server(cluster, serving):
    serving.override_versions = ["4"]
    ok = smoke_test(base_url=serving.url, model_name="m", expected_version=4, sample_image=sample_png(size=8))
    assert ok.ok and ok.reported_versions == ["4"]
    wrong = smoke_test(base_url=serving.url, model_name="m", expected_version=5)
    assert not wrong.ok and "not 5" in wrong.message
    down = smoke_test(base_url="http://127.0.0.1:9", model_name="m", expected_version=5, timeout_s=2)
    assert not down.ok and "ConnectError" in down.message
    assert ok.route == "/v1/models/m/versions/4"
    assert "POST /v1/models/m/versions/4:predict 1" in serving.requests
    # A server without version routes is asked on the model's routes, unless the caller pins.
    serving.version_routes = False
    legacy = smoke_test(base_url=serving.url, model_name="m", expected_version=4)
    assert legacy.ok and legacy.route == "/v1/models/m" and "POST /v1/models/m:predict 1" in serving.requests
    pinned = smoke_test(base_url=serving.url, model_name="m", expected_version=4, pinned=True)
    assert not pinned.ok and "GET /v1/models/m/versions/4 answered 404" in pinned.message


# ---- the command line ------------------------------------------------------------------------------------


def tfloop(*args, env=None):
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "deploy", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, **(env or {})}
    )


def test_cli_deploy_json_dry_run_and_failure(cluster, serving, tmp_path):
    cluster.build_image("reg.example/tfloop-classifier:v1", carries=1)
    common = [
        "--image",
        "reg.example/tfloop-classifier:v1",
        "--model-name",
        "tfloop-classifier",
        "--version",
        "1",
        "--kubeconfig",
        str(cluster.kubeconfig),
        "--smoke-url",
        serving.url,
        "--timeout",
        "20",
        "--feedback-uri",
        "gs://tfloop-test/feedback",
    ]
    dry = tfloop(*common, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    payload = json.loads(dry.stdout.strip().splitlines()[-1])
    assert payload["dry_run"] and payload["ok"] and "Deployment/tfloop-serving" in payload["changed"]
    assert "+++ new tfloop/Deployment/tfloop-serving" in dry.stderr

    done = tfloop(*common, "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    assert payload["ok"] and payload["model_version"] == 1 and payload["smoke"]["ok"]
    assert "successfully rolled out" in done.stderr

    missing = tfloop(*common[:6], "--json", env={"KUBECONFIG": str(tmp_path / "absent")})
    assert missing.returncode == 1 and "error: no kubeconfig at" in missing.stderr
    assert "Traceback" not in missing.stderr


# ---- serving settings that close the loop, and their persistence ----------------------------------------

FEEDBACK = "gs://tfloop-test/feedback"
SA_EMAIL = "tfloop-serving@my-project.iam.gserviceaccount.com"


def obj(cluster, resource, name) -> dict | None:
    def read():
        key = (resource, NAMESPACE, name)
        if key not in cluster.emulator.objects or cluster.emulator.objects[key].deleted:
            return None
        return copy.deepcopy(cluster.emulator.objects[key].raw)

    return cluster.locked(read)


def add_secret(cluster, name: str, *keys: str) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {key: "c2VjcmV0" for key in keys},
    }
    cluster.locked(lambda: cluster.emulator.objects.__setitem__((SECRETS, NAMESPACE, name), secret))


def settings_data(cluster) -> dict:
    return obj(cluster, CONFIGMAPS, "tfloop-serving-settings")["data"]


def secret_env(deployment: dict) -> dict:
    env = manifests.serving_container(deployment)["env"]
    return {
        item["name"]: (item["valueFrom"]["secretKeyRef"]["name"], item["valueFrom"]["secretKeyRef"]["key"])
        for item in env
        if "valueFrom" in item
    }


def test_serving_settings_land_in_the_objects_and_persist_across_deploys(cluster, serving):
    for name, key in [
        ("prefect", "api-key"),
        ("feedback-auth", "tok"),
        ("signing", "secret"),
        ("gcs", "sa.json"),
    ]:
        add_secret(cluster, name, key)
    wanted = ServingSettings(
        feedback_uri=FEEDBACK,
        prefect_api_url="http://prefect.prefect:4200/api",
        prefect_api_key_secret=SecretRef(name="prefect", key="api-key"),
        token_secret=SecretRef(name="feedback-auth", key="tok"),
        feedback_secret=SecretRef(name="signing", key="secret"),
        gcp_service_account=SA_EMAIL,
        gcp_key_secret=SecretRef(name="gcs", key="sa.json"),
    )
    first = run(cluster, serving, 1, serving=wanted, allow_pod_local_feedback=False)
    assert first.ok, first.reason
    assert first.serving_settings["feedback_uri"] == FEEDBACK
    data = settings_data(cluster)
    assert data["TFLOOP_SERVE_FEEDBACK_URI"] == FEEDBACK
    assert data["TFLOOP_SERVE_PREFECT_API_URL"] == "http://prefect.prefect:4200/api"
    assert data["TFLOOP_SERVE_DRAIN_S"] == "5"
    deployment = live_deployment(cluster)
    assert secret_env(deployment) == {
        "PREFECT_API_KEY": ("prefect", "api-key"),
        "TFLOOP_SERVE_TOKEN": ("feedback-auth", "tok"),
        "TFLOOP_FEEDBACK_SECRET": ("signing", "secret"),
    }
    container = manifests.serving_container(deployment)
    assert {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/google/key.json"} in container[
        "env"
    ]
    assert {"name": "gcp-key", "mountPath": "/var/secrets/google", "readOnly": True} in container[
        "volumeMounts"
    ]
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "gcp-key")
    assert volume["secret"] == {"secretName": "gcs", "items": [{"key": "sa.json", "path": "key.json"}]}
    account = obj(cluster, SERVICEACCOUNTS, "tfloop-serving")
    assert account["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": SA_EMAIL}

    # A deploy that says nothing about settings keeps every one (and is not refused as pod-local), and a
    # key someone added by hand stays (it changes the checksum, so the pods roll and see it).
    cluster.locked(
        lambda: cluster.emulator.objects[CONFIGMAPS, NAMESPACE, "tfloop-serving-settings"].patch(
            {"data": {"TFLOOP_SERVE_MAX_BATCH_SIZE": "16"}}
        )
    )
    data = settings_data(cluster)
    second = run(cluster, serving, 2, allow_pod_local_feedback=False)
    assert second.ok, second.reason
    assert second.changed == ["Deployment/tfloop-serving"]
    assert settings_data(cluster) == data and data["TFLOOP_SERVE_MAX_BATCH_SIZE"] == "16"
    deployment = live_deployment(cluster)
    assert manifests.serving_container(deployment)["image"].endswith(":v2")
    assert secret_env(deployment) == secret_env(live_deployment(cluster))
    assert len(secret_env(deployment)) == 3
    assert (
        obj(cluster, SERVICEACCOUNTS, "tfloop-serving")["metadata"]["annotations"]
        == account["metadata"]["annotations"]
    )

    # One setting changes, one is cleared; the rest stays.
    third = run(
        cluster,
        serving,
        3,
        serving=ServingSettings(
            feedback_uri="gs://tfloop-test/feedback-2", clear=frozenset({"prefect_api_url", "token_secret"})
        ),
        allow_pod_local_feedback=False,
    )
    assert third.ok, third.reason
    data = settings_data(cluster)
    assert data["TFLOOP_SERVE_FEEDBACK_URI"] == "gs://tfloop-test/feedback-2"
    assert "TFLOOP_SERVE_PREFECT_API_URL" not in data
    assert set(secret_env(live_deployment(cluster))) == {"PREFECT_API_KEY", "TFLOOP_FEEDBACK_SECRET"}
    assert third.serving_settings["gcp_service_account"] == SA_EMAIL

    # Workload Identity and the key file go back to the node's default credentials.
    fourth = run(
        cluster,
        serving,
        3,
        serving=ServingSettings(clear=frozenset({"gcp_service_account", "gcp_key_secret"})),
    )
    assert fourth.ok, fourth.reason
    assert not obj(cluster, SERVICEACCOUNTS, "tfloop-serving")["metadata"].get("annotations")
    container = manifests.serving_container(live_deployment(cluster))
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in {item["name"] for item in container["env"]}
    assert [mount["name"] for mount in container["volumeMounts"]] == ["cache", "tmp"]
    assert settings_data(cluster)["TFLOOP_SERVE_FEEDBACK_URI"] == "gs://tfloop-test/feedback-2"


def test_a_settings_change_alone_rolls_the_pods(cluster, serving):
    assert run(cluster, serving, 1, serving=ServingSettings(feedback_uri=FEEDBACK)).ok
    before = live_deployment(cluster)
    result = run(cluster, serving, 1, serving=ServingSettings(feedback_uri="gs://tfloop-test/other"))
    assert result.ok, result.reason
    assert set(result.changed) == {"ConfigMap/tfloop-serving-settings", "Deployment/tfloop-serving"}
    after = live_deployment(cluster)
    checksum = manifests.SETTINGS_CHECKSUM_ANNOTATION
    assert (
        after["spec"]["template"]["metadata"]["annotations"][checksum]
        != before["spec"]["template"]["metadata"]["annotations"][checksum]
    )
    assert manifests.revision(after) == 2


def test_a_feedback_queue_inside_the_pod_is_refused_unless_allowed(cluster, serving):
    with pytest.raises(PodLocalFeedbackError, match=r"/cache/feedback .*--feedback-uri gs://bucket/feedback"):
        run(cluster, serving, 1, allow_pod_local_feedback=False)
    with pytest.raises(PodLocalFeedbackError, match=r"/data/feedback \(set\).*--allow-pod-local-feedback"):
        run(
            cluster,
            serving,
            1,
            serving=ServingSettings(feedback_uri="/data/feedback"),
            allow_pod_local_feedback=False,
        )
    assert obj(cluster, DEPLOYMENTS, "tfloop-serving") is None
    assert obj(cluster, CONFIGMAPS, "tfloop-serving-settings") is None
    assert manifests.lease_holder(obj(cluster, LEASES, "tfloop-serving-rollout")) is None  # released
    allowed = run(cluster, serving, 1, allow_pod_local_feedback=True)
    assert allowed.ok and settings_data(cluster)["TFLOOP_SERVE_FEEDBACK_URI"] == "/cache/feedback"
    # The allowance is per deploy: the next one must say so again (or move the queue to GCS).
    with pytest.raises(PodLocalFeedbackError):
        run(cluster, serving, 2, allow_pod_local_feedback=False)
    assert run(
        cluster, serving, 2, serving=ServingSettings(feedback_uri=FEEDBACK), allow_pod_local_feedback=False
    ).ok


def test_a_missing_secret_fails_the_rollout_at_once_and_rolls_back(cluster, serving):
    assert run(cluster, serving, 1, serving=ServingSettings(feedback_uri=FEEDBACK)).ok
    result = run(
        cluster, serving, 2, serving=ServingSettings(token_secret=SecretRef(name="absent", key="token"))
    )
    assert not result.ok and result.outcome == "rolled_back", result.reason
    assert 'CreateContainerConfigError (restarts: 0): secret "absent" not found' in result.reason
    assert "TFLOOP_SERVE_TOKEN" not in secret_env(live_deployment(cluster))
    # A missing key file Secret leaves the pod in ContainerCreating: its FailedMount events say why.
    result = run(
        cluster, serving, 3, serving=ServingSettings(gcp_key_secret=SecretRef(name="nokey", key="k"))
    )
    assert not result.ok and result.outcome == "rolled_back", result.reason
    assert 'FailedMount (restarts: 0): MountVolume.SetUp failed for volume "gcp-key"' in result.reason
    assert 'secret "nokey" not found' in result.reason and "timed out" not in result.reason
    assert live_deployment(cluster)["spec"]["template"]["spec"]["volumes"][-1]["name"] == "tmp"


def restorable_state(cluster) -> dict:
    return {
        key: manifests.restorable(found) if (found := obj(cluster, resource, name)) else None
        for key, (resource, name) in {
            "ServiceAccount": (SERVICEACCOUNTS, "tfloop-serving"),
            "ConfigMap": (CONFIGMAPS, "tfloop-serving-settings"),
            "Deployment": (DEPLOYMENTS, "tfloop-serving"),
            "HorizontalPodAutoscaler": (HPAS, "tfloop-serving"),
            "NetworkPolicy": (NETWORKPOLICIES, "tfloop-serving"),
        }.items()
    }


def test_a_failing_rollout_restores_every_object_it_changed(cluster, serving):
    assert run(cluster, serving, 1, serving=ServingSettings(feedback_uri=FEEDBACK)).ok
    before = restorable_state(cluster)
    assert before["NetworkPolicy"] is None
    fail_image(cluster, ":v2", "crashloop")
    result = run(
        cluster,
        serving,
        2,
        spec=ServingSpec(max_replicas=7),
        serving=ServingSettings(
            feedback_uri="gs://tfloop-test/elsewhere",
            prefect_api_url="http://prefect:4200/api",
            gcp_service_account=SA_EMAIL,
        ),
        network_policy=True,
    )
    assert not result.ok and result.rolled_back and result.rollback_ok and result.outcome == "rolled_back"
    assert sorted(result.changed) == sorted(
        [
            "ServiceAccount/tfloop-serving",
            "ConfigMap/tfloop-serving-settings",
            "Deployment/tfloop-serving",
            "HorizontalPodAutoscaler/tfloop-serving",
            "NetworkPolicy/tfloop-serving",
        ]
    )
    assert result.restored == [
        "ServiceAccount/tfloop-serving",
        "ConfigMap/tfloop-serving-settings",
        "HorizontalPodAutoscaler/tfloop-serving",
        "Deployment/tfloop-serving",
    ]
    assert result.deleted == ["NetworkPolicy/tfloop-serving"]
    after = restorable_state(cluster)
    assert after == before
    assert settings_data(cluster)["TFLOOP_SERVE_FEEDBACK_URI"] == FEEDBACK


def test_an_image_by_digest_runs_by_digest_and_keeps_its_tag(cluster, serving):
    digest = "sha256:" + "ab" * 32
    cluster.build_image(f"reg.example:5000/tfloop-classifier@{digest}", carries=1)
    pinned = DeployTarget(
        image="reg.example:5000/tfloop-classifier:v1",
        digest=digest,
        model_name="tfloop-classifier",
        version=1,
    )
    result = deploy(
        pinned,
        settings=settings_for(cluster),
        timeout_s=20,
        smoke=SmokeSettings(url=serving.url, timeout_s=5),
        allow_pod_local_feedback=True,
    )
    assert result.ok, result.reason
    assert result.image == f"reg.example:5000/tfloop-classifier@{digest}" and result.image_tag == "v1"
    deployment = live_deployment(cluster)
    assert manifests.serving_container(deployment)["image"] == f"reg.example:5000/tfloop-classifier@{digest}"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations[manifests.IMAGE_ANNOTATION] == "reg.example:5000/tfloop-classifier:v1"


# ---- the rollout lease -------------------------------------------------------------------------------------


def lease(cluster) -> dict | None:
    return obj(cluster, LEASES, "tfloop-serving-rollout")


def wait_until(condition, *, what: str, bound_s: float = 30.0):
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up after {bound_s} s waiting for {what}")


def test_a_second_deploy_is_refused_while_the_first_holds_the_lease(cluster, serving):
    gate = threading.Event()
    cluster.controller.plan_for = lambda pod: PodPlan() if gate.is_set() else PodPlan("never-ready")
    cluster.build_image(target(1).image, carries=1)
    outcome: dict = {}

    def first():
        outcome["result"] = deploy(
            target(1),
            settings=ClusterSettings(
                kubeconfig=cluster.kubeconfig, poll_interval_s=0.05, request_timeout_s=5, lease_duration_s=3
            ),
            timeout_s=60,
            smoke=SmokeSettings(url=serving.url, timeout_s=5),
            allow_pod_local_feedback=True,
        )

    thread = threading.Thread(target=first)
    thread.start()
    try:
        wait_until(lambda: obj(cluster, DEPLOYMENTS, "tfloop-serving"), what="the first deploy's Deployment")
        held = manifests.lease_holder(lease(cluster))
        assert held
        assert held.startswith(f"{socket.gethostname()}@{os.getpid()}/")
        with pytest.raises(RolloutInProgressError, match=rf"held by {re.escape(held)}.*expires in \d+ s"):
            run(cluster, serving, 2)
        # The refused deploy changed nothing; the first one is renewing its lease (every second here).
        assert manifests.serving_container(live_deployment(cluster))["image"].endswith(":v1")
        wait_until(
            lambda: lease(cluster)["spec"]["renewTime"] != lease(cluster)["spec"]["acquireTime"],
            what="a lease renewal",
        )
    finally:
        gate.set()
        thread.join(timeout=60)
    result = outcome["result"]
    assert result.ok and result.lease == "tfloop-serving-rollout" and result.lease_holder == held
    assert manifests.lease_holder(lease(cluster)) is None  # released
    assert run(cluster, serving, 2).ok


def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(cluster, serving):
    def seed(renewed: datetime.datetime) -> None:
        body = manifests.rollout_lease(
            ServingSpec(), holder="ci-runner@4242/deadbeef", duration_s=60, now=renewed, transitions=2
        )
        body["metadata"].update(namespace=NAMESPACE, resourceVersion="1")
        cluster.locked(
            lambda: cluster.emulator.objects.__setitem__((LEASES, NAMESPACE, body["metadata"]["name"]), body)
        )

    now = datetime.datetime.now(tz=datetime.UTC)
    seed(now)
    with pytest.raises(
        RolloutInProgressError, match=r"held by ci-runner@4242/deadbeef.*kubectl delete lease"
    ):
        run(cluster, serving, 1)
    preview = run(cluster, serving, 1, dry_run=True)  # a dry run takes no Lease, and says who holds it
    assert preview.ok and preview.lease is None
    assert preview.notes == [
        "a rollout by ci-runner@4242/deadbeef holds Lease tfloop-serving-rollout now: "
        "deploying would be refused"
    ]
    assert obj(cluster, DEPLOYMENTS, "tfloop-serving") is None

    seed(now - datetime.timedelta(minutes=10))
    result = run(cluster, serving, 1)
    assert result.ok, result.reason
    assert any(
        "took over the expired rollout Lease" in note and "ci-runner@4242" in note for note in result.notes
    )
    final = lease(cluster)
    assert final["spec"]["leaseTransitions"] == 3 and manifests.lease_holder(final) is None


def test_cli_serving_flags_digest_and_pod_local_refusal(cluster, serving):
    for version in (1, 2, 3):
        cluster.build_image(target(version).image, carries=version)
    from typer.testing import CliRunner

    from pipeline.cli import app

    for name, key in [
        ("prefect", "api-key"),
        ("feedback-auth", "tok"),
        ("signing", "secret"),
        ("gcs", "key.json"),
    ]:
        add_secret(cluster, name, key)
    runner = CliRunner()
    common = ["--model-name", "tfloop-classifier", "--kubeconfig", str(cluster.kubeconfig)]
    common += ["--smoke-url", serving.url, "--timeout", "20", "--json"]

    def tfloop_deploy(*args):
        result = runner.invoke(app, ["deploy", *common, *args])
        payload = json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else None
        return result, payload

    digest = "sha256:" + "cd" * 32
    cluster.build_image(f"reg.example/tfloop-classifier@{digest}", carries=1)
    result, payload = tfloop_deploy(
        *["--image", "reg.example/tfloop-classifier:v1", "--digest", digest, "--version", "1"],
        *["--feedback-uri", FEEDBACK, "--prefect-api-url", "http://prefect:4200/api"],
        *["--prefect-api-key-secret", "prefect", "--token-secret", "feedback-auth:tok"],
        *["--feedback-secret", "signing", "--gcp-service-account", SA_EMAIL],
    )
    assert result.exit_code == 0, result.output
    assert payload["outcome"] == "rolled_out" and payload["lease"] == "tfloop-serving-rollout"
    assert payload["image"] == f"reg.example/tfloop-classifier@{digest}" and payload["image_tag"] == "v1"
    assert payload["serving_settings"] == {
        "feedback_uri": FEEDBACK,
        "prefect_api_url": "http://prefect:4200/api",
        "prefect_api_key_secret": "prefect:api-key",
        "token_secret": "feedback-auth:tok",
        "feedback_secret": "signing:secret",
        "gcp_service_account": SA_EMAIL,
        "gcp_key_secret": None,
    }
    assert manifests.serving_container(live_deployment(cluster))["image"] == payload["image"]
    assert secret_env(live_deployment(cluster))["TFLOOP_SERVE_TOKEN"] == ("feedback-auth", "tok")

    # By digest in --image; '' clears a setting, the rest persists; a key file instead of the token.
    digest2 = "sha256:" + "ef" * 32
    cluster.build_image(f"reg.example/tfloop-classifier@{digest2}", carries=2)
    result, payload = tfloop_deploy(
        *["--image", f"reg.example/tfloop-classifier@{digest2}", "--version", "2"],
        *["--token-secret", "", "--gcp-key-secret", "gcs"],
    )
    assert result.exit_code == 0, result.output
    assert payload["image"] == f"reg.example/tfloop-classifier@{digest2}" and payload["image_tag"] is None
    assert payload["serving_settings"]["token_secret"] is None
    assert payload["serving_settings"]["gcp_key_secret"] == "gcs:key.json"
    assert payload["serving_settings"]["feedback_uri"] == FEEDBACK
    assert "TFLOOP_SERVE_TOKEN" not in secret_env(live_deployment(cluster))

    # Resetting the queue to the pod-local default is refused, unless asked for (here as a dry run).
    image = ["--image", "reg.example/tfloop-classifier:v3", "--version", "3"]
    result, _ = tfloop_deploy(*image, "--feedback-uri", "")
    assert result.exit_code != 0 and isinstance(result.exception, PodLocalFeedbackError)
    assert "--feedback-uri gs://bucket/feedback" in str(result.exception)
    result, payload = tfloop_deploy(*image, "--feedback-uri", "", "--allow-pod-local-feedback", "--dry-run")
    assert result.exit_code == 0, result.output
    assert payload["outcome"] == "dry_run" and payload["serving_settings"]["feedback_uri"] is None
    assert "+  TFLOOP_SERVE_FEEDBACK_URI: /cache/feedback" in payload["diff"]
    assert settings_data(cluster)["TFLOOP_SERVE_FEEDBACK_URI"] == FEEDBACK

    for bad, message in [
        (["--digest", "sha256:1234"], "image digest 'sha256:1234' is malformed"),
        (["--token-secret", "Not_A_Name"], "Secret name 'Not_A_Name' is not a valid Kubernetes name"),
        (["--gcp-service-account", "someone@gmail.com"], "is not an email like NAME@PROJECT"),
        (["--feedback-uri", "s3://bucket/feedback"], "neither gs://bucket/prefix nor an absolute path"),
    ]:
        result, _ = tfloop_deploy(*image, *bad)
        assert result.exit_code != 0 and message in str(result.exception), (bad, result.exception)


def test_a_rollout_that_lost_its_lease_does_not_roll_back_over_another(cluster, serving):
    assert run(cluster, serving, 1).ok
    fail_image(cluster, ":v2", "never-ready")
    cluster.build_image(target(2).image, carries=2)
    outcome: dict = {}

    def second():
        outcome["result"] = deploy(
            target(2),
            settings=ClusterSettings(
                kubeconfig=cluster.kubeconfig, poll_interval_s=0.05, request_timeout_s=5, lease_duration_s=3
            ),
            timeout_s=5,
            smoke=SmokeSettings(url=serving.url, timeout_s=5),
            allow_pod_local_feedback=True,
        )

    thread = threading.Thread(target=second)
    thread.start()
    try:
        wait_until(
            lambda: manifests.serving_container(live_deployment(cluster))["image"].endswith(":v2"),
            what="the rollout of v2",
        )

        def steal():
            stored = cluster.emulator.objects[LEASES, NAMESPACE, "tfloop-serving-rollout"]
            stored.patch({"metadata": {"resourceVersion": "stolen"}, "spec": {"holderIdentity": "other@1/x"}})

        cluster.locked(steal)
    finally:
        thread.join(timeout=60)
    result = outcome["result"]
    assert not result.ok and not result.rolled_back and result.outcome == "failed"
    assert (
        "not rolled back: Lease 'tfloop-serving-rollout' was changed or removed by someone else"
        in result.reason
    )
    assert any(note.startswith("warning: Lease") for note in result.notes)
    assert manifests.lease_holder(lease(cluster)) == "other@1/x"  # not released over the new holder


def test_a_rollback_that_cannot_finish_says_what_is_left(cluster, serving):
    assert run(cluster, serving, 1).ok
    fail_image(cluster, ":v2", "crashloop")
    cluster.emulator.forbidden.add(("delete", "networkpolicies"))
    result = run(cluster, serving, 2, network_policy=True)
    assert not result.ok and not result.rolled_back and result.outcome == "rollback_failed"
    assert result.restored == ["Deployment/tfloop-serving"] and result.deleted == []
    assert "rollback stopped with NetworkPolicy/tfloop-serving not restored" in result.reason
    assert "refused to delete networkpolicies 'tfloop-serving'" in result.reason
    assert manifests.serving_container(live_deployment(cluster))["image"].endswith(":v1")
