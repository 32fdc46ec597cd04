"""Pure functions that build and edit Kubernetes objects as plain dicts (camelCase, exactly as in YAML).

The builders produce what ``k8s/manifests/*.yaml`` holds (tests keep the two equal), the editors return
changed copies and never mutate their input, and the diff helpers show what an apply would change. Nothing
here talks to a cluster.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from k8s.settings import SECRET_DEFAULT_KEYS, DeployTarget, SecretRef, ServingSettings, ServingSpec

NAME_LABEL = "app.kubernetes.io/name"
PART_OF_LABEL = "app.kubernetes.io/part-of"
COMPONENT_LABEL = "app.kubernetes.io/component"
MODEL_NAME_LABEL = "tfloop.io/model-name"
MODEL_VERSION_LABEL = "tfloop.io/model-version"
MODEL_VERSION_ANNOTATION = "tfloop.io/model-version"
RUN_ID_ANNOTATION = "tfloop.io/mlflow-run-id"
IMAGE_ANNOTATION = "tfloop.io/image"
SETTINGS_CHECKSUM_ANNOTATION = "tfloop.io/settings-checksum"
GCP_SERVICE_ACCOUNT_ANNOTATION = "iam.gke.io/gcp-service-account"
CHANGE_CAUSE_ANNOTATION = "kubernetes.io/change-cause"
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
POD_TEMPLATE_HASH_LABEL = "pod-template-hash"
SERVING_CONTAINER = "serving"
MODELS_DIR = "/models"
CACHE_DIR = "/cache"
GCP_KEY_VOLUME = "gcp-key"
GCP_KEY_DIR = "/var/secrets/google"
GCP_KEY_FILE = "key.json"

# ConfigMap keys (serving/settings.py reads them) and the env variables filled from Secrets.
FEEDBACK_URI_KEY = "TFLOOP_SERVE_FEEDBACK_URI"
PREFECT_API_URL_KEY = "TFLOOP_SERVE_PREFECT_API_URL"
DRAIN_KEY = "TFLOOP_SERVE_DRAIN_S"
SHUTDOWN_TIMEOUT_KEY = "TFLOOP_SERVE_SHUTDOWN_TIMEOUT_S"
MODEL_NAME_ENV = "TFLOOP_SERVE_MODEL_NAME"
VERSION_POLICY_ENV = "TFLOOP_SERVE_VERSION_POLICY"
CREDENTIALS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
SECRET_ENV = {
    "prefect_api_key_secret": "PREFECT_API_KEY",
    "token_secret": "TFLOOP_SERVE_TOKEN",
    "feedback_secret": "TFLOOP_FEEDBACK_SECRET",
}
MANAGED_CONFIG_KEYS = (FEEDBACK_URI_KEY, PREFECT_API_URL_KEY)
"""ConfigMap keys a deploy may remove (settings that can be cleared); other keys are only ever set."""

Obj = dict[str, Any]


def selector_labels(spec: ServingSpec) -> dict[str, str]:
    """The Deployment's selector: stable across versions (a selector cannot change after creation)."""
    return {NAME_LABEL: spec.app_name}


def common_labels(spec: ServingSpec) -> dict[str, str]:
    return {**selector_labels(spec), PART_OF_LABEL: "tfloop", COMPONENT_LABEL: "serving"}


def _metadata(spec: ServingSpec, name: str | None = None) -> Obj:
    return {"name": name or spec.app_name, "labels": common_labels(spec)}


def model_labels(target: DeployTarget) -> dict[str, str]:
    return {MODEL_NAME_LABEL: target.model_name, MODEL_VERSION_LABEL: str(target.version)}


def model_annotations(target: DeployTarget) -> dict[str, str]:
    """Annotations naming what runs; the run id is always present ('' when unknown) so a patch replaces it.

    ``tfloop.io/image`` is the image as the caller named it (its tag stays readable when the pod template
    runs it by digest).
    """
    return {
        MODEL_VERSION_ANNOTATION: str(target.version),
        RUN_ID_ANNOTATION: target.run_id or "",
        IMAGE_ANNOTATION: target.image,
        **target.extra_annotations,
    }


def change_cause(target: DeployTarget) -> str:
    return f"tfloop deploy {target.model_name} v{target.version} ({target.image})"


