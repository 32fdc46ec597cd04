"""gcp-storage-emulator, made to honour the write precondition ``ifGenerationMatch`` as GCS does.

The emulator stores every upload it gets, so a second "create only if absent" upload
(``ifGenerationMatch=0``) would silently overwrite the first. Here uploads that carry the precondition are
checked against the stored object's generation under one lock, and refused with 412 when it does not hold,
so tests of tfloop's no-overwrite writes (feedback, claims, publishes) can fail.
"""

from __future__ import annotations

import threading
from http import HTTPStatus
from typing import Any

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_LOCK = threading.Lock()
_PLAIN_INSERT = objects.insert
PRECONDITION_FAILED = {
    "error": {
        "code": 412,
        "message": "At least one of the pre-conditions you specified did not hold.",
        "errors": [{"reason": "conditionNotMet", "message": "Precondition Failed"}],
    }
}


def _object_name(request: Any) -> str | None:
    if "name" in request.query:
        return str(request.query["name"][0])
    data = request.data
    if isinstance(data, dict):
        meta = data.get("meta") if "meta" in data else data
        if isinstance(meta, dict) and meta.get("name"):
            return str(meta["name"])
    return None


def _stored_generation(storage: Any, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name).get("generation", "0"))
    except NotFound:
        return "0"


def insert_with_preconditions(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    """``objects.insert`` that refuses an upload whose ``ifGenerationMatch`` does not hold (412)."""
    wanted = request.query.get("ifGenerationMatch")
    name = _object_name(request)
    if not wanted or name is None:
        return _PLAIN_INSERT(request, response, storage, *args, **kwargs)
    with _LOCK:
        if _stored_generation(storage, request.params["bucket_name"], name) != str(wanted[0]):
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json(PRECONDITION_FAILED)
            return None
        return _PLAIN_INSERT(request, response, storage, *args, **kwargs)


def install() -> None:
    """Route the emulator's uploads through :func:`insert_with_preconditions` (idempotent)."""
    for _pattern, handlers in emulator_server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is _PLAIN_INSERT:
                handlers[method] = insert_with_preconditions
    objects.insert = insert_with_preconditions
