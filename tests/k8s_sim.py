"""A Kubernetes API on loopback for tests: kmock's emulator, plus what a real cluster would do that it lacks.

``kmock.KubernetesEmulator`` (0.8) stores objects as plain JSON and applies every PATCH as a JSON merge
patch; it runs no controllers. This module adds, honestly and only as far as tfloop's rollout needs:

* server behaviour kmock lacks, in :class:`ClusterEmulator` (done inside the request, as the real API
  server does it): ``metadata.generation`` (1 on create, +1 when ``spec`` changes), ``uid``,
  ``resourceVersion`` (and its precondition: a PATCH that names an older ``metadata.resourceVersion``
  gets 409 Conflict, as optimistic concurrency on a real server); Namespace objects
  (``GET /api/v1/namespaces/NAME``) and 404 for writes into a missing namespace; RBAC refusals (403
  ``Status`` for a chosen verb and resource, before anything is stored); the resources kmock does not
  declare by itself (ReplicaSets, Secrets, ``coordination.k8s.io/v1`` Leases, ...). Gaps that stay: no
  strategic-merge or server-side-apply patches (tfloop sends JSON merge patches, which both kmock and
  real servers understand), no PUT, no field/label selectors on the server side (tfloop filters lists
  itself as well), and the resourceVersion check and the store are two steps (a real server does both
  atomically). ``pods/NAME/portforward`` is served as a real websocket upgrade in the v4 channel protocol
  that the official client speaks; what it relays to is a loopback listener the test names for the pod
  (``pod_listener``), not a container.
* a registry of built images (:meth:`RunningCluster.build_image`): which model version each image
  carries, so a test's stand-in for the serving pods answers from the image rolled out, not from the
  labels tfloop wrote.
* :class:`SimulatedDeploymentController`, an asyncio task on the emulator's loop that plays the
  Deployment and ReplicaSet controllers and the kubelet: ReplicaSets per pod template with
  ``pod-template-hash`` and ``deployment.kubernetes.io/revision`` (an old ReplicaSet is reused, with a
  new revision, when its template comes back, as on rollback), rolling updates that honour ``maxSurge``
  and ``maxUnavailable: 0``, pods that become ready or crash-loop or fail to pull their image as the
  test decides (with Warning events), containers whose ``secretKeyRef`` names a missing Secret or key
  (``CreateContainerConfigError``, as the kubelet reports it), pods whose Secret volume is missing
  (``ContainerCreating`` and ``FailedMount`` events), ``observedGeneration``, and the
  ``Progressing`` condition with ``ProgressDeadlineExceeded``. It logs available replicas on every step
  for invariant checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml
from kmock._internal import dicts as kmock_dicts

RESOURCES = {
    "v1/namespaces": ("Namespace", False),
    "v1/pods": ("Pod", True),
    "v1/events": ("Event", True),
    "v1/services": ("Service", True),
    "v1/configmaps": ("ConfigMap", True),
    "v1/serviceaccounts": ("ServiceAccount", True),
    "v1/secrets": ("Secret", True),
    "coordination.k8s.io/v1/leases": ("Lease", True),
    "apps/v1/deployments": ("Deployment", True),
    "apps/v1/replicasets": ("ReplicaSet", True),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", True),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True),
}
VERBS = {
    kmock.action.FETCH: "get",
    kmock.action.LIST: "list",
    kmock.action.WATCH: "watch",
    kmock.action.CREATE: "create",
    kmock.action.UPDATE: "patch",
    kmock.action.DELETE: "delete",
}
NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces/(?P<name>[^/]+)$")
PORTFORWARD_PATH = re.compile(r"^/api/v1/namespaces/(?P<namespace>[^/]+)/pods/(?P<name>[^/]+)/portforward$")
PORTFORWARD_PROTOCOL = "v4.channel.k8s.io"
DEPLOYMENTS = kmock.resource("apps/v1/deployments")
REPLICASETS = kmock.resource("apps/v1/replicasets")
PODS = kmock.resource("v1/pods")
EVENTS = kmock.resource("v1/events")
SECRETS = kmock.resource("v1/secrets")
CONFIGMAPS = kmock.resource("v1/configmaps")
SERVICEACCOUNTS = kmock.resource("v1/serviceaccounts")
HPAS = kmock.resource("autoscaling/v2/horizontalpodautoscalers")
NETWORKPOLICIES = kmock.resource("networking.k8s.io/v1/networkpolicies")
LEASES = kmock.resource("coordination.k8s.io/v1/leases")


def _status(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> aiohttp.web.Response:
    body = {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
        "details": details or {},
    }
    return aiohttp.web.json_response(body, status=code)


class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus generations, namespaces and RBAC refusals (see the module docstring)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.namespaces: set[str] = {"default"}
        self.forbidden: set[tuple[str, str]] = set()
        self._versions = itertools.count(1)
        # Where a pod's container port listens: (pod name, port) -> a loopback (host, port) that plays it.
        self.pod_listener: Callable[[str, int], tuple[str, int]] | None = None
        for key, (kind, namespaced) in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs={"get", "list", "create", "patch", "delete"}
            )

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        path = request.url.path
        forward = PORTFORWARD_PATH.match(path)
        if forward and request.method == "GET":
            return await self._port_forward(request, forward["namespace"], forward["name"])
        namespace_match = NAMESPACE_PATH.match(path)
        if namespace_match and request.method == "GET":
            name = namespace_match["name"]
            if ("get", "namespaces") in self.forbidden:
                return self._forbidden("get", "namespaces", name, None)
            if name not in self.namespaces:
                return _status(
                    404, "NotFound", f'namespaces "{name}" not found', {"name": name, "kind": "namespaces"}
                )
            return aiohttp.web.json_response(
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": name},
                    "status": {"phase": "Active"},
                }
            )
        if request.resource is not None and request.action is not None:
            verb = VERBS.get(request.action, str(request.action).lower())
            plural = request.resource.plural
            if (verb, plural) in self.forbidden:
                return self._forbidden(verb, plural, request.name, request.namespace)
            if request.action == kmock.action.CREATE and request.namespace not in self.namespaces:
                return _status(
                    404,
                    "NotFound",
                    f'namespaces "{request.namespace}" not found',
                    {"name": request.namespace, "kind": "namespaces"},
                )
            if isinstance(request.data, dict):
                conflict = await self._stale_resource_version(request)
                if conflict is not None:
                    return conflict
                await self._server_side_fields(request)
        return await super()._handle(request)

    async def _port_forward(self, request: Any, namespace: str, name: str) -> aiohttp.web.StreamResponse:
        """``pods/NAME/portforward`` as the API server and kubelet serve it: a websocket upgrade speaking
        the v4 channel protocol (per port a data and an error channel, each first sent the port number as
        two little-endian bytes; every frame starts with its channel byte), relayed to the TCP listener
        that ``pod_listener`` names for the pod (a loopback server playing that pod's container)."""
        raw = request._raw_request
        port = int(raw.query.get("ports", "0"))
        if (PODS, namespace, name) not in self.objects or self.objects[PODS, namespace, name].deleted:
            return _status(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
        if self.pod_listener is None:
            return _status(500, "InternalError", "no listener plays this pod's port", {"name": name})
        host, listener_port = self.pod_listener(name, port)
        socket = aiohttp.web.WebSocketResponse(protocols=(PORTFORWARD_PROTOCOL,))
        await socket.prepare(raw)
        number = bytes((port & 0xFF, port >> 8))
        await socket.send_bytes(b"\x00" + number)
        await socket.send_bytes(b"\x01" + number)
        reader, writer = await asyncio.open_connection(host, listener_port)

        async def to_pod() -> None:
            async for message in socket:
                if message.type == aiohttp.WSMsgType.BINARY and message.data[:1] == b"\x00":
                    writer.write(message.data[1:])
                    await writer.drain()
            writer.close()

        async def from_pod() -> None:
            while data := await reader.read(65536):
                await socket.send_bytes(b"\x00" + data)
            await socket.close()

        try:
            await asyncio.gather(to_pod(), from_pod())
        except (ConnectionError, aiohttp.ClientError):
            await socket.close()
        return socket

    def _forbidden(
        self, verb: str, plural: str, name: str | None, namespace: str | None
    ) -> aiohttp.web.Response:
        target = f'{plural} "{name}"' if name else plural
        where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        return _status(
            403,
            "Forbidden",
            f'{target} is forbidden: User "tester" cannot {verb} resource "{plural}"{where}',
            {"kind": plural},
        )

    async def _stale_resource_version(self, request: Any) -> aiohttp.web.Response | None:
        """409 for a PATCH whose ``metadata.resourceVersion`` is not the stored one (a lost update)."""
        wanted = (request.data.get("metadata") or {}).get("resourceVersion")
        if request.action != kmock.action.UPDATE or wanted is None:
            return None
        async with self._lock:
            key = (request.resource, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                return None
            stored = self.objects[key].raw.get("metadata", {}).get("resourceVersion")
        if stored == wanted:
            return None
        return _status(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {request.resource.plural} "{request.name}": the object has '
            "been modified; please apply your changes to the latest version and try again",
            {"name": request.name, "kind": request.resource.plural},
        )

    async def _server_side_fields(self, request: Any) -> None:
        """Fill what the API server sets itself, by editing the request body before kmock stores it."""
        metadata = request.data.setdefault("metadata", {})
        metadata["resourceVersion"] = str(next(self._versions))
        if request.action == kmock.action.CREATE:
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            metadata["generation"] = 1
        elif request.action == kmock.action.UPDATE and not request.subresource:
            async with self._lock:
                key = (request.resource, request.namespace, request.name)
                if key not in self.objects or self.objects[key].deleted:
                    return
                before = copy.deepcopy(self.objects[key].raw)
            after = kmock_dicts.patch_dict(copy.deepcopy(before), request.data)
            generation = before.get("metadata", {}).get("generation", 1)
            metadata["generation"] = generation + 1 if after.get("spec") != before.get("spec") else generation


@dataclass
class PodPlan:
    """How pods behave: ``ready``, ``crashloop``, ``image-pull`` or ``never-ready``.

    ``image-pull`` reports ``ErrImagePull`` with zero restarts (a pull that failed: the container never
    started), then ``ImagePullBackOff`` after ``backoff_after_s``.
    """

    behaviour: str = "ready"
    ready_after_s: float = 0.15
    crash_every_s: float = 0.1
    backoff_after_s: float = 3600.0


@dataclass
class AvailabilitySample:
    at: float
    deployment: str
    available: int
    desired: int
    images: tuple[str, ...]


@dataclass
class SimulatedDeploymentController:
    """Plays the Deployment/ReplicaSet controllers and the kubelet on the emulator's own event loop."""

    emulator: ClusterEmulator
    plan_for: Callable[[dict[str, Any]], PodPlan] = field(default=lambda template: PodPlan())
    tick_s: float = 0.03
    log: list[AvailabilitySample] = field(default_factory=list)
    _progress: dict[tuple[str, str], tuple[Any, float]] = field(default_factory=dict)
    _names: itertools.count = field(default_factory=lambda: itertools.count(1))

    async def run(self) -> None:
        while True:
            async with self.emulator._lock:
                for key in [key for key in list(self.emulator.objects) if key[0] == DEPLOYMENTS]:
                    obj = self.emulator.objects[key]
                    if not obj.deleted:
                        self._reconcile(key[1], copy.deepcopy(obj.raw))
            await asyncio.sleep(self.tick_s)

    # -- object helpers (called with the emulator's lock held) --
    def _items(self, resource: Any, namespace: str) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(obj.raw)
            for (res, ns, _), obj in list(self.emulator.objects.items())
            if res == resource and ns == namespace and not obj.deleted
        ]

    def _put(self, resource: Any, namespace: str, obj: dict[str, Any]) -> None:
        self.emulator.objects[resource, namespace, obj["metadata"]["name"]] = obj

    def _patch(self, resource: Any, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.emulator.objects[resource, namespace, name].patch(patch)

    @staticmethod
    def _owned(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
        return any(
            ref.get("uid") == owner["metadata"]["uid"] for ref in obj["metadata"].get("ownerReferences", [])
        )

    @staticmethod
    def _revision(obj: dict[str, Any]) -> int:
        return int(obj["metadata"].get("annotations", {}).get("deployment.kubernetes.io/revision", "0"))

    @staticmethod
    def _without_hash(template: dict[str, Any]) -> dict[str, Any]:
        result = copy.deepcopy(template)
        result.get("metadata", {}).get("labels", {}).pop("pod-template-hash", None)
        return result

    # -- the controllers --
    def _reconcile(self, namespace: str, deployment: dict[str, Any]) -> None:
        now = time.monotonic()
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]
        desired = int(spec.get("replicas", 1))
        surge = int(spec.get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", 1))
        template = spec["template"]
        replicasets = [rs for rs in self._items(REPLICASETS, namespace) if self._owned(rs, deployment)]
        max_revision = max((self._revision(rs) for rs in replicasets), default=0)
        new_rs = next(
            (
                rs
                for rs in replicasets
                if self._without_hash(rs["spec"]["template"]) == self._without_hash(template)
            ),
            None,
        )
        if new_rs is None:
            new_rs = self._new_replicaset(namespace, deployment, max_revision + 1)
        elif self._revision(new_rs) < max_revision:
            annotations = {"deployment.kubernetes.io/revision": str(max_revision + 1)}
            self._patch(
                REPLICASETS, namespace, new_rs["metadata"]["name"], {"metadata": {"annotations": annotations}}
            )
            new_rs["metadata"]["annotations"].update(annotations)
        revision = str(self._revision(new_rs))
        if deployment["metadata"].get("annotations", {}).get("deployment.kubernetes.io/revision") != revision:
            self._patch(
                DEPLOYMENTS,
                namespace,
                name,
                {"metadata": {"annotations": {"deployment.kubernetes.io/revision": revision}}},
            )

        pods = [pod for pod in self._items(PODS, namespace)]
        self._kubelet(namespace, pods, now)
        pods = self._items(PODS, namespace)
        new_name = new_rs["metadata"]["name"]
        owned = {rs["metadata"]["name"]: rs for rs in [*replicasets, new_rs]}
        by_rs = {rs_name: [pod for pod in pods if self._owned(pod, rs)] for rs_name, rs in owned.items()}
        new_pods = by_rs[new_name]
        old_pods = [pod for rs_name, group in by_rs.items() if rs_name != new_name for pod in group]
        ready = [pod for pod in [*new_pods, *old_pods] if self._ready(pod)]
        total = len(new_pods) + len(old_pods)

        # One scaling step per tick, as the rolling-update rules allow it.
        if len(new_pods) < desired and total < desired + surge:
            self._new_pod(namespace, new_rs, now)
        elif len(new_pods) > desired:
            self._delete_pod(namespace, new_pods[-1])
        else:
            unready_old = [pod for pod in old_pods if not self._ready(pod)]
            if unready_old:
                self._delete_pod(namespace, unready_old[0])
            elif old_pods and len(ready) - 1 >= desired:
                self._delete_pod(namespace, old_pods[0])

        pods = self._items(PODS, namespace)
        by_rs = {rs_name: [pod for pod in pods if self._owned(pod, rs)] for rs_name, rs in owned.items()}
        for rs_name, group in by_rs.items():
            self._patch(
                REPLICASETS,
                namespace,
                rs_name,
                {
                    "spec": {"replicas": len(group)},
                    "status": {
                        "replicas": len(group),
                        "readyReplicas": sum(map(self._ready, group)),
                        "availableReplicas": sum(map(self._ready, group)),
                    },
                },
            )
        new_pods = by_rs[new_name]
        all_pods = [pod for group in by_rs.values() for pod in group]
        available = sum(map(self._ready, all_pods))
        new_available = sum(map(self._ready, new_pods))
        complete = new_available == desired and len(all_pods) == desired
        signature = (len(new_pods), new_available, len(all_pods))
        key = (namespace, new_name)
        last_signature, since = self._progress.get(key, (None, now))
        if signature != last_signature:
            since = now
        self._progress[key] = (signature, since)
        deadline = float(spec.get("progressDeadlineSeconds", 600))
        if complete:
            progressing = {
                "type": "Progressing",
                "status": "True",
                "reason": "NewReplicaSetAvailable",
                "message": f'ReplicaSet "{new_name}" has successfully progressed.',
            }
        elif now - since > deadline:
            progressing = {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": f'ReplicaSet "{new_name}" has timed out progressing.',
            }
        else:
            progressing = {
                "type": "Progressing",
                "status": "True",
                "reason": "ReplicaSetUpdated",
                "message": f'ReplicaSet "{new_name}" is progressing.',
            }
        availability = {
            "type": "Available",
            "status": "True" if available >= desired else "False",
            "reason": "MinimumReplicasAvailable" if available >= desired else "MinimumReplicasUnavailable",
        }
        self._patch(
            DEPLOYMENTS,
            namespace,
            name,
            {
                "status": {
                    "observedGeneration": deployment["metadata"].get("generation", 1),
                    "replicas": len(all_pods),
                    "updatedReplicas": len(new_pods),
                    "readyReplicas": available,
                    "availableReplicas": available,
                    "unavailableReplicas": max(0, len(all_pods) - available),
                    "conditions": [availability, progressing],
                }
            },
        )
        images = tuple(sorted(pod["spec"]["containers"][0]["image"] for pod in all_pods if self._ready(pod)))
        self.log.append(
            AvailabilitySample(at=now, deployment=name, available=available, desired=desired, images=images)
        )

    def _new_replicaset(self, namespace: str, deployment: dict[str, Any], revision: int) -> dict[str, Any]:
        template = self._without_hash(deployment["spec"]["template"])
        pod_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        template.setdefault("metadata", {}).setdefault("labels", {})["pod-template-hash"] = pod_hash
        name = f"{deployment['metadata']['name']}-{pod_hash}"
        rs = {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "labels": dict(template["metadata"]["labels"]),
                "annotations": {"deployment.kubernetes.io/revision": str(revision)},
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "controller": True,
                        "name": deployment["metadata"]["name"],
                        "uid": deployment["metadata"]["uid"],
                    }
                ],
            },
            "spec": {
                "replicas": 0,
                "selector": {
                    "matchLabels": {
                        **deployment["spec"]["selector"]["matchLabels"],
                        "pod-template-hash": pod_hash,
                    }
                },
                "template": template,
            },
            "status": {"replicas": 0},
        }
        self._put(REPLICASETS, namespace, rs)
        return rs

    def _new_pod(self, namespace: str, rs: dict[str, Any], now: float) -> None:
        template = rs["spec"]["template"]
        name = f"{rs['metadata']['name']}-{next(self._names):05d}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "labels": dict(template["metadata"]["labels"]),
                "annotations": {"sim/created": repr(now)},
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "controller": True,
                        "name": rs["metadata"]["name"],
                        "uid": rs["metadata"]["uid"],
                    }
                ],
            },
            "spec": copy.deepcopy(template["spec"]),
            "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]},
        }
        self._put(PODS, namespace, pod)

    def _delete_pod(self, namespace: str, pod: dict[str, Any]) -> None:
        del self.emulator.objects[PODS, namespace, pod["metadata"]["name"]]

    @staticmethod
    def _ready(pod: dict[str, Any]) -> bool:
        return any(
            c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
        )

    def _kubelet(self, namespace: str, pods: list[dict[str, Any]], now: float) -> None:
        for pod in pods:
            age = now - float(pod["metadata"]["annotations"]["sim/created"])
            plan = self.plan_for(pod)
            container = pod["spec"]["containers"][0]
            name = pod["metadata"]["name"]
            base = {
                "name": container["name"],
                "image": container["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
            }
            if plan.behaviour == "ready" and age >= plan.ready_after_s:
                status = {
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": [{**base, "ready": True, "state": {"running": {}}}],
                }
            elif plan.behaviour == "crashloop" and age >= plan.crash_every_s:
                cname = container["name"]
                restarts = int(age / plan.crash_every_s)
                status = {
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "False"}],
                    "containerStatuses": [
                        {
                            **base,
                            "restartCount": restarts,
                            "state": {
                                "waiting": {
                                    "reason": "CrashLoopBackOff",
                                    "message": f"back-off 10s restarting failed container={cname} pod={name}",
                                }
                            },
                            "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
                        }
                    ],
                }
                self._event(
                    namespace,
                    pod,
                    "BackOff",
                    f"Back-off restarting failed container {container['name']} in pod {name}",
                    restarts,
                )
            elif missing_volume := self._missing_secret_volume(namespace, pod):
                status = {
                    "phase": "Pending",
                    "conditions": [{"type": "Ready", "status": "False"}],
                    "containerStatuses": [{**base, "state": {"waiting": {"reason": "ContainerCreating"}}}],
                }
                self._event(namespace, pod, "FailedMount", missing_volume, 1)
            elif missing := self._missing_secret(namespace, container):
                status = {
                    "phase": "Pending",
                    "conditions": [{"type": "Ready", "status": "False"}],
                    "containerStatuses": [
                        {
                            **base,
                            "state": {
                                "waiting": {"reason": "CreateContainerConfigError", "message": missing}
                            },
                        }
                    ],
                }
                self._event(namespace, pod, "Failed", f"Error: {missing}", 1)
            elif plan.behaviour == "image-pull":
                backoff = age >= plan.backoff_after_s
                status = {
                    "phase": "Pending",
                    "conditions": [{"type": "Ready", "status": "False"}],
                    "containerStatuses": [
                        {
                            **base,
                            "state": {
                                "waiting": {
                                    "reason": "ImagePullBackOff" if backoff else "ErrImagePull",
                                    "message": (
                                        f'Back-off pulling image "{container["image"]}"'
                                        if backoff
                                        else f'failed to pull image "{container["image"]}": not found'
                                    ),
                                }
                            },
                        }
                    ],
                }
                self._event(
                    namespace, pod, "Failed", f'Failed to pull image "{container["image"]}": not found', 1
                )
            else:
                status = {
                    "phase": "Pending" if plan.behaviour != "never-ready" else "Running",
                    "conditions": [{"type": "Ready", "status": "False"}],
                    "containerStatuses": [{**base, "state": {"running": {}}}],
                }
            if pod["status"] != status:
                self._patch(PODS, namespace, name, {"status": status})

    def _missing_secret_volume(self, namespace: str, pod: dict[str, Any]) -> str | None:
        """The kubelet's FailedMount message for a Secret volume whose Secret does not exist."""
        for volume in pod["spec"].get("volumes") or []:
            secret = volume.get("secret")
            if not secret or secret.get("optional"):
                continue
            key = (SECRETS, namespace, secret["secretName"])
            if key not in self.emulator.objects or self.emulator.objects[key].deleted:
                return (
                    f'MountVolume.SetUp failed for volume "{volume["name"]}" : '
                    f'secret "{secret["secretName"]}" not found'
                )
        return None

    def _missing_secret(self, namespace: str, container: dict[str, Any]) -> str | None:
        """The kubelet's message for an env ``secretKeyRef`` whose Secret or key does not exist."""
        for item in container.get("env") or []:
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if not ref or ref.get("optional"):
                continue
            key = (SECRETS, namespace, ref["name"])
            if key not in self.emulator.objects or self.emulator.objects[key].deleted:
                return f'secret "{ref["name"]}" not found'
            secret = self.emulator.objects[key]
            if ref["key"] not in (secret.raw.get("data") or {}) and ref["key"] not in (
                secret.raw.get("stringData") or {}
            ):
                return f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}"
        return None

    def _event(self, namespace: str, pod: dict[str, Any], reason: str, message: str, count: int) -> None:
        name = f"{pod['metadata']['name']}.{reason.lower()}"
        self._put(
            EVENTS,
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": name, "namespace": namespace},
                "involvedObject": {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": namespace},
                "type": "Warning",
                "reason": reason,
                "message": message,
                "count": max(1, count),
            },
        )