def config_map_name(spec: ServingSpec) -> str:
    return f"{spec.app_name}-settings"


def service_account(spec: ServingSpec, settings: ServingSettings | None = None) -> Obj:
    """The pods' identity; with Workload Identity it names the Google service account they act as."""
    metadata = _metadata(spec)
    if settings is not None and settings.gcp_service_account:
        metadata["annotations"] = {GCP_SERVICE_ACCOUNT_ANNOTATION: settings.gcp_service_account}
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata,
        "automountServiceAccountToken": False,
    }


def config_map(spec: ServingSpec, settings: ServingSettings | None = None) -> Obj:
    """Serving settings that do not change per model version (``TFLOOP_SERVE_*``, see serving/settings.py)."""
    settings = settings or ServingSettings()
    data = {
        "TFLOOP_SERVE_MODEL_BASE": MODELS_DIR,
        "TFLOOP_SERVE_CACHE_DIR": f"{CACHE_DIR}/models",
        FEEDBACK_URI_KEY: settings.effective_feedback_uri(),
        "TFLOOP_SERVE_PORT": str(spec.port),
        "TFLOOP_SERVE_GRPC_PORT": str(spec.grpc_port),
        "TFLOOP_SERVE_LOG_LEVEL": "info",
        DRAIN_KEY: str(spec.drain_s),
        SHUTDOWN_TIMEOUT_KEY: str(spec.shutdown_timeout_s),
    }
    if settings.prefect_api_url:
        data[PREFECT_API_URL_KEY] = settings.prefect_api_url
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(spec, config_map_name(spec)),
        "data": data,
    }


def _secret_env(name: str, ref: SecretRef) -> Obj:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def serving_env(target: DeployTarget, settings: ServingSettings) -> list[Obj]:
    """The serving container's env: the model pin, then values from Secrets, then the credentials file."""
    env: list[Obj] = [
        {"name": MODEL_NAME_ENV, "value": target.model_name},
        {"name": VERSION_POLICY_ENV, "value": str(target.version)},
    ]
    for field_name, env_name in SECRET_ENV.items():
        ref = getattr(settings, field_name)
        if ref is not None:
            env.append(_secret_env(env_name, ref))
    if settings.gcp_key_secret is not None:
        env.append({"name": CREDENTIALS_ENV, "value": f"{GCP_KEY_DIR}/{GCP_KEY_FILE}"})
    return env


def service(spec: ServingSpec) -> Obj:
    ports: list[Obj] = [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}]
    if spec.grpc_port:
        # appProtocol lets HTTP/2-aware load balancers and meshes balance each call, not each connection
        # (a gRPC channel keeps one connection open)
        grpc = {"name": "grpc", "port": spec.grpc_port, "targetPort": "grpc", "protocol": "TCP"}
        ports.append({**grpc, "appProtocol": "grpc"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec),
        "spec": {"type": "ClusterIP", "selector": selector_labels(spec), "ports": ports},
    }


def container_ports(spec: ServingSpec) -> list[Obj]:
    """The serving container's ports: ``http`` (REST) and, unless ``grpc_port`` is 0, ``grpc``."""
    ports: list[Obj] = [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}]
    if spec.grpc_port:
        ports.append({"name": "grpc", "containerPort": spec.grpc_port, "protocol": "TCP"})
    return ports


def _probe(path: str, *, period_s: int, failure_threshold: int, timeout_s: int = 2) -> Obj:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period_s,
        "timeoutSeconds": timeout_s,
        "failureThreshold": failure_threshold,
    }


