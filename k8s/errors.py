"""Errors a user can cause when deploying to Kubernetes; each message says what is wrong and how to fix it."""

from __future__ import annotations

from storage import TfloopError


class ClusterError(TfloopError):
    """Base of every Kubernetes-related error tfloop reports to users."""


class KubeconfigMissingError(ClusterError):
    """No kubeconfig file where one was expected."""


class UnknownContextError(ClusterError):
    """The requested kubeconfig context does not exist."""


class ClusterUnreachableError(ClusterError):
    """The API server did not answer (down, wrong address, network)."""


class ForbiddenError(ClusterError):
    """RBAC refused a request (HTTP 403); the message names the verb and the resource."""


class NamespaceMissingError(ClusterError):
    """The target namespace does not exist."""


class ClusterApiError(ClusterError):
    """Any other refusal of the API server (invalid object, conflict, server error)."""


class InvalidTargetError(ClusterError):
    """The rollout target (image, model name, version) cannot be deployed as given."""


class InvalidSettingsError(ClusterError):
    """A serving or cluster setting cannot be used as given (malformed, or unsafe without being asked)."""


class PodLocalFeedbackError(InvalidSettingsError):
    """The feedback queue would live inside the pods (lost with them) and nobody asked for that."""


class RolloutInProgressError(ClusterError):
    """Another rollout holds the Deployment's Lease."""
