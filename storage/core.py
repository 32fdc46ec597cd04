"""Implementation of the storage API: local filesystem and Google Cloud Storage behind one set of functions.

Writes are atomic for readers on both backends: local files are written to a temporary name and renamed,
GCS objects appear whole or not at all. ``write_if_absent`` never overwrites: locally it links a finished
temporary file into place (``link`` fails if the name exists); on GCS it checks first and uploads with
``if_generation_match=0`` so that a racing writer loses on a real bucket. Local writes are durable when
they return: the file and every folder entry they created (the name, new parent folders) are fsynced.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.cloud.storage import Blob, Bucket, Client

GCS_SCHEME = "gs://"
FILE_SCHEME = "file://"
GCS_TIMEOUT_SECONDS = float(os.environ.get("TFLOOP_GCS_TIMEOUT", "30"))


class TfloopError(Exception):
    """Base of every error tfloop reports to a user as a message (never a traceback)."""


class StorageError(TfloopError):
    """A storage operation failed; the message says which URI, what happened and how to fix it."""


def is_gcs(uri: str) -> bool:
    """True for ``gs://`` URIs."""
    return str(uri).startswith(GCS_SCHEME)


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The filesystem path of a local path or ``file://`` URI."""
    text = os.fspath(uri)
    if is_gcs(text):
        raise StorageError(f"{text} is a GCS URI, not a local path")
    if text.startswith(FILE_SCHEME):
        text = text[len(FILE_SCHEME) :]
    return Path(text)


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """Join path segments onto a URI (``/`` separated on every backend)."""
    text = os.fspath(uri)
    if is_gcs(text):
        cleaned = [text.rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))]
        return "/".join(cleaned)
    return str(local_path(text).joinpath(*parts))


