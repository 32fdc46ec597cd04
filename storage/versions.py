"""The versioned model layout shared by export (writer) and serving (reader): ``<base>/<name>/<int>/``.

A version folder is complete when ``saved_model.pb`` is present: the exporter writes it last, so a reader
that sees it can load the version. Anything else below ``<base>/<name>/`` (staging folders, partial
uploads, non-integer names) is invisible to readers.
"""

from __future__ import annotations

from storage.core import exists, join, list_dirs

COMPLETE_MARKER = "saved_model.pb"
METADATA_FILE = "tfloop.json"


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
