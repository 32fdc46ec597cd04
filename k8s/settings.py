"""Typed settings for talking to a cluster and for shaping the serving Deployment, plus the rollout target.

Nothing here reads the environment or touches the network: callers build these objects (the CLI from its
flags, the Prefect flow from its parameters) and pass them to :mod:`k8s.rollout`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from k8s.errors import InvalidTargetError

LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, kw_only=True)
class ClusterSettings:
    """Which cluster and namespace to talk to, and how patiently.

    ``kubeconfig`` None means ``$KUBECONFIG`` (first entry), then ``~/.kube/config``; ``in_cluster`` uses the
    pod's service account instead (what a Prefect Kubernetes worker's job gets). ``namespace`` None means the
    context's namespace, else ``default``.
    """

    kubeconfig: Path | None = None
    context: str | None = None
    namespace: str | None = None
    in_cluster: bool = False
    request_timeout_s: float = 15.0
    poll_interval_s: float = 2.0


@dataclass(frozen=True, kw_only=True)
class ServingSpec:
    """The shape of the serving workload: names, sizes and probes (defaults match ``k8s/manifests``)."""

    app_name: str = "tfloop-serving"
    replicas: int = 2
    port: int = 8501
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
    feedback_uri: str = "/cache/feedback"
    run_as_user: int = 10001


@dataclass(frozen=True, kw_only=True)
class DeployTarget:
    """What to roll out: a serving image that carries ``model_name`` version ``version``."""

    image: str
    model_name: str
    version: int
    run_id: str | None = None
    extra_annotations: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.image.strip() or any(char.isspace() for char in self.image):
            raise InvalidTargetError(
                f"image reference {self.image!r} is empty or has spaces: pass e.g. "
                "registry.example.com/tfloop-classifier:v3"
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
