"""The feedback queue as a training run sees it: the dataset roots of a run (base dataset, corrections
already used, corrections pending), consuming the pending corrections a run trained on (moved under
``consumed/<run>/``, never deleted), and the quarantine: images a run found under different labels stay
pending, marked under ``quarantine/``, until a person resolves them (:func:`resolve_quarantined`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import storage
from storage.layout import CONSUMED, PENDING, QUARANTINE, REJECTED, RESOLUTIONS
from storage.quarantine import quarantined_images, queue_file_sha256

FEEDBACK_EVENT = "tfloop.feedback.received"


@dataclass(frozen=True)
class DatasetRoots:
    """Where a training run reads from, and which pending feedback files it will consume afterwards."""

    base: str
    feedback_roots: tuple[str, ...]
    pending_root: str
    pending_files: tuple[str, ...]
    resolutions: Mapping[str, str] = field(default_factory=dict)

    @property
    def all(self) -> list[str]:
        """Every root to scan: the base dataset first, then the feedback roots."""
        return [self.base, *self.feedback_roots]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quarantined_hashes(feedback_root: str) -> set[str]:
    """The sha256 of every image marked quarantined under ``<feedback_root>/quarantine/``."""
    marked = storage.list_files(storage.join(feedback_root, QUARANTINE))
    return {name.split(".", 1)[0] for name in marked if name.endswith(".json")}


def pending_files(feedback_root: str, *, include_quarantined: bool = False) -> list[str]:
    """Relative paths ``<label>/<file>`` of the images waiting in ``<feedback_root>/pending/`` (without
    the quarantined ones: they wait for a person, not for a run)."""
    names = [name for name in storage.list_files(storage.join(feedback_root, PENDING)) if "/" in name]
    if include_quarantined:
        return names
    held = quarantined_hashes(feedback_root)
    return [name for name in names if queue_file_sha256(name) not in held]


def read_resolutions(feedback_root: str) -> dict[str, str]:
    """The label a person chose for each resolved image, by sha256 (``resolutions/<sha256>.json``)."""
    chosen: dict[str, str] = {}
    folder = storage.join(feedback_root, RESOLUTIONS)
    for name in storage.list_files(folder):
        if name.endswith(".json"):
            record = json.loads(storage.read_bytes(storage.join(folder, name)))
            chosen[str(record["sha256"])] = str(record["label"])
    return chosen


def gather_roots(*, data_uri: str, feedback_root: str, include_consumed: bool = True) -> DatasetRoots:
    """The roots of a training run: the base dataset, earlier consumed corrections and pending ones.

    Corrections consumed by earlier runs stay training data (``include_consumed``), so a correction keeps
    counting after the run that first used it. The pending files are listed now: feedback that arrives
    while the run trains stays pending for the next run.
    """
    if not storage.exists(data_uri):
        raise storage.TfloopError(
            f"the base dataset {data_uri} is empty or missing; set TFLOOP_DATA_URI (or pass data_uri) to a "
            "folder or gs:// prefix laid out <label>/<image>, or run `tfloop data make-demo` to make one"
        )
    roots: list[str] = []
    if include_consumed:
        consumed = storage.join(feedback_root, CONSUMED)
        roots += [storage.join(consumed, run) for run in storage.list_dirs(consumed)]
    pending_root = storage.join(feedback_root, PENDING)
    roots.append(pending_root)
    return DatasetRoots(
        base=data_uri,
        feedback_roots=tuple(roots),
        pending_root=pending_root,
        pending_files=tuple(pending_files(feedback_root)),
        resolutions=read_resolutions(feedback_root),
    )


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def consumed_folder_name(run_id: str) -> str:
    """A folder name for ``consumed/<run>/`` made from a run id (no path separators, never empty)."""
    name = _UNSAFE.sub("-", run_id).strip("-.")
    if not name:
        raise storage.TfloopError(f"run id {run_id!r} cannot name a folder; pass the MLflow run id")
    return name


@dataclass(frozen=True)
class ConsumeResult:
    """What :func:`consume_feedback` moved, and where to."""

    destination: str
    moved: int
    already_moved: int
    missing: int
    quarantined: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def consume_feedback(
    *, feedback_root: str, run_id: str, files: Sequence[str], quarantined: Sequence[str] = ()
) -> ConsumeResult:
    """Move the pending ``files`` (``<label>/<name>``) to ``consumed/<run>/<label>/<name>``; never delete.
    Images whose sha256 is in ``quarantined`` stay pending (the run did not train on them).

    Idempotent: a file already at its destination (a re-run after a crash) counts as ``already_moved``.
    """
    destination = storage.join(feedback_root, CONSUMED, consumed_folder_name(run_id))
    held = set(quarantined)
    moved = already = missing = kept = 0
    for name in files:
        if name.startswith("/") or ".." in name.split("/"):
            raise storage.TfloopError(f"feedback file name {name!r} is not a relative <label>/<file> path")
        if queue_file_sha256(name) in held:
            kept += 1
            continue
        source = storage.join(feedback_root, PENDING, name)
        target = storage.join(destination, name)
        if storage.exists(source):
            storage.move(source, target)
            moved += 1
        elif storage.exists(target):
            already += 1
        else:
            missing += 1
    return ConsumeResult(
        destination=destination, moved=moved, already_moved=already, missing=missing, quarantined=kept
    )


def feedback_threshold_reached(*, feedback_root: str, threshold: int) -> bool:
    """The demo's stand-in for the server-side trigger: at least ``threshold`` corrections pending."""
    return len(pending_files(feedback_root)) >= threshold


