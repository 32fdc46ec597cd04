"""Multi-worker training on a Kubernetes Indexed Job: ``TF_CONFIG`` from the pod's completion index, and the
stand-in tracker of workers that are not the chief.

An Indexed Job with ``completions = parallelism = N`` and ``subdomain`` set to a headless Service gives pod
``i`` the host name ``<job>-<i>``, reachable as ``<job>-<i>.<service>`` from the other pods, and the
variable ``JOB_COMPLETION_INDEX=i``. :func:`tf_config_from_index` turns that into the ``TF_CONFIG`` that
``MultiWorkerMirroredStrategy`` reads. The container entrypoint is ``python -m training.distribute
--workers N --service S -- COMMAND...``: it sets ``TF_CONFIG`` when N is above 1 and runs COMMAND in its
place (the Prefect job template passes the flow-run command).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage import TfloopError

if TYPE_CHECKING:
    import keras
    from matplotlib.figure import Figure

DEFAULT_WORKER_PORT = 12345
DEFAULT_WORKERS_SERVICE = "tfloop-train-workers"


class ClusterError(TfloopError):
    """The worker cluster cannot be described from what the pod was given."""


def tf_config_from_index(
    index: int,
    *,
    workers: int,
    job_name: str,
    service: str = DEFAULT_WORKERS_SERVICE,
    port: int = DEFAULT_WORKER_PORT,
) -> dict[str, Any]:
    """``TF_CONFIG`` for pod ``index`` of an Indexed Job named ``job_name`` with ``workers`` pods whose
    ``subdomain`` is the headless Service ``service``. Worker 0 is the chief."""
    if workers < 1:
        raise ClusterError(f"a cluster needs at least one worker, got {workers}")
    if not 0 <= index < workers:
        raise ClusterError(f"worker index {index} is outside 0..{workers - 1}")
    if not job_name:
        raise ClusterError("the job name is empty: cannot name the worker hosts")
    hosts = [f"{job_name}-{i}.{service}:{port}" for i in range(workers)]
    return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}


def job_name_from_hostname(hostname: str, index: int) -> str:
    """An Indexed Job pod's host name is ``<job>-<index>``: the job name is what precedes the index."""
    suffix = f"-{index}"
    if not hostname.endswith(suffix) or len(hostname) == len(suffix):
        raise ClusterError(
            f"host name {hostname!r} does not end with -{index}: is the pod part of an Indexed Job with a "
            "subdomain (completionMode: Indexed)?"
        )
    return hostname[: -len(suffix)]


def tf_config_for_pod(
    environ: Mapping[str, str],
    *,
    hostname: str,
    workers: int,
    service: str = DEFAULT_WORKERS_SERVICE,
    port: int = DEFAULT_WORKER_PORT,
) -> dict[str, Any] | None:
    """``TF_CONFIG`` for this pod from its ``JOB_COMPLETION_INDEX`` and host name; ``None`` for a single
    worker or when ``TF_CONFIG`` is already set."""
    if environ.get("TF_CONFIG") or workers <= 1:
        return None
    raw_index = environ.get("JOB_COMPLETION_INDEX")
    if raw_index is None or not raw_index.isdigit():
        raise ClusterError(
            f"{workers} workers asked but JOB_COMPLETION_INDEX is {raw_index!r}: run the workers as a "
            "Kubernetes Job with completionMode: Indexed"
        )
    index = int(raw_index)
    return tf_config_from_index(
        index, workers=workers, job_name=job_name_from_hostname(hostname, index), service=service, port=port
    )


class WorkerTracker:
    """The tracker of a worker that is not the chief: the same calls as ``RunTracker``, nothing logged.

    Every worker runs the same training code in lockstep; only the chief's run reaches MLflow.
    """

    run_id = ""

    def log_params(self, params: Mapping[str, Any]) -> None:
        del params

    def log_metrics(self, metrics: Mapping[str, float], *, step: int | None = None) -> None:
        del metrics, step

    def set_tags(self, tags: Mapping[str, str]) -> None:
        del tags

    def log_dict(self, data: Mapping[str, Any] | list[Any], artifact_file: str) -> None:
        del data, artifact_file

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        del figure, artifact_file

    def log_file(self, path: Path, *, artifact_path: str | None = None) -> None:
        del path, artifact_path

    def finish(self, status: str = "FINISHED") -> None:
        del status

    def epoch_callback(self, *, prefix: str, step_offset: int) -> keras.callbacks.Callback:
        import keras

        del prefix, step_offset
        return keras.callbacks.Callback()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m training.distribute --workers N [--service S] [--port P] -- COMMAND...``: set
    ``TF_CONFIG`` for this pod of an Indexed Job, then run COMMAND in this process's place."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.distribute", description=main.__doc__)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--service", default=DEFAULT_WORKERS_SERVICE)
    parser.add_argument("--port", type=int, default=DEFAULT_WORKER_PORT)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    try:
        tf_config = tf_config_for_pod(
            os.environ,
            hostname=socket.gethostname(),
            workers=args.workers,
            service=args.service,
            port=args.port,
        )
    except ClusterError as error:
        sys.exit(f"error: {error}")
    if tf_config is not None:
        os.environ["TF_CONFIG"] = json.dumps(tf_config)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
