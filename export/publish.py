"""Publish a SavedModel folder as the next integer version ``<base>/<name>/<version>/`` (local or ``gs://``).

Rules (docs/contracts.md, storage/versions.py):

- The next version is one above the highest complete version, skipping every number that an export has
  already claimed. Numbers are never reused: a number whose export crashed stays burnt.
- Claiming works on every backend without conditional writes: each exporter writes its own marker
  ``<base>/<name>/.claims/<N>/<owner>.json`` (unique name), then lists ``.claims/<N>/``; it owns N only
  when its marker is the only one there. Two exporters racing for N can never both own it (each lists
  after its own write, so the later lister sees the earlier marker); the loser tries N+1.
- Readers never see a partial version. Locally the files are staged in ``<base>/<name>/.staging-...`` and
  renamed onto the version name in one ``os.rename``; on GCS they are uploaded with ``saved_model.pb``
  last (a version without it is incomplete, and readers skip it).
- A partial version (a numbered folder without ``saved_model.pb``) whose claim holders are gone (the
  process died on this host, or the claim is older than ``stale_after_s``) is deleted by the next export
  and its number stays burnt. A partial that nobody claimed (not written by tfloop) is claimed by the
  next export, deleted, and that export publishes under its number.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import storage
from export.errors import ExportError, PublishError
from export.savedmodel import METADATA_FILE, read_metadata, write_metadata
from storage import versions

CLAIMS_DIR = ".claims"
STAGING_PREFIX = ".staging-"
DEFAULT_STALE_AFTER_S = 6 * 3600.0
MAX_ATTEMPTS = 100


@dataclass(frozen=True)
class PublishedVersion:
    """Where a SavedModel was published."""

    model_name: str
    version: int
    uri: str


@dataclass(frozen=True)
class Claim:
    """Who claimed a version number, and when."""

    owner: str
    host: str
    pid: int
    created_at: float

    def is_stale(self, *, stale_after_s: float, now: float | None = None) -> bool:
        """True when the claiming process is gone (same host) or the claim is older than the limit."""
        age = (now if now is not None else time.time()) - self.created_at
        if age > stale_after_s:
            return True
        return self.host == socket.gethostname() and not _process_alive(self.pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claims_uri(base: str, model_name: str, version: int) -> str:
    return storage.join(versions.model_uri(base, model_name), CLAIMS_DIR, str(version))


def read_claims(base: str, model_name: str, version: int) -> list[Claim]:
    """Every claim written for ``version`` (unreadable markers count as fresh claims by nobody alive)."""
    claims = []
    prefix = _claims_uri(base, model_name, version)
    for name in storage.list_files(prefix):
        try:
            data = json.loads(storage.read_text(storage.join(prefix, name)))
            claims.append(
                Claim(str(data["owner"]), str(data["host"]), int(data["pid"]), float(data["created_at"]))
            )
        except (storage.StorageError, ValueError, KeyError, TypeError):
            claims.append(Claim(owner=name, host="", pid=0, created_at=time.time()))
    return claims


def try_claim(base: str, model_name: str, version: int, *, owner: str) -> bool:
    """Write this owner's marker for ``version``; True when it is the only marker (the number is ours)."""
    marker = storage.join(_claims_uri(base, model_name, version), f"{owner}.json")
    claim = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "created_at": time.time()}
    storage.write_if_absent(marker, json.dumps(claim).encode("utf-8"))
    return storage.list_files(_claims_uri(base, model_name, version)) == [f"{owner}.json"]


def _version_has_files(base: str, model_name: str, version: int) -> bool:
    return bool(storage.list_files(versions.version_uri(base, model_name, version)))


def clean_partial_versions(
    base: str,
    model_name: str,
    *,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    owner: str | None = None,
) -> list[int]:
    """Delete partial versions nobody is still writing (and stale local staging folders).

    Returns the version numbers whose folders were deleted. A partial that no exporter claimed is claimed
    first, as ``owner`` (so no exporter can start writing into it while it is deleted, and the exporter
    that cleaned it may publish there); one whose claim holders are alive is left alone.
    """
    removed = []
    for version in versions.numbered_versions(base, model_name):
        if versions.is_complete(base, model_name, version):
            continue
        claims = read_claims(base, model_name, version)
        if claims:
            if not all(claim.is_stale(stale_after_s=stale_after_s) for claim in claims):
                continue
        elif not try_claim(base, model_name, version, owner=owner or f"cleanup-{uuid.uuid4().hex}"):
            continue
        try:
            storage.delete(versions.version_uri(base, model_name, version), recursive=True)
        except storage.StorageError:
            continue  # best effort: another export may be deleting the same leftover; the next one retries
        removed.append(version)
    if not storage.is_gcs(base):
        _clean_local_staging(Path(storage.local_path(versions.model_uri(base, model_name))), stale_after_s)
    return removed


