"""Connect to a cluster with the official client and turn its failures into clear :mod:`k8s.errors`.

:func:`connect` loads a kubeconfig (context selectable) or the in-cluster service account without touching
the client's global configuration, so several clusters can be used side by side. :func:`call` runs one API
request and returns plain dicts (camelCase, as in YAML); every failure becomes a ``ClusterError`` whose
message names the verb, the resource and what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from k8s.errors import (
    ClusterApiError,
    ClusterError,
    ClusterUnreachableError,
    ForbiddenError,
    KubeconfigMissingError,
    NamespaceMissingError,
    UnknownContextError,
)
from k8s.settings import ClusterSettings

DEFAULT_KUBECONFIG = Path("~/.kube/config")
RBAC_HINT = (
    "ask a cluster admin to grant it, e.g. apply k8s/manifests/deployer-rbac.yaml and bind the Role to your "
    "user or service account (`kubectl auth can-i {verb} {resource} -n {namespace}` checks it)"
)


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """An open connection: the API client, the typed API groups, and where requests go."""

    api_client: k8s_client.ApiClient
    namespace: str
    context: str | None
    server: str
    request_timeout_s: float

    @property
    def core(self) -> k8s_client.CoreV1Api:
        return k8s_client.CoreV1Api(self.api_client)

    @property
    def apps(self) -> k8s_client.AppsV1Api:
        return k8s_client.AppsV1Api(self.api_client)

    @property
    def autoscaling(self) -> k8s_client.AutoscalingV2Api:
        return k8s_client.AutoscalingV2Api(self.api_client)

    @property
    def policy(self) -> k8s_client.PolicyV1Api:
        return k8s_client.PolicyV1Api(self.api_client)

    @property
    def networking(self) -> k8s_client.NetworkingV1Api:
        return k8s_client.NetworkingV1Api(self.api_client)

    @property
    def coordination(self) -> k8s_client.CoordinationV1Api:
        return k8s_client.CoordinationV1Api(self.api_client)

    @property
    def label(self) -> str:
        """How error messages name this cluster."""
        return f"context {self.context!r} ({self.server})" if self.context else self.server

    def close(self) -> None:
        self.api_client.close()


def kubeconfig_path(settings: ClusterSettings) -> Path:
    """The kubeconfig file to read: the setting, else the first ``$KUBECONFIG`` entry, else ~/.kube/config."""
    if settings.kubeconfig is not None:
        return settings.kubeconfig.expanduser()
    from_env = [entry for entry in os.environ.get("KUBECONFIG", "").split(os.pathsep) if entry]
    return Path(from_env[0]).expanduser() if from_env else DEFAULT_KUBECONFIG.expanduser()


def connect(*, settings: ClusterSettings) -> Cluster:
    """Open a client for the configured cluster; fails with a clear error before any request is made."""
    configuration = k8s_client.Configuration()
    if settings.in_cluster:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except ConfigException as error:
            raise KubeconfigMissingError(
                f"in-cluster configuration is not available ({error}): run inside a pod with a "
                "service account, or drop --in-cluster to use a kubeconfig"
            ) from error
        context = None
        namespace = settings.namespace or _in_cluster_namespace() or "default"
    else:
        path = kubeconfig_path(settings)
        if not path.is_file():
            raise KubeconfigMissingError(
                f"no kubeconfig at {path}: create one for your cluster (e.g. `kind create cluster`, "
                "`minikube start` or `gcloud container clusters get-credentials NAME`), or pass "
                "--kubeconfig PATH or set KUBECONFIG"
            )
        context, namespace = _select_context(path, settings)
        try:
            k8s_config.load_kube_config(
                config_file=str(path),
                context=context,
                client_configuration=configuration,
                persist_config=False,
            )
        except (ConfigException, OSError, ValueError) as error:
            raise KubeconfigMissingError(
                f"kubeconfig {path} (context {context!r}) cannot be used: {error}; check it with "
                "`kubectl config view --minify`"
            ) from error
    configuration.retries = 1
    return Cluster(
        api_client=k8s_client.ApiClient(configuration),
        namespace=namespace,
        context=context,
        server=configuration.host,
        request_timeout_s=settings.request_timeout_s,
    )


def _select_context(path: Path, settings: ClusterSettings) -> tuple[str, str]:
    try:
        contexts, active = k8s_config.list_kube_config_contexts(config_file=str(path))
    except (ConfigException, OSError, ValueError) as error:
        raise KubeconfigMissingError(
            f"kubeconfig {path} has no usable contexts ({error}): add one with `kubectl config set-context`, "
            "or point --kubeconfig at another file"
        ) from error
    by_name = {entry["name"]: entry for entry in contexts}
    name = settings.context or (active or {}).get("name")
    if name not in by_name:
        known = ", ".join(sorted(by_name)) or "none"
        raise UnknownContextError(
            f"kubeconfig {path} has no context {name!r} (known: {known}): pass --context with one of them, "
            "or list them with `kubectl config get-contexts`"
        )
    namespace = settings.namespace or by_name[name].get("context", {}).get("namespace") or "default"
    return name, namespace


def _in_cluster_namespace() -> str | None:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else None


def call(
    cluster: Cluster,
    method: Callable[..., Any],
    *args: Any,
    verb: str,
    resource: str,
    name: str | None = None,
    namespaced: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run one API request and return its answer as a plain dict; failures become ``ClusterError``."""
    try:
        answer = method(*args, _request_timeout=cluster.request_timeout_s, **kwargs)
    except ApiException as error:
        raise api_error(
            error,
            cluster=cluster,
            verb=verb,
            resource=resource,
            name=name,
            namespace=cluster.namespace if namespaced else None,
        ) from error
    except ValueError as error:
        raise ClusterApiError(
            f"the Kubernetes API of {cluster.label} answered {verb} {resource} with an object the client "
            f"cannot read ({error.__class__.__name__}): check that the server and the kubernetes client "
            "versions match"
        ) from error
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise ClusterUnreachableError(
            f"cannot reach the Kubernetes API server of {cluster.label} ({type(error).__name__}: {error}): "
            "check that the cluster is running (`kubectl cluster-info`), that the address in your "
            "kubeconfig is right, and your network/VPN"
        ) from error
    result = cluster.api_client.sanitize_for_serialization(answer)
    return result if isinstance(result, dict) else {}


