"""Roll a model version out to Kubernetes, verify it, and roll back automatically when it fails.

:func:`deploy` takes the Deployment's rollout Lease (:mod:`k8s.lease`: one rollout at a time), reads the
live serving stack, merges the serving settings it was asked to change onto the ones the cluster has
(:class:`~k8s.settings.ServingSettings`; a feedback queue inside the pods is refused unless allowed), and
creates or JSON-merge-patches each object, the Deployment last, recording every object's previous state
first. It waits like ``kubectl rollout status``: the observed generation caught up and updated, ready and
available replicas equal to the desired count. It stops on ``ProgressDeadlineExceeded``, on new pods that
crash-loop, on image-pull and container-config errors (at once: those never restart), or on the caller's
timeout, then smoke-tests the Service on the new version's routes. On any failure it restores every object
it changed (and deletes the ones it created), waits for the previous version to be healthy, and returns a
failed :class:`RolloutResult` whose ``outcome`` says whether it was rolled back, and which condition, pod
and event caused it. With ``maxUnavailable: 0`` the previous version keeps serving throughout.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from k8s import manifests
from k8s.client import Cluster, call, connect, ensure_namespace, is_not_found
from k8s.errors import ClusterApiError, ClusterError, PodLocalFeedbackError
from k8s.lease import HeldLease, hold_rollout_lease, live_holder
from k8s.settings import ClusterSettings, DeployTarget, ServingSettings, ServingSpec, split_image
from k8s.smoke import SmokeResult, SmokeSettings, forward_service, grpc_smoke_test, smoke_test

MERGE_PATCH = "application/merge-patch+json"
IMMEDIATELY_FATAL = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "ErrImageNeverPull",
}
FATAL_AFTER_RESTARTS = {"CrashLoopBackOff", "RunContainerError", "CreateContainerError"}

ROLLED_OUT = "rolled_out"
ROLLED_BACK = "rolled_back"
ROLLBACK_FAILED = "rollback_failed"
FAILED = "failed"
DRY_RUN = "dry_run"

ProgressCallback = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class PodProblem:
    """A new pod that will not become ready: which pod and container, and what Kubernetes says."""

    pod: str
    container: str
    reason: str
    message: str
    restarts: int

    def describe(self) -> str:
        text = f"pod {self.pod} container {self.container}: {self.reason} (restarts: {self.restarts})"
        return f"{text}: {self.message}" if self.message else text


@dataclass(frozen=True, kw_only=True)
class RolloutStatus:
    """One look at a Deployment, as ``kubectl rollout status`` judges it."""

    done: bool
    message: str
    failure: str | None = None


@dataclass(frozen=True, kw_only=True)
class WaitOutcome:
    ok: bool
    reason: str
    problems: list[PodProblem] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class RolloutResult:
    """What happened: ``ok`` means the new version serves and passed its smoke test.

    ``outcome`` says it in one word: ``rolled_out`` (ok), ``rolled_back`` (the new version failed and every
    changed object was put back; the previous version serves: retrying the same image is pointless),
    ``rollback_failed`` (put back, but the previous version did not become healthy again), ``failed``
    (nothing to roll back to: a first rollout, or nothing had changed) or ``dry_run``. ``rolled_back`` is
    True exactly when the previous state was restored (``restored``: objects patched back, ``deleted``:
    objects this deploy had created), whatever ``rollback_ok`` then says about its health.
    """

    ok: bool
    reason: str
    deployment: str
    namespace: str
    image: str
    model_name: str
    model_version: int
    outcome: str = FAILED
    image_tag: str | None = None
    image_digest: str | None = None
    previous_image: str | None = None
    previous_model_version: int | None = None
    revision: int | None = None
    rolled_back: bool = False
    rollback_ok: bool | None = None
    dry_run: bool = False
    changed: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    serving_settings: dict[str, str | None] = field(default_factory=dict)
    lease: str | None = None
    lease_holder: str | None = None
    diff: str = ""
    events: list[str] = field(default_factory=list)
    pod_problems: list[PodProblem] = field(default_factory=list)
    smoke: SmokeResult | None = None
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- pure judgement ----------------------------------------------------------------------------------


def rollout_status(deployment: Mapping[str, Any]) -> RolloutStatus:
    """Judge a Deployment the way ``kubectl rollout status`` does (pure; no API calls)."""
    name = deployment.get("metadata", {}).get("name", "?")
    generation = deployment.get("metadata", {}).get("generation")
    status = deployment.get("status") or {}
    observed = status.get("observedGeneration")
    if generation is None or observed is None or observed < generation:
        return RolloutStatus(done=False, message=f"waiting for deployment {name} spec update to be observed")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            detail = condition.get("message") or "no progress within progressDeadlineSeconds"
            return RolloutStatus(
                done=False,
                message=detail,
                failure=f"condition Progressing=False, reason ProgressDeadlineExceeded: {detail}",
            )
    desired = deployment.get("spec", {}).get("replicas", 1)
    updated = status.get("updatedReplicas") or 0
    total = status.get("replicas") or 0
    available = status.get("availableReplicas") or 0
    prefix = f"waiting for deployment {name} rollout to finish"
    if updated < desired:
        return RolloutStatus(done=False, message=f"{prefix}: {updated} of {desired} new replicas updated")
    if total > updated:
        return RolloutStatus(
            done=False, message=f"{prefix}: {total - updated} old replicas pending termination"
        )
    if available < updated:
        return RolloutStatus(
            done=False, message=f"{prefix}: {available} of {updated} updated replicas available"
        )
    return RolloutStatus(
        done=True, message=f"deployment {name} successfully rolled out ({available} available)"
    )


def pod_problems(pods: list[Mapping[str, Any]], *, crashloop_restarts: int = 2) -> list[PodProblem]:
    """New pods that will not become ready: image pull failures, crash loops, bad container config."""
    found: list[PodProblem] = []
    for pod in pods:
        status = pod.get("status") or {}
        statuses = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
        for container in statuses:
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            restarts = int(container.get("restartCount") or 0)
            fatal = reason in IMMEDIATELY_FATAL or (
                reason in FATAL_AFTER_RESTARTS and restarts >= crashloop_restarts
            )
            if fatal:
                last = (container.get("lastState") or {}).get("terminated") or {}
                message = waiting.get("message") or ""
                if last:
                    message = (f"{message}; " if message else "") + (
                        f"last exit code {last.get('exitCode')} ({last.get('reason', 'terminated')})"
                    )
                found.append(
                    PodProblem(
                        pod=pod["metadata"]["name"],
                        container=container.get("name", "?"),
                        reason=str(reason),
                        message=message,
                        restarts=restarts,
                    )
                )
    return found


def creating(pods: list[Mapping[str, Any]]) -> list[str]:
    """Names of pods whose containers still wait in ``ContainerCreating`` (volumes not mounted yet)."""
    return [
        pod["metadata"]["name"]
        for pod in pods
        if any(
            ((status.get("state") or {}).get("waiting") or {}).get("reason") == "ContainerCreating"
            for status in (pod.get("status") or {}).get("containerStatuses") or []
        )
    ]


def mount_problems(pods: list[Mapping[str, Any]], events: list[Mapping[str, Any]]) -> list[PodProblem]:
    """Pods stuck in ``ContainerCreating`` because a volume's Secret or ConfigMap does not exist.

    The kubelet retries such a mount forever and says so only in ``FailedMount`` Warning events; the pod
    would otherwise just wait until the progress deadline.
    """
    waiting = set(creating(pods))
    found: dict[str, PodProblem] = {}
    for event in events:
        involved = event.get("involvedObject") or {}
        pod = involved.get("name")
        message = str(event.get("message") or "")
        if (
            pod in waiting
            and pod not in found
            and event.get("type") == "Warning"
            and event.get("reason") == "FailedMount"
            and "not found" in message
        ):
            found[pod] = PodProblem(pod=pod, container="-", reason="FailedMount", message=message, restarts=0)
    return list(found.values())


def previous_model(deployment: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """The image and model version a live Deployment runs now."""
    try:
        image = manifests.serving_container(deployment).get("image")
    except (KeyError, IndexError):
        image = None
    labels = deployment.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {}
    version = labels.get(manifests.MODEL_VERSION_LABEL)
    return image, int(version) if version and str(version).isdigit() else None


# ---- API helpers -------------------------------------------------------------------------------------

_KINDS: dict[str, tuple[str, str, str]] = {
    # kind -> (API group property on Cluster, method suffix, plural for messages)
    "ServiceAccount": ("core", "service_account", "serviceaccounts"),
    "ConfigMap": ("core", "config_map", "configmaps"),
    "Service": ("core", "service", "services"),
    "Deployment": ("apps", "deployment", "deployments"),
    "HorizontalPodAutoscaler": ("autoscaling", "horizontal_pod_autoscaler", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy", "pod_disruption_budget", "poddisruptionbudgets"),
    "NetworkPolicy": ("networking", "network_policy", "networkpolicies"),
}
# Restored before the Deployment (its rollback pods read them), deleted after it.
RESTORE_ORDER = ["ServiceAccount", "ConfigMap", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]


def _api(cluster: Cluster, kind: str, action: str) -> tuple[Callable[..., Any], str]:
    group, suffix, plural = _KINDS[kind]
    return getattr(getattr(cluster, group), f"{action}_namespaced_{suffix}"), plural


def read_object(cluster: Cluster, *, kind: str, name: str) -> dict[str, Any] | None:
    """The live object, or None when it does not exist."""
    method, plural = _api(cluster, kind, "read")
    try:
        return call(cluster, method, name, cluster.namespace, verb="get", resource=plural, name=name)
    except ClusterApiError as error:
        if is_not_found(error):
            return None
        raise


def apply_object(
    cluster: Cluster, obj: Mapping[str, Any], *, live: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Create ``obj``, or JSON-merge-patch the live one with it (no request when nothing changes)."""
    name = obj["metadata"]["name"]
    if live is None:
        method, plural = _api(cluster, obj["kind"], "create")
        body = {**obj, "metadata": {**obj["metadata"], "namespace": cluster.namespace}}
        return call(cluster, method, cluster.namespace, body, verb="create", resource=plural, name=name)
    if manifests.project(live, obj) == manifests.project(manifests.apply_merge_patch(live, obj), obj):
        return dict(live)
    method, plural = _api(cluster, obj["kind"], "patch")
    return call(
        cluster,
        method,
        name,
        cluster.namespace,
        obj,
        verb="patch",
        resource=plural,
        name=name,
        _content_type=MERGE_PATCH,
    )


