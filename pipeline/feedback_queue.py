"""The feedback queue as a training run sees it: the dataset roots of a run (base dataset, corrections
already used, corrections pending), and consuming the pending corrections a run trained on (moved under
``consumed/<run>/``, never deleted).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import storage
from storage.layout import CONSUMED, PENDING

FEEDBACK_EVENT = "tfloop.feedback.received"


@dataclass(frozen=True)
class DatasetRoots:
    """Where a training run reads from, and which pending feedback files it will consume afterwards."""

    base: str
    feedback_roots: tuple[str, ...]
    pending_root: str
    pending_files: tuple[str, ...]

    @property
    def all(self) -> list[str]:
        """Every root to scan: the base dataset first, then the feedback roots."""
        return [self.base, *self.feedback_roots]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pending_files(feedback_root: str) -> list[str]:
    """Relative paths ``<label>/<file>`` of the images waiting in ``<feedback_root>/pending/``."""
    return [name for name in storage.list_files(storage.join(feedback_root, PENDING)) if "/" in name]


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def consume_feedback(*, feedback_root: str, run_id: str, files: Sequence[str]) -> ConsumeResult:
    """Move the pending ``files`` (``<label>/<name>``) to ``consumed/<run>/<label>/<name>``; never delete.

    Idempotent: a file already at its destination (a re-run after a crash) counts as ``already_moved``.
    """
    destination = storage.join(feedback_root, CONSUMED, consumed_folder_name(run_id))
    moved = already = missing = 0
    for name in files:
        if name.startswith("/") or ".." in name.split("/"):
            raise storage.TfloopError(f"feedback file name {name!r} is not a relative <label>/<file> path")
        source = storage.join(feedback_root, PENDING, name)
        target = storage.join(destination, name)
        if storage.exists(source):
            storage.move(source, target)
            moved += 1
        elif storage.exists(target):
            already += 1
        else:
            missing += 1
    return ConsumeResult(destination=destination, moved=moved, already_moved=already, missing=missing)


def feedback_threshold_reached(*, feedback_root: str, threshold: int) -> bool:
    """The demo's stand-in for the server-side trigger: at least ``threshold`` corrections pending."""
    return len(pending_files(feedback_root)) >= threshold
