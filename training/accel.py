"""Devices for training: numeric precision, XLA compilation and the distribution strategy.

The one home of these choices. :func:`resolve_precision`, :func:`resolve_jit_compile` and
:func:`resolve_distribution` are pure functions of what was asked and what the machine has (tests call them
directly); :func:`choose_devices` looks at the visible devices and ``TF_CONFIG`` and builds the strategy:

- ``none``: one device; on a GPU a ``OneDeviceStrategy`` so input batches are prefetched to the GPU while
  the CPU decodes the next ones.
- ``mirrored``: ``MirroredStrategy`` over the GPUs of this machine (over its logical CPUs when it has no
  GPU, which is how the tests run it).
- ``multi-worker``: ``MultiWorkerMirroredStrategy`` over the workers named in ``TF_CONFIG``; only the chief
  (task type ``chief``, or ``worker`` 0 when there is no chief) logs and saves.

Importing this module imports no TensorFlow: :func:`choose_devices` does, when called.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from storage import TfloopError

if TYPE_CHECKING:
    import tensorflow as tf

Precision = Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]
JitCompile = Literal["auto", "on", "off"]
Distribute = Literal["auto", "none", "mirrored", "multi-worker"]
Distribution = Literal["none", "mirrored", "multi-worker"]
PRECISIONS: tuple[str, ...] = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE_CHOICES: tuple[str, ...] = ("auto", "on", "off")
DISTRIBUTE_CHOICES: tuple[str, ...] = ("auto", "none", "mirrored", "multi-worker")
FLOAT16_MIN_CAPABILITY = (7, 0)
BFLOAT16_MIN_CAPABILITY = (8, 0)


class DeviceError(TfloopError):
    """The devices or the cluster cannot run training as asked (bad TF_CONFIG, no such strategy here)."""


@dataclass(frozen=True)
class Gpu:
    """One visible GPU: its name and CUDA compute capability (``None`` when TensorFlow does not say)."""

    name: str
    compute_capability: tuple[int, int] | None = None


@dataclass(frozen=True)
class WorkerRole:
    """This process's place in a cluster described by ``TF_CONFIG`` (one worker when there is none)."""

    task_type: str = "worker"
    index: int = 0
    workers: int = 1

    @property
    def is_chief(self) -> bool:
        """The chief logs to MLflow and writes checkpoints and the final model; other workers do not."""
        return self.task_type == "chief" or (self.task_type == "worker" and self.index == 0)


def worker_role(tf_config: str | None) -> WorkerRole:
    """Parse ``TF_CONFIG`` (JSON: ``cluster`` {type: [host:port, ...]}, ``task`` {type, index})."""
    if not tf_config:
        return WorkerRole()
    try:
        data = json.loads(tf_config)
        cluster = data.get("cluster") or {}
        task = data.get("task") or {}
        workers = sum(len(cluster.get(kind) or []) for kind in ("chief", "worker"))
        role = WorkerRole(
            task_type=str(task.get("type", "worker")), index=int(task.get("index", 0)), workers=workers
        )
    except (ValueError, TypeError, AttributeError) as error:
        raise DeviceError(
            f"TF_CONFIG is not valid JSON of the form {{'cluster': {{'worker': ['host:port', ...]}}, "
            f"'task': {{'type': 'worker', 'index': 0}}}}: {error}"
        ) from None
    if role.workers < 1 or role.task_type not in cluster or role.index >= len(cluster[role.task_type]):
        raise DeviceError(
            f"TF_CONFIG names task {role.task_type}:{role.index}, which its cluster {cluster} does not list"
        )
    return role


def resolve_precision(requested: Precision, gpus: Sequence[Gpu]) -> str:
    """The Keras dtype policy: ``auto`` is ``mixed_bfloat16`` when every GPU has compute capability >= 8.0,
    ``mixed_float16`` when every GPU has >= 7.0, ``float32`` otherwise (CPU, older or unknown GPUs)."""
    if requested != "auto":
        return requested
    capabilities = [gpu.compute_capability for gpu in gpus]
    if not capabilities or any(cc is None for cc in capabilities):
        return "float32"
    lowest = min(cc for cc in capabilities if cc is not None)
    if lowest >= BFLOAT16_MIN_CAPABILITY:
        return "mixed_bfloat16"
    if lowest >= FLOAT16_MIN_CAPABILITY:
        return "mixed_float16"
    return "float32"


def resolve_jit_compile(requested: JitCompile, *, on_gpu: bool) -> bool:
    """XLA compilation of the train step: ``auto`` is on for GPUs and off for CPUs."""
    return requested == "on" or (requested == "auto" and on_gpu)