def delete_object(cluster: Cluster, *, kind: str, name: str) -> None:
    """Delete an object (gone already is fine)."""
    method, plural = _api(cluster, kind, "delete")
    try:
        call(cluster, method, name, cluster.namespace, verb="delete", resource=plural, name=name)
    except ClusterApiError as error:
        if not is_not_found(error):
            raise


def owned_replicasets(cluster: Cluster, deployment: Mapping[str, Any]) -> list[dict[str, Any]]:
    selector = _label_selector(deployment["spec"]["selector"].get("matchLabels") or {})
    answer = call(
        cluster,
        cluster.apps.list_namespaced_replica_set,
        cluster.namespace,
        label_selector=selector,
        verb="list",
        resource="replicasets",
    )
    return [rs for rs in answer.get("items", []) if manifests.owned_by(rs, deployment)]


def _label_selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _matches(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    have = obj.get("metadata", {}).get("labels") or {}
    return all(have.get(key) == value for key, value in labels.items())


def new_pods(
    cluster: Cluster, deployment: Mapping[str, Any], replicaset: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Pods of the rollout's new ReplicaSet (selected by its ``pod-template-hash``)."""
    labels = dict(deployment["spec"]["selector"].get("matchLabels") or {})
    pod_hash = (replicaset["metadata"].get("labels") or {}).get(manifests.POD_TEMPLATE_HASH_LABEL)
    if pod_hash:
        labels[manifests.POD_TEMPLATE_HASH_LABEL] = pod_hash
    answer = call(
        cluster,
        cluster.core.list_namespaced_pod,
        cluster.namespace,
        label_selector=_label_selector(labels),
        verb="list",
        resource="pods",
    )
    return [
        pod
        for pod in answer.get("items", [])
        if _matches(pod, labels) and manifests.owned_by(pod, replicaset)
    ]


def list_events(cluster: Cluster) -> list[dict[str, Any]]:
    answer = call(
        cluster, cluster.core.list_namespaced_event, cluster.namespace, verb="list", resource="events"
    )
    return list(answer.get("items", []))


def warning_events(cluster: Cluster, *, names: set[str]) -> list[str]:
    """Warning events about the named objects, oldest first, as ``Kind/name: Reason: message`` lines."""
    if not names:
        return []
    lines = []
    for event in list_events(cluster):
        involved = event.get("involvedObject") or {}
        if involved.get("name") in names and event.get("type") == "Warning":
            count = event.get("count") or 1
            lines.append(
                f"{involved.get('kind', '?')}/{involved.get('name')}: {event.get('reason')}: "
                f"{event.get('message', '')}" + (f" (x{count})" if count > 1 else "")
            )
    return lines


def wait_for_rollout(
    cluster: Cluster,
    *,
    name: str,
    timeout_s: float,
    poll_interval_s: float,
    crashloop_restarts: int = 2,
    on_progress: ProgressCallback | None = None,
) -> WaitOutcome:
    """Wait until Deployment ``name`` has rolled out, or say precisely why it will not."""
    deadline = time.monotonic() + timeout_s
    last_message = ""
    while True:
        deployment = read_object(cluster, kind="Deployment", name=name)
        if deployment is None:
            return WaitOutcome(ok=False, reason=f"deployment {name} disappeared during the rollout")
        status = rollout_status(deployment)
        replicasets = owned_replicasets(cluster, deployment)
        current = manifests.current_replicaset(deployment, replicasets)
        pods = new_pods(cluster, deployment, current) if current else []
        problems = pod_problems(pods, crashloop_restarts=crashloop_restarts)
        if not problems and creating(pods):
            problems = mount_problems(pods, list_events(cluster))
        if status.failure or problems:
            names = {pod["metadata"]["name"] for pod in pods} | {name}
            if current:
                names.add(current["metadata"]["name"])
            reason = status.failure or "; ".join(problem.describe() for problem in problems)
            return WaitOutcome(
                ok=False, reason=reason, problems=problems, events=warning_events(cluster, names=names)
            )
        if status.done:
            _report(on_progress, status.message)
            return WaitOutcome(ok=True, reason=status.message)
        if status.message != last_message:
            _report(on_progress, status.message)
            last_message = status.message
        if time.monotonic() >= deadline:
            names = {pod["metadata"]["name"] for pod in pods} | {name}
            return WaitOutcome(
                ok=False,
                reason=f"timed out after {timeout_s:g} s: {status.message}",
                events=warning_events(cluster, names=names),
            )
        time.sleep(poll_interval_s)


def _report(on_progress: ProgressCallback | None, message: str) -> None:
    if on_progress is not None:
        on_progress(message)


# ---- the rollout -------------------------------------------------------------------------------------


def deploy(
    target: DeployTarget,
    *,
    settings: ClusterSettings,
    spec: ServingSpec | None = None,
    serving: ServingSettings | None = None,
    allow_pod_local_feedback: bool = False,
    timeout_s: float = 600.0,
    dry_run: bool = False,
    smoke: SmokeSettings | None = None,
    network_policy: bool = False,
    crashloop_restarts: int = 2,
    on_progress: ProgressCallback | None = None,
) -> RolloutResult:
    """Roll ``target`` out, verify it, and roll back on failure; see the module docstring.

    ``serving`` holds the serving settings this deploy changes (None fields keep what the cluster has);
    a feedback queue inside the pods is refused unless ``allow_pod_local_feedback``. Raises
    ``ClusterError`` subclasses for problems a user must fix before anything can be rolled out
    (kubeconfig, context, unreachable server, RBAC, missing namespace, another rollout holding the Lease,
    unsafe settings). A rollout that fails after it began is not an exception: the result has
    ``ok=False``, ``outcome``, the reason, and whether the rollback worked.
    """
    spec = spec or ServingSpec()
    smoke = smoke or SmokeSettings()
    started = time.monotonic()
    cluster = connect(settings=settings)
    try:
        ensure_namespace(cluster)
        lease_context = (
            contextlib.nullcontext(None)
            if dry_run
            else hold_rollout_lease(cluster, spec=spec, duration_s=settings.lease_duration_s)
        )
        with lease_context as lease:
            if lease is not None and lease.took_over:
                _report(on_progress, f"took over expired rollout Lease {lease.name} from {lease.took_over}")
            result = _deploy(
                cluster,
                target,
                spec=spec,
                serving=serving or ServingSettings(),
                allow_pod_local_feedback=allow_pod_local_feedback,
                settings=settings,
                timeout_s=timeout_s,
                dry_run=dry_run,
                smoke=smoke,
                network_policy=network_policy,
                crashloop_restarts=crashloop_restarts,
                on_progress=on_progress,
                lease=lease,
            )
        if lease is not None:
            _note_lease(result, lease)
        elif holder := live_holder(cluster, spec=spec):
            result.notes.append(
                f"a rollout by {holder} holds Lease {manifests.lease_name(spec)} now: "
                "deploying would be refused"
            )
    finally:
        cluster.close()
    result.duration_s = round(time.monotonic() - started, 3)
    return result


def _note_lease(result: RolloutResult, lease: HeldLease) -> None:
    result.lease, result.lease_holder = lease.name, lease.holder
    if lease.took_over:
        result.notes.append(f"took over the expired rollout Lease {lease.name} from {lease.took_over}")
    if lease.lost:
        result.notes.append(f"warning: {lease.lost}; another deploy may have run at the same time")


def resolve_serving_settings(
    requested: ServingSettings,
    *,
    live: Mapping[str, dict[str, Any] | None],
    spec: ServingSpec,
    allow_pod_local_feedback: bool,
) -> ServingSettings:
    """The settings this deploy applies: ``requested`` over what the live objects carry; refuses a feedback
    queue inside the pods unless allowed."""
    current = manifests.live_serving_settings(
        config_map_obj=live.get(f"ConfigMap/{manifests.config_map_name(spec)}"),
        deployment_obj=live.get(f"Deployment/{spec.app_name}"),
        service_account_obj=live.get(f"ServiceAccount/{spec.app_name}"),
    )
    resolved = requested.over(current)
    if resolved.feedback_in_pod() and not allow_pod_local_feedback:
        uri = resolved.effective_feedback_uri()
        where = "the default" if resolved.feedback_uri is None else "set"
        raise PodLocalFeedbackError(
            f"the feedback queue would be {uri} ({where}), a folder inside each serving pod: corrected "
            "labels would be lost with the pod and split across replicas. Pass "
            "--feedback-uri gs://bucket/feedback (with --gcp-service-account or --gcp-key-secret so "
            "serving may write there), or "
            "--allow-pod-local-feedback to accept a pod-local queue (demos, tests)"
        )
    return resolved


def desired_objects(
    spec: ServingSpec,
    *,
    target: DeployTarget,
    settings: ServingSettings,
    live: Mapping[str, dict[str, Any] | None],
    network_policy: bool,
) -> list[dict[str, Any]]:
    """The objects to apply over ``live``: cleared settings removed, the settings checksum in the pod
    template (a settings change rolls the pods), ``spec.replicas`` left to the HPA on updates."""
    desired = []
    config_data: dict[str, Any] = {}
    for obj in manifests.serving_objects(
        spec, target=target, settings=settings, network_policy_enabled=network_policy
    ):
        key = manifests.object_key(obj)
        if obj["kind"] == "ConfigMap":
            obj = manifests.removing(
                obj, live=live.get(key), path=("data",), keys=manifests.MANAGED_CONFIG_KEYS
            )
            config_data = manifests.apply_merge_patch(live.get(key) or {}, obj).get("data") or {}
        elif obj["kind"] == "ServiceAccount":
            obj = manifests.removing(
                obj,
                live=live.get(key),
                path=("metadata", "annotations"),
                keys=[manifests.GCP_SERVICE_ACCOUNT_ANNOTATION],
            )
        desired.append(obj)
    result = []
    for obj in desired:
        if obj["kind"] == "Deployment":
            obj = manifests.with_settings_checksum(obj, data=config_data)
            if live.get(manifests.object_key(obj)) is not None:
                obj = manifests.without_replicas(obj)
        result.append(obj)
    return result


def _deploy(
    cluster: Cluster,
    target: DeployTarget,
    *,
    spec: ServingSpec,
    serving: ServingSettings,
    allow_pod_local_feedback: bool,
    settings: ClusterSettings,
    timeout_s: float,
    dry_run: bool,
    smoke: SmokeSettings,
    network_policy: bool,
    crashloop_restarts: int,
    on_progress: ProgressCallback | None,
    lease: HeldLease | None = None,
) -> RolloutResult:
    plan = manifests.serving_objects(spec, target=target, network_policy_enabled=network_policy)
    live = {
        manifests.object_key(obj): read_object(cluster, kind=obj["kind"], name=obj["metadata"]["name"])
        for obj in plan
    }
    resolved = resolve_serving_settings(
        serving, live=live, spec=spec, allow_pod_local_feedback=allow_pod_local_feedback
    )
    desired = desired_objects(
        spec, target=target, settings=resolved, live=live, network_policy=network_policy
    )
    deployment_key = f"Deployment/{spec.app_name}"
    live_deployment = live[deployment_key]
    previous_image, previous_version = previous_model(live_deployment) if live_deployment else (None, None)
    _, image_tag, _ = split_image(target.image)
    result = RolloutResult(
        ok=False,
        reason="",
        deployment=spec.app_name,
        namespace=cluster.namespace,
        image=target.reference,
        image_tag=image_tag,
        image_digest=target.image_digest,
        model_name=target.model_name,
        model_version=target.version,
        previous_image=previous_image,
        previous_model_version=previous_version,
        dry_run=dry_run,
        serving_settings=resolved.to_dict(),
    )
    diffs = {
        manifests.object_key(obj): manifests.diff_objects(
            live[manifests.object_key(obj)], obj, namespace=cluster.namespace
        )
        for obj in desired
    }
    result.changed = [key for key, text in diffs.items() if text]
    result.diff = "".join(diffs.values())
    if dry_run:
        result.ok, result.outcome = True, DRY_RUN
        result.reason = (
            f"dry run: {len(result.changed)} object(s) would change"
            if result.changed
            else "dry run: nothing would change"
        )
        return result

    applied: list[str] = []
    try:
        for obj in desired:
            key = manifests.object_key(obj)
            if obj["kind"] != "Deployment" and key in result.changed:
                _report(on_progress, f"{'updating' if live[key] else 'creating'} {key}")
                apply_object(cluster, obj, live=live[key])
                applied.append(key)
        _report(
            on_progress,
            f"rolling {spec.app_name} out to {target.model_name} v{target.version} ({target.reference})",
        )
        deployment = apply_object(
            cluster, next(obj for obj in desired if obj["kind"] == "Deployment"), live=live_deployment
        )
        if deployment_key in result.changed:
            applied.append(deployment_key)
    except ClusterError:
        if live_deployment is not None:
            with contextlib.suppress(ClusterError):
                _restore(cluster, applied=applied, previous=live, result=result, on_progress=on_progress)
        raise
    result.revision = manifests.revision(deployment) or None

    outcome = wait_for_rollout(
        cluster,
        name=spec.app_name,
        timeout_s=timeout_s,
        poll_interval_s=settings.poll_interval_s,
        crashloop_restarts=crashloop_restarts,
        on_progress=on_progress,
    )
    if outcome.ok and smoke.enabled:
        _report(on_progress, f"smoke test: {target.model_name} v{target.version}")
        smoked = _smoke(cluster, target=target, spec=spec, smoke=smoke, settings=settings, result=result)
        outcome = outcome if smoked.ok else smoked
    latest = read_object(cluster, kind="Deployment", name=spec.app_name) or deployment
    result.revision = manifests.revision(latest) or result.revision
    result.events, result.pod_problems = outcome.events, outcome.problems
    if outcome.ok:
        result.ok, result.outcome, result.reason = True, ROLLED_OUT, outcome.reason
        return result

    result.reason = outcome.reason
    if live_deployment is None:
        result.reason += " (nothing to roll back to: this was the first rollout)"
        result.notes.append(
            "first rollout failed: the objects it created are left in place for inspection "
            f"(kubectl describe deployment {spec.app_name} -n {cluster.namespace}): " + ", ".join(applied)
        )
        return result
    if not applied:
        result.reason += " (nothing to roll back to: the Deployment already ran this template)"
        return result
    if lease is not None and lease.lost:
        # Someone else may be rolling the Deployment out now: putting the old state back could undo theirs.
        result.reason += f" (not rolled back: {lease.lost})"
        return result
    _report(on_progress, f"rollout failed: {outcome.reason}; rolling back to {previous_image}")
    try:
        _restore(cluster, applied=applied, previous=live, result=result, on_progress=on_progress)
    except ClusterError as error:
        result.rollback_ok, result.outcome = False, ROLLBACK_FAILED
        pending = [key for key in applied if key not in {*result.restored, *result.deleted}]
        result.reason += f"; rollback stopped with {', '.join(pending)} not restored: {error}"
        return result
    result.rolled_back = True
    back = wait_for_rollout(
        cluster,
        name=spec.app_name,
        timeout_s=timeout_s,
        poll_interval_s=settings.poll_interval_s,
        crashloop_restarts=crashloop_restarts,
        on_progress=on_progress,
    )
    result.rollback_ok = back.ok
    result.outcome = ROLLED_BACK if back.ok else ROLLBACK_FAILED
    result.revision = (
        manifests.revision(read_object(cluster, kind="Deployment", name=spec.app_name) or {}) or None
    )
    result.reason += (
        f"; rolled back to {previous_image} (model v{previous_version})"
        if back.ok
        else f"; rollback to {previous_image} did not become healthy: {back.reason}"
    )
    return result


def _restore(
    cluster: Cluster,
    *,
    applied: list[str],
    previous: Mapping[str, dict[str, Any] | None],
    result: RolloutResult,
    on_progress: ProgressCallback | None,
) -> None:
    """Put every object in ``applied`` back as ``previous`` had it: patched back, or deleted when this deploy
    created it. Settings objects go first (the rollback's pods read them), creations are undone last."""
    rank = {kind: index for index, kind in enumerate([*RESTORE_ORDER, "Deployment", "NetworkPolicy"])}
    created = [key for key in applied if previous.get(key) is None]
    for key in sorted((key for key in applied if key not in created), key=lambda k: rank[k.split("/")[0]]):
        kind, name = key.split("/", 1)
        current = read_object(cluster, kind=kind, name=name)
        before = previous[key]
        if before is None:
            continue
        if current is None:
            _report(on_progress, f"re-creating {key}")
            body = manifests.restorable(before)
            body["metadata"]["name"] = name
            apply_object(cluster, body, live=None)
            result.restored.append(key)
            continue
        patch = manifests.restore_patch(current, before)
        if patch:
            _report(on_progress, f"restoring {key}")
            method, plural = _api(cluster, kind, "patch")
            call(
                cluster,
                method,
                name,
                cluster.namespace,
                patch,
                verb="patch",
                resource=plural,
                name=name,
                _content_type=MERGE_PATCH,
            )
        result.restored.append(key)
    for key in created:
        kind, name = key.split("/", 1)
        _report(on_progress, f"deleting {key} (this deploy created it)")
        delete_object(cluster, kind=kind, name=name)
        result.deleted.append(key)


def _smoke(
    cluster: Cluster,
    *,
    target: DeployTarget,
    spec: ServingSpec,
    smoke: SmokeSettings,
    settings: ClusterSettings,
    result: RolloutResult,
) -> WaitOutcome:
    try:
        with _smoke_url(cluster, spec=spec, smoke=smoke, in_cluster=settings.in_cluster) as url:
            check = smoke_test if smoke.protocol == "rest" else grpc_smoke_test
            where = {"base_url": url} if smoke.protocol == "rest" else {"target": url.split("://")[-1]}
            result.smoke = check(
                **where,
                model_name=target.model_name,
                expected_version=target.version,
                sample_image=smoke.sample_image,
                predict=smoke.predict,
                timeout_s=smoke.timeout_s,
                pinned=smoke.pinned,
            )
    except ClusterError as error:
        return WaitOutcome(ok=False, reason=f"smoke test could not reach the service: {error}")
    if not result.smoke.ok:
        return WaitOutcome(
            ok=False, reason=f"smoke test failed at {result.smoke.url}: {result.smoke.message}"
        )
    return WaitOutcome(ok=True, reason=result.smoke.message)


@contextlib.contextmanager
def _smoke_url(
    cluster: Cluster, *, spec: ServingSpec, smoke: SmokeSettings, in_cluster: bool
) -> Iterator[str]:
    port = spec.port if smoke.protocol == "rest" else spec.grpc_port
    if smoke.protocol == "grpc" and not port:
        raise ClusterError(
            "a gRPC smoke test needs the gRPC port; the serving spec turns it off (grpc_port 0)"
        )
    if smoke.url:
        yield smoke.url
    elif in_cluster:
        yield f"http://{spec.app_name}.{cluster.namespace}.svc:{port}"
    else:
        with forward_service(cluster, service_name=spec.app_name, port=port) as url:
            yield url
