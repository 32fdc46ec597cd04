"""Request and response bodies of the REST routes (they document /docs; the hot predict path parses its
body itself, see :mod:`serving.predict`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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


class ReviewEntry(BaseModel):
    prediction_id: str = Field(description="Send it to /feedback with the right label (no image needed).")
    sha256: str
    model_name: str
    model_version: int = Field(description="The live version that made this prediction.")
    top_k: list[LabelScore]
    margin: float = Field(description="Top-1 minus top-2 score: the smaller, the less sure the model was.")
    entropy: float
    predicted_at: str
    image_url: str = Field(description="The image, relative to the server (send the token, as for /review).")


class ReviewResponse(BaseModel):
    items: list[ReviewEntry] = Field(description="Least confident first.")
    queued: int = Field(description="Items in the review queue in all.")


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
