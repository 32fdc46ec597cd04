"""The durable feedback queue (docs/contracts.md "serving -> pipeline") and a bounded memory of recently
classified images.

Layout below the root (local folder or ``gs://`` prefix):
``pending/<label>/<sha256>.<ext>`` (the image, content-addressed), ``records/<feedback_id>.json`` (label,
prediction_id, the model name and version that made the prediction, its top-k and when, received-at,
note). Both are written with ``storage.write_if_absent`` before the caller answers 202, so nothing is ever
overwritten and the same image with the same label is stored once (the feedback id is derived from both).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import storage
from serving.errors import FeedbackStoreError, InvalidInput
from storage.layout import CONSUMED, PENDING, RECORDS
from storage.quarantine import quarantined_images

SAFE_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ .+-]{0,99}")
MAX_NOTE_CHARS = 2000
MAX_LISTED_QUARANTINED = 100


@dataclass(frozen=True)
class FeedbackItem:
    """One correction to store: the image, the right label, and what the model said."""

    image: bytes
    extension: str
    label: str
    prediction_id: str | None = None
    predicted: Sequence[dict[str, Any]] = ()
    model_name: str | None = None
    model_version: int | None = None
    predicted_at: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class FeedbackReceipt:
    """What the queue stored: the id, the URIs, and whether the same image+label was already there."""

    feedback_id: str
    image_sha256: str
    image_uri: str
    record_uri: str
    duplicate: bool


def check_label(label: str, *, known: Sequence[str], allow_new: bool) -> str:
    """``label`` stripped, if it is safe as a folder name and known (or new labels are allowed).

    Raises InvalidInput naming the known labels otherwise. No label reaches a path unchecked.
    """
    text = label.strip()
    if text in known and SAFE_LABEL.fullmatch(text):
        return text
    if text not in known and not allow_new:
        raise InvalidInput(f"unknown label {label!r}; known labels: {', '.join(known)}")
    if not SAFE_LABEL.fullmatch(text) or text.endswith((".", " ")):
        raise InvalidInput(
            f"label {label!r} cannot be stored: use 1-100 characters from letters, digits, space and "
            "_ . + - starting with a letter, digit or _ (known labels: " + ", ".join(known) + ")"
        )
    return text


class FeedbackQueue:
    """Stores feedback items durably under ``root``; safe to call from many threads at once."""

    def __init__(self, root: str) -> None:
        self.root = root

    @staticmethod
    def feedback_id(label: str, image: bytes) -> str:
        """The id of the correction ``label`` for ``image`` (the same for every submission of both)."""
        return hashlib.sha256(f"{label}\n{hashlib.sha256(image).hexdigest()}".encode()).hexdigest()[:32]

    def known(self, label: str, image: bytes) -> bool:
        """Whether this correction was already stored (pending or consumed)."""
        try:
            return storage.exists(storage.join(self.root, RECORDS, f"{self.feedback_id(label, image)}.json"))
        except storage.StorageError as error:
            raise FeedbackStoreError(f"the feedback queue cannot be read, please retry: {error}") from error

    def submit(self, item: FeedbackItem) -> FeedbackReceipt:
        """Store the image and its record (blocking; call in a thread). Idempotent per image+label: an
        image already queued or consumed with this label is a duplicate and is not queued again."""
        if not SAFE_LABEL.fullmatch(item.label):
            raise InvalidInput(f"label {item.label!r} is not a safe folder name")
        image_sha = hashlib.sha256(item.image).hexdigest()
        feedback_id = self.feedback_id(item.label, item.image)
        image_uri = storage.join(self.root, PENDING, item.label, f"{image_sha}.{item.extension}")
        record_uri = storage.join(self.root, RECORDS, f"{feedback_id}.json")
        record = {
            "feedback_id": feedback_id,
            "label": item.label,
            "image": f"{PENDING}/{item.label}/{image_sha}.{item.extension}",
            "image_sha256": image_sha,
            "prediction_id": item.prediction_id,
            "predicted": list(item.predicted),
            "model_name": item.model_name,
            "model_version": item.model_version,
            "predicted_at": item.predicted_at,
            "received_at": datetime.now(UTC).isoformat(),
            "note": (item.note or "")[:MAX_NOTE_CHARS] or None,
        }
        try:
            if storage.exists(record_uri):  # records outlive consumption: a consumed item stays known
                return FeedbackReceipt(feedback_id, image_sha, image_uri, record_uri, duplicate=True)
            storage.write_if_absent(image_uri, item.image)
            created = storage.write_if_absent(record_uri, json.dumps(record, indent=2).encode("utf-8"))
        except storage.StorageError as error:
            raise FeedbackStoreError(f"the feedback could not be stored, please retry: {error}") from error
        return FeedbackReceipt(feedback_id, image_sha, image_uri, record_uri, duplicate=not created)

    def stats(self) -> dict[str, Any]:
        """Counts per label of pending and consumed images, the number of records in total, and the
        quarantined images: the same bytes pending under different labels, or found so by a training run."""
        per_label: dict[str, dict[str, int]] = {}
        try:
            pending = storage.list_files(storage.join(self.root, PENDING))
            for path in pending:
                per_label.setdefault(path.split("/", 1)[0], {"pending": 0, "consumed": 0})["pending"] += 1
            for path in storage.list_files(storage.join(self.root, CONSUMED)):
                parts = path.split("/")
                if len(parts) >= 3:
                    per_label.setdefault(parts[1], {"pending": 0, "consumed": 0})["consumed"] += 1
            total = sum(
                1 for p in storage.list_files(storage.join(self.root, RECORDS)) if p.endswith(".json")
            )
            quarantined = quarantined_images(self.root, pending=pending)
        except (storage.StorageError, ValueError, KeyError) as error:
            raise FeedbackStoreError(f"the feedback queue cannot be read: {error}") from error
        return {
            "labels": dict(sorted(per_label.items())),
            "pending": sum(c["pending"] for c in per_label.values()),
            "consumed": sum(c["consumed"] for c in per_label.values()),
            "total": total,
            "quarantined": len(quarantined),
            "quarantined_items": [{"sha256": sha, "labels": labels} for sha, labels in quarantined.items()][
                :MAX_LISTED_QUARANTINED
            ],
            "resolve": f"tfloop feedback resolve SHA256 --label LABEL --feedback-uri {self.root}",
        }


@dataclass(frozen=True)
class RecentImage:
    """An image this replica classified lately, kept so that feedback may cite it by id alone."""

    image: bytes
    extension: str


class RecentImages:
    """A thread-safe LRU of recently classified images by sha256, bounded by count and by total bytes.

    Only an optimisation for clients that post a prediction_id without the image to the replica that
    classified it: correctness never depends on it (any replica accepts the image sent with the id).
    """

    def __init__(self, *, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, RecentImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, image_sha256: str, entry: RecentImage) -> None:
        if self.max_items == 0 or len(entry.image) > self.max_bytes:
            return
        with self._lock:
            previous = self._items.pop(image_sha256, None)
            if previous is not None:
                self._bytes -= len(previous.image)
            self._items[image_sha256] = entry
            self._bytes += len(entry.image)
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted.image)

    def get(self, image_sha256: str) -> RecentImage | None:
        with self._lock:
            return self._items.get(image_sha256)
