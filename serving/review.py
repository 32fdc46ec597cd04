"""The review queue: live predictions the model was least sure of, kept with their image until a person
labels them (``GET /review``, the page's "help the model" view, then ``/feedback``).

Below the feedback queue root (local folder or ``gs://``): ``review/items/<margin>-<sha256>.json`` (the
prediction, with a signed ``prediction_id``; names sort least confident first) and
``review/images/<sha256>.<ext>`` (written before its item, so a listed item always has its image). The
queue is bounded (a less confident prediction takes the place of the most confident one) and items expire.
Every replica writes to the same queue; the bound holds to within the items replicas add at the same time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import storage
from storage.layout import REVIEW

logger = logging.getLogger(__name__)

ITEMS = "items"
IMAGES = "images"


@dataclass(frozen=True)
class ReviewItem:
    """One prediction waiting for a label."""

    sha256: str
    prediction_id: str
    model_name: str
    model_version: int
    top_k: list[tuple[str, float]]
    margin: float
    entropy: float
    time: float
    extension: str

    @property
    def name(self) -> str:
        """The item's file name: sorts by margin, least confident first."""
        return f"{self.margin:.6f}-{self.sha256}.json"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> ReviewItem:
        raw = json.loads(data)
        return cls(
            sha256=str(raw["sha256"]),
            prediction_id=str(raw["prediction_id"]),
            model_name=str(raw["model_name"]),
            model_version=int(raw["model_version"]),
            top_k=[(str(label), float(score)) for label, score in raw["top_k"]],
            margin=float(raw["margin"]),
            entropy=float(raw["entropy"]),
            time=float(raw["time"]),
            extension=str(raw["extension"]),
        )

    def answer(self) -> dict[str, object]:
        """The item as ``GET /review`` lists it."""
        return {
            "prediction_id": self.prediction_id,
            "sha256": self.sha256,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "top_k": [{"label": label, "score": score} for label, score in self.top_k],
            "margin": self.margin,
            "entropy": self.entropy,
            "predicted_at": datetime.fromtimestamp(self.time, UTC).isoformat(),
            "image_url": f"review/{self.sha256}/image",
        }


def _sha_of(name: str) -> str:
    return name.rsplit("-", 1)[-1].removesuffix(".json")


def _margin_of(name: str) -> float:
    try:
        return float(name.split("-", 1)[0])
    except ValueError:
        return 1.0


class ReviewQueue:
    """The review queue below ``root``; methods block (call them in a thread) and raise StorageError."""

    def __init__(
        self, root: str, *, max_items: int, ttl_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.root = root
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._clock = clock

    def _item_uri(self, name: str) -> str:
        return storage.join(self.root, REVIEW, ITEMS, name)

    def _image_uri(self, sha256: str, extension: str) -> str:
        return storage.join(self.root, REVIEW, IMAGES, f"{sha256}.{extension}")

    def names(self) -> list[str]:
        """Item names, least confident first."""
        return [n for n in storage.list_files(storage.join(self.root, REVIEW, ITEMS)) if n.endswith(".json")]

    def _read(self, name: str) -> ReviewItem | None:
        try:
            return ReviewItem.from_json(storage.read_bytes(self._item_uri(name)))
        except storage.StorageError:
            return None  # taken by a reviewer (or expired) since the listing
        except (ValueError, KeyError, TypeError):
            logger.warning("review item %s is unreadable; skipped", name)
            return None

    def _drop(self, item: ReviewItem) -> None:
        storage.delete(self._item_uri(item.name))
        storage.delete(self._image_uri(item.sha256, item.extension))

    def add(self, candidates: Sequence[tuple[ReviewItem, bytes]], *, expire: bool = True) -> dict[str, int]:
        """Add the candidates (item, image) that belong in the bounded queue; with ``expire``, expired items
        go first (that reads every item). Counts of ``added``, ``evicted`` and ``expired``."""
        counts = {"added": 0, "evicted": 0, "expired": 0}
        if self.max_items == 0:
            return counts
        names = self.names()
        if expire:
            counts["expired"] = self._expire(names)
        held = {_sha_of(name): name for name in names}
        for item, image in sorted(candidates, key=lambda pair: pair[0].margin):
            if item.sha256 in held:
                continue
            if len(held) >= self.max_items:
                worst = max(held.values(), key=_margin_of)
                if _margin_of(worst) <= item.margin:
                    continue
                evicted = self._read(worst)
                if evicted is not None:
                    self._drop(evicted)
                del held[_sha_of(worst)]
                counts["evicted"] += 1
            storage.write_if_absent(self._image_uri(item.sha256, item.extension), image)
            storage.write_if_absent(self._item_uri(item.name), item.to_json())
            held[item.sha256] = item.name
            counts["added"] += 1
        return counts

    def _expire(self, names: list[str]) -> int:
        """Remove expired items from the store and from ``names``; how many."""
        expired = 0
        for name in list(names):
            item = self._read(name)
            if item is not None and self._clock() - item.time > self.ttl_s:
                self._drop(item)
                names.remove(name)
                expired += 1
        return expired

    def items(self, *, limit: int) -> tuple[list[ReviewItem], int]:
        """Up to ``limit`` unexpired items, least confident first, and how many the queue holds."""
        names = self.names()
        chosen: list[ReviewItem] = []
        for name in names:
            if len(chosen) >= limit:
                break
            item = self._read(name)
            if item is not None and self._clock() - item.time <= self.ttl_s:
                chosen.append(item)
        return chosen, len(names)

    def find(self, sha256: str) -> ReviewItem | None:
        """The item of an image, if it is in the queue."""
        for name in self.names():
            if _sha_of(name) == sha256:
                return self._read(name)
        return None

    def image(self, sha256: str) -> tuple[bytes, str] | None:
        """The image of a queued item and its extension, or None."""
        item = self.find(sha256)
        if item is None:
            return None
        try:
            return storage.read_bytes(self._image_uri(sha256, item.extension)), item.extension
        except storage.StorageError:
            return None

    def remove(self, sha256: str) -> bool:
        """Take an image's item out of the queue (it was labelled); whether it was there."""
        item = self.find(sha256)
        if item is None:
            return False
        self._drop(item)
        return True