def deployment(spec: ServingSpec, *, target: DeployTarget, settings: ServingSettings | None = None) -> Obj:
    """The serving Deployment for ``target``: zero-downtime rolling updates, probes, limits, non-root.

    Pods sleep ``pre_stop_s`` in a ``preStop`` hook before SIGTERM (endpoints drop them first), then drain;
    the image runs by digest when ``target`` has one.
    """
    settings = settings or ServingSettings()
    startup_period_s = 5
    mounts: list[Obj] = [
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[Obj] = [
        {"name": "cache", "emptyDir": {"sizeLimit": spec.cache_size_limit}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
    ]
    if settings.gcp_key_secret is not None:
        mounts.append({"name": GCP_KEY_VOLUME, "mountPath": GCP_KEY_DIR, "readOnly": True})
        volumes.append(
            {
                "name": GCP_KEY_VOLUME,
                "secret": {
                    "secretName": settings.gcp_key_secret.name,
                    "items": [{"key": settings.gcp_key_secret.key, "path": GCP_KEY_FILE}],
                },
            }
        )
    template_labels = {**common_labels(spec), **model_labels(target)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": spec.app_name,
            "labels": dict(template_labels),
            "annotations": {**model_annotations(target), CHANGE_CAUSE_ANNOTATION: change_cause(target)},
        },
        "spec": {
            "replicas": spec.replicas,
            "revisionHistoryLimit": spec.revision_history_limit,
            "progressDeadlineSeconds": spec.progress_deadline_s,
            "selector": {"matchLabels": selector_labels(spec)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": spec.max_surge},
            },
            "template": {
                "metadata": {
                    "labels": dict(template_labels),
                    "annotations": {
                        **model_annotations(target),
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(spec.port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": spec.app_name,
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": spec.termination_grace_s,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": spec.run_as_user,
                        "runAsGroup": spec.run_as_user,
                        "fsGroup": spec.run_as_user,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": SERVING_CONTAINER,
                            "image": target.reference,
                            "imagePullPolicy": "IfNotPresent",
                            "ports": container_ports(spec),
                            "envFrom": [{"configMapRef": {"name": config_map_name(spec)}}],
                            "env": serving_env(target, settings),
                            "resources": {
                                "requests": {"cpu": spec.cpu_request, "memory": spec.memory_request},
                                "limits": {"cpu": spec.cpu_limit, "memory": spec.memory_limit},
                            },
                            "startupProbe": _probe(
                                "/readyz",
                                period_s=startup_period_s,
                                failure_threshold=max(1, spec.startup_timeout_s // startup_period_s),
                            ),
                            "readinessProbe": _probe("/readyz", period_s=5, failure_threshold=3),
                            "livenessProbe": _probe("/healthz", period_s=10, failure_threshold=3),
                            "lifecycle": {
                                "preStop": {
                                    "exec": {
                                        "command": [
                                            "python",
                                            "-c",
                                            f"import time; time.sleep({spec.pre_stop_s})",
                                        ]
                                    }
                                }
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def horizontal_pod_autoscaler(spec: ServingSpec) -> Obj:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(spec),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.app_name},
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": spec.target_cpu_percent},
                    },
                }
            ],
        },
    }


def pod_disruption_budget(spec: ServingSpec) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(spec),
        "spec": {"minAvailable": spec.min_available, "selector": {"matchLabels": selector_labels(spec)}},
    }


def network_policy(spec: ServingSpec) -> Obj:
    """Optional: only the serving ports (REST, gRPC) are reachable; egress stays open (GCS, Prefect)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(spec),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(spec)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "ports": [
                        {"port": port["containerPort"], "protocol": "TCP"} for port in container_ports(spec)
                    ]
                }
            ],
        },
    }


def serving_objects(
    spec: ServingSpec,
    *,
    target: DeployTarget,
    settings: ServingSettings | None = None,
    network_policy_enabled: bool = False,
) -> list[Obj]:
    """Every object of the serving stack, in apply order (the Deployment after what it references)."""
    objects = [
        service_account(spec, settings),
        config_map(spec, settings),
        service(spec),
        deployment(spec, target=target, settings=settings),
        horizontal_pod_autoscaler(spec),
        pod_disruption_budget(spec),
    ]
    if network_policy_enabled:
        objects.append(network_policy(spec))
    return objects


TRAIN_WORKERS_SERVICE = "tfloop-train-workers"
TRAIN_WORKERS_LABEL = "tfloop.io/train-workers"
TRAIN_WORKER_PORT = 12345


def prefect_train_workers_service(
    *, namespace: str = "tfloop", name: str = TRAIN_WORKERS_SERVICE, port: int = TRAIN_WORKER_PORT
) -> Obj:
    """The headless Service that gives every training pod a DNS name ``<job>-<index>.<name>`` (the pods set
    ``subdomain: <name>``), so multi-worker training finds its peers. Apply it once per namespace."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "tfloop"}},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {TRAIN_WORKERS_LABEL: "true"},
            "ports": [{"name": "worker", "port": port, "targetPort": port}],
        },
    }


