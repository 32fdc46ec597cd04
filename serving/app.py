"""The serving HTTP API: ``create_app(settings)`` builds the FastAPI app with TF Serving's REST endpoints,
``/classify``, ``/feedback``, health, metrics and the upload page.

Every error is answered as ``{"error": "..."}`` with a 4xx status for anything a client can cause; the
model runs in threads behind the dynamic batcher so the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import tfserving
from serving.batching import DynamicBatcher
from serving.errors import (
    ImageMismatch,
    ImageRequired,
    InvalidInput,
    ModelNotReady,
    NotFound,
    ServingError,
    Unauthorized,
)
from serving.events import PrefectEventSender, feedback_event
from serving.feedback import FeedbackItem, FeedbackQueue, RecentImage, RecentImages, check_label
from serving.images import ImageInfo, check_image_header, validate_image
from serving.metrics import ServingMetrics
from serving.model import (
    DEFAULT_SIGNATURE,
    ImageJob,
    ModelManager,
    Prediction,
    ServedModel,
    VersionStatus,
    image_job_group,
    predict_jobs,
)
from serving.settings import ServingSettings
from serving.tokens import MAX_TOKEN_CHARS, PredictionClaim, PredictionSigner, signer_for

logger = logging.getLogger(__name__)

LARGE_IMAGE_BYTES = 256 * 1024
INTERNAL_ERROR = "internal error; the server logged the details"
MODEL_VERSION_HEADER = "X-Model-Version"


class InFlight:
    """How many POST requests the app is handling now, and the most it handled at once lately (the batcher
    waits only when others may join, and spreads the recent peak over its workers)."""

    def __init__(self, *, window_s: float = 1.0) -> None:
        self.count = 0
        self.window_s = window_s
        self._peak = 0
        self._peak_at = 0.0

    def enter(self) -> None:
        self.count += 1
        now = time.monotonic()
        if self.count >= self._peak or now - self._peak_at > self.window_s:
            self._peak, self._peak_at = self.count, now

    def leave(self) -> None:
        self.count -= 1

    def recent_peak(self) -> int:
        """The most requests in progress at once within the last ``window_s`` (at least the current count)."""
        if time.monotonic() - self._peak_at > self.window_s:
            self._peak, self._peak_at = self.count, time.monotonic()
        return max(self._peak, self.count)


@dataclass
class Services:
    """Everything the routes use, built once per app from its settings."""

    settings: ServingSettings
    metrics: ServingMetrics
    manager: ModelManager
    batcher: DynamicBatcher[ImageJob, Prediction]
    queue: FeedbackQueue
    recent: RecentImages
    signer: PredictionSigner
    events: PrefectEventSender | None
    in_flight: InFlight
    draining: bool = field(default=False)

    def drain(self) -> None:
        """Start draining: /readyz answers 503 from now on, every other route keeps serving."""
        if not self.draining:
            logger.info("draining: /readyz answers 503; requests are still served")
        self.draining = True

    async def validate(self, data: bytes) -> ImageInfo:
        """Validate an image (in a thread when it is large enough to take a while)."""
        limit = self.settings.max_image_pixels
        if len(data) > LARGE_IMAGE_BYTES:
            return await asyncio.to_thread(validate_image, data, max_pixels=limit)
        return validate_image(data, max_pixels=limit)


def build_services(settings: ServingSettings) -> Services:
    metrics = ServingMetrics()

    def loaded(model: ServedModel) -> None:
        metrics.model_loads.labels(model.name, "ok").inc()

    def failed(_version: int, _message: str) -> None:
        metrics.model_loads.labels(settings.model_name, "failed").inc()

    manager = ModelManager(settings, on_loaded=loaded, on_load_failed=failed)
    metrics.model_version.labels(settings.model_name).set_function(
        lambda: manager.loaded.live.version if manager.loaded.live is not None else 0
    )

    def screen(job: ImageJob) -> ServingError | None:
        """Why an image alone is bad (Pillow's full decode), after the model refused its batch."""
        try:
            validate_image(job.image, max_pixels=settings.max_image_pixels)
        except ServingError as error:
            return error
        return None

    in_flight = InFlight()
    batcher: DynamicBatcher[ImageJob, Prediction] = DynamicBatcher(
        predict_jobs,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000,
        on_batch=metrics.batch_size.observe,
        requests_in_flight=lambda: in_flight.count,
        peak_in_flight=in_flight.recent_peak,
        screen=screen,
        group=image_job_group,
        workers=settings.batch_workers,
    )
    events = None
    if settings.prefect_api_url:
        events = PrefectEventSender(
            settings.prefect_api_url,
            api_key=settings.prefect_api_key,
            timeout_s=settings.event_timeout_s,
            on_result=lambda ok: metrics.events.labels("sent" if ok else "failed").inc(),
        )
    return Services(
        settings=settings,
        metrics=metrics,
        manager=manager,
        batcher=batcher,
        queue=FeedbackQueue(settings.feedback_uri),
        recent=RecentImages(
            max_items=settings.recent_predictions, max_bytes=settings.recent_predictions_bytes
        ),
        signer=signer_for(settings.feedback_secret, ttl_s=settings.prediction_ttl_s),
        events=events,
        in_flight=in_flight,
    )


async def get_services(request: Request) -> Services:
    """Async, so FastAPI resolves it on the event loop instead of a thread hop per request."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
_bearer = HTTPBearer(auto_error=False, description="Needed when the server is started with a token.")


async def require_token(
    services: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    token = services.settings.token
    if token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise Unauthorized(
            "this route needs the server's token: send the header 'Authorization: Bearer <token>'"
        )


TokenDep = Annotated[None, Depends(require_token)]


# --- response models (for /docs) -------------------------------------------------------------------


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    prediction_id: str = Field(
        description="A signed id of this classification: send it to /feedback, with the image as 'file', "
        "to correct it (any replica accepts it)."
    )
    model_name: str
    model_version: int = Field(description="The version that computed this answer.")
    top_k: list[LabelScore]


class FeedbackResponse(BaseModel):
    feedback_id: str
    label: str
    duplicate: bool = Field(description="True when the same image with the same label was already queued.")
    status: str = "accepted"


class PredictRequest(BaseModel):
    """TF Serving's predict body: ``instances`` (row) or ``inputs`` (columnar)."""

    signature_name: str | None = None
    instances: list[Any] | None = None
    inputs: Any = None


class ErrorResponse(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)
}


