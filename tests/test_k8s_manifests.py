"""Manifests and pure functions of k8s/: the YAML parses into the official client's models without losing a
field, the builders produce exactly what the YAML says, kustomize renders it offline, and the pure rollout
helpers (status judgement, pod problems, rollback choice, merge patches, diffs) behave as Kubernetes does."""

from __future__ import annotations

import copy
import datetime
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from k8s import manifests
from k8s.errors import InvalidSettingsError, InvalidTargetError
from k8s.rollout import mount_problems, pod_problems, rollout_status
from k8s.settings import DeployTarget, SecretRef, ServingSettings, ServingSpec, split_image
from tests.tools import missing_tool

MANIFESTS = Path(__file__).resolve().parents[1] / "k8s" / "manifests"
MODEL_CLASSES = {
    "Deployment": "V1Deployment",
    "Service": "V1Service",
    "ConfigMap": "V1ConfigMap",
    "ServiceAccount": "V1ServiceAccount",
    "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler",
    "PodDisruptionBudget": "V1PodDisruptionBudget",
    "NetworkPolicy": "V1NetworkPolicy",
    "Role": "V1Role",
    "RoleBinding": "V1RoleBinding",
}
DEFAULT_TARGET = DeployTarget(image="tfloop-classifier:v1", model_name="tfloop-classifier", version=1)


def yaml_documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


@pytest.mark.parametrize(("file_name", "document"), yaml_documents(), ids=lambda value: str(value)[:40])
def test_yaml_parses_into_the_official_models_without_losing_fields(file_name, document):
    from kubernetes.client import ApiClient

    api = ApiClient()
    model = api.deserialize(json.dumps(document), MODEL_CLASSES[document["kind"]], "application/json")
    assert type(model).__name__ == MODEL_CLASSES[document["kind"]]
    # A misspelt or misplaced key would be dropped by the model and break this round trip.
    assert api.sanitize_for_serialization(model) == document, file_name


def test_builders_produce_what_the_yaml_says():
    spec = ServingSpec()
    files = {
        "serviceaccount.yaml": manifests.service_account(spec),
        "configmap.yaml": manifests.config_map(spec),
        "service.yaml": manifests.service(spec),
        "deployment.yaml": manifests.deployment(spec, target=DEFAULT_TARGET),
        "hpa.yaml": manifests.horizontal_pod_autoscaler(spec),
        "pdb.yaml": manifests.pod_disruption_budget(spec),
        "networkpolicy.yaml": manifests.network_policy(spec),
    }
    shipped = {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(MANIFESTS.glob("*.yaml"))
    }
    for file_name, built in files.items():
        assert shipped[file_name] == [built], file_name
    kinds = [obj["kind"] for obj in manifests.serving_objects(spec, target=DEFAULT_TARGET)]
    assert kinds == [
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ]