def prefect_gpu_job_template(
    *,
    image: str = "tfloop-train:latest",
    gpu_count: int = 1,
    node_selector: Mapping[str, str] | None = None,
    toleration_key: str = "nvidia.com/gpu",
) -> Obj:
    """A base job template for a Prefect Kubernetes work pool whose jobs get ``gpu_count`` NVIDIA GPUs.

    Use it with ``prefect work-pool create NAME --type kubernetes --base-job-template FILE.json``; every
    ``{{ name }}`` is a Prefect job variable the deployment may override (``job_variables``). The Job is
    Indexed with ``workers`` pods (default 1) behind the headless Service of
    :func:`prefect_train_workers_service`; the container runs ``python -m training.distribute``, which sets
    ``TF_CONFIG`` from the pod's completion index when there are several workers and then runs the command.
    ``backoff_limit`` restarts lost workers; training resumes from the chief's last checkpoint.
    """
    selector = dict(node_selector or {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"})
    return {
        "job_configuration": {
            "command": "{{ command }}",
            "env": "{{ env }}",
            "labels": "{{ labels }}",
            "name": "{{ name }}",
            "namespace": "{{ namespace }}",
            "cluster_config": "{{ cluster_config }}",
            "job_watch_timeout_seconds": "{{ job_watch_timeout_seconds }}",
            "pod_watch_timeout_seconds": "{{ pod_watch_timeout_seconds }}",
            "stream_output": "{{ stream_output }}",
            "job_manifest": {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {
                    "generateName": "{{ name }}-",
                    "labels": "{{ labels }}",
                    "namespace": "{{ namespace }}",
                },
                "spec": {
                    "backoffLimit": "{{ backoff_limit }}",
                    "completionMode": "Indexed",
                    "completions": "{{ workers }}",
                    "parallelism": "{{ workers }}",
                    "ttlSecondsAfterFinished": "{{ finished_job_ttl }}",
                    "template": {
                        "metadata": {"labels": {TRAIN_WORKERS_LABEL: "true"}},
                        "spec": {
                            "restartPolicy": "Never",
                            "subdomain": "{{ workers_service }}",
                            "serviceAccountName": "{{ service_account_name }}",
                            "nodeSelector": "{{ node_selector }}",
                            "tolerations": [
                                {"key": toleration_key, "operator": "Exists", "effect": "NoSchedule"}
                            ],
                            "containers": [
                                {
                                    "name": "prefect-job",
                                    "image": "{{ image }}",
                                    "imagePullPolicy": "{{ image_pull_policy }}",
                                    "command": [
                                        "python",
                                        "-m",
                                        "training.distribute",
                                        "--workers={{ workers }}",
                                        "--service={{ workers_service }}",
                                        "--port={{ worker_port }}",
                                        "--",
                                    ],
                                    "args": "{{ command }}",
                                    "env": "{{ env }}",
                                    "resources": {
                                        "requests": {
                                            "cpu": "{{ cpu }}",
                                            "memory": "{{ memory }}",
                                            "nvidia.com/gpu": "{{ gpu_count }}",
                                        },
                                        "limits": {
                                            "memory": "{{ memory }}",
                                            "nvidia.com/gpu": "{{ gpu_count }}",
                                        },
                                    },
                                }
                            ],
                        },
                    },
                },
            },
        },
        "variables": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "title": "Name", "default": "tfloop-train"},
                "namespace": {"type": "string", "title": "Namespace", "default": "tfloop"},
                "image": {"type": "string", "title": "Image", "default": image},
                "image_pull_policy": {
                    "type": "string",
                    "title": "Image pull policy",
                    "default": "IfNotPresent",
                    "enum": ["IfNotPresent", "Always", "Never"],
                },
                "command": {"type": "string", "title": "Command"},
                "env": {
                    "type": "object",
                    "title": "Environment variables",
                    "additionalProperties": {"type": "string"},
                },
                "labels": {"type": "object", "title": "Labels", "additionalProperties": {"type": "string"}},
                "service_account_name": {
                    "type": "string",
                    "title": "Service account",
                    "default": "tfloop-train",
                },
                "node_selector": {
                    "type": "object",
                    "title": "Node selector",
                    "default": selector,
                    "additionalProperties": {"type": "string"},
                },
                "gpu_count": {"type": "integer", "title": "GPUs per job", "default": gpu_count, "minimum": 0},
                "workers": {
                    "type": "integer",
                    "title": "Training workers (pods of the Indexed Job; above 1: multi-worker training)",
                    "default": 1,
                    "minimum": 1,
                },
                "workers_service": {
                    "type": "string",
                    "title": "Headless Service naming the workers",
                    "default": TRAIN_WORKERS_SERVICE,
                },
                "worker_port": {
                    "type": "integer",
                    "title": "Port the workers talk on",
                    "default": TRAIN_WORKER_PORT,
                },
                "backoff_limit": {
                    "type": "integer",
                    "title": "Pod restarts before the job fails (a restarted worker resumes)",
                    "default": 0,
                    "minimum": 0,
                },
                "cpu": {"type": "string", "title": "CPU request", "default": "4"},
                "memory": {"type": "string", "title": "Memory request and limit", "default": "16Gi"},
                "finished_job_ttl": {
                    "type": "integer",
                    "title": "Seconds to keep a finished job",
                    "default": 3600,
                },
                "job_watch_timeout_seconds": {"type": "integer", "title": "Job watch timeout"},
                "pod_watch_timeout_seconds": {
                    "type": "integer",
                    "title": "Pod watch timeout",
                    "default": 300,
                },
                "stream_output": {"type": "boolean", "title": "Stream output", "default": True},
                "cluster_config": {
                    "title": "Cluster config",
                    "allOf": [{"$ref": "#/definitions/KubernetesClusterConfig"}],
                },
            },
            "definitions": {
                "KubernetesClusterConfig": {
                    "title": "KubernetesClusterConfig",
                    "type": "object",
                    "properties": {
                        "config": {"title": "Config", "type": "object"},
                        "context_name": {"title": "Context name", "type": "string"},
                    },
                    "required": ["config"],
                    "block_type_slug": "kubernetes-cluster-config",
                    "secret_fields": [],
                    "block_schema_references": {},
                }
            },
        },
    }


