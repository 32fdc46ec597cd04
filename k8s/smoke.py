"""Smoke test of a rolled-out model over the TF Serving REST API or its gRPC API, and a port-forward to
reach it.

:func:`smoke_test` is plain HTTP, on the version's own routes by default
(``GET /v1/models/<name>/versions/<v>``, then one ``POST /v1/models/<name>/versions/<v>:predict`` with a
sample image; a server without version routes is asked on ``/v1/models/<name>``), so it works against any
base URL: a port-forward opened by :func:`forward_service`, the in-cluster Service DNS name, an ingress, or
a local server in tests. :func:`grpc_smoke_test` asks the same over gRPC (``ModelService.GetModelStatus``,
then ``PredictionService.Predict`` pinned to the version), with the official ``tensorflow-serving-api``
stubs, as a TF Serving client would.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import httpx

from k8s.client import Cluster, call
from k8s.errors import ClusterError


@dataclass(frozen=True, kw_only=True)
class SmokeSettings:
    """How to smoke-test a rollout: where the Service answers (None: port-forward) and what to send."""

    enabled: bool = True
    url: str | None = None
    sample_image: bytes | None = None
    timeout_s: float = 30.0
    predict: bool = True
    pinned: bool | None = None
    protocol: Literal["rest", "grpc"] = "rest"


@dataclass(frozen=True, kw_only=True)
class SmokeResult:
    ok: bool
    url: str
    expected_version: int
    reported_versions: list[str]
    message: str
    route: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_png(*, size: int = 32) -> bytes:
    """A small valid RGB PNG (a colour gradient), made without image libraries."""
    rows = b"".join(
        b"\x00" + bytes(value for x in range(size) for value in (x * 255 // size, y * 255 // size, 128))
        for y in range(size)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def smoke_test(
    *,
    base_url: str,
    model_name: str,
    expected_version: int,
    sample_image: bytes | None = None,
    predict: bool = True,
    timeout_s: float = 30.0,
    pinned: bool | None = None,
) -> SmokeResult:
    """Check that ``model_name`` version ``expected_version`` is AVAILABLE and answers one prediction.

    ``pinned`` True asks only the version's own routes (``/v1/models/<name>/versions/<N>``): how a candidate
    that is loaded but not live yet is tested before promotion; False only the model's routes. None (the
    default) prefers the version's routes, which answer only when that very version is loaded, and falls
    back to the model's when the server has no version routes (404).
    """
    url = base_url.rstrip("/")
    model_path = f"/v1/models/{model_name}" + (f"/versions/{expected_version}" if pinned is not False else "")
    try:
        with httpx.Client(base_url=url, timeout=timeout_s) as http:
            status = http.get(model_path)
            if status.status_code == 404 and pinned is None:
                fallback = http.get(f"/v1/models/{model_name}")
                if fallback.status_code == 200:
                    model_path, status = f"/v1/models/{model_name}", fallback
            if status.status_code != 200:
                return _failed(
                    url,
                    expected_version,
                    [],
                    f"GET {model_path} answered {status.status_code}: {status.text[:200]}",
                )
            entries = status.json().get("model_version_status") or []
            available = [str(entry.get("version")) for entry in entries if entry.get("state") == "AVAILABLE"]
            if str(expected_version) not in available:
                return _failed(
                    url,
                    expected_version,
                    available,
                    f"the service reports versions {available or 'none'} AVAILABLE, not {expected_version}",
                )
            if predict:
                image = sample_image if sample_image is not None else sample_png()
                body = {"instances": [{"b64": base64.b64encode(image).decode("ascii")}]}
                answer = http.post(f"{model_path}:predict", json=body)
                predictions = answer.json().get("predictions") if answer.status_code == 200 else None
                if not isinstance(predictions, list) or len(predictions) != 1:
                    return _failed(
                        url,
                        expected_version,
                        available,
                        f"POST {model_path}:predict answered {answer.status_code}: {answer.text[:200]}",
                    )
    except (httpx.HTTPError, ValueError) as error:
        return _failed(url, expected_version, [], f"{type(error).__name__}: {error}")
    return SmokeResult(
        ok=True,
        url=url,
        expected_version=expected_version,
        reported_versions=available,
        message=f"version {expected_version} is AVAILABLE"
        + (" and predicts" if predict else "")
        + f" ({model_path})",
        route=model_path,
    )


def grpc_smoke_test(
    *,
    target: str,
    model_name: str,
    expected_version: int,
    sample_image: bytes | None = None,
    predict: bool = True,
    timeout_s: float = 30.0,
    pinned: bool | None = None,
) -> SmokeResult:
    """:func:`smoke_test` over TF Serving's gRPC API at ``target`` (``host:port``): the version must be
    AVAILABLE in ``GetModelStatus`` and answer one ``Predict`` of ``serving_default`` (the image bytes in
    ``image_bytes``) whose ``model_spec`` names it. ``pinned`` False asks the live version instead."""
    import grpc
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import (
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    route = f"{model_name}" + (f" version {expected_version}" if pinned is not False else " (live)")
    try:
        with grpc.insecure_channel(target) as channel:
            status_request = get_model_status_pb2.GetModelStatusRequest()
            status_request.model_spec.name = model_name
            if pinned is not False:
                status_request.model_spec.version.value = expected_version
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
                status_request, timeout=timeout_s
            )
            available = [
                str(entry.version)
                for entry in status.model_version_status
                if entry.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
            ]
            if str(expected_version) not in available:
                return _failed(
                    target,
                    expected_version,
                    available,
                    f"GetModelStatus reports {available or 'no versions'} AVAILABLE, not {expected_version}",
                )
            if predict:
                request = predict_pb2.PredictRequest()
                request.model_spec.name = model_name
                request.model_spec.signature_name = "serving_default"
                if pinned is not False:
                    request.model_spec.version.value = expected_version
                image = sample_image if sample_image is not None else sample_png()
                request.inputs["image_bytes"].CopyFrom(
                    tensor_pb2.TensorProto(
                        dtype=types_pb2.DT_STRING,
                        tensor_shape=tensor_shape_pb2.TensorShapeProto(
                            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
                        ),
                        string_val=[image],
                    )
                )
                answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                    request, timeout=timeout_s
                )
                answered = answer.model_spec.version.value
                if answered != expected_version or not answer.outputs:
                    return _failed(
                        target,
                        expected_version,
                        available,
                        f"Predict was answered by version {answered} with outputs {sorted(answer.outputs)}",
                    )
    except grpc.RpcError as error:
        code = error.code().name if hasattr(error, "code") else "UNKNOWN"
        details = error.details() if hasattr(error, "details") else str(error)
        return _failed(target, expected_version, [], f"gRPC {code}: {details}")
    return SmokeResult(
        ok=True,
        url=f"grpc://{target}",
        expected_version=expected_version,
        reported_versions=available,
        message=f"version {expected_version} is AVAILABLE"
        + (" and predicts" if predict else "")
        + f" (gRPC, {route})",
        route=f"grpc {route}",
    )


def _failed(url: str, expected: int, versions: list[str], message: str) -> SmokeResult:
    return SmokeResult(
        ok=False, url=url, expected_version=expected, reported_versions=versions, message=message
    )


@contextlib.contextmanager
def forward_service(cluster: Cluster, *, service_name: str, port: int) -> Iterator[str]:
    """Forward a local loopback port to a ready pod behind a Service; yields ``http://127.0.0.1:PORT``.

    Like ``kubectl port-forward svc/NAME``: one ready pod is picked when the forward opens. Each local
    connection gets its own port-forward stream (the client's websocket ``portforward``).
    """
    from kubernetes.stream import portforward

    pod_name = _ready_pod(cluster, service_name=service_name)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    stopped = threading.Event()

    def relay(local: socket.socket) -> None:
        try:
            forward = portforward(
                cluster.core.connect_get_namespaced_pod_portforward,
                pod_name,
                cluster.namespace,
                ports=str(port),
            )
            remote = forward.socket(port)
            remote.setblocking(True)
            pumps = [
                threading.Thread(target=_pump, args=(local, remote), daemon=True),
                threading.Thread(target=_pump, args=(remote, local), daemon=True),
            ]
            for pump in pumps:
                pump.start()
            for pump in pumps:
                pump.join()
            forward.close()
        except (OSError, ValueError, RuntimeError):
            local.close()

    def accept_loop() -> None:
        while not stopped.is_set():
            try:
                local, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=relay, args=(local,), daemon=True).start()

    acceptor = threading.Thread(target=accept_loop, name="tfloop port-forward", daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stopped.set()
        acceptor.join(timeout=2)
        listener.close()


def _pump(source: Any, sink: Any) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _ready_pod(cluster: Cluster, *, service_name: str) -> str:
    svc = call(
        cluster,
        cluster.core.read_namespaced_service,
        service_name,
        cluster.namespace,
        verb="get",
        resource="services",
        name=service_name,
    )
    selector = ",".join(
        f"{key}={value}" for key, value in (svc.get("spec", {}).get("selector") or {}).items()
    )
    pods = call(
        cluster,
        cluster.core.list_namespaced_pod,
        cluster.namespace,
        label_selector=selector,
        verb="list",
        resource="pods",
    )
    for pod in pods.get("items", []):
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue  # a terminating pod of the old version may still look ready
        conditions = pod.get("status", {}).get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return str(pod["metadata"]["name"])
    raise ClusterError(
        f"no ready pod behind service {service_name!r} in namespace {cluster.namespace!r} to forward to: "
        f"check `kubectl get pods -n {cluster.namespace} -l {selector}`, or pass a smoke-test URL"
    )
