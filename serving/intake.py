"""Feedback intake: from a ``/feedback`` form to a stored queue item (label checked against the versions
that could have made the prediction, the image matched to the signed prediction token or taken from the
review queue, the event sent, the labelled image out of the review queue)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime

from fastapi import UploadFile

import storage
from serving.errors import (
    FeedbackStoreError,
    ImageMismatch,
    ImageRequired,
    InvalidInput,
    LabelCapReached,
    ModelNotReady,
)
from serving.events import feedback_event
from serving.feedback import FeedbackItem, check_label
from serving.schemas import FeedbackResponse
from serving.services import Services
from serving.tokens import PredictionClaim

logger = logging.getLogger(__name__)


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
            reviewed = await _review_image(services, claim.image_sha256)
            if reviewed is not None:
                return reviewed
        if kept is None:
            raise ImageRequired(
                "send the image with the prediction_id (as 'file'): this server does not hold the classified "
                "image (another replica may have classified it, or it was evicted)"
            )
        return kept.image, kept.extension
    raise InvalidInput(
        "send either the prediction_id of a classification with its image, or the image as 'file'"
    )


async def _review_image(services: Services, image_sha256: str) -> tuple[bytes, str] | None:
    """The review queue's copy of an image (any replica's), or None."""
    if services.review is None:
        return None
    try:
        return await asyncio.to_thread(services.review.image, image_sha256)
    except storage.StorageError as error:
        raise FeedbackStoreError(f"the review queue cannot be read, please retry: {error}") from error


async def _leave_review(services: Services, image_sha256: str) -> None:
    """A labelled image leaves the review queue (the feedback is stored already: a failure here only
    leaves the item listed, and is logged)."""
    if services.review is None:
        return
    try:
        if await asyncio.to_thread(services.review.remove, image_sha256):
            services.metrics.review.labels("reviewed").inc()
    except storage.StorageError as error:
        logger.warning("labelled image %s stays in the review queue: %s", image_sha256, error)


async def store_feedback(
    services: Services,
    label: str,
    prediction_id: str | None,
    note: str | None,
    file: UploadFile | None,
    *,
    client: str,
) -> FeedbackResponse:
    """Check and store one feedback item from ``client`` (its limits apply in production mode)."""
    if services.limiter is not None:
        services.limiter.admit(client)
    claim = services.signer.verify(prediction_id) if prediction_id else None
    known = _known_labels(services, claim)
    if known is None and not services.settings.allow_new_labels:
        raise ModelNotReady("no model is loaded yet, so labels cannot be checked; retry when /readyz is 200")
    checked = check_label(label, known=known or [], allow_new=services.settings.allow_new_labels)
    image, extension = await _feedback_image(services, claim, file)
    if services.limiter is not None:
        try:
            services.limiter.check_cap(client, checked)
        except LabelCapReached:  # a correction already stored moves nothing: it answers "duplicate"
            if not await asyncio.to_thread(services.queue.known, checked, image):
                raise
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
    if services.limiter is not None and not receipt.duplicate:
        services.limiter.added(client, checked)
    services.metrics.feedback.labels("duplicate" if receipt.duplicate else "accepted").inc()
    await _leave_review(services, receipt.image_sha256)
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