def mark_quarantined(*, feedback_root: str, conflicts: Mapping[str, Sequence[str]]) -> int:
    """Mark each image of ``conflicts`` (sha256 -> its labels, as a run found them) quarantined, and clear
    the marks of images that no longer conflict; the number of marks written."""
    folder = storage.join(feedback_root, QUARANTINE)
    for name in storage.list_files(folder):
        if name.endswith(".json") and name.split(".", 1)[0] not in conflicts:
            storage.delete(storage.join(folder, name))
    now = datetime.now(UTC).isoformat()
    written = 0
    for sha256, labels in conflicts.items():
        uri = storage.join(folder, f"{sha256}.json")
        if storage.exists(uri) and json.loads(storage.read_bytes(uri)).get("labels") == sorted(labels):
            continue
        marker = {"sha256": sha256, "labels": sorted(labels), "marked_at": now}
        storage.write_bytes(uri, json.dumps(marker, indent=2).encode())
        written += 1
    return written


@dataclass(frozen=True)
class Resolution:
    """What :func:`resolve_quarantined` did: the label kept, the copies moved to ``rejected/``, and whether
    the image was queued under the chosen label (when no pending copy had it)."""

    sha256: str
    label: str
    rejected: list[str]
    queued: str | None
    record: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SHA256 = re.compile(r"[0-9a-f]{64}")
_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ .+-]{0,99}")


def resolve_quarantined(*, feedback_root: str, sha256: str, label: str) -> Resolution:
    """Settle a quarantined image: ``label`` is its label from now on, in every later run.

    Pending copies under other labels move to ``rejected/<label>/`` (never deleted); when no pending copy
    has ``label``, one is queued under it; ``resolutions/<sha256>.json`` records the choice, which also
    overrides a base-dataset copy under another label; the quarantine mark goes.
    """
    if not _SHA256.fullmatch(sha256):
        raise storage.TfloopError(
            f"{sha256!r} is not a sha256 (64 lowercase hex digits); copy it from /feedback/stats "
            "'quarantined_items' or the run's data report"
        )
    if not _LABEL.fullmatch(label) or label.endswith((".", " ")):
        raise storage.TfloopError(
            f"label {label!r} cannot name a folder: use 1-100 letters, digits, space and _ . + -"
        )
    copies = [
        name
        for name in pending_files(feedback_root, include_quarantined=True)
        if queue_file_sha256(name) == sha256
    ]
    marker_uri = storage.join(feedback_root, QUARANTINE, f"{sha256}.json")
    if sha256 not in quarantined_images(feedback_root):
        raise storage.TfloopError(
            f"image {sha256[:12]}... is not quarantined in {feedback_root}; "
            "`tfloop feedback quarantined` lists the ones that are"
        )
    rejected: list[str] = []
    queued = None
    if copies and not any(name.split("/", 1)[0] == label for name in copies):
        extension = copies[0].rsplit(".", 1)[-1]
        queued = f"{label}/{sha256}.{extension}"
        data = storage.read_bytes(storage.join(feedback_root, PENDING, copies[0]))
        storage.write_if_absent(storage.join(feedback_root, PENDING, queued), data)
    for name in copies:
        if name.split("/", 1)[0] != label:
            storage.move(
                storage.join(feedback_root, PENDING, name), storage.join(feedback_root, REJECTED, name)
            )
            rejected.append(name)
    record = {
        "sha256": sha256,
        "label": label,
        "rejected": rejected,
        "resolved_at": datetime.now(UTC).isoformat(),
    }
    record_uri = storage.join(feedback_root, RESOLUTIONS, f"{sha256}.json")
    storage.write_bytes(record_uri, json.dumps(record, indent=2).encode())
    if storage.exists(marker_uri):
        storage.delete(marker_uri)
    return Resolution(sha256=sha256, label=label, rejected=rejected, queued=queued, record=record_uri)