class RunningCluster:
    """The emulator served on a loopback port from a background event-loop thread, plus its controller."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="k8s-emulator", daemon=True)
        self.stack = contextlib.AsyncExitStack()
        self.emulator: ClusterEmulator
        self.controller: SimulatedDeploymentController
        self.url = ""
        self.kubeconfig: Path | None = None
        self._task: asyncio.Task[None] | None = None
        # The images a test built, and the model version each carries: what its pods serve.
        self.images: dict[str, int] = {}

    def build_image(self, reference: str, *, carries: int) -> None:
        """Record that ``reference`` (name:tag, or name@digest) was built with model version ``carries``."""
        self.images[reference] = carries

    def version_in(self, image: str) -> int | None:
        """The model version an image carries (a digest reference resolves by its name:tag), or None."""
        if image in self.images:
            return self.images[image]
        return self.images.get(image.split("@", 1)[0])

    def start(self) -> RunningCluster:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self.emulator = await self.stack.enter_async_context(ClusterEmulator())
        server = await self.stack.enter_async_context(kmock.Server(self.emulator))
        self.url = f"http://127.0.0.1:{server.port}"
        self.controller = SimulatedDeploymentController(self.emulator)
        self._task = asyncio.get_running_loop().create_task(self.controller.run())

    def stop(self) -> None:
        async def _stop() -> None:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            await self.stack.aclose()

        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def locked(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the emulator's loop with its lock held (to read or seed objects safely)."""

        async def _call() -> Any:
            async with self.emulator._lock:
                return function()

        return asyncio.run_coroutine_threadsafe(_call(), self.loop).result(timeout=30)

    def write_kubeconfig(self, path: Path, *, context: str = "emulator", namespace: str = "tfloop") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": context,
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": "emulator", "user": "tester", "namespace": namespace},
                }
            ],
        }
        path.write_text(yaml.safe_dump(config))
        self.kubeconfig = path
        return path
