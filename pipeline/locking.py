"""At most one loop run per model at a time: the name of the per-model Prefect concurrency limit, and the
operating-system file lock that stands in for it where no Prefect server runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import storage
from pipeline.feedback_queue import consumed_folder_name

LOOP_LIMIT_PREFIX = "tfloop-loop-"


def loop_limit_name(model_name: str) -> str:
    """The name of the concurrency limit (one slot) that one model's loop runs share."""
    return f"{LOOP_LIMIT_PREFIX}{model_name}"


class LoopBusyError(storage.TfloopError):
    """Another loop run of the same model holds the model's lock on this machine."""


@contextlib.contextmanager
def local_loop_lock(lock_dir: Path, model_name: str, *, wait_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive OS file lock ``<lock_dir>/<limit name>.lock`` while the block runs.

    For runs without a Prefect server (``tfloop flows run --local``, the demo): their temporary Prefect
    servers do not share concurrency leases. The operating system drops the lock when the process ends, so
    a crashed run never leaves it held. ``wait_s`` None waits as long as it takes; otherwise
    :class:`LoopBusyError` after ``wait_s`` seconds.
    """
    import fcntl

    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{loop_limit_name(consumed_folder_name(model_name))}.lock"
    with path.open("a+") as handle:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise LoopBusyError(
                        f"another loop run of {model_name} on this machine holds {path}; it runs one at a "
                        "time: wait for it to finish"
                    ) from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
