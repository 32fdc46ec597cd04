"""The services every protocol handler shares, built once per app from its settings: the model manager,
the dynamic batcher, the feedback queue, the signer of prediction tokens, the event sender, the in-flight
count, the prediction observer and the review queue; and their FastAPI dependency aliases
(``ServicesDep``, ``TokenDep``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serving.batching import DynamicBatcher
from serving.errors import FeedbackClosed, ServingError, Unauthorized
from serving.events import PrefectEventSender
from serving.feedback import FeedbackQueue, RecentImages
from serving.images import ImageInfo, validate_image
from serving.limits import FeedbackLimiter
from serving.metrics import ServingMetrics
from serving.model import ImageJob, ModelManager, Prediction, ServedModel, image_job_group, predict_jobs
from serving.observe import PredictionObserver
from serving.review import ReviewQueue
from serving.settings import ServingSettings
from serving.tokens import PredictionSigner, signer_for

logger = logging.getLogger(__name__)

LARGE_IMAGE_BYTES = 256 * 1024


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
    limiter: FeedbackLimiter | None = None
    observer: PredictionObserver | None = None
    review: ReviewQueue | None = None
    draining: bool = field(default=False)

    def drain(self) -> None:
        """Start draining: /readyz answers 503 from now on, every other route keeps serving."""
        if not self.draining:
            logger.info("draining: /readyz answers 503; requests are still served")
        self.draining = True

    async def batched_answer(self, model: ServedModel, data: bytes) -> Prediction:
        """``model``'s answer for one image through the batcher (the shadow candidate's path)."""
        return await self.batcher.submit(ImageJob(model, data))

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
    signer = signer_for(settings.feedback_secret, ttl_s=settings.prediction_ttl_s)
    review = (
        ReviewQueue(settings.feedback_uri, max_items=settings.review_max_items, ttl_s=settings.review_ttl())
        if settings.review_max_items > 0
        else None
    )
    observer = None
    if settings.prediction_log or review is not None or settings.shadow_sample > 0:
        observer = PredictionObserver(settings, metrics=metrics, signer=signer, review=review)
    return Services(
        settings=settings,
        metrics=metrics,
        manager=manager,
        batcher=batcher,
        queue=FeedbackQueue(settings.feedback_uri),
        recent=RecentImages(
            max_items=settings.recent_predictions, max_bytes=settings.recent_predictions_bytes
        ),
        signer=signer,
        events=events,
        in_flight=in_flight,
        limiter=(
            FeedbackLimiter(
                rate_per_minute=settings.feedback_rate_per_minute,
                burst=settings.feedback_burst,
                label_cap=settings.feedback_label_cap,
                cap_window_s=settings.feedback_cap_window_s,
            )
            if settings.production_mode
            else None
        ),
        observer=observer,
        review=review,
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


async def require_feedback_token(services: ServicesDep, _token: TokenDep) -> None:
    """The token rule of the feedback routes: production mode takes feedback only with a token."""
    if services.settings.production_mode and services.settings.token is None:
        raise FeedbackClosed(
            "feedback is closed: production mode (a gs:// feedback queue, or TFLOOP_SERVE_PRODUCTION=true) "
            "takes feedback only with a token; set TFLOOP_SERVE_TOKEN (`tfloop deploy --token-secret`) or, "
            "for a trusted network only, TFLOOP_SERVE_PRODUCTION=false"
        )


FeedbackTokenDep = Annotated[None, Depends(require_feedback_token)]


def client_key(request: Request, *, trust_forwarded_for: bool) -> str:
    """Who sent ``request``, for the per-client limits: the connection's address, or the first
    X-Forwarded-For address when the settings trust the proxy in front."""
    if trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
        if forwarded:
            return forwarded
    return request.client.host if request.client is not None else "unknown"
