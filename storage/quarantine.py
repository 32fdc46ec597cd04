"""The quarantined images of a feedback queue, as serving's ``/feedback/stats`` and ``tfloop feedback``
both list them: the same bytes pending under different labels, and the images a training run marked
(``quarantine/<sha256>.json``, which may involve the base dataset)."""

from __future__ import annotations

import json

from storage.core import join, list_files, read_bytes
from storage.layout import PENDING, QUARANTINE


def queue_file_sha256(name: str) -> str:
    """The content hash a queue file is named by (``<label>/<sha256>.<ext>``)."""
    return name.rsplit("/", 1)[-1].split(".", 1)[0]


def quarantined_images(root: str, *, pending: list[str] | None = None) -> dict[str, list[str]]:
    """sha256 -> the labels it is found under, for every quarantined image below the queue ``root``.

    ``pending`` is the listing of ``<root>/pending`` when the caller already has it.
    """
    labels_of: dict[str, set[str]] = {}
    for name in pending if pending is not None else list_files(join(root, PENDING)):
        if "/" in name:
            labels_of.setdefault(queue_file_sha256(name), set()).add(name.split("/", 1)[0])
    found = {sha: labels for sha, labels in labels_of.items() if len(labels) > 1}
    for name in list_files(join(root, QUARANTINE)):
        if name.endswith(".json"):
            marker = json.loads(read_bytes(join(root, QUARANTINE, name)))
            found.setdefault(str(marker["sha256"]), set()).update(marker.get("labels", []))
    return {sha: sorted(labels) for sha, labels in sorted(found.items())}
