"""Typed errors of the serving API; each carries the HTTP status it is answered with as ``{"error": ...}``."""

from __future__ import annotations

from storage import TfloopError


class ServingError(TfloopError):
    """An error answered to the client with ``status_code`` and the message as ``{"error": message}``."""

    status_code = 500


class InvalidInput(ServingError):
    """The request is malformed: bad JSON shape, bad base64, not an image, unknown label."""

    status_code = 400


class Unauthorized(ServingError):
    """A bearer token is required and the request did not carry the right one."""

    status_code = 401


class NotFound(ServingError):
    """No such model, version or prediction."""

    status_code = 404


class PayloadTooLarge(ServingError):
    """The request body or an image exceeds a configured limit."""

    status_code = 413


class TooManyRequests(ServingError):
    """A client went over its feedback rate or its per-label cap; ``retry_after_s`` says when to retry."""

    status_code = 429

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LabelCapReached(TooManyRequests):
    """A client already added as many items to a label as one client may within the cap window."""


class ModelNotReady(ServingError):
    """No model version is loaded yet (startup, or the pinned version does not exist)."""

    status_code = 503


class FeedbackClosed(ServingError):
    """Production mode with no token configured: /feedback takes nothing until one is set."""

    status_code = 503


class FeedbackStoreError(ServingError):
    """The feedback queue could not store an item (storage outage); the client may retry."""

    status_code = 503


class InvalidPredictionId(InvalidInput):
    """A prediction_id that /classify did not issue (malformed, changed, or signed with another key)."""


class ExpiredPredictionId(NotFound):
    """A genuine prediction_id older than the configured lifetime."""


class ImageMismatch(InvalidInput):
    """The image sent with a prediction_id is not the one that was classified."""


class ImageRequired(ServingError):
    """Feedback cites a prediction_id but this replica does not hold its image and none was sent."""

    status_code = 422
