"""The predict path: TF Serving's ``:predict`` answered straight from ASGI (:class:`PredictLane`), one image
through the dynamic batcher (:func:`predict_image`), other signatures called directly
(:func:`call_signature`), and the model status and metadata answers REST and gRPC share."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from serving import tfserving
from serving.errors import InvalidInput, NotFound, ServingError
from serving.images import ImageInfo, check_image_header
from serving.middleware import INTERNAL_ERROR
from serving.model import DEFAULT_SIGNATURE, ImageJob, Prediction, ServedModel, VersionStatus
from serving.observe import Observation
from serving.schemas import PredictRequest
from serving.services import LARGE_IMAGE_BYTES, Services

logger = logging.getLogger(__name__)

MODEL_VERSION_HEADER = "X-Model-Version"
MODEL_VERSION_HEADER_BYTES = MODEL_VERSION_HEADER.lower().encode("ascii")


PREDICT_PATH = re.compile(
    r"/v1/models/(?P<name>[^/]+)(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/]+))?:predict"
)
PREDICT_ROUTES = {
    "latest": "/v1/models/{name}:predict",
    "version": "/v1/models/{name}/versions/{version}:predict",
    "label": "/v1/models/{name}/labels/{label}:predict",
}


class PredictLane:
    """Answers TF Serving's ``:predict`` routes straight from ASGI, ahead of FastAPI's router.

    They are the hot path: for a one-image request, FastAPI's routing, dependency resolution and body model,
    and every middleware layer's wrapping of ``send``, cost more server CPU than everything else the request
    needs (BENCHMARKS.md, serving). A request that declares a body within the size limit is answered by
    :meth:`serve` before the middleware stack (the app's ``__call__``), counting its own metrics; anything
    else (a chunked body, one over the limit) goes through the stack, whose body limit answers 413 and whose
    :class:`LaneMiddleware` hands what passes to :meth:`answer`. The same routes stay declared on the app,
    for /docs and the OpenAPI schema; the lane answers them exactly as they would.
    """

    def __init__(self, *, services: Services, routes: Mapping[str, BaseRoute]) -> None:
        self.services = services
        self.routes = routes  # by the keys of PREDICT_ROUTES: for the metrics' route label
        self._max_body_bytes = services.settings.max_body_bytes

    @staticmethod
    def match(scope: Scope) -> re.Match[str] | None:
        """The path's match when ``scope`` is a ``:predict`` request."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        return PREDICT_PATH.fullmatch(scope["path"])

    def fast_match(self, scope: Scope) -> re.Match[str] | None:
        """The path's match when the lane answers ``scope`` ahead of the middleware stack: a ``:predict``
        POST whose declared body size is within the limit (no chunked body, nothing for the 413)."""
        match = self.match(scope)
        if match is None:
            return None
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
            elif name == b"transfer-encoding":
                return None
        if declared is None or not declared.isdigit() or int(declared) > self._max_body_bytes:
            return None
        return match

    async def serve(self, scope: Scope, receive: Receive, send: Send, match: re.Match[str]) -> None:
        """:meth:`answer` with what the metrics middleware does for requests that pass through it: the
        in-flight count and the request metrics (a client that left before its answer is not counted)."""
        started = time.perf_counter()
        in_flight = self.services.in_flight
        in_flight.enter()
        try:
            status = await self.answer(scope, receive, send, match)
        finally:
            in_flight.leave()
        if status:
            self.services.metrics.record_request(
                "rest", "POST", scope["route"].path, str(status), time.perf_counter() - started
            )

    async def answer(self, scope: Scope, receive: Receive, send: Send, match: re.Match[str]) -> int:
        """Read the body, predict, send the answer; its HTTP status (0 when the client left first)."""
        version, label = match["version"], match["label"]
        scope["route"] = self.routes["version" if version else "label" if label else "latest"]
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return 0  # the client left
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        model: ServedModel | None = None
        try:
            body = parse_predict_body(b"".join(chunks))
            model = self.services.manager.resolve(
                match["name"], version=int(version) if version else None, label=label
            )
            status, content = 200, json_bytes(await run_predict(self.services, model, body))
        except ServingError as error:
            status, content = error.status_code, json_bytes({"error": str(error)})
        except Exception:  # the server must answer, never die; logged
            logger.exception("unexpected error in :predict")
            status, content = 500, json_bytes({"error": INTERNAL_ERROR})
        headers = [(b"content-length", b"%d" % len(content)), (b"content-type", b"application/json")]
        if model is not None:
            headers.append((MODEL_VERSION_HEADER_BYTES, b"%d" % model.version))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        return status


class LaneMiddleware:
    """Hands the ``:predict`` requests that took the long way through the middleware stack to the lane."""

    def __init__(self, app: ASGIApp, *, lane: PredictLane) -> None:
        self.app = app
        self.lane = lane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = self.lane.match(scope)
        if match is None:
            await self.app(scope, receive, send)
        else:
            await self.lane.answer(scope, receive, send, match)


def json_bytes(content: Any) -> bytes:
    """``content`` as the JSON bytes Starlette's JSONResponse would send (NaN refused)."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def parse_predict_body(raw: bytes) -> dict[str, Any]:
    """A ``:predict`` body as a dict of the fields :class:`PredictRequest` declares, or InvalidInput."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidInput(f"the body is not valid JSON ({error})") from error
    if not isinstance(body, dict):
        raise InvalidInput('the body must be a JSON object with "instances" (row) or "inputs" (columnar)')
    signature_name, instances = body.get("signature_name"), body.get("instances")
    if signature_name is not None and not isinstance(signature_name, str):
        raise InvalidInput('"signature_name" must be a string')
    if instances is not None and not isinstance(instances, list):
        raise InvalidInput('"instances" must be a list (one value per instance)')
    return {"signature_name": signature_name, "instances": instances, "inputs": body.get("inputs")}


def _status_entry(status: VersionStatus) -> dict[str, Any]:
    return {
        "version": str(status.version),
        "state": status.state,
        "status": {"error_code": "UNKNOWN" if status.error else "OK", "error_message": status.error},
    }


def version_status(
    services: Services, name: str, *, version: int | None = None, label: str | None = None
) -> dict[str, Any]:
    """TF Serving's ``GetModelStatus`` answer for the model, one version, or the version of a label."""
    manager = services.manager
    if name != services.settings.model_name:
        raise NotFound(f"Servable not found for request: Latest({name})")
    statuses = manager.statuses()
    if label is not None:
        version = manager.resolve(name, label=label).version
    if version is not None:
        statuses = [status for status in statuses if status.version == version]
    if not statuses:
        if version is not None and manager.loaded.models:
            raise NotFound(f"Servable not found for request: Specific({name}, {version})")
        statuses = [VersionStatus(version or 0, manager.state, manager.last_error or "")]
    return {"model_version_status": [_status_entry(status) for status in statuses]}


def model_metadata_answer(model: ServedModel) -> dict[str, Any]:
    """TF Serving's ``GetModelMetadata`` answer for one loaded version."""
    return {
        "model_spec": {"name": model.name, "signature_name": "", "version": str(model.version)},
        "metadata": {"signature_def": {"signature_def": model.signature_def()}},
    }


async def predict_route(
    services: Services,
    body: PredictRequest,
    name: str,
    *,
    version: int | None = None,
    label: str | None = None,
) -> JSONResponse:
    """A declared predict route's answer (the lane answers these paths the same way)."""
    model = services.manager.resolve(name, version=version, label=label)
    content = await run_predict(services, model, body.model_dump())
    return JSONResponse(content, headers={MODEL_VERSION_HEADER: str(model.version)})


async def predict_image(
    services: Services,
    model: ServedModel,
    data: bytes,
    *,
    where: str,
    info: ImageInfo | None = None,
    protocol: str = "rest",
) -> Prediction:
    """One image (header checked: ``info``) classified by ``model`` through the dynamic batcher; a model
    failure on it alone is the client's 400. The answer is handed to the observer (log, review, shadow)."""
    prediction = await _batched(services, model, data, where=where)
    observer = services.observer
    if observer is not None:
        loaded = services.manager.loaded
        observation = Observation(
            prediction=prediction,
            image=data,
            model_name=model.name,
            protocol=protocol,
            at=time.time(),
            live=model is loaded.live,
            info=info,
        )
        candidate = loaded.candidate
        if observation.live and candidate is not None and candidate is not model and observer.wants_shadow():
            observer.shadow(observation, candidate=candidate, answer=services.batched_answer)
        else:
            observer.observe(observation)
    return prediction


async def _batched(services: Services, model: ServedModel, data: bytes, *, where: str) -> Prediction:
    try:
        return await services.batcher.submit(ImageJob(model, data))
    except InvalidInput as error:
        raise InvalidInput(f"{where}: {error}") from error
    except ServingError:
        raise
    except Exception as error:  # the model refused this image even alone: a client error
        services.metrics.predict_errors.inc()
        raise InvalidInput(
            f"{where}: the model could not process this image ({type(error).__name__})"
        ) from error


async def run_predict(services: Services, model: ServedModel, body: Mapping[str, Any]) -> dict[str, Any]:
    """The answer of ``model`` to a ``:predict`` body (the fields of :class:`PredictRequest`);
    ServingError otherwise."""
    signature_name = body.get("signature_name") or DEFAULT_SIGNATURE
    specs = model.request_specs(signature_name)
    parsed = tfserving.parse_predict(body, specs, max_instances=services.settings.max_instances)

    headers: list[ImageInfo] = []

    def check(data: bytes, where: str) -> None:
        try:  # the model decodes the image; a batch it refuses is screened with a full decode
            headers.append(check_image_header(data, max_pixels=services.settings.max_image_pixels))
        except ServingError as error:
            raise type(error)(f"{where}: {error}") from error

    if signature_name == DEFAULT_SIGNATURE and len(specs) == 1:
        (input_name,) = specs
        values = parsed.columns[input_name]
        if len(values) == 1 and len(str(values[0])) < LARGE_IMAGE_BYTES:  # small: a thread hop costs more
            images = tfserving.decode_strings(values, name=input_name, validate=check)
        else:
            images = await asyncio.to_thread(
                tfserving.decode_strings, values, name=input_name, validate=check
            )
        if len(images) == 1:
            predictions = [
                await predict_image(services, model, images[0], where=f"{input_name}[0]", info=headers[0])
            ]
        else:
            predictions = await asyncio.gather(
                *(
                    predict_image(services, model, image, where=f"{input_name}[{i}]", info=header)
                    for i, (image, header) in enumerate(zip(images, headers, strict=True))
                )
            )
        return tfserving.format_rows([p.outputs() for p in predictions], parsed.format)

    arrays: dict[str, Any] = {}
    for input_name, spec in specs.items():
        values = parsed.columns[input_name]
        if spec.is_string:
            decoded = tfserving.decode_strings(values, name=input_name, validate=check)
            arrays[input_name] = np.array(decoded, dtype=object)
        else:
            arrays[input_name] = tfserving.to_array(values, spec, name=input_name)
    outputs = await asyncio.to_thread(call_signature, services, model, signature_name, arrays)
    return tfserving.format_outputs(outputs, parsed.format)


def call_signature(
    services: Services, model: ServedModel, signature_name: str, arrays: Mapping[str, Any]
) -> dict[str, Any]:
    """``model``'s signature called on ``arrays`` (blocking: call it in a thread); TensorFlow refusing the
    inputs is the client's InvalidInput."""
    try:
        return model.run(signature_name, arrays)
    except ServingError:
        raise
    except Exception as error:  # TF rejected the inputs: a client error
        services.metrics.predict_errors.inc()
        raise InvalidInput(
            f"the model rejected the inputs: {type(error).__name__}: {str(error)[:300]}"
        ) from error