# --- middleware ------------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """Answers 413 for bodies over ``max_bytes`` (declared or streamed) before any route reads them.

    A client that writes its whole body before it reads (``urllib``, ``requests``, ``http.client``) sees
    a connection reset instead of the 413 when the server closes while the body is still arriving. So,
    as nginx's lingering close does, the rest of a refused body is read and dropped first, up to
    ``discard_bytes`` in all and for at most ``discard_s``; a body declared larger than that, or a client
    that waits for ``100 Continue``, is answered at once.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, discard_bytes: int, discard_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.discard_bytes = discard_bytes
        self.discard_s = discard_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(send)
            elif int(declared) > self.max_bytes:
                waits = headers.get(b"expect", b"").lower() == b"100-continue"
                if not waits and int(declared) <= self.discard_bytes:
                    await self._discard(receive, received=0)
                await self._refuse(send)
            else:
                await self.app(scope, receive, send)
            return
        if headers.get(b"transfer-encoding") is None:
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._discard(receive, received=size)
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _discard(self, receive: Receive, *, received: int) -> None:
        """Read and drop the rest of the body, until it ends, passes ``discard_bytes`` or ``discard_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.discard_s):
                while received <= self.discard_bytes:
                    message = await receive()
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        return
                    received += len(message.get("body", b""))

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"error": f"the request body is over the limit of {self.max_bytes} bytes"}, status_code=413
        )
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class MetricsMiddleware:
    """Counts requests by route template and status and observes their latency."""

    def __init__(self, app: ASGIApp, *, metrics: ServingMetrics, in_flight: InFlight) -> None:
        self.app = app
        self.metrics = metrics
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        counted = scope.get("method") == "POST"
        if counted:
            self.in_flight.enter()
        try:
            await self.app(scope, receive, record_status)
        finally:
            if counted:
                self.in_flight.leave()
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            self.metrics.requests.labels("rest", method, template, str(status)).inc()
            self.metrics.latency.labels("rest", method, template).observe(time.perf_counter() - started)


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

    They are the hot path: for a one-image request, FastAPI's routing, dependency resolution and body model
    cost more server CPU than everything else the request needs (BENCHMARKS.md, serving). The same routes
    stay declared on the app, for /docs and the OpenAPI schema; the lane answers them exactly as they would.
    """

    def __init__(self, app: ASGIApp, *, services: Services, routes: Mapping[str, BaseRoute]) -> None:
        self.app = app
        self.services = services
        self.routes = routes  # by the keys of PREDICT_ROUTES: for the metrics' route label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = PREDICT_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        version, label = match["version"], match["label"]
        scope["route"] = self.routes["version" if version else "label" if label else "latest"]
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        model: ServedModel | None = None
        try:
            body = parse_predict_body(b"".join(chunks))
            model = self.services.manager.resolve(
                match["name"], version=int(version) if version else None, label=label
            )
            response = JSONResponse(await run_predict(self.services, model, body))
        except ServingError as error:
            response = _error(error.status_code, str(error))
        except Exception:  # the server must answer, never die; logged
            logger.exception("unexpected error in :predict")
            response = _error(500, INTERNAL_ERROR)
        if model is not None:
            response.headers[MODEL_VERSION_HEADER] = str(model.version)
        await response(scope, receive, send)


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


