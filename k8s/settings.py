"""Typed settings for talking to a cluster and for shaping the serving Deployment, plus the rollout target.

Nothing here reads the environment or touches the network: callers build these objects (the CLI from its
flags, the Prefect flow from its parameters) and pass them to :mod:`k8s.rollout`.

* :class:`ClusterSettings`: which cluster and namespace, how patiently, how long a rollout lease lasts.
* :class:`ServingSpec`: the shape of the workload (names, sizes, probes, drain), fixed per code release.
* :class:`ServingSettings`: what the serving pods are configured with (feedback queue, Prefect, Secret
  references, Google credentials). These live in the cluster and persist across deploys: a deploy passes
  only what it changes, and :meth:`ServingSettings.over` merges that onto what the cluster has.
* :class:`DeployTarget`: what to roll out (image by tag or digest, model name and version).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from k8s.errors import InvalidSettingsError, InvalidTargetError

LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
GCS_URI = re.compile(r"^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?$")
GCP_SERVICE_ACCOUNT = re.compile(
    r"^[a-z][-a-z0-9]{4,28}[a-z0-9]@[a-z][-a-z0-9.:]{4,61}\.iam\.gserviceaccount\.com$"
)

POD_LOCAL_FEEDBACK_URI = "/cache/feedback"
"""The feedback queue when none is configured: an emptyDir inside each pod (lost with the pod)."""


@dataclass(frozen=True, kw_only=True)
class ClusterSettings:
    """Which cluster and namespace to talk to, and how patiently.

    ``kubeconfig`` None means ``$KUBECONFIG`` (first entry), then ``~/.kube/config``; ``in_cluster`` uses the
    pod's service account instead (what a Prefect Kubernetes worker's job gets). ``namespace`` None means the
    context's namespace, else ``default``. ``lease_duration_s`` is how long the rollout's Lease stays valid
    without a renewal (it is renewed every third of that while the rollout runs).
    """

    kubeconfig: Path | None = None
    context: str | None = None
    namespace: str | None = None
    in_cluster: bool = False
    request_timeout_s: float = 15.0
    poll_interval_s: float = 2.0
    lease_duration_s: int = 60

    def __post_init__(self) -> None:
        if self.lease_duration_s < 3:
            raise InvalidSettingsError(
                f"lease duration {self.lease_duration_s} s is too short to renew: use 3 s or more "
                "(default 60)"
            )


@dataclass(frozen=True, kw_only=True)
class ServingSpec:
    """The shape of the serving workload: names, sizes, probes and drain (defaults match ``k8s/manifests``).

    On termination a pod first sleeps ``pre_stop_s`` (its ``preStop`` hook, so that Services stop sending
    it traffic), then gets SIGTERM: serving keeps answering for ``drain_s`` (``TFLOOP_SERVE_DRAIN_S``) and
    then lets requests in progress finish for up to ``shutdown_timeout_s``
    (``TFLOOP_SERVE_SHUTDOWN_TIMEOUT_S``); ``termination_grace_s`` must cover all three before the kubelet
    kills it.
    """

    app_name: str = "tfloop-serving"
    replicas: int = 2
    port: int = 8501
    grpc_port: int = 8500  # TF Serving's gRPC API (container port ``grpc``); 0: REST only
    max_surge: int = 1
    revision_history_limit: int = 5
    progress_deadline_s: int = 600
    cpu_request: str = "500m"
    memory_request: str = "1Gi"
    cpu_limit: str = "2"
    memory_limit: str = "2Gi"
    cache_size_limit: str = "2Gi"
    startup_timeout_s: int = 300
    min_replicas: int = 2
    max_replicas: int = 5
    target_cpu_percent: int = 70
    min_available: int = 1
    run_as_user: int = 10001
    pre_stop_s: int = 5
    drain_s: int = 5
    shutdown_timeout_s: int = 15
    termination_grace_s: int = 30

    def __post_init__(self) -> None:
        if not DNS_LABEL.match(self.app_name) or len(self.app_name) > 50:
            raise InvalidSettingsError(
                f"app name {self.app_name!r} is not a DNS label of at most 50 characters: use lowercase "
                "letters, digits and '-' (e.g. tfloop-serving)"
            )
        stop = (self.pre_stop_s, self.drain_s, self.shutdown_timeout_s)
        if min(stop) < 0 or sum(stop) >= self.termination_grace_s:
            raise InvalidSettingsError(
                f"termination grace {self.termination_grace_s} s must exceed the preStop sleep "
                f"({self.pre_stop_s} s) plus the drain ({self.drain_s} s) plus the shutdown timeout "
                f"({self.shutdown_timeout_s} s), each 0 or more: raise termination_grace_s or lower the "
                "others"
            )


@dataclass(frozen=True, kw_only=True)
class SecretRef:
    """A key of a Kubernetes Secret in the target namespace (tfloop only references it, never reads it)."""

    name: str
    key: str

    def __post_init__(self) -> None:
        if not DNS_SUBDOMAIN.match(self.name):
            raise InvalidSettingsError(
                f"Secret name {self.name!r} is not a valid Kubernetes name: use lowercase letters, digits, "
                "'-' and '.' (e.g. tfloop-serving-token)"
            )
        if not SECRET_KEY.match(self.key):
            raise InvalidSettingsError(
                f"Secret key {self.key!r} (of Secret {self.name!r}) is not a valid key: use letters, digits, "
                "'-', '_' and '.'"
            )

    @classmethod
    def parse(cls, text: str, *, default_key: str) -> SecretRef:
        """``NAME`` or ``NAME:KEY`` (the form the command line takes)."""
        name, _, key = text.strip().partition(":")
        return cls(name=name, key=key or default_key)

    def __str__(self) -> str:
        return f"{self.name}:{self.key}"


SECRET_DEFAULT_KEYS = {
    "prefect_api_key_secret": "api-key",
    "token_secret": "token",
    "feedback_secret": "secret",
    "gcp_key_secret": "key.json",
}
"""The Secret key each reference uses when ``NAME`` is given without ``:KEY``."""


@dataclass(frozen=True, kw_only=True)
class ServingSettings:
    """How the serving pods are configured; each field lives in the cluster and persists across deploys.

    As a request (what a deploy passes), None means "keep what the cluster has" and ``clear`` names fields to
    remove (``feedback_uri`` cleared goes back to the pod-local default). As the cluster's state (what
    :func:`k8s.manifests.live_serving_settings` reads back), None means "not set" and ``clear`` is empty.

    * ``feedback_uri``: the feedback queue (``TFLOOP_SERVE_FEEDBACK_URI``), ``gs://bucket/prefix`` in
      production; an absolute path is inside the pod (lost with it, one queue per replica).
    * ``prefect_api_url`` (``TFLOOP_SERVE_PREFECT_API_URL``) and its key ``prefect_api_key_secret``
      (env ``PREFECT_API_KEY``): where feedback events go.
    * ``token_secret``: the bearer token that protects ``/feedback`` (env ``TFLOOP_SERVE_TOKEN``).
    * ``feedback_secret``: the key that signs prediction ids, shared by all replicas
      (env ``TFLOOP_FEEDBACK_SECRET``).
    * ``gcp_service_account``: GKE Workload Identity (annotation ``iam.gke.io/gcp-service-account`` on the
      pods' ServiceAccount); ``gcp_key_secret``: a service-account key file mounted from a Secret
      (``GOOGLE_APPLICATION_CREDENTIALS``).
    """

    feedback_uri: str | None = None
    prefect_api_url: str | None = None
    prefect_api_key_secret: SecretRef | None = None
    token_secret: SecretRef | None = None
    feedback_secret: SecretRef | None = None
    gcp_service_account: str | None = None
    gcp_key_secret: SecretRef | None = None
    clear: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        known = {item.name for item in fields(self)} - {"clear"}
        unknown = sorted(set(self.clear) - known)
        if unknown:
            raise InvalidSettingsError(
                f"cannot clear unknown serving setting(s) {', '.join(unknown)}: "
                f"known are {', '.join(sorted(known))}"
            )
        both = sorted(name for name in self.clear if getattr(self, name) is not None)
        if both:
            raise InvalidSettingsError(f"serving setting(s) {', '.join(both)} both set and cleared: pick one")
        if self.feedback_uri is not None:
            uri = self.feedback_uri
            if uri.startswith("gs://"):
                if not GCS_URI.match(uri):
                    raise InvalidSettingsError(
                        f"feedback URI {uri!r} has no valid bucket name: pass e.g. --feedback-uri "
                        "gs://my-bucket/feedback"
                    )
            elif not uri.startswith("/") or any(char.isspace() for char in uri):
                raise InvalidSettingsError(
                    f"feedback URI {uri!r} is neither gs://bucket/prefix nor an absolute path in the pod: "
                    "pass e.g. --feedback-uri gs://my-bucket/feedback"
                )
        if self.prefect_api_url is not None and not re.match(
            r"^https?://[^\s/]+(/\S*)?$", self.prefect_api_url
        ):
            raise InvalidSettingsError(
                f"Prefect API URL {self.prefect_api_url!r} is not an http(s) URL: pass e.g. "
                "--prefect-api-url http://prefect-server.prefect:4200/api"
            )
        if self.gcp_service_account is not None and not GCP_SERVICE_ACCOUNT.match(self.gcp_service_account):
            raise InvalidSettingsError(
                f"Google service account {self.gcp_service_account!r} is not an email like "
                "NAME@PROJECT.iam.gserviceaccount.com: pass the account Workload Identity maps the pods to"
            )

    @classmethod
    def parse(
        cls,
        *,
        feedback_uri: str | None = None,
        prefect_api_url: str | None = None,
        prefect_api_key_secret: str | None = None,
        token_secret: str | None = None,
        feedback_secret: str | None = None,
        gcp_service_account: str | None = None,
        gcp_key_secret: str | None = None,
    ) -> ServingSettings:
        """A change given as text (``tfloop deploy``'s flags, a flow's options): None keeps a setting,
        '' clears it, Secret references are ``NAME`` or ``NAME:KEY`` (default keys:
        ``SECRET_DEFAULT_KEYS``)."""
        given = {
            "feedback_uri": feedback_uri,
            "prefect_api_url": prefect_api_url,
            "prefect_api_key_secret": prefect_api_key_secret,
            "token_secret": token_secret,
            "feedback_secret": feedback_secret,
            "gcp_service_account": gcp_service_account,
            "gcp_key_secret": gcp_key_secret,
        }
        values: dict[str, Any] = {}
        clear: set[str] = set()
        for name, value in given.items():
            if value is None:
                continue
            if not value.strip():
                clear.add(name)
            elif name in SECRET_DEFAULT_KEYS:
                values[name] = SecretRef.parse(value, default_key=SECRET_DEFAULT_KEYS[name])
            else:
                values[name] = value.strip()
        return cls(**values, clear=frozenset(clear))

    def over(self, live: ServingSettings) -> ServingSettings:
        """These settings merged onto ``live``: set fields win, cleared ones go, the rest is kept."""
        merged = {}
        for item in fields(self):
            if item.name != "clear" and item.name not in self.clear:
                mine = getattr(self, item.name)
                merged[item.name] = mine if mine is not None else getattr(live, item.name)
        return ServingSettings(**merged)

    def effective_feedback_uri(self) -> str:
        return self.feedback_uri or POD_LOCAL_FEEDBACK_URI

    def feedback_in_pod(self) -> bool:
        """True when the feedback queue would live inside each pod (lost with it, one per replica)."""
        return not self.effective_feedback_uri().startswith("gs://")

    def to_dict(self) -> dict[str, str | None]:
        """Plain values for JSON output (Secret references as ``NAME:KEY``; no secret values exist here)."""
        return {
            item.name: None if getattr(self, item.name) is None else str(getattr(self, item.name))
            for item in fields(self)
            if item.name != "clear"
        }


def split_image(reference: str) -> tuple[str, str | None, str | None]:
    """``repo[:tag][@digest]`` -> (repo, tag, digest); a registry port (``host:5000/x``) is no tag."""
    name, _, digest = reference.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repo, _, tag = name.rpartition(":")
        return repo, tag, digest or None
    return name, None, digest or None


@dataclass(frozen=True, kw_only=True)
class DeployTarget:
    """What to roll out: a serving image that carries ``model_name`` version ``version``.

    ``image`` is ``repo:tag``, ``repo@sha256:...`` or ``repo:tag@sha256:...``; ``digest`` (``sha256:...``)
    pins a tagged image to its content. With a digest the pod template runs ``repo@sha256:...`` (what the
    registry cannot change under the Deployment) and the tag stays readable in the ``tfloop.io/image``
    annotation.
    """

    image: str
    model_name: str
    version: int
    run_id: str | None = None
    digest: str | None = None
    extra_annotations: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.image.strip() or any(char.isspace() for char in self.image):
            raise InvalidTargetError(
                f"image reference {self.image!r} is empty or has spaces: pass e.g. "
                "registry.example.com/tfloop-classifier:v3"
            )
        repo, _, in_image = split_image(self.image)
        if not repo:
            raise InvalidTargetError(
                f"image reference {self.image!r} has no repository: pass e.g. "
                "registry.example.com/tfloop-classifier:v3 or "
                "registry.example.com/tfloop-classifier@sha256:..."
            )
        for digest in (in_image, self.digest):
            if digest is not None and not DIGEST.match(digest):
                raise InvalidTargetError(
                    f"image digest {digest!r} is malformed: a digest is 'sha256:' and 64 lowercase hex "
                    "digits (e.g. what `tfloop build --json` prints as digest)"
                )
        if in_image and self.digest and in_image != self.digest:
            raise InvalidTargetError(
                f"image {self.image!r} names digest {in_image} but digest {self.digest} was given too: "
                "pass one"
            )
        if not LABEL_VALUE.match(self.model_name) or not self.model_name:
            raise InvalidTargetError(
                f"model name {self.model_name!r} cannot be a Kubernetes label value: use at most 63 letters, "
                "digits, '-', '_' or '.', starting and ending with a letter or digit"
            )
        if self.version < 1:
            raise InvalidTargetError(
                f"model version {self.version} is not a positive integer: pass --version 1 or higher"
            )

    @property
    def image_digest(self) -> str | None:
        return self.digest or split_image(self.image)[2]

    @property
    def reference(self) -> str:
        """What the pod template runs: ``repo@sha256:...`` when a digest is known, else the image as given."""
        repo, _, _ = split_image(self.image)
        digest = self.image_digest
        return f"{repo}@{digest}" if digest else self.image
