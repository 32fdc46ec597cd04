"""One storage API for every layer: local paths, ``file://`` URIs and ``gs://`` URIs.

Every function takes a URI string. Local paths and ``file://`` URIs go to the filesystem; ``gs://bucket/key``
goes to Google Cloud Storage through the official ``google-cloud-storage`` client (``STORAGE_EMULATOR_HOST``
points it at an emulator). Failures surface as :class:`StorageError` with a message that says what to fix.
"""

from storage.core import (
    StorageError,
    TfloopError,
    copy_tree,
    delete,
    download_tree,
    exists,
    is_gcs,
    join,
    list_dirs,
    list_files,
    local_path,
    move,
    read_bytes,
    read_text,
    upload_tree,
    write_bytes,
    write_if_absent,
    write_text,
)

__all__ = [
    "StorageError",
    "TfloopError",
    "copy_tree",
    "delete",
    "download_tree",
    "exists",
    "is_gcs",
    "join",
    "list_dirs",
    "list_files",
    "local_path",
    "move",
    "read_bytes",
    "read_text",
    "upload_tree",
    "write_bytes",
    "write_if_absent",
    "write_text",
]
