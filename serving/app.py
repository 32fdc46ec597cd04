"""The serving HTTP API: ``create_app(settings)`` builds the FastAPI app with TF Serving's REST endpoints,
``/classify``, ``/feedback``, the review queue (``/review``), health, metrics and the upload page.

The routes are thin: the shared services live in :mod:`serving.services`, the predict path in
:mod:`serving.predict`, feedback intake in :mod:`serving.intake`, the middleware in
:mod:`serving.middleware`. Every error is answered as ``{"error": "..."}`` with a 4xx status for anything a
client can cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from serving.errors import FeedbackStoreError, ModelNotReady, NotFound, ServingError, TooManyRequests
from serving.feedback import RecentImage
from serving.images import MEDIA_TYPES
from serving.intake import store_feedback
from serving.middleware import INTERNAL_ERROR, BodyLimitMiddleware, MetricsMiddleware, error_response
from serving.predict import (
    MODEL_VERSION_HEADER,
    PREDICT_ROUTES,
    LaneMiddleware,
    PredictLane,
    model_metadata_answer,
    predict_image,
    predict_route,
    version_status,
)
from serving.review import ReviewQueue
from serving.schemas import (
    ERRORS,
    ClassifyResponse,
    FeedbackResponse,
    LabelScore,
    PredictRequest,
    ReviewResponse,
)
from serving.services import FeedbackTokenDep, Services, ServicesDep, build_services, client_key
from serving.settings import ServingSettings
from serving.tokens import MAX_TOKEN_CHARS
from storage import StorageError

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_REVIEW_LIMIT = 100
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# --- app -------------------------------------------------------------------------------------------


async def _poll_versions(services: Services) -> None:
    """Load the first version, then look for new ones every poll interval, forever."""
    while True:
        try:
            await asyncio.to_thread(services.manager.refresh)
        except Exception:  # the poller must outlive any surprise (logged)
            logger.exception("version poll failed")
        await asyncio.sleep(services.settings.poll_interval_s)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(_request: Request, error: ServingError) -> JSONResponse:
        response = error_response(error.status_code, str(error))
        if isinstance(error, TooManyRequests):
            response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for problem in error.errors()[:5]:
            where = ".".join(str(part) for part in problem.get("loc", ()))
            problems.append(f"{where}: {problem.get('msg', 'invalid')}")
        return error_response(400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(error.detail)}, status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=error)
        return error_response(500, INTERNAL_ERROR)


def _review_queue(services: Services) -> ReviewQueue:
    if services.review is None:
        raise NotFound("the review queue is off on this server (TFLOOP_SERVE_REVIEW_MAX_ITEMS=0)")
    return services.review


async def _storage_call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking storage read in a thread; a storage failure is a retryable 503."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except StorageError as error:
        raise FeedbackStoreError(f"the review queue cannot be read, please retry: {error}") from error


def _page() -> str:
    return resources.files("serving").joinpath("static/index.html").read_text(encoding="utf-8")


class ServingApp(FastAPI):
    """The FastAPI app, whose ``:predict`` requests with a declared body within the limit go straight to the
    lane (:class:`PredictLane`), ahead of the middleware stack; everything else takes the whole stack."""

    lane: PredictLane | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.lane
        match = lane.fast_match(scope) if lane is not None else None
        if lane is None or match is None:
            await super().__call__(scope, receive, send)
        else:
            await lane.serve(scope, receive, send, match)


def create_app(settings: ServingSettings) -> ServingApp:
    """The serving app for ``settings``; the model loads in the background once the app starts."""
    services = build_services(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await services.batcher.start()
        if services.events is not None:
            await services.events.start()
        if services.observer is not None:
            services.observer.start()
        poller = asyncio.create_task(_poll_versions(services), name="version-poller")
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            if services.observer is not None:
                await services.observer.drain_shadows()
            await services.batcher.stop()
            if services.observer is not None:
                await asyncio.to_thread(services.observer.stop)
            if services.events is not None:
                await services.events.stop()

    app = ServingApp(
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
    app.lane = PredictLane(
        services=services, routes={kind: routes[path] for kind, path in PREDICT_ROUTES.items()}
    )
    app.add_middleware(LaneMiddleware, lane=app.lane)
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
        prediction = await predict_image(services, model, data, where="file", info=info)
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
        request: Request,
        services: ServicesDep,
        _auth: FeedbackTokenDep,
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
        as ``file``) or for an image alone. The same image and label again (pending or already trained
        on) answers ``duplicate``. In production mode the token is required and each client is
        rate-limited and capped per label (429 with Retry-After)."""
        try:
            client = client_key(request, trust_forwarded_for=services.settings.trust_forwarded_for)
            return await store_feedback(services, label, prediction_id, note, file, client=client)
        except ServingError:
            services.metrics.feedback.labels("refused").inc()
            raise

    @app.get("/review", tags=["feedback"], response_model=ReviewResponse)
    async def review(
        services: ServicesDep,
        _auth: FeedbackTokenDep,
        limit: Annotated[int, Query(ge=1, le=MAX_REVIEW_LIMIT, description="Most items to list.")] = 20,
    ) -> dict[str, Any]:
        """Predictions the model was least sure of (margin under ``review_margin``), least confident first:
        label one by posting its ``prediction_id`` and the right label to /feedback; it then leaves the
        queue. Same token rules as /feedback."""
        queue = _review_queue(services)
        items, queued = await _storage_call(queue.items, limit=limit)
        return {"items": [item.answer() for item in items], "queued": queued}

    @app.get("/review/{sha256}/image", tags=["feedback"], response_class=Response)
    async def review_image(sha256: str, services: ServicesDep, _auth: FeedbackTokenDep) -> Response:
        """The image of a review item."""
        queue = _review_queue(services)
        found = await _storage_call(queue.image, sha256) if SHA256_HEX.fullmatch(sha256) else None
        if found is None:
            raise NotFound(f"no review item for image {sha256} (labelled, expired, or never queued)")
        data, extension = found
        return Response(data, media_type=MEDIA_TYPES.get(extension, "application/octet-stream"))

    @app.get("/feedback/stats", tags=["feedback"])
    async def feedback_stats(services: ServicesDep, _auth: FeedbackTokenDep) -> dict[str, Any]:
        """Counts per label (pending, consumed), the total of records, and the quarantined images (the
        same image under different labels: held out of training until ``tfloop feedback resolve``)."""
        return await asyncio.to_thread(services.queue.stats)
