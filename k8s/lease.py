"""One rollout at a time per Deployment: a ``coordination.k8s.io/v1`` Lease named ``<app>-rollout``.

:func:`hold_rollout_lease` takes the Lease (creating it, or taking over one that is free or expired), renews
it from a background thread every third of its duration while the rollout runs, and releases it (clears
``holderIdentity``) at the end. An unexpired Lease held by someone else fails at once with
:class:`~k8s.errors.RolloutInProgressError` naming the holder. Every change after a read carries the
``resourceVersion`` it was based on, so two deployers racing for the same Lease cannot both win: the API
server answers 409 Conflict to the second one.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from k8s import manifests
from k8s.client import Cluster, call, is_not_found
from k8s.errors import ClusterApiError, ClusterError, RolloutInProgressError
from k8s.settings import ServingSpec

MERGE_PATCH = "application/merge-patch+json"

Clock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def holder_identity() -> str:
    """``host@pid/token``: the host and process, plus a token unique to this rollout."""
    return f"{socket.gethostname()}@{os.getpid()}/{uuid.uuid4().hex[:8]}"


@dataclass(kw_only=True)
class HeldLease:
    """A Lease this process holds: its name, holder identity and the last ``resourceVersion`` it wrote."""

    name: str
    holder: str
    duration_s: int
    resource_version: str
    took_over: str | None = None
    renewals: int = 0
    lost: str | None = None
    released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _conflict(error: ClusterError) -> bool:
    cause = error.__cause__
    return getattr(cause, "status", None) == 409


def _read(cluster: Cluster, name: str) -> dict[str, Any] | None:
    try:
        return call(
            cluster,
            cluster.coordination.read_namespaced_lease,
            name,
            cluster.namespace,
            verb="get",
            resource="leases",
            name=name,
        )
    except ClusterApiError as error:
        if is_not_found(error):
            return None
        raise


def _patch(cluster: Cluster, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
    return call(
        cluster,
        cluster.coordination.patch_namespaced_lease,
        name,
        cluster.namespace,
        body,
        verb="patch",
        resource="leases",
        name=name,
        _content_type=MERGE_PATCH,
    )


def _refuse(
    cluster: Cluster, lease: Mapping[str, Any], *, app_name: str, now: datetime.datetime
) -> Exception:
    name = lease["metadata"]["name"]
    holder = manifests.lease_holder(lease)
    expires = manifests.lease_expires_at(lease)
    left = (
        f", expires in {max(0, round((expires - now).total_seconds()))} s unless renewed" if expires else ""
    )
    return RolloutInProgressError(
        f"another rollout of deployment {app_name!r} in namespace {cluster.namespace!r} is in progress: "
        f"Lease {name!r} is held by {holder}{left}. Wait for it to finish and deploy again; if that deploy "
        f"died, its Lease expires by itself (or remove it: "
        f"`kubectl delete lease {name} -n {cluster.namespace}`)"
    )


def live_holder(cluster: Cluster, *, spec: ServingSpec, clock: Clock = utc_now) -> str | None:
    """Who holds the rollout Lease now (unexpired), or None; None as well when leases may not be read."""
    try:
        live = _read(cluster, manifests.lease_name(spec))
    except ClusterError:
        return None
    expires = manifests.lease_expires_at(live) if live else None
    return manifests.lease_holder(live) if live and expires and expires > clock() else None


def acquire(
    cluster: Cluster, *, spec: ServingSpec, duration_s: int, holder: str | None = None, clock: Clock = utc_now
) -> HeldLease:
    """Take the rollout Lease of ``spec.app_name``, or raise :class:`RolloutInProgressError` at once."""
    name = manifests.lease_name(spec)
    holder = holder or holder_identity()
    now = clock()
    live = _read(cluster, name)
    if live is None:
        body = manifests.rollout_lease(spec, holder=holder, duration_s=duration_s, now=now)
        body["metadata"]["namespace"] = cluster.namespace
        try:
            created = call(
                cluster,
                cluster.coordination.create_namespaced_lease,
                cluster.namespace,
                body,
                verb="create",
                resource="leases",
                name=name,
            )
        except ClusterApiError as error:
            if not _conflict(error):
                raise
            raced = _read(cluster, name)
            raise _refuse(cluster, raced or body, app_name=spec.app_name, now=now) from error
        return HeldLease(
            name=name,
            holder=holder,
            duration_s=duration_s,
            resource_version=str(created["metadata"].get("resourceVersion", "")),
        )
    expires = manifests.lease_expires_at(live)
    previous = manifests.lease_holder(live)
    if previous is not None and expires is not None and expires > now:
        raise _refuse(cluster, live, app_name=spec.app_name, now=now)
    transitions = int((live.get("spec") or {}).get("leaseTransitions") or 0) + (1 if previous else 0)
    fresh = manifests.rollout_lease(
        spec, holder=holder, duration_s=duration_s, now=now, transitions=transitions
    )
    patch = {
        "metadata": {
            "resourceVersion": live["metadata"].get("resourceVersion"),
            "labels": fresh["metadata"]["labels"],
        },
        "spec": fresh["spec"],
    }
    try:
        taken = _patch(cluster, name, patch)
    except ClusterApiError as error:
        if not _conflict(error):
            raise
        raise _refuse(cluster, _read(cluster, name) or live, app_name=spec.app_name, now=now) from error
    return HeldLease(
        name=name,
        holder=holder,
        duration_s=duration_s,
        resource_version=str(taken["metadata"].get("resourceVersion", "")),
        took_over=previous if previous else None,
    )


def renew(cluster: Cluster, lease: HeldLease, *, clock: Clock = utc_now) -> None:
    """Push the Lease's ``renewTime`` forward; marks it lost when someone else changed it meanwhile."""
    with lease._lock:
        if lease.lost or lease.released:
            return
        patch = {
            "metadata": {"resourceVersion": lease.resource_version},
            "spec": {"holderIdentity": lease.holder, "renewTime": manifests.micro_time(clock())},
        }
        try:
            answer = _patch(cluster, lease.name, patch)
        except ClusterError as error:
            if _conflict(error) or is_not_found(error):
                lease.lost = f"Lease {lease.name!r} was changed or removed by someone else during the rollout"
            return  # a transient failure: the next renewal tries again
        lease.resource_version = str(answer["metadata"].get("resourceVersion", ""))
        lease.renewals += 1


