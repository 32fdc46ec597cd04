"""The versioned model layout shared by export (writer) and serving (reader): ``<base>/<name>/<int>/``.

A version folder is complete when ``saved_model.pb`` is present: the exporter writes it last, so a reader
that sees it can load the version. Anything else below ``<base>/<name>/`` (staging folders, partial
uploads, non-integer names) is invisible to readers.

Which version is **live** (answers unpinned requests) is one file beside the versions,
``<base>/<name>/live.json`` (:class:`LivePointer`), written by promotion and read by every serving replica.
Without it the newest complete version is live, as TF Serving serves the highest version. The newest
complete version above the live one is the **candidate** (TF Serving's version labels ``live`` and
``candidate``): loaded for pinned requests and smoke tests, never for unpinned ones.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from storage.core import StorageError, exists, join, list_dirs, read_text, write_text

COMPLETE_MARKER = "saved_model.pb"
METADATA_FILE = "tfloop.json"
REFERENCE_FILE = "reference.json"  # the training run's drift reference (training.drift.DriftReference)
LIVE_POINTER_FILE = "live.json"
LIVE_LABEL = "live"
CANDIDATE_LABEL = "candidate"


def model_uri(base: str, name: str) -> str:
    """``<base>/<name>``."""
    return join(base, name)


def version_uri(base: str, name: str, version: int) -> str:
    """``<base>/<name>/<version>``."""
    return join(base, name, str(version))


def numbered_versions(base: str, name: str) -> list[int]:
    """Every integer-named folder below ``<base>/<name>``, complete or not (ascending)."""
    return sorted(int(d) for d in list_dirs(model_uri(base, name)) if d.isdigit())


def is_complete(base: str, name: str, version: int) -> bool:
    """True when the version's ``saved_model.pb`` exists (it is written last)."""
    return exists(join(version_uri(base, name, version), COMPLETE_MARKER))


def complete_versions(base: str, name: str) -> list[int]:
    """The versions a reader may load (ascending)."""
    return [v for v in numbered_versions(base, name) if is_complete(base, name, v)]


def latest_version(base: str, name: str) -> int | None:
    """The highest complete version, or None when there is none."""
    versions = complete_versions(base, name)
    return versions[-1] if versions else None


@dataclass(frozen=True, kw_only=True)
class LivePointer:
    """The content of ``<base>/<name>/live.json``: the live version and who made it live, when."""

    version: int
    previous: int | None = None
    promoted_at: str = ""
    promoted_by: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def live_pointer_uri(base: str, name: str) -> str:
    """``<base>/<name>/live.json``."""
    return join(model_uri(base, name), LIVE_POINTER_FILE)


def read_live_pointer(base: str, name: str) -> LivePointer | None:
    """The promoted live version, or None when nothing was promoted yet. A malformed file is an error."""
    uri = live_pointer_uri(base, name)
    if not exists(uri):
        return None
    text = read_text(uri)
    try:
        data = json.loads(text)
        return LivePointer(
            version=int(data["version"]),
            previous=int(data["previous"]) if data.get("previous") is not None else None,
            promoted_at=str(data.get("promoted_at", "")),
            promoted_by=str(data.get("promoted_by", "")),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise StorageError(
            f"{uri} is not a live pointer ({error}); promote a version again with "
            "`tfloop promote VERSION --model-name NAME --model-base BASE`"
        ) from error


def write_live_pointer(base: str, name: str, version: int, *, promoted_by: str = "") -> LivePointer:
    """Make ``version`` live (one atomic write); refuses a version that is not complete."""
    if not is_complete(base, name, version):
        raise StorageError(
            f"version {version} of {name!r} is not complete under {model_uri(base, name)} "
            f"(no {COMPLETE_MARKER}); complete versions: {complete_versions(base, name) or 'none'}"
        )
    current = read_live_pointer(base, name)
    pointer = LivePointer(
        version=version,
        previous=current.version if current is not None else latest_version_below(base, name, version),
        promoted_at=datetime.now(UTC).isoformat(timespec="seconds"),
        promoted_by=promoted_by,
    )
    write_text(live_pointer_uri(base, name), pointer.to_json())
    return pointer


def latest_version_below(base: str, name: str, version: int) -> int | None:
    """The highest complete version lower than ``version``."""
    lower = [v for v in complete_versions(base, name) if v < version]
    return lower[-1] if lower else None


def live_version(base: str, name: str) -> int | None:
    """The version unpinned requests get: the pointer's when it names a complete version, else the newest."""
    pointer = read_live_pointer(base, name)
    if pointer is not None and is_complete(base, name, pointer.version):
        return pointer.version
    return latest_version(base, name)


def candidate_version(base: str, name: str, *, live: int | None) -> int | None:
    """The newest complete version above ``live`` (published, not promoted yet), or None."""
    newest = latest_version(base, name)
    if newest is None or (live is not None and newest <= live):
        return None
    return newest