def test_deployment_has_the_safety_properties_the_issue_asks_for():
    deployment = manifests.deployment(ServingSpec(), target=DEFAULT_TARGET)
    spec = deployment["spec"]
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert spec["revisionHistoryLimit"] > 1 and spec["progressDeadlineSeconds"] > 0
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 300
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert set(container["resources"]) == {"requests", "limits"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/cache"]]
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8501"
    labels = spec["template"]["metadata"]["labels"]
    assert (
        labels[manifests.MODEL_NAME_LABEL] == "tfloop-classifier"
        and labels[manifests.MODEL_VERSION_LABEL] == "1"
    )
    # The selector must not contain per-version labels: it is immutable after creation.
    assert set(spec["selector"]["matchLabels"]) == {manifests.NAME_LABEL}


def test_kustomize_renders_offline_into_the_namespace():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing_tool(
            "kubectl",
            why="`kubectl kustomize k8s/manifests` cannot be checked",
            how="install kubectl (make system-deps)",
        )
    rendered = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    objects = [doc for doc in yaml.safe_load_all(rendered) if doc]
    kinds = sorted(f"{obj['kind']}/{obj['metadata']['name']}" for obj in objects)
    assert "Deployment/tfloop-serving" in kinds and "HorizontalPodAutoscaler/tfloop-serving" in kinds
    assert "Role/tfloop-deployer" in kinds and "NetworkPolicy/tfloop-serving" not in kinds
    assert all(obj["metadata"]["namespace"] == "tfloop" for obj in objects)


def test_prefect_gpu_job_template_file_matches_builder_and_requests_a_gpu():
    shipped = json.loads((MANIFESTS / "prefect" / "gpu-job-template.json").read_text())
    assert shipped == manifests.prefect_gpu_job_template()
    pod = shipped["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert pod["nodeSelector"] == "{{ node_selector }}"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    variables = shipped["variables"]["properties"]
    assert variables["gpu_count"]["default"] == 1 and variables["node_selector"]["default"]
    placeholders = json.dumps(shipped["job_configuration"])
    for name in variables:
        if name != "cluster_config":
            assert "{{ " + name + " }}" in placeholders, name


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image": "", "model_name": "m", "version": 1},
        {"image": "a b", "model_name": "m", "version": 1},
        {"image": "i", "model_name": "-bad-", "version": 1},
        {"image": "i", "model_name": "m" * 64, "version": 1},
        {"image": "i", "model_name": "m", "version": 0},
    ],
)
def test_invalid_targets_are_refused_with_a_fix(kwargs):
    with pytest.raises(InvalidTargetError, match=r"(pass|use)"):
        DeployTarget(**kwargs)


def test_merge_patch_round_trips():
    current = {"a": 1, "b": {"c": 2, "d": [1, 2]}, "gone": {"x": 1}}
    desired = {"a": 1, "b": {"c": 3, "d": [2]}, "new": "yes"}
    patch = manifests.merge_patch(current, desired)
    assert patch == {"b": {"c": 3, "d": [2]}, "new": "yes", "gone": None}
    assert manifests.apply_merge_patch(current, patch) == desired
    assert manifests.merge_patch(desired, desired) == {}


def test_diff_shows_image_change_and_nothing_for_equal_objects():
    spec = ServingSpec()
    live = manifests.deployment(spec, target=DEFAULT_TARGET)
    live["status"] = {"replicas": 2}
    live["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"  # a server default
    new = manifests.deployment(
        spec, target=DeployTarget(image="tfloop-classifier:v2", model_name="tfloop-classifier", version=2)
    )
    text = manifests.diff_objects(live, new, namespace="tfloop")
    assert "-        image: tfloop-classifier:v1" in text and "+        image: tfloop-classifier:v2" in text
    assert "status" not in text and "dnsPolicy" not in text
    assert (
        manifests.diff_objects(live, manifests.deployment(spec, target=DEFAULT_TARGET), namespace="tfloop")
        == ""
    )
    assert manifests.diff_objects(None, new, namespace="tfloop").startswith("--- /dev/null")


def _rs(name, revision, image, uid="dep-uid"):
    template = manifests.deployment(
        ServingSpec(), target=DeployTarget(image=image, model_name="m", version=1)
    )
    template = copy.deepcopy(template["spec"]["template"])
    template["metadata"]["labels"][manifests.POD_TEMPLATE_HASH_LABEL] = name
    return {
        "metadata": {
            "name": name,
            "annotations": {manifests.REVISION_ANNOTATION: str(revision)},
            "ownerReferences": [{"uid": uid}],
        },
        "spec": {"template": template},
    }


def test_rollback_replicaset_choice():
    deployment = {
        "metadata": {"uid": "dep-uid"},
        "spec": {"template": manifests.template_without_hash(_rs("c", 3, "m:v3")["spec"]["template"])},
    }
    sets = [_rs("a", 1, "m:v1"), _rs("b", 2, "m:v2"), _rs("c", 3, "m:v3")]
    assert manifests.current_replicaset(deployment, sets)["metadata"]["name"] == "c"
    assert manifests.rollback_replicaset(sets, deployment_obj=deployment)["metadata"]["name"] == "b"
    # The failed rollout never got its own ReplicaSet: the remembered revision still picks the right one.
    assert (
        manifests.rollback_replicaset(sets[:2], deployment_obj=deployment, previous_revision=2)["metadata"][
            "name"
        ]
        == "b"
    )
    assert manifests.rollback_replicaset(sets, deployment_obj=deployment, previous_revision=3) is None
    assert manifests.rollback_replicaset(sets[2:], deployment_obj=deployment) is None
    assert manifests.owned_by(sets[0], deployment) and not manifests.owned_by(
        _rs("x", 1, "i", uid="other"), deployment
    )


def _deployment(generation=2, observed=2, replicas=2, updated=2, total=2, available=2, conditions=()):
    return {
        "metadata": {"name": "d", "generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "updatedReplicas": updated,
            "replicas": total,
            "availableReplicas": available,
            "conditions": list(conditions),
        },
    }


def test_rollout_status_follows_kubectl():
    assert not rollout_status(_deployment(observed=1)).done
    assert "observed" in rollout_status(_deployment(observed=1)).message
    assert "1 of 2 new replicas" in rollout_status(_deployment(updated=1, total=3)).message
    assert "1 old replicas pending" in rollout_status(_deployment(total=3)).message
    assert "1 of 2 updated replicas available" in rollout_status(_deployment(available=1)).message
    assert rollout_status(_deployment()).done
    stalled = _deployment(
        updated=1,
        conditions=[
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "timed out",
            }
        ],
    )
    assert "ProgressDeadlineExceeded" in rollout_status(stalled).failure