# ---- editors ------------------------------------------------------------------------------------------


def live_serving_settings(
    *,
    config_map_obj: Mapping[str, Any] | None,
    deployment_obj: Mapping[str, Any] | None,
    service_account_obj: Mapping[str, Any] | None,
) -> ServingSettings:
    """The serving settings the live objects carry (what a deploy that changes nothing keeps)."""
    data = (config_map_obj or {}).get("data") or {}
    annotations = ((service_account_obj or {}).get("metadata") or {}).get("annotations") or {}
    refs: dict[str, SecretRef | None] = dict.fromkeys(SECRET_DEFAULT_KEYS)
    if deployment_obj is not None:
        container = serving_container(deployment_obj)
        by_env = {item.get("name"): item for item in container.get("env") or []}
        for field_name, env_name in SECRET_ENV.items():
            ref = ((by_env.get(env_name) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("name") and ref.get("key"):
                refs[field_name] = SecretRef(name=ref["name"], key=ref["key"])
        for volume in deployment_obj["spec"]["template"]["spec"].get("volumes") or []:
            secret = volume.get("secret") or {}
            if volume.get("name") == GCP_KEY_VOLUME and secret.get("secretName"):
                items = secret.get("items") or [{"key": GCP_KEY_FILE}]
                refs["gcp_key_secret"] = SecretRef(name=secret["secretName"], key=items[0]["key"])
    return ServingSettings(
        feedback_uri=data.get(FEEDBACK_URI_KEY),
        prefect_api_url=data.get(PREFECT_API_URL_KEY),
        gcp_service_account=annotations.get(GCP_SERVICE_ACCOUNT_ANNOTATION),
        **refs,
    )


def removing(
    desired: Obj, *, live: Mapping[str, Any] | None, path: tuple[str, ...], keys: Iterable[str]
) -> Obj:
    """A copy of ``desired`` whose map at ``path`` sets each of ``keys`` that ``live`` has but it lacks to
    None, so that applying it as a merge patch removes them (a setting that was cleared)."""
    result = copy.deepcopy(desired)
    have: Any = live or {}
    for part in path:
        have = have.get(part) if isinstance(have, Mapping) else None
    gone = [key for key in keys if isinstance(have, Mapping) and key in have]
    node = result
    for part in path:
        node = node.setdefault(part, {})
    for key in gone:
        if key not in node:
            node[key] = None
    return result


def settings_checksum(data: Mapping[str, Any]) -> str:
    """A short hash of a ConfigMap's data: in the pod template, a settings change rolls the pods."""
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True).encode()).hexdigest()[:16]