def _clean_local_staging(model_dir: Path, stale_after_s: float) -> None:
    if not model_dir.is_dir():
        return
    for entry in model_dir.iterdir():
        if not entry.name.startswith(STAGING_PREFIX) or not entry.is_dir():
            continue
        host, _, rest = entry.name[len(STAGING_PREFIX) :].rpartition("@")
        pid_text = rest.split("-", 1)[0]
        try:
            age = time.time() - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        dead_here = host == socket.gethostname() and pid_text.isdigit() and not _process_alive(int(pid_text))
        if dead_here or age > stale_after_s:
            shutil.rmtree(entry, ignore_errors=True)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextlib.contextmanager
def _staged_copy(export_dir: Path, base: str, model_name: str, owner: str) -> Iterator[Path]:
    """A private copy of the export (hard links where possible) whose tfloop.json may be rewritten."""
    if storage.is_gcs(base):
        with tempfile.TemporaryDirectory(prefix="tfloop-publish-") as scratch:
            stage = Path(scratch) / "version"
            shutil.copytree(export_dir, stage, copy_function=_link_or_copy)
            yield stage
        return
    model_dir = storage.local_path(versions.model_uri(base, model_name))
    model_dir.mkdir(parents=True, exist_ok=True)
    stage = model_dir / f"{STAGING_PREFIX}{socket.gethostname()}@{os.getpid()}-{owner}"
    try:
        # A real copy, not links: the published version must not change if the source folder is reused.
        shutil.copytree(export_dir, stage)
        os.utime(stage)  # copytree copies the source's old mtime; the age check needs the staging time
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish_staged(stage: Path, base: str, model_name: str, version: int) -> bool:
    """Move or upload the stage to ``version``. False when a foreign folder already holds that number."""
    target = versions.version_uri(base, model_name, version)
    if storage.is_gcs(base):
        try:
            storage.upload_tree(stage, target, last=(versions.COMPLETE_MARKER,))
        except storage.StorageError:
            with contextlib.suppress(storage.StorageError):
                storage.delete(target, recursive=True)
            raise
        return True
    try:
        # Renaming onto an existing empty folder succeeds; the claim already guarantees nobody else
        # writes this number, and an empty folder carries nothing a reader could load.
        os.rename(stage, storage.local_path(target))
    except OSError as error:
        if storage.local_path(target).exists():
            return False
        raise PublishError(f"cannot move the staged model to {target}: {error.strerror or error}") from error
    return True


def find_published_run(base: str, model_name: str, run_id: str) -> PublishedVersion | None:
    """The complete version whose ``tfloop.json`` ``run_id`` is ``run_id`` (the newest such), or None.

    Versions without a ``tfloop.json``, or with a malformed one, were not published by a tfloop export and
    are skipped; a storage error propagates (skipping a version that cannot be read now could publish the
    run twice).
    """
    for version in reversed(versions.complete_versions(base, model_name)):
        uri = versions.version_uri(base, model_name, version)
        if not storage.exists(storage.join(uri, METADATA_FILE)):
            continue
        try:
            metadata = read_metadata(uri)
        except ExportError:
            continue
        if metadata.get("run_id") == run_id:
            return PublishedVersion(model_name=model_name, version=version, uri=uri)
    return None


def publish_version(
    export_dir: str | os.PathLike[str],
    *,
    base: str,
    model_name: str,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> PublishedVersion:
    """Publish a local SavedModel folder as the next version of ``model_name`` below ``base``.

    The published ``tfloop.json`` gets the version number (the source folder is left as it is). Never
    overwrites an existing version; raises :class:`PublishError` when no number could be claimed or the
    upload failed (a partial upload is removed, and the next export cleans up what a crash leaves).
    """
    source = Path(export_dir)
    if not (source / versions.COMPLETE_MARKER).is_file():
        raise PublishError(
            f"{source} holds no saved_model.pb; publish a folder written by "
            "export.savedmodel.export_saved_model"
        )
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise PublishError(f"invalid model name {model_name!r}: use letters, digits, '-' or '_'")
    metadata = read_metadata(str(source)) if (source / METADATA_FILE).is_file() else {}
    owner = uuid.uuid4().hex
    clean_partial_versions(base, model_name, stale_after_s=stale_after_s, owner=owner)
    with _staged_copy(source, base, model_name, owner) as stage:
        candidate = (versions.latest_version(base, model_name) or 0) + 1
        for _ in range(MAX_ATTEMPTS):
            claim_owners = [claim.owner for claim in read_claims(base, model_name, candidate)]
            owned = claim_owners == [owner]  # a partial this export cleaned up is its own
            if (claim_owners and not owned) or _version_has_files(base, model_name, candidate):
                candidate += 1
                continue
            if not owned and not try_claim(base, model_name, candidate, owner=owner):
                candidate += 1
                continue
            write_metadata(stage, {**metadata, "model_name": model_name, "version": candidate})
            if _publish_staged(stage, base, model_name, candidate):
                return PublishedVersion(
                    model_name=model_name,
                    version=candidate,
                    uri=versions.version_uri(base, model_name, candidate),
                )
            candidate += 1
    raise PublishError(
        f"could not claim a free version number for {model_name} below {base} after {MAX_ATTEMPTS} tries; "
        "check for many concurrent exports or stray folders there"
    )