def _pod(reason, restarts, name="p"):
    return {
        "metadata": {"name": name},
        "status": {
            "containerStatuses": [
                {
                    "name": "serving",
                    "restartCount": restarts,
                    "state": {"waiting": {"reason": reason, "message": "m"}},
                }
            ]
        },
    }


def test_pod_problems_detects_crash_loops_and_pull_failures():
    assert pod_problems([_pod("CrashLoopBackOff", 1)], crashloop_restarts=2) == []
    problems = pod_problems(
        [
            _pod("CrashLoopBackOff", 2, "a"),
            _pod("ImagePullBackOff", 0, "b"),
            _pod("ContainerCreating", 0, "c"),
        ]
    )
    assert [(p.pod, p.reason) for p in problems] == [("a", "CrashLoopBackOff"), ("b", "ImagePullBackOff")]
    assert "pod a container serving: CrashLoopBackOff" in problems[0].describe()


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("image", "digest", "reference", "tag"),
    [
        ("reg/m:v3", None, "reg/m:v3", "v3"),
        ("reg/m:v3", DIGEST, f"reg/m@{DIGEST}", "v3"),
        (f"reg/m@{DIGEST}", None, f"reg/m@{DIGEST}", None),
        (f"reg/m:v3@{DIGEST}", DIGEST, f"reg/m@{DIGEST}", "v3"),
        ("host:5000/team/m:v3", DIGEST, f"host:5000/team/m@{DIGEST}", "v3"),
        ("host:5000/team/m", DIGEST, f"host:5000/team/m@{DIGEST}", None),
    ],
)
def test_images_by_tag_or_digest(image, digest, reference, tag):
    target = DeployTarget(image=image, digest=digest, model_name="m", version=3)
    assert target.reference == reference and split_image(image)[1] == tag
    built = manifests.deployment(ServingSpec(), target=target)
    assert manifests.serving_container(built)["image"] == reference
    assert built["spec"]["template"]["metadata"]["annotations"][manifests.IMAGE_ANNOTATION] == image


@pytest.mark.parametrize(
    ("image", "digest", "message"),
    [
        ("reg/m:v3", "sha256:abc", "is malformed"),
        ("reg/m:v3", "md5:" + "0" * 32, "is malformed"),
        ("reg/m@sha256:ABC", None, "is malformed"),
        (f"reg/m@{DIGEST}", "sha256:" + "f" * 64, "pass one"),
        (f"@{DIGEST}", None, "has no repository"),
    ],
)
def test_malformed_digests_are_refused(image, digest, message):
    with pytest.raises(InvalidTargetError, match=message):
        DeployTarget(image=image, digest=digest, model_name="m", version=1)