def with_settings_checksum(deployment_obj: Obj, *, data: Mapping[str, Any]) -> Obj:
    result = copy.deepcopy(deployment_obj)
    annotations = result["spec"]["template"].setdefault("metadata", {}).setdefault("annotations", {})
    annotations[SETTINGS_CHECKSUM_ANNOTATION] = settings_checksum(data)
    return result


def restorable(obj: Mapping[str, Any]) -> Obj:
    """What a rollback puts back: the object without status, server-set metadata, the controller's revision
    annotation and (for a Deployment) the replica count the HorizontalPodAutoscaler owns."""
    result = {key: copy.deepcopy(value) for key, value in obj.items() if key not in {"status", "metadata"}}
    metadata = obj.get("metadata") or {}
    result["metadata"] = {
        "labels": dict(metadata.get("labels") or {}),
        "annotations": {
            key: value
            for key, value in (metadata.get("annotations") or {}).items()
            if key != REVISION_ANNOTATION
        },
    }
    if obj.get("kind") == "Deployment":
        result.get("spec", {}).pop("replicas", None)
    return result


def restore_patch(current: Mapping[str, Any], previous: Mapping[str, Any]) -> Obj:
    """The merge patch that puts ``previous`` (as it was read before a deploy) back over ``current``."""
    patch = merge_patch(restorable(current), restorable(previous))
    return patch if isinstance(patch, dict) else {}


# ---- the rollout lease ---------------------------------------------------------------------------------


def lease_name(spec: ServingSpec) -> str:
    return f"{spec.app_name}-rollout"


def micro_time(moment: datetime.datetime) -> str:
    """A Kubernetes ``MicroTime`` (RFC 3339, microseconds, UTC)."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rollout_lease(
    spec: ServingSpec, *, holder: str, duration_s: int, now: datetime.datetime, transitions: int = 0
) -> Obj:
    """The ``coordination.k8s.io/v1`` Lease a rollout of ``spec.app_name`` holds while it runs."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name(spec),
            "labels": {NAME_LABEL: spec.app_name, PART_OF_LABEL: "tfloop", COMPONENT_LABEL: "rollout"},
        },
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration_s,
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
            "leaseTransitions": transitions,
        },
    }


def lease_holder(lease: Mapping[str, Any]) -> str | None:
    return (lease.get("spec") or {}).get("holderIdentity") or None


def lease_expires_at(lease: Mapping[str, Any]) -> datetime.datetime | None:
    """When the lease runs out (renew or acquire time plus its duration); None when it has no holder."""
    spec = lease.get("spec") or {}
    stamp = spec.get("renewTime") or spec.get("acquireTime")
    if not lease_holder(lease) or not stamp:
        return None
    try:
        renewed = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    if renewed.tzinfo is None:
        renewed = renewed.replace(tzinfo=datetime.UTC)
    return renewed + datetime.timedelta(seconds=int(spec.get("leaseDurationSeconds") or 0))


def serving_container(deployment_obj: Mapping[str, Any]) -> Obj:
    """The serving container of a Deployment (or ReplicaSet / pod template holder)."""
    containers = deployment_obj["spec"]["template"]["spec"]["containers"]
    for container in containers:
        if container.get("name") == SERVING_CONTAINER:
            return container
    return containers[0]


def without_replicas(obj: Obj) -> Obj:
    """A copy of a Deployment without ``spec.replicas``: on update, the HorizontalPodAutoscaler owns it."""
    result = copy.deepcopy(obj)
    result.get("spec", {}).pop("replicas", None)
    return result