# --- app -------------------------------------------------------------------------------------------


async def _poll_versions(services: Services) -> None:
    """Load the first version, then look for new ones every poll interval, forever."""
    while True:
        try:
            await asyncio.to_thread(services.manager.refresh)
        except Exception:  # the poller must outlive any surprise (logged)
            logger.exception("version poll failed")
        await asyncio.sleep(services.settings.poll_interval_s)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(_request: Request, error: ServingError) -> JSONResponse:
        return _error(error.status_code, str(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for problem in error.errors()[:5]:
            where = ".".join(str(part) for part in problem.get("loc", ()))
            problems.append(f"{where}: {problem.get('msg', 'invalid')}")
        return _error(400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(error.detail)}, status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=error)
        return _error(500, INTERNAL_ERROR)


def _page() -> str:
    return resources.files("serving").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(settings: ServingSettings) -> FastAPI:
    """The serving app for ``settings``; the model loads in the background once the app starts."""
    services = build_services(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await services.batcher.start()
        if services.events is not None:
            await services.events.start()
        poller = asyncio.create_task(_poll_versions(services), name="version-poller")
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await services.batcher.stop()
            if services.events is not None:
                await services.events.stop()

    app = FastAPI(
        title="tfloop serving",
        description="TensorFlow Serving-compatible image classification with a feedback queue.",
        version="1",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.services = services
    _install_error_handlers(app)
    _add_routes(app)
    routes = {getattr(route, "path", ""): route for route in app.routes}
    app.add_middleware(
        PredictLane, services=services, routes={kind: routes[path] for kind, path in PREDICT_ROUTES.items()}
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        discard_bytes=settings.discard_bytes(),
        discard_s=settings.max_discard_s,
    )
    app.add_middleware(MetricsMiddleware, metrics=services.metrics, in_flight=services.in_flight)
    return app


def _add_routes(app: FastAPI) -> None:
    # PredictLane answers the predict routes before the router sees them; they are declared for /docs.
    @app.post(PREDICT_ROUTES["latest"], tags=["tensorflow-serving"], response_model=dict[str, Any])
    async def predict(name: str, body: PredictRequest, services: ServicesDep) -> JSONResponse:
        """TF Serving predict on the live version (row ``instances`` or columnar ``inputs``; binary as
        ``{"b64": ...}``). The ``X-Model-Version`` header names the version that answered."""
        return await predict_route(services, body, name)

    @app.post(PREDICT_ROUTES["version"], tags=["tensorflow-serving"], response_model=dict[str, Any])
    async def predict_version(
        name: str, version: int, body: PredictRequest, services: ServicesDep
    ) -> JSONResponse:
        """TF Serving predict on exactly one loaded version (404 when it is not loaded)."""
        return await predict_route(services, body, name, version=version)

    @app.post(PREDICT_ROUTES["label"], tags=["tensorflow-serving"], response_model=dict[str, Any])
    async def predict_label(
        name: str, label: str, body: PredictRequest, services: ServicesDep
    ) -> JSONResponse:
        """TF Serving predict on the version a label names: ``live`` or ``candidate`` (404 when none)."""
        return await predict_route(services, body, name, label=label)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page())

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(services: ServicesDep) -> dict[str, Any]:
        """Readiness: the live version is loaded and warmed up, and the server is not draining (503
        otherwise)."""
        if services.draining:
            raise ModelNotReady("draining: this server is shutting down and takes no new traffic")
        model = services.manager.require()
        return {"status": "ready", "model_name": model.name, "model_version": model.version}

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics(services: ServicesDep) -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info", tags=["classify"])
    async def info(services: ServicesDep) -> dict[str, Any]:
        """The live model, its labels, the loaded versions, and what feedback accepts (used by the page)."""
        model = services.manager.require()
        candidate = services.manager.loaded.candidate
        return {
            "model_name": model.name,
            "model_version": model.version,
            "candidate_version": candidate.version if candidate is not None else None,
            "labels": model.labels,
            "allow_new_labels": services.settings.allow_new_labels,
            "token_required": services.settings.token is not None,
        }

    # TensorFlow Serving REST -------------------------------------------------------------------

    @app.get("/v1/models/{name}", tags=["tensorflow-serving"])
    async def model_status(name: str, services: ServicesDep) -> dict[str, Any]:
        """TF Serving model status: every version this server has loaded (AVAILABLE), is loading, or
        failed to load."""
        return version_status(services, name)

    @app.get("/v1/models/{name}/versions/{version}", tags=["tensorflow-serving"])
    async def model_version_status(name: str, version: int, services: ServicesDep) -> dict[str, Any]:
        """TF Serving model status of one version."""
        return version_status(services, name, version=version)

    @app.get("/v1/models/{name}/labels/{label}", tags=["tensorflow-serving"])
    async def model_label_status(name: str, label: str, services: ServicesDep) -> dict[str, Any]:
        """TF Serving model status of the version a label (``live``, ``candidate``) names."""
        return version_status(services, name, label=label)

    @app.get("/v1/models/{name}/metadata", tags=["tensorflow-serving"])
    async def model_metadata(name: str, services: ServicesDep) -> dict[str, Any]:
        """TF Serving metadata of the live version: the signatures."""
        return model_metadata_answer(services.manager.resolve(name))

    @app.get("/v1/models/{name}/versions/{version}/metadata", tags=["tensorflow-serving"])
    async def model_version_metadata(name: str, version: int, services: ServicesDep) -> dict[str, Any]:
        """TF Serving metadata of one loaded version."""
        return model_metadata_answer(services.manager.resolve(name, version=version))

    @app.get("/v1/models/{name}/labels/{label}/metadata", tags=["tensorflow-serving"])
    async def model_label_metadata(name: str, label: str, services: ServicesDep) -> dict[str, Any]:
        """TF Serving metadata of the version a label names."""
        return model_metadata_answer(services.manager.resolve(name, label=label))

    # classify and feedback -----------------------------------------------------------------------

    @app.post("/classify", tags=["classify"], response_model=ClassifyResponse)
    async def classify(
        file: Annotated[UploadFile, File(description="The image.")], services: ServicesDep, response: Response
    ) -> ClassifyResponse:
        """Classify one uploaded image with the live version (``curl -F file=@cat.jpg``); answers the top-k
        labels and a signed ``prediction_id`` for /feedback."""
        data = await file.read()
        info = await services.validate(data)
        model = services.manager.require()
        prediction = await predict_image(services, model, data, where="file")
        response.headers[MODEL_VERSION_HEADER] = str(prediction.model_version)
        top_k = list(zip(prediction.classes, prediction.scores, strict=True))
        image_sha256 = hashlib.sha256(data).hexdigest()
        services.recent.put(image_sha256, RecentImage(data, info.extension))
        return ClassifyResponse(
            prediction_id=services.signer.issue(
                image_sha256=image_sha256,
                model_name=model.name,
                model_version=prediction.model_version,
                top_k=top_k,
            ),
            model_name=model.name,
            model_version=prediction.model_version,
            top_k=[LabelScore(label=label, score=score) for label, score in top_k],
        )

    @app.post("/feedback", tags=["feedback"], status_code=202, response_model=FeedbackResponse)
    async def feedback(
        services: ServicesDep,
        _auth: TokenDep,
        label: Annotated[str, Form(max_length=200, description="The right label.")],
        prediction_id: Annotated[
            str | None,
            Form(max_length=MAX_TOKEN_CHARS, description="From /classify; send the image with it as 'file'."),
        ] = None,
        note: Annotated[str | None, Form(max_length=2000, description="Free text for reviewers.")] = None,
        file: Annotated[
            UploadFile | None, File(description="The image: the classified one with a prediction_id, or any.")
        ] = None,
    ) -> FeedbackResponse:
        """Queue a corrected label (202) for an earlier classification (``prediction_id`` with the image
        as ``file``) or for an image alone."""
        try:
            return await store_feedback(services, label, prediction_id, note, file)
        except ServingError:
            services.metrics.feedback.labels("refused").inc()
            raise

    @app.get("/feedback/stats", tags=["feedback"])
    async def feedback_stats(services: ServicesDep, _auth: TokenDep) -> dict[str, Any]:
        """Counts per label (pending, consumed) and the total of records."""
        return await asyncio.to_thread(services.queue.stats)


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


async def predict_image(services: Services, model: ServedModel, data: bytes, *, where: str) -> Prediction:
    """One image (header checked) classified by ``model`` through the dynamic batcher; a model failure on
    it alone is the client's 400."""
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

    def check(data: bytes, where: str) -> None:
        try:  # the model decodes the image; a batch it refuses is screened with a full decode
            check_image_header(data, max_pixels=services.settings.max_image_pixels)
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
            predictions = [await predict_image(services, model, images[0], where=f"{input_name}[0]")]
        else:
            predictions = await asyncio.gather(
                *(
                    predict_image(services, model, image, where=f"{input_name}[{i}]")
                    for i, image in enumerate(images)
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
    outputs = await _run_model(services, model, signature_name, arrays)
    return tfserving.format_outputs(outputs, parsed.format)


async def _run_model(
    services: Services, model: ServedModel, signature_name: str, arrays: dict[str, Any]
) -> Any:
    try:
        return await asyncio.to_thread(model.run, signature_name, arrays)
    except ServingError:
        raise
    except Exception as error:  # TF rejected the inputs: a client error
        services.metrics.predict_errors.inc()
        raise InvalidInput(
            f"the model rejected the inputs: {type(error).__name__}: {str(error)[:300]}"
        ) from error


def _known_labels(services: Services, claim: PredictionClaim | None) -> list[str] | None:
    """Labels feedback may use: the live version's, plus those of the version that made the prediction
    when it is loaded here; None when no version is loaded."""
    view = services.manager.loaded
    labels = list(view.live.labels) if view.live is not None else []
    cited = view.models.get(claim.model_version) if claim is not None else None
    if cited is not None:
        labels += [label for label in cited.labels if label not in labels]
    return labels if view.live is not None or cited is not None else None


async def _feedback_image(
    services: Services, claim: PredictionClaim | None, file: UploadFile | None
) -> tuple[bytes, str]:
    """The image of a feedback item and its extension: the one sent (which must be the classified one when a
    prediction_id is cited), or this replica's copy of the cited classification's image."""
    if file is not None:
        data = await file.read()
        info = await services.validate(data)
        if claim is not None and hashlib.sha256(data).hexdigest() != claim.image_sha256:
            raise ImageMismatch(
                "the image sent is not the one this prediction_id was issued for (their sha256 differ); send "
                "the classified image with its prediction_id, or send this image without a prediction_id"
            )
        return data, info.extension
    if claim is not None:
        kept = services.recent.get(claim.image_sha256)
        if kept is None:
            raise ImageRequired(
                "send the image with the prediction_id (as 'file'): this server does not hold the classified "
                "image (another replica may have classified it, or it was evicted)"
            )
        return kept.image, kept.extension
    raise InvalidInput(
        "send either the prediction_id of a classification with its image, or the image as 'file'"
    )


async def store_feedback(
    services: Services,
    label: str,
    prediction_id: str | None,
    note: str | None,
    file: UploadFile | None,
) -> FeedbackResponse:
    claim = services.signer.verify(prediction_id) if prediction_id else None
    known = _known_labels(services, claim)
    if known is None and not services.settings.allow_new_labels:
        raise ModelNotReady("no model is loaded yet, so labels cannot be checked; retry when /readyz is 200")
    checked = check_label(label, known=known or [], allow_new=services.settings.allow_new_labels)
    image, extension = await _feedback_image(services, claim, file)
    item = FeedbackItem(
        image=image,
        extension=extension,
        label=checked,
        prediction_id=prediction_id if claim is not None else None,
        predicted=claim.predicted() if claim is not None else (),
        model_name=claim.model_name if claim is not None else services.settings.model_name,
        model_version=claim.model_version if claim is not None else None,
        predicted_at=(
            datetime.fromtimestamp(claim.issued_at, UTC).isoformat() if claim is not None else None
        ),
        note=note,
    )
    receipt = await asyncio.to_thread(services.queue.submit, item)
    services.metrics.feedback.labels("duplicate" if receipt.duplicate else "accepted").inc()
    if services.events is not None and not receipt.duplicate:
        services.events.emit(
            feedback_event(
                model_name=services.settings.model_name,
                label=checked,
                payload={
                    "feedback_id": receipt.feedback_id,
                    "image": receipt.image_uri,
                    "model_version": item.model_version,
                },
            )
        )
    return FeedbackResponse(feedback_id=receipt.feedback_id, label=checked, duplicate=receipt.duplicate)