def _split_gcs(uri: str) -> tuple[str, str]:
    rest = uri[len(GCS_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: a GCS URI needs a bucket name, e.g. gs://my-bucket/path")
    return bucket, key.strip("/")


@functools.cache
def _client_for(emulator_host: str | None, project: str | None) -> Client:
    from google.cloud import storage as gcs

    if emulator_host:
        from google.auth.credentials import AnonymousCredentials

        return gcs.Client(project=project or "tfloop-local", credentials=AnonymousCredentials())
    try:
        return gcs.Client(project=project)
    except Exception as error:  # google.auth raises several unrelated types for missing credentials
        raise StorageError(
            f"cannot create a Google Cloud Storage client: {error}. Run "
            "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a "
            "service-account key file."
        ) from error


def _client() -> Client:
    return _client_for(os.environ.get("STORAGE_EMULATOR_HOST"), os.environ.get("GOOGLE_CLOUD_PROJECT"))


def _bucket(uri: str) -> tuple[Bucket, str]:
    name, key = _split_gcs(uri)
    return _client().bucket(name), key


@contextlib.contextmanager
def _gcs_errors(uri: str, action: str) -> Iterator[None]:
    """Turn the GCS client's many exception types into one StorageError that says what to do."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc
    from requests import exceptions as req_exc

    try:
        yield
    except StorageError:
        raise
    except gexc.NotFound as error:
        raise StorageError(
            f"cannot {action} {uri}: not found ({error.message}). Check that the bucket exists and the "
            "path is spelled right."
        ) from error
    except gexc.Forbidden as error:
        raise StorageError(
            f"cannot {action} {uri}: permission denied ({error.message}). Grant the service account "
            "storage.objects.* on the bucket (roles/storage.objectAdmin)."
        ) from error
    except gexc.GoogleAPICallError as error:
        raise StorageError(f"cannot {action} {uri}: {error.message}") from error
    except gexc.RetryError as error:
        raise StorageError(
            f"cannot {action} {uri}: the bucket did not answer within {GCS_TIMEOUT_SECONDS:.0f}s "
            f"({error.cause}). Check the network and STORAGE_EMULATOR_HOST if you use an emulator."
        ) from error
    except (req_exc.ConnectionError, req_exc.Timeout, ConnectionError, TimeoutError) as error:
        raise StorageError(
            f"cannot {action} {uri}: the storage endpoint is unreachable ({type(error).__name__}). "
            "Check the network and STORAGE_EMULATOR_HOST if you use an emulator."
        ) from error
    except auth_exc.GoogleAuthError as error:
        raise StorageError(
            f"cannot {action} {uri}: no usable Google credentials ({error}). Run `gcloud auth "
            "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS."
        ) from error


@contextlib.contextmanager
def _local_errors(uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as error:
        raise StorageError(f"cannot {action} {uri}: no such file or directory") from error
    except PermissionError as error:
        raise StorageError(f"cannot {action} {uri}: permission denied; check the folder's owner") from error
    except OSError as error:
        raise StorageError(f"cannot {action} {uri}: {error.strerror or error}") from error


def _retry() -> object:
    from google.api_core.retry import Retry
    from google.cloud.storage.retry import DEFAULT_RETRY

    retry: Retry = DEFAULT_RETRY
    return retry.with_timeout(GCS_TIMEOUT_SECONDS)


def _blobs(uri: str) -> Iterator[tuple[str, Blob]]:
    bucket, key = _bucket(uri)
    prefix = f"{key}/" if key else ""
    for blob in bucket.list_blobs(prefix=prefix, retry=_retry(), timeout=GCS_TIMEOUT_SECONDS):
        if not blob.name.endswith("/"):
            yield blob.name[len(prefix) :], blob


def list_files(uri: str) -> list[str]:
    """Relative POSIX paths of every file below ``uri`` (recursive, sorted). Missing prefix: empty list."""
    if is_gcs(uri):
        with _gcs_errors(uri, "list"):
            return sorted(name for name, _ in _blobs(uri))
    root = local_path(uri)
    if not root.is_dir():
        return []
    with _local_errors(uri, "list"):
        return sorted(
            p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not _is_temp(p)
        )


def _is_temp(path: Path) -> bool:
    """A write in progress (or one a crash interrupted), named by :func:`_temp_beside`: never listed."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate sub-folders of ``uri`` (sorted). Missing prefix: empty list."""
    if is_gcs(uri):
        bucket, key = _bucket(uri)
        prefix = f"{key}/" if key else ""
        with _gcs_errors(uri, "list"):
            pages = bucket.list_blobs(
                prefix=prefix, delimiter="/", retry=_retry(), timeout=GCS_TIMEOUT_SECONDS
            )
            for _ in pages:
                pass
            return sorted(p[len(prefix) :].rstrip("/") for p in pages.prefixes)
    root = local_path(uri)
    if not root.is_dir():
        return []
    with _local_errors(uri, "list"):
        return sorted(p.name for p in root.iterdir() if p.is_dir())


def exists(uri: str) -> bool:
    """True if ``uri`` names a file, or a folder/prefix with something in it."""
    if is_gcs(uri):
        bucket, key = _bucket(uri)
        with _gcs_errors(uri, "check"):
            if key and bucket.blob(key).exists(retry=_retry(), timeout=GCS_TIMEOUT_SECONDS):
                return True
            prefix = f"{key}/" if key else ""
            return any(
                True for _ in bucket.list_blobs(prefix=prefix, max_results=1, timeout=GCS_TIMEOUT_SECONDS)
            )
    return local_path(uri).exists()


def read_bytes(uri: str) -> bytes:
    """The whole content of one file."""
    if is_gcs(uri):
        bucket, key = _bucket(uri)
        with _gcs_errors(uri, "read"):
            return bucket.blob(key).download_as_bytes(retry=_retry(), timeout=GCS_TIMEOUT_SECONDS)
    with _local_errors(uri, "read"):
        return local_path(uri).read_bytes()


def read_text(uri: str) -> str:
    """The content of one UTF-8 text file."""
    return read_bytes(uri).decode("utf-8")


def _fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a file renamed or linked into it, a new subfolder) survive a crash."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _make_parents(path: Path) -> None:
    """Create ``path``'s missing parent folders, each recorded durably in its own parent."""
    missing = [folder for folder in [path.parent, *path.parent.parents] if not folder.exists()]
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        _fsync_dir(folder.parent)


def _temp_beside(path: Path) -> Path:
    """An empty temporary file next to ``path``, with the mode a plain ``open()`` would give it."""
    _make_parents(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


@functools.cache
def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes(uri: str, data: bytes) -> None:
    """Write (or replace) one file atomically: readers see the old content or the new, never a part."""
    if is_gcs(uri):
        bucket, key = _bucket(uri)
        with _gcs_errors(uri, "write"):
            bucket.blob(key).upload_from_string(data, retry=_retry(), timeout=GCS_TIMEOUT_SECONDS)
        return
    path = local_path(uri)
    with _local_errors(uri, "write"):
        temp = _temp_beside(path)
        try:
            temp.write_bytes(data)
            with open(temp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temp, path)
            _fsync_dir(path.parent)
        finally:
            temp.unlink(missing_ok=True)


def write_text(uri: str, text: str) -> None:
    """Write one UTF-8 text file atomically."""
    write_bytes(uri, text.encode("utf-8"))


def write_if_absent(uri: str, data: bytes) -> bool:
    """Create ``uri`` with ``data`` unless it exists. True if this call wrote it; never overwrites."""
    if is_gcs(uri):
        from google.api_core.exceptions import PreconditionFailed

        bucket, key = _bucket(uri)
        blob = bucket.blob(key)
        with _gcs_errors(uri, "write"):
            if blob.exists(retry=_retry(), timeout=GCS_TIMEOUT_SECONDS):
                return False
            try:
                blob.upload_from_string(data, if_generation_match=0, timeout=GCS_TIMEOUT_SECONDS)
            except PreconditionFailed:
                return False
        return True
    path = local_path(uri)
    with _local_errors(uri, "write"):
        if path.exists():
            return False
        temp = _temp_beside(path)
        try:
            temp.write_bytes(data)
            with open(temp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.link(temp, path)
        except FileExistsError:
            return False
        finally:
            temp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    return True


def _ordered(names: Iterable[str], last: Sequence[str]) -> list[str]:
    """Names sorted so that files whose base name is in ``last`` come at the end, in ``last`` order."""
    names = list(names)
    tail = [n for key in last for n in names if PurePosixPath(n).name == key]
    return [n for n in names if n not in tail] + tail


def copy_tree(src: str, dst: str, *, last: Sequence[str] = ("saved_model.pb",)) -> int:
    """Copy every file below ``src`` to the same relative path below ``dst``; returns the file count.

    Works between any two backends. Files named in ``last`` are copied after all others, so that a reader
    that waits for them (TensorFlow Serving waits for ``saved_model.pb``) never sees a partial tree.
    """
    names = list_files(src)
    if not names and not exists(src):
        raise StorageError(f"cannot copy {src}: nothing there")
    if not is_gcs(src) and not is_gcs(dst):
        for name in _ordered(names, last):
            target = local_path(dst) / name
            with _local_errors(dst, "write"):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local_path(src) / name, target)
        return len(names)
    for name in _ordered(names, last):
        if is_gcs(dst) and not is_gcs(src):
            bucket, key = _bucket(join(dst, name))
            with _gcs_errors(dst, "upload to"):
                bucket.blob(key).upload_from_filename(
                    str(local_path(src) / name), retry=_retry(), timeout=GCS_TIMEOUT_SECONDS
                )
        elif is_gcs(src) and not is_gcs(dst):
            bucket, key = _bucket(join(src, name))
            target = local_path(dst) / name
            with _gcs_errors(src, "download"):
                target.parent.mkdir(parents=True, exist_ok=True)
                bucket.blob(key).download_to_filename(
                    str(target), retry=_retry(), timeout=GCS_TIMEOUT_SECONDS
                )
        else:
            write_bytes(join(dst, name), read_bytes(join(src, name)))
    return len(names)


def upload_tree(
    local_dir: str | os.PathLike[str], dst: str, *, last: Sequence[str] = ("saved_model.pb",)
) -> int:
    """Copy a local folder to ``dst`` (local or GCS), ``last`` files at the end. Returns the file count."""
    return copy_tree(os.fspath(local_dir), dst, last=last)


def download_tree(src: str, local_dir: str | os.PathLike[str]) -> Path:
    """Make ``src``'s files available under ``local_dir`` and return that folder."""
    target = Path(local_dir)
    copy_tree(src, str(target))
    return target


def move(src: str, dst: str) -> None:
    """Move one file. Refuses to overwrite a different existing file at ``dst`` (raises StorageError)."""
    if not is_gcs(src) and not is_gcs(dst):
        source, target = local_path(src), local_path(dst)
        with _local_errors(src, "move"):
            _make_parents(target)
            try:
                os.link(source, target)
            except FileExistsError:
                if target.read_bytes() != source.read_bytes():
                    raise StorageError(
                        f"cannot move {src} to {dst}: a different file is already there"
                    ) from None
            _fsync_dir(target.parent)
            source.unlink()
            _fsync_dir(source.parent)
        return
    data = read_bytes(src)
    if not write_if_absent(dst, data) and read_bytes(dst) != data:
        raise StorageError(f"cannot move {src} to {dst}: a different file is already there")
    delete(src)


def delete(uri: str, *, recursive: bool = False) -> None:
    """Delete one file, or with ``recursive`` a whole folder/prefix. Missing targets are not an error."""
    if is_gcs(uri):
        bucket, key = _bucket(uri)
        with _gcs_errors(uri, "delete"):
            if recursive:
                for _, blob in list(_blobs(uri)):
                    blob.delete(timeout=GCS_TIMEOUT_SECONDS)
            else:
                blob = bucket.blob(key)
                if blob.exists(timeout=GCS_TIMEOUT_SECONDS):
                    blob.delete(timeout=GCS_TIMEOUT_SECONDS)
        return
    path = local_path(uri)
    with _local_errors(uri, "delete"):
        if path.is_dir() and recursive:
            shutil.rmtree(path)
        elif path.is_file() or path.is_symlink():
            path.unlink()