def revision(obj: Mapping[str, Any]) -> int:
    """The ``deployment.kubernetes.io/revision`` of a Deployment or ReplicaSet (0 when missing)."""
    value = (obj.get("metadata", {}).get("annotations") or {}).get(REVISION_ANNOTATION, "0")
    try:
        return int(value)
    except ValueError:
        return 0


def template_without_hash(template: Mapping[str, Any]) -> Obj:
    """A pod template without the ``pod-template-hash`` label the controller adds to ReplicaSets."""
    result = copy.deepcopy(dict(template))
    labels = result.get("metadata", {}).get("labels")
    if labels:
        labels.pop(POD_TEMPLATE_HASH_LABEL, None)
    return result


def templates_equal(left: Mapping[str, Any], right: Mapping[str, Any]) -> bool:
    """Equal pod templates, ignoring ``pod-template-hash`` (how ``kubectl`` matches a ReplicaSet)."""
    return template_without_hash(left) == template_without_hash(right)


def owned_by(obj: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    uid = owner.get("metadata", {}).get("uid")
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs) if uid else False


def current_replicaset(
    deployment_obj: Mapping[str, Any], replicasets: Iterable[Mapping[str, Any]]
) -> Obj | None:
    """The ReplicaSet whose template equals the Deployment's (the rollout's new one), if created yet."""
    template = deployment_obj["spec"]["template"]
    matches = [dict(rs) for rs in replicasets if templates_equal(rs["spec"]["template"], template)]
    return max(matches, key=revision) if matches else None


def rollback_replicaset(
    replicasets: Iterable[Mapping[str, Any]],
    *,
    deployment_obj: Mapping[str, Any],
    previous_revision: int | None = None,
) -> Obj | None:
    """The ReplicaSet to roll back to, as ``kubectl rollout undo`` picks it.

    With ``previous_revision`` (the Deployment's revision before the rollout started) that ReplicaSet is
    chosen, which stays right even if the failed rollout never got its own ReplicaSet. Without it, the
    highest revision below the newest. None when there is nothing different to go back to.
    """
    candidates = sorted((dict(rs) for rs in replicasets), key=revision, reverse=True)
    template = deployment_obj["spec"]["template"]
    if previous_revision:
        chosen = next((rs for rs in candidates if revision(rs) == previous_revision), None)
    else:
        chosen = candidates[1] if len(candidates) > 1 else None
    if chosen is None or templates_equal(chosen["spec"]["template"], template):
        return None
    return chosen


def merge_patch(current: Any, desired: Any) -> Any:
    """The RFC 7386 JSON merge patch that turns ``current`` into ``desired`` (None deletes a key)."""
    if not isinstance(current, Mapping) or not isinstance(desired, Mapping):
        return copy.deepcopy(desired)
    patch: Obj = {}
    for key in current:
        if key not in desired:
            patch[key] = None
    for key, value in desired.items():
        if key not in current:
            patch[key] = copy.deepcopy(value)
        elif current[key] != value:
            patch[key] = merge_patch(current[key], value)
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: what a server stores after a JSON merge patch (used for dry-run previews)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = copy.deepcopy(dict(target)) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def project(live: Any, like: Any) -> Any:
    """``live`` cut down to the keys ``like`` has (server defaults and status dropped, for readable diffs)."""
    if isinstance(live, Mapping) and isinstance(like, Mapping):
        return {key: project(live[key], like[key]) for key in like if key in live}
    if isinstance(live, list) and isinstance(like, list):
        return [project(item, like[index]) if index < len(like) else item for index, item in enumerate(live)]
    return copy.deepcopy(live)


def object_key(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def diff_objects(live: Mapping[str, Any] | None, desired: Mapping[str, Any], *, namespace: str) -> str:
    """A unified YAML diff of what applying ``desired`` (as a merge patch) would change; '' when nothing."""
    after = desired if live is None else project(apply_merge_patch(live, desired), desired)
    before_text = "" if live is None else to_yaml(project(live, desired))
    after_text = to_yaml(after)
    if before_text == after_text:
        return ""
    label = f"{namespace}/{object_key(desired)}"
    lines = difflib.unified_diff(
        before_text.splitlines(keepends=True),
        after_text.splitlines(keepends=True),
        fromfile=f"live {label}" if live is not None else "/dev/null",
        tofile=f"new {label}",
    )
    return "".join(lines)


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=True, default_flow_style=False)
