"""The prediction log, shared by serving (writer) and the pipeline (``tfloop monitor``, shadow reports).

Below a feedback queue root: ``predictions/<model_name>/<YYYY-MM-DD>/<HHMMSS>-<writer>-<seq>.jsonl``, append
only (each batch is a new object, never rewritten). One JSON object per line, a
:class:`PredictionRecord`: the image's content hash, never the image or anything about the client.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from storage.core import join, list_dirs, list_files, read_bytes
from storage.layout import PREDICTIONS


@dataclass(frozen=True)
class ShadowAnswer:
    """What the candidate answered for a copy of a live request (never sent to the client)."""

    version: int
    label: str
    score: float
    agrees: bool


@dataclass(frozen=True)
class PredictionRecord:
    """One logged prediction: what was asked (hash, size, format), who answered, how confidently."""

    sha256: str
    model_name: str
    model_version: int
    top_k: list[tuple[str, float]]
    margin: float
    entropy: float
    time: str
    bytes: int
    format: str
    width: int
    height: int
    protocol: str = "rest"
    shadow: ShadowAnswer | None = None

    @property
    def label(self) -> str:
        """The top-1 label."""
        return self.top_k[0][0]

    @property
    def confidence(self) -> float:
        """The top-1 score."""
        return self.top_k[0][1]

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "sha256": self.sha256,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "top_k": [[label, round(score, 6)] for label, score in self.top_k],
            "margin": self.margin,
            "entropy": self.entropy,
            "time": self.time,
            "bytes": self.bytes,
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "protocol": self.protocol,
        }
        if self.shadow is not None:
            shadow = self.shadow
            data["shadow"] = {
                "version": shadow.version,
                "label": shadow.label,
                "score": shadow.score,
                "agrees": shadow.agrees,
            }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictionRecord:
        shadow = data.get("shadow")
        return cls(
            sha256=str(data["sha256"]),
            model_name=str(data["model_name"]),
            model_version=int(data["model_version"]),
            top_k=[(str(label), float(score)) for label, score in data["top_k"]],
            margin=float(data["margin"]),
            entropy=float(data["entropy"]),
            time=str(data["time"]),
            bytes=int(data["bytes"]),
            format=str(data["format"]),
            width=int(data["width"]),
            height=int(data["height"]),
            protocol=str(data.get("protocol", "rest")),
            shadow=ShadowAnswer(**shadow) if isinstance(shadow, dict) else None,
        )


@dataclass(frozen=True)
class Confidence:
    """Top-1 score, margin (top-1 minus top-2) and entropy (nats) of a probability vector."""

    top1: float
    margin: float
    entropy: float = field(default=0.0)


def confidence_of(probabilities: Sequence[float]) -> Confidence:
    """How sure a probability vector is: top-1, margin to the second, entropy."""
    ordered = sorted(probabilities, reverse=True)
    top1 = ordered[0] if ordered else 0.0
    second = ordered[1] if len(ordered) > 1 else 0.0
    entropy = -sum(p * math.log(p) for p in probabilities if p > 0.0)
    return Confidence(top1=float(top1), margin=float(top1 - second), entropy=float(entropy))


def batch_name(now: datetime, *, writer: str, sequence: int) -> str:
    """The name of one log batch below ``predictions/<model>/``: ``<date>/<time>-<writer>-<seq>.jsonl``."""
    return f"{now:%Y-%m-%d}/{now:%H%M%S}-{writer}-{sequence:06d}.jsonl"


def model_log_uri(root: str, model_name: str) -> str:
    """The folder of ``model_name``'s prediction log below a feedback queue ``root``."""
    return join(root, PREDICTIONS, model_name)


def read_predictions(
    root: str, model_name: str, *, since: datetime | None = None, until: datetime | None = None
) -> Iterator[PredictionRecord]:
    """Every logged prediction of ``model_name`` with ``since <= time < until`` (both optional), batch by
    batch in name order. Days before ``since`` are not read."""
    folder = model_log_uri(root, model_name)
    first_day = f"{since - timedelta(days=1):%Y-%m-%d}" if since is not None else ""
    for day in sorted(list_dirs(folder)):
        if day < first_day:
            continue
        for name in sorted(list_files(join(folder, day))):
            if not name.endswith(".jsonl"):
                continue
            for line in read_bytes(join(folder, day, name)).decode("utf-8").splitlines():
                if not line.strip():
                    continue
                record = PredictionRecord.from_dict(json.loads(line))
                stamp = datetime.fromisoformat(record.time)
                if stamp.tzinfo is None:
                    stamp = stamp.replace(tzinfo=UTC)
                if (since is None or stamp >= since) and (until is None or stamp < until):
                    yield record
