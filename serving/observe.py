"""Watching predictions off the request path: the prediction log, the review queue's intake, the drift
metrics, and the shadow candidate.

A request only appends an :class:`Observation` to a bounded in-memory list
(:meth:`PredictionObserver.observe`, a few microseconds). A background thread then hashes and measures
each image, updates the Prometheus metrics, writes the log as append-only batches
(:mod:`storage.predictions`), and hands the least confident live predictions, with their image, to the
review queue (:mod:`serving.review`). Shadow predictions (the candidate answering a copy of a live
request) run as background tasks after the client's answer is made; their answer joins the live
prediction's log record.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import re
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TypeVar

import storage
from serving.errors import ServingError
from serving.images import ImageInfo, check_image_header
from serving.metrics import ServingMetrics, observe_all
from serving.model import Prediction, ServedModel
from serving.review import ReviewItem, ReviewQueue
from serving.settings import ServingSettings
from serving.tokens import PredictionSigner
from storage.predictions import PredictionRecord, ShadowAnswer, batch_name, confidence_of, model_log_uri

logger = logging.getLogger(__name__)
Item = TypeVar("Item")

TOP_K_LOGGED = 5
# A flush handles thousands of predictions at once. Holding the GIL all that while (Python hands it over
# only every 5 ms when asked) would take half the event loop's time for as long as the flush lasts, so the
# flush lets go of it after every few records.
YIELD_EVERY = 32
EXPIRY_EVERY_S = 60.0
UNKNOWN_IMAGE = ImageInfo("unknown", "bin", 0, 0)


@dataclass(frozen=True)
class Observation:
    """One answered image, as the request path hands it over (nothing computed yet)."""

    prediction: Prediction
    image: bytes
    model_name: str
    protocol: str
    at: float
    live: bool
    shadow: ShadowAnswer | None = None
    info: ImageInfo | None = None  # the header the request path read, when it did


@dataclass(frozen=True)
class ReviewCandidate:
    """A live prediction unsure enough for the review queue, with its image."""

    record: PredictionRecord
    image: bytes
    at: float
    extension: str


@dataclass(frozen=True)
class Measured:
    """One observation, measured: its record (logged or sampled out) and, if unsure, a review candidate."""

    record: PredictionRecord
    logged: bool
    review: ReviewCandidate | None
    top1: float


def writer_id() -> str:
    """A name for this process's log batches, unique among replicas: host (the pod), pid and a nonce."""
    host = re.sub(r"[^A-Za-z0-9]+", "-", socket.gethostname()).strip("-")[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


class PredictionObserver:
    """Collects observations and writes them out from its own thread (:meth:`start` / :meth:`stop`)."""

    def __init__(
        self,
        settings: ServingSettings,
        *,
        metrics: ServingMetrics,
        signer: PredictionSigner,
        review: ReviewQueue | None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.signer = signer
        self.review = review
        self.writer = writer_id()
        self._pending: deque[Observation] = deque()
        self._unwritten: list[PredictionRecord] = []
        self._sequence = 0
        self._last_expiry = -EXPIRY_EVERY_S
        self._offered: set[str] = set()  # image hashes offered to the review queue since the last expiry
        self._sampled_out = 0
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._flush_lock = threading.Lock()
        self._shadows: set[asyncio.Task[None]] = set()

    # --- request path ------------------------------------------------------------------------------

    def observe(self, observation: Observation) -> None:
        """Hand one answered image over (never blocks, never raises)."""
        if len(self._pending) >= self.settings.prediction_log_max_pending:
            self.metrics.prediction_log.labels("dropped").inc()
            return
        self._pending.append(observation)

    def wants_shadow(self) -> bool:
        """Whether this live prediction should also go to the candidate."""
        sample = self.settings.shadow_sample
        if sample <= 0.0:
            return False
        if len(self._shadows) >= self.settings.shadow_max_in_flight:
            self.metrics.shadow.labels("skipped").inc()
            return False
        return sample >= 1.0 or random.random() < sample

    def shadow(
        self,
        observation: Observation,
        *,
        candidate: ServedModel,
        answer: Callable[[ServedModel, bytes], Awaitable[Prediction]],
    ) -> None:
        """Have ``candidate`` answer the observed image in the background; the observation is logged with
        its answer (or without, when the candidate fails)."""
        task = asyncio.get_running_loop().create_task(self._shadow(observation, candidate, answer))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(
        self,
        observation: Observation,
        candidate: ServedModel,
        answer: Callable[[ServedModel, bytes], Awaitable[Prediction]],
    ) -> None:
        try:
            shadow = await answer(candidate, observation.image)
        except Exception:  # the candidate failing is counted and logged, never raised to anyone
            logger.warning("shadow prediction of version %d failed", candidate.version, exc_info=True)
            self.metrics.shadow.labels("failed").inc()
            self.observe(observation)
            return
        live_label = observation.prediction.classes[0] if observation.prediction.classes else ""
        label = shadow.classes[0] if shadow.classes else ""
        agrees = label == live_label
        self.metrics.shadow.labels("agreed" if agrees else "disagreed").inc()
        answer_record = ShadowAnswer(
            version=shadow.model_version,
            label=label,
            score=round(float(shadow.scores[0]) if shadow.scores else 0.0, 6),
            agrees=agrees,
        )
        self.observe(replace(observation, shadow=answer_record))

    async def drain_shadows(self) -> None:
        """Wait for the shadow predictions in progress (at shutdown, after the batcher stopped taking new
        live requests but before it stops)."""
        if self._shadows:
            await asyncio.gather(*list(self._shadows), return_exceptions=True)

    # --- background ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread after a last flush."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.settings.prediction_log_flush_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # the writer must outlive any surprise (logged)
                logger.exception("prediction log flush failed")

    def flush(self) -> int:
        """Process what was observed so far: metrics, log batch, review candidates; how many logged."""
        with self._flush_lock:
            observations: list[Observation] = []
            while self._pending:
                observations.append(self._pending.popleft())
            tally: Counter[tuple[str, str, str]] = Counter()  # (version, top label, format)
            records: list[PredictionRecord] = []
            candidates: dict[str, ReviewCandidate] = {}
            top1_by_version: dict[str, list[float]] = {}
            sizes: list[float] = []
            pixels: list[float] = []
            for observation in _yielding(observations):
                measured = self._measure(observation)
                record = measured.record
                top1_by_version.setdefault(str(record.model_version), []).append(measured.top1)
                sizes.append(record.bytes)
                pixels.append(record.width * record.height)
                tally[
                    str(record.model_version), record.top_k[0][0] if record.top_k else "", record.format
                ] += 1
                if measured.logged:
                    records.append(record)
                candidate = measured.review
                if candidate is not None:
                    known = candidates.get(candidate.record.sha256)
                    if known is None or candidate.record.margin < known.record.margin:
                        candidates[candidate.record.sha256] = candidate
            for version, values in top1_by_version.items():
                observe_all(self.metrics.confidence.labels(version), values)
            observe_all(self.metrics.input_bytes, sizes)
            observe_all(self.metrics.input_pixels, pixels)
            for (version, label, image_format), count in tally.items():
                self.metrics.predicted_class.labels(version, label).inc(count)
                self.metrics.input_format.labels(image_format).inc(count)
            if self._sampled_out:
                self.metrics.prediction_log.labels("sampled_out").inc(self._sampled_out)
                self._sampled_out = 0
            self._write_log(records)
            self._add_review(list(candidates.values()))
            return len(records)

    def _measure(self, observation: Observation) -> Measured:
        prediction = observation.prediction
        confidence = confidence_of(prediction.probabilities)
        info = observation.info
        if info is None:
            try:
                info = check_image_header(observation.image, max_pixels=self.settings.max_image_pixels)
            except ServingError:  # answered, so the model decoded it; Pillow's header reader disagreed
                info = UNKNOWN_IMAGE
        image_format, extension, width, height = info.format, info.extension, info.width, info.height
        record = PredictionRecord(
            sha256=hashlib.sha256(observation.image).hexdigest(),
            model_name=observation.model_name,
            model_version=prediction.model_version,
            top_k=[
                (label, round(float(score), 6))
                for label, score in zip(prediction.classes[:TOP_K_LOGGED], prediction.scores, strict=False)
            ],
            margin=round(confidence.margin, 6),
            entropy=round(confidence.entropy, 6),
            time=datetime.fromtimestamp(observation.at, UTC).isoformat(),
            bytes=len(observation.image),
            format=image_format,
            width=width,
            height=height,
            protocol=observation.protocol,
            shadow=observation.shadow,
        )
        review = None
        if (
            observation.live
            and self.review is not None
            and self.settings.review_max_items > 0
            and confidence.margin < self.settings.review_margin
        ):
            review = ReviewCandidate(
                record=record, image=observation.image, at=observation.at, extension=extension
            )
        sample = self.settings.prediction_log_sample
        logged = self.settings.prediction_log and (sample >= 1.0 or random.random() < sample)
        if not logged:
            self._sampled_out += 1
        return Measured(record=record, logged=logged, review=review, top1=confidence.top1)

    def _write_log(self, records: list[PredictionRecord]) -> None:
        records = self._unwritten + records
        self._unwritten = []
        if not records:
            return
        by_model: dict[str, list[PredictionRecord]] = {}
        for record in records:
            by_model.setdefault(record.model_name, []).append(record)
        now = datetime.now(UTC)
        for model_name, batch in by_model.items():
            self._sequence += 1
            uri = storage.join(
                model_log_uri(self.settings.feedback_uri, model_name),
                batch_name(now, writer=self.writer, sequence=self._sequence),
            )
            data = ("\n".join(record.to_json() for record in _yielding(batch)) + "\n").encode("utf-8")
            try:
                storage.write_if_absent(uri, data)
            except storage.StorageError as error:
                logger.warning("prediction log batch not written (kept for the next try): %s", error)
                self.metrics.prediction_log.labels("failed").inc(len(batch))
                room = self.settings.prediction_log_max_pending - len(self._unwritten)
                self._unwritten.extend(batch[: max(0, room)])
                continue
            self.metrics.prediction_log.labels("written").inc(len(batch))

    def _add_review(self, candidates: list[ReviewCandidate]) -> None:
        """Offer the queue the images it does not hold yet (as far as this replica knows: what it offered
        since the last expiry), each with a freshly signed prediction id."""
        if self.review is None:
            return
        due = time.monotonic() - self._last_expiry > EXPIRY_EVERY_S
        if due or len(self._offered) > 4 * max(self.settings.review_max_items, 1):
            self._offered.clear()
        fresh = [candidate for candidate in candidates if candidate.record.sha256 not in self._offered]
        if not fresh and not due:
            return
        try:
            counts = self.review.add([self._review_item(candidate) for candidate in fresh], expire=due)
        except storage.StorageError as error:
            logger.warning("review queue not updated: %s", error)
            self.metrics.review.labels("failed").inc(len(fresh))
            return
        if due:
            self._last_expiry = time.monotonic()
        self._offered.update(candidate.record.sha256 for candidate in fresh)
        for result, count in counts.items():
            if count:
                self.metrics.review.labels(result).inc(count)

    def _review_item(self, candidate: ReviewCandidate) -> tuple[ReviewItem, bytes]:
        record = candidate.record
        prediction_id = self.signer.issue(
            image_sha256=record.sha256,
            model_name=record.model_name,
            model_version=record.model_version,
            top_k=record.top_k,
        )
        item = ReviewItem(
            sha256=record.sha256,
            prediction_id=prediction_id,
            model_name=record.model_name,
            model_version=record.model_version,
            top_k=record.top_k,
            margin=record.margin,
            entropy=record.entropy,
            time=candidate.at,
            extension=candidate.extension,
        )
        return item, candidate.image


def _yielding(items: list[Item]) -> Iterator[Item]:
    """The items in order, giving up the GIL after every :data:`YIELD_EVERY` of them."""
    for index, item in enumerate(items):
        if index % YIELD_EVERY == YIELD_EVERY - 1:
            time.sleep(0)
        yield item