def release(cluster: Cluster, lease: HeldLease, *, clock: Clock = utc_now) -> bool:
    """Give the Lease up (clear ``holderIdentity``); False when it was no longer ours to release."""
    with lease._lock:
        if lease.lost or lease.released:
            return False
        patch = {
            "metadata": {"resourceVersion": lease.resource_version},
            "spec": {"holderIdentity": None, "renewTime": manifests.micro_time(clock())},
        }
        try:
            _patch(cluster, lease.name, patch)
        except ClusterError as error:
            if _conflict(error) or is_not_found(error):
                lease.lost = f"Lease {lease.name!r} was changed or removed by someone else during the rollout"
                return False
            raise
        lease.released = True
        return True


@contextlib.contextmanager
def hold_rollout_lease(
    cluster: Cluster, *, spec: ServingSpec, duration_s: int, clock: Clock = utc_now
) -> Iterator[HeldLease]:
    """Hold the rollout Lease for the ``with`` block: acquire, renew in the background, release."""
    lease = acquire(cluster, spec=spec, duration_s=duration_s, clock=clock)
    stopped = threading.Event()

    def renew_loop() -> None:
        while not stopped.wait(max(1.0, duration_s / 3)):
            renew(cluster, lease, clock=clock)

    renewer = threading.Thread(target=renew_loop, name=f"tfloop lease {lease.name}", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stopped.set()
        renewer.join(timeout=cluster.request_timeout_s + 5)
        with contextlib.suppress(ClusterError):
            release(cluster, lease, clock=clock)