def api_error(
    error: ApiException,
    *,
    cluster: Cluster,
    verb: str,
    resource: str,
    name: str | None,
    namespace: str | None,
) -> Exception:
    """The ``ClusterError`` that explains an API refusal."""
    target = f"{resource} {name!r}" if name else resource
    where = f" in namespace {namespace!r}" if namespace else ""
    detail = _server_message(error)
    if error.status == 403:
        hint = RBAC_HINT.format(verb=verb, resource=resource, namespace=namespace or cluster.namespace)
        return ForbiddenError(
            f"the Kubernetes API of {cluster.label} refused to {verb} {target}{where} "
            f"(403 Forbidden: {detail}): {hint}"
        )
    if error.status == 401:
        return ForbiddenError(
            f"the Kubernetes API of {cluster.label} did not accept your credentials (401: {detail}): "
            "refresh them (e.g. `gcloud container clusters get-credentials`, or a new token) and try again"
        )
    if error.status == 404 and namespace and "namespaces" in detail and namespace in detail:
        return NamespaceMissingError(
            f"namespace {namespace!r} does not exist on {cluster.label}: create it with "
            f"`kubectl create namespace {namespace}` or pass --namespace with an existing one"
        )
    return ClusterApiError(
        f"the Kubernetes API of {cluster.label} refused to {verb} {target}{where} "
        f"(HTTP {error.status} {error.reason}: {detail}): fix the object or the cluster state it names, "
        "then retry"
    )


def _server_message(error: ApiException) -> str:
    try:
        body = json.loads(error.body or "{}")
    except (TypeError, ValueError):
        return str(error.body or error.reason or "no details")[:300]
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or error.reason or "no details")[:300]


def is_not_found(error: ClusterError | Exception) -> bool:
    """True when a translated error came from an HTTP 404 on the object itself."""
    cause = error.__cause__
    return (
        isinstance(cause, ApiException)
        and cause.status == 404
        and not isinstance(error, NamespaceMissingError)
    )


def ensure_namespace(cluster: Cluster) -> None:
    """Fail with :class:`NamespaceMissingError` when the target namespace does not exist.

    A user allowed into one namespace only may not read Namespace objects: a 403 here is no proof of
    absence, so the check is skipped and later requests report what they must.
    """
    try:
        call(
            cluster,
            cluster.core.read_namespace,
            cluster.namespace,
            verb="get",
            resource="namespaces",
            name=cluster.namespace,
            namespaced=False,
        )
    except ForbiddenError:
        return
    except ClusterApiError as error:
        if is_not_found(error):
            raise NamespaceMissingError(
                f"namespace {cluster.namespace!r} does not exist on {cluster.label}: create it with "
                f"`kubectl create namespace {cluster.namespace}` or pass --namespace with an existing one"
            ) from error
        raise