def test_secret_refs_and_settings_merge():
    assert SecretRef.parse("tok", default_key="token") == SecretRef(name="tok", key="token")
    assert SecretRef.parse("tok:value", default_key="token") == SecretRef(name="tok", key="value")
    with pytest.raises(InvalidSettingsError, match="not a valid key"):
        SecretRef.parse("tok:bad key", default_key="token")
    live = ServingSettings(
        feedback_uri="gs://bkt/f",
        prefect_api_url="http://p/api",
        token_secret=SecretRef.parse("t", default_key="token"),
    )
    change = ServingSettings(
        gcp_service_account="sa-name@proj-1.iam.gserviceaccount.com", clear=frozenset({"token_secret"})
    )
    merged = change.over(live)
    assert merged == ServingSettings(
        feedback_uri="gs://bkt/f",
        prefect_api_url="http://p/api",
        gcp_service_account="sa-name@proj-1.iam.gserviceaccount.com",
    )
    assert not merged.feedback_in_pod() and ServingSettings().feedback_in_pod()
    assert (
        ServingSettings(clear=frozenset({"feedback_uri"})).over(live).effective_feedback_uri()
        == "/cache/feedback"
    )
    with pytest.raises(InvalidSettingsError, match="unknown serving setting"):
        ServingSettings(clear=frozenset({"nope"}))
    with pytest.raises(InvalidSettingsError, match="both set and cleared"):
        ServingSettings(feedback_uri="gs://bkt/f", clear=frozenset({"feedback_uri"}))
    for bad in [
        {"feedback_uri": "gs://B"},
        {"feedback_uri": "relative/path"},
        {"prefect_api_url": "prefect:4200"},
    ]:
        with pytest.raises(InvalidSettingsError, match="pass"):
            ServingSettings(**bad)


def test_live_settings_read_back_what_the_builders_wrote():
    spec = ServingSpec()
    settings = ServingSettings(
        feedback_uri="gs://bucket/feedback",
        prefect_api_url="https://prefect.example/api",
        prefect_api_key_secret=SecretRef(name="prefect", key="api-key"),
        token_secret=SecretRef(name="tok", key="token"),
        feedback_secret=SecretRef(name="sign", key="k"),
        gcp_service_account="serving@proj-1.iam.gserviceaccount.com",
        gcp_key_secret=SecretRef(name="gcs", key="sa.json"),
    )
    read = manifests.live_serving_settings(
        config_map_obj=manifests.config_map(spec, settings),
        deployment_obj=manifests.deployment(spec, target=DEFAULT_TARGET, settings=settings),
        service_account_obj=manifests.service_account(spec, settings),
    )
    assert read == settings
    empty = manifests.live_serving_settings(
        config_map_obj=None, deployment_obj=None, service_account_obj=None
    )
    assert empty == ServingSettings()


def test_termination_waits_for_the_prestop_sleep_and_the_drain():
    spec = ServingSpec(pre_stop_s=4, drain_s=10, shutdown_timeout_s=5, termination_grace_s=20)
    pod = manifests.deployment(spec, target=DEFAULT_TARGET)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 20
    hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert hook == ["python", "-c", "import time; time.sleep(4)"]
    data = manifests.config_map(spec)["data"]
    assert data["TFLOOP_SERVE_DRAIN_S"] == "10" and data["TFLOOP_SERVE_SHUTDOWN_TIMEOUT_S"] == "5"
    with pytest.raises(InvalidSettingsError, match="must exceed the preStop sleep"):
        ServingSpec(pre_stop_s=5, drain_s=5, termination_grace_s=25)