def resolve_distribution(requested: Distribute, *, gpu_count: int, role: WorkerRole) -> Distribution:
    """``auto``: multi-worker when ``TF_CONFIG`` names several workers, else mirrored with several GPUs."""
    if requested == "multi-worker" and role.workers < 2:
        raise DeviceError(
            "--distribute multi-worker needs TF_CONFIG naming at least two workers (set by the Indexed Job's "
            "entrypoint, training.distribute); use --distribute mirrored for the GPUs of one machine"
        )
    if requested != "auto":
        return requested
    if role.workers > 1:
        return "multi-worker"
    return "mirrored" if gpu_count > 1 else "none"


@dataclass
class DeviceSetup:
    """What training runs on: strategy, dtype policy, XLA and this worker's role."""

    strategy: tf.distribute.Strategy
    precision: str
    jit_compile: bool
    distribution: Distribution
    devices: list[str]
    role: WorkerRole

    @property
    def mixed_precision(self) -> bool:
        return self.precision != "float32"

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def description(self) -> str:
        """Short and human: ``cpu``, ``1 GPU(s)``, ``2 GPU(s) x 3 workers``."""
        gpus = sum(1 for device in self.devices if "GPU" in device.upper())
        text = f"{gpus} GPU(s)" if gpus else "cpu"
        return f"{text} x {self.role.workers} workers" if self.role.workers > 1 else text

    def params(self) -> dict[str, Any]:
        """What MLflow records about the devices (the chief's view)."""
        return {
            "precision_used": self.precision,
            "jit_compile_used": self.jit_compile,
            "distribution": self.distribution,
            "strategy": type(self.strategy).__name__,
            "replicas": self.replicas,
            "workers": self.role.workers,
            "devices": ",".join(self.devices),
            "device": self.description,
        }


def _gpus() -> list[Gpu]:
    import tensorflow as tf

    found = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        found.append(
            Gpu(
                name=str(details.get("device_name", device.name)),
                compute_capability=tuple(capability) if capability else None,  # type: ignore[arg-type]
            )
        )
    return found


def _keras_ready(strategy_class: type[tf.distribute.Strategy]) -> type[tf.distribute.Strategy]:
    """``strategy_class`` with the two reductions Keras 3's TensorFlow trainer asks of it made to work.

    To build the model Keras reduces a whole ``(images, labels)`` batch, only to learn its shapes and dtypes:
    that fails when the batch splits unevenly over replicas and, across workers, on any structure; here it
    gets one replica's part. Across workers Keras reduces scalar metrics with ``axis=0``, which the
    collective strategy refuses on scalars; here the axis is dropped.
    """
    import tensorflow as tf

    class KerasReadyStrategy(strategy_class):  # type: ignore[misc, valid-type]
        def reduce(self, reduce_op: Any, value: Any, axis: int | None = None) -> Any:
            if isinstance(value, tuple | list | dict):
                return tf.nest.map_structure(lambda v: self.experimental_local_results(v)[0], value)
            if axis is not None and self.experimental_local_results(value)[0].shape.rank == 0:
                axis = None
            return super().reduce(reduce_op, value, axis)

    KerasReadyStrategy.__name__ = strategy_class.__name__
    KerasReadyStrategy.__qualname__ = strategy_class.__name__
    return KerasReadyStrategy


def choose_devices(
    *,
    precision: Precision = "auto",
    jit_compile: JitCompile = "auto",
    distribute: Distribute = "auto",
    tf_config: str | None = None,
) -> DeviceSetup:
    """Build the strategy for this machine. Call it before any other TensorFlow work in the process: a
    multi-worker strategy must configure TensorFlow's collectives at start-up."""
    import tensorflow as tf

    role = worker_role(tf_config)
    gpus = _gpus()
    distribution = resolve_distribution(distribute, gpu_count=len(gpus), role=role)
    strategy: tf.distribute.Strategy
    if distribution == "multi-worker":
        strategy = _keras_ready(tf.distribute.MultiWorkerMirroredStrategy)()
        devices = [
            f"worker{role.index}:" + (f"GPU:{i}" if gpus else "CPU:0") for i in range(max(1, len(gpus)))
        ]
    elif distribution == "mirrored":
        names = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        strategy = _keras_ready(tf.distribute.MirroredStrategy)(devices=names)
        devices = names
    elif gpus:
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0")
        devices = ["/gpu:0"]
    else:
        strategy = tf.distribute.get_strategy()
        devices = ["/cpu:0"]
    return DeviceSetup(
        strategy=strategy,
        precision=resolve_precision(precision, gpus),
        jit_compile=resolve_jit_compile(jit_compile, on_gpu=bool(gpus)),
        distribution=distribution,
        devices=[d.split("device:")[-1] for d in devices],
        role=role,
    )


def shard_by_data(dataset: tf.data.Dataset, setup: DeviceSetup) -> tf.data.Dataset:
    """Under a multi-worker strategy, split batches among the workers (each worker reads all files and keeps
    its share of every batch); unchanged otherwise."""
    if setup.distribution != "multi-worker":
        return dataset
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