def test_restore_patch_puts_the_previous_object_back():
    spec = ServingSpec()
    previous = manifests.deployment(spec, target=DEFAULT_TARGET)
    previous["metadata"].update(uid="u1", resourceVersion="7", generation=3)
    previous["metadata"]["annotations"][manifests.REVISION_ANNOTATION] = "3"
    previous["status"] = {"replicas": 2}
    changed = manifests.deployment(
        ServingSpec(max_surge=2),
        target=DeployTarget(image="m:v2", model_name="tfloop-classifier", version=2, run_id="r2"),
        settings=ServingSettings(token_secret=SecretRef(name="t", key="token")),
    )
    changed["metadata"].update(uid="u1", resourceVersion="9", generation=4)
    changed["metadata"]["annotations"][manifests.REVISION_ANNOTATION] = "4"
    changed["spec"]["replicas"] = 5  # the HPA's
    patch = manifests.restore_patch(changed, previous)
    assert "status" not in patch and "replicas" not in patch["spec"]
    assert manifests.REVISION_ANNOTATION not in patch["metadata"]["annotations"]
    restored = manifests.apply_merge_patch(changed, patch)
    assert restored["spec"]["template"] == previous["spec"]["template"]
    assert manifests.restorable(restored) == manifests.restorable(previous)
    assert restored["spec"]["replicas"] == 5 and restored["metadata"]["resourceVersion"] == "9"
    assert manifests.restore_patch(previous, previous) == {}


def test_lease_expiry_and_clearing_removed_keys():
    now = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
    lease = manifests.rollout_lease(ServingSpec(), holder="h@1/x", duration_s=60, now=now)
    assert lease["spec"]["renewTime"] == "2026-01-01T12:00:00.000000Z"
    assert manifests.lease_expires_at(lease) == now + datetime.timedelta(seconds=60)
    assert manifests.lease_holder(lease) == "h@1/x"
    released = {**lease, "spec": {**lease["spec"], "holderIdentity": None}}
    assert manifests.lease_expires_at(released) is None and manifests.lease_holder(released) is None

    live = {"data": {"A": "1", "TFLOOP_SERVE_PREFECT_API_URL": "http://p"}}
    desired = {"data": {"A": "1"}}
    cleared = manifests.removing(desired, live=live, path=("data",), keys=manifests.MANAGED_CONFIG_KEYS)
    assert cleared == {"data": {"A": "1", "TFLOOP_SERVE_PREFECT_API_URL": None}} and desired == {
        "data": {"A": "1"}
    }
    assert manifests.apply_merge_patch(live, cleared) == {"data": {"A": "1"}}
    assert manifests.removing(desired, live=None, path=("data",), keys=["A"]) == desired


def test_image_pull_and_config_errors_are_fatal_with_zero_restarts():
    reasons = [
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "ErrImageNeverPull",
    ]
    problems = pod_problems([_pod(reason, 0, f"p{index}") for index, reason in enumerate(reasons)])
    assert [problem.reason for problem in problems] == reasons
    assert pod_problems([_pod("CreateContainerError", 1)]) == []


def test_a_missing_volume_secret_is_found_in_failed_mount_events():
    stuck = _pod("ContainerCreating", 0, "stuck")
    event = {
        "type": "Warning",
        "reason": "FailedMount",
        "involvedObject": {"kind": "Pod", "name": "stuck"},
        "message": 'MountVolume.SetUp failed for volume "gcp-key" : secret "k" not found',
    }
    assert pod_problems([stuck]) == []
    [problem] = mount_problems([stuck], [event])
    assert (problem.pod, problem.reason, problem.restarts) == ("stuck", "FailedMount", 0)
    assert mount_problems([stuck], [{**event, "involvedObject": {"name": "other"}}]) == []
    assert mount_problems([stuck], [{**event, "message": "timed out waiting for the condition"}]) == []
    assert mount_problems([_pod("CrashLoopBackOff", 0, "stuck")], [event]) == []


def test_settings_parse_text_options():
    parsed = ServingSettings.parse(
        feedback_uri=" gs://bkt/f ", token_secret="tok", gcp_key_secret="gcs:sa.json", prefect_api_url=""
    )
    assert parsed == ServingSettings(
        feedback_uri="gs://bkt/f",
        token_secret=SecretRef(name="tok", key="token"),
        gcp_key_secret=SecretRef(name="gcs", key="sa.json"),
        clear=frozenset({"prefect_api_url"}),
    )
    assert ServingSettings.parse() == ServingSettings()
