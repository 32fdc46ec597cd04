"""Benchmark of fine-tuning speed, written to BENCHMARKS.md (section ``training``).

For VGG16 at 224 px and InceptionV3 at 299 px, two phases:

1. frozen-feature phase: tfloop computes the backbone features once (a forward pass) and trains the head
   on them; the plain baseline trains the head behind a frozen backbone, image by image.
2. fine-tune phase: the top backbone layers trainable (BatchNorm frozen), lower learning rate.

tfloop runs with its device choices (:mod:`training.accel`: mixed precision and XLA on GPUs, prefetch to
the device); the baseline is ``keras.applications`` + ``model.fit`` with Keras' defaults, the same model,
the same in-memory batches, in the same process. Rounds alternate tfloop and baseline (medians; ratios).

Model FLOP utilisation: MFU = achieved FLOP/s / peak FLOP/s. Forward multiply-adds per image: VGG16 15.5 G
at 224 px, InceptionV3 5.7 G at 299 px, scaled by (size / reference size)^2; a multiply-add is 2 FLOP; a
training step is 3 forward passes, the frozen-feature pass 1. Peak: ``--peak-tflops``, else a known
figure for the detected GPU (dense tensor-core fp16/bf16), else (CPU) a float32 matmul measured here.

Run on a GPU: ``python benchmarks/training.py``; on a CPU: ``python benchmarks/training.py --quick``
(tiny images, random weights, a few steps).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sections import replace_section

SECTION = "training"
UNFREEZE = {"vgg16": 4, "inception_v3": 30}


@dataclass(frozen=True)
class Workload:
    backbone: str
    image_size: int
    reference_size: int
    forward_gmacs: float

    def forward_flops(self, image_size: int) -> float:
        return 2 * self.forward_gmacs * 1e9 * (image_size / self.reference_size) ** 2


WORKLOADS = {
    "vgg16": Workload("vgg16", 224, 224, 15.5),
    "inception_v3": Workload("inception_v3", 299, 299, 5.7),
}
# Dense tensor-core fp16/bf16 peaks (TFLOP/s) from the vendors' data sheets, matched on the device name.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "V100": 125.0,
    "T4": 65.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def gpu_peak_tflops(name: str) -> float | None:
    """The known peak of a GPU by its name (longest match first: ``A10G`` before ``A10``)."""
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAK_TFLOPS[key]
    return None


def trainable_share(backbone: Any) -> float:
    """Share of the backbone's forward multiply-adds in trainable Conv2D/Dense layers (the fine-tune phase
    computes gradients for those only)."""
    import keras

    total = trainable = 0.0
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense):
            kernel = layer.kernel.shape
            out = layer.output.shape
            positions = float(out[1] * out[2]) if len(out) == 4 else 1.0
            macs = positions * float(math.prod(kernel))
            total += macs
            trainable += macs if layer.trainable else 0.0
    return trainable / total if total else 0.0


def measured_matmul_tflops(size: int = 2048, repeats: int = 4) -> float:
    """float32 matmul throughput of this machine's default device (the CPU's practical peak)."""
    import tensorflow as tf

    a = tf.random.normal((size, size))
    b = tf.random.normal((size, size))

    @tf.function
    def chain(x: Any) -> Any:
        for _ in range(repeats):
            x = tf.matmul(x, b) * 1e-3
        return x

    chain(a).numpy()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        chain(a).numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best / 1e12


def _batches(*, images: int, batch_size: int, image_size: int, classes: int) -> Any:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
    labels = rng.integers(0, classes, batch_size).astype("int32")
    steps = max(1, images // batch_size)
    return tf.data.Dataset.from_tensors((pixels, labels)).repeat(steps).cache().prefetch(
        tf.data.AUTOTUNE
    ), steps


def _seconds(call: Any) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _plain_model(workload: Workload, *, image_size: int, classes: int, trainable_top: int) -> Any:
    """A plain Keras script's model: keras.applications backbone, preprocessing, pooling, dense head."""
    import keras

    constructor = getattr(
        keras.applications, {"vgg16": "VGG16", "inception_v3": "InceptionV3"}[workload.backbone]
    )
    base = constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    module = keras.applications.vgg16 if workload.backbone == "vgg16" else keras.applications.inception_v3
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Lambda(module.preprocess_input)(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    base.trainable = trainable_top > 0
    if trainable_top:
        for layer in base.layers[:-trainable_top]:
            layer.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    return model


def bench_backbone(workload: Workload, args: argparse.Namespace, devices: Any) -> dict[str, Any]:
    import keras
    import numpy as np

    from training.fit import _dtype_policy, compile_model
    from training.models import backbone_of, build_model, feature_extractor, head_model, set_trainable

    size = args.image_size or workload.image_size
    classes = 5
    data, steps = _batches(images=args.images, batch_size=args.batch_size, image_size=size, classes=classes)
    images = steps * args.batch_size
    images_only = data.map(lambda x, _: x)
    unfreeze = UNFREEZE[workload.backbone]
    keras.utils.set_random_seed(0)

    with _dtype_policy(devices.precision), devices.strategy.scope():
        model = build_model(workload.backbone, classes, image_size=size, weights="none")
        set_trainable(model, phase="head")
        extractor = feature_extractor(model)
        head = head_model(model)
        compile_model(head, 1e-3, jit_compile=devices.jit_compile)
        tuned = build_model(workload.backbone, classes, image_size=size, weights="none")
        set_trainable(tuned, phase="fine_tune", unfreeze=unfreeze)
        compile_model(tuned, 1e-4, jit_compile=devices.jit_compile)
        # The same fine-tune model with XLA the other way: auto's choice is measured, not assumed.
        flipped = build_model(workload.backbone, classes, image_size=size, weights="none")
        set_trainable(flipped, phase="fine_tune", unfreeze=unfreeze)
        compile_model(flipped, 1e-4, jit_compile=not devices.jit_compile)
    plain_frozen = _plain_model(workload, image_size=size, classes=classes, trainable_top=0)
    plain_tuned = _plain_model(workload, image_size=size, classes=classes, trainable_top=unfreeze)

    def tfloop_frozen() -> None:
        import tensorflow as tf

        features = np.asarray(extractor.predict(images_only, verbose=0), dtype=np.float32)
        targets = np.zeros(len(features), dtype=np.int32)
        cached = tf.data.Dataset.from_tensor_slices((features, targets)).batch(args.batch_size)
        head.fit(cached, epochs=args.head_epochs, verbose=0)

    runs = {
        ("frozen", "tfloop"): tfloop_frozen,
        ("frozen", "plain"): lambda: plain_frozen.fit(data, epochs=args.head_epochs, verbose=0),
        ("fine_tune", "tfloop"): lambda: tuned.fit(data, epochs=1, verbose=0),
        ("fine_tune", "plain"): lambda: plain_tuned.fit(data, epochs=1, verbose=0),
        ("fine_tune", "xla_flipped"): lambda: flipped.fit(data, epochs=1, verbose=0),
    }
    print(f"{workload.backbone}@{size}: compiling ({steps} steps of {args.batch_size})", file=sys.stderr)
    for run in runs.values():
        run()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for round_index in range(args.rounds):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for key in order:
            times[key].append(_seconds(runs[key]))
        print(f"  round {round_index + 1}/{args.rounds}", file=sys.stderr)
    forward = workload.forward_flops(size)
    share = trainable_share(backbone_of(tuned))
    flops_per_image = {"frozen": forward, "fine_tune": 3 * forward}
    counted_per_image = {"frozen": forward, "fine_tune": (1 + 2 * share) * forward}
    result: dict[str, Any] = {"backbone": workload.backbone, "size": size, "images": images, "share": share}
    epochs = {"frozen": args.head_epochs, "fine_tune": 1}
    for (phase, who), values in times.items():
        ips = images * epochs[phase] / statistics.median(values)
        result[(phase, who)] = ips
        result[(phase, who, "mfu")] = ips * flops_per_image[phase] / (args.peak_tflops * 1e12)
        # tfloop's frozen-feature phase runs the backbone once, not once per epoch.
        done = counted_per_image[phase] / (epochs[phase] if who == "tfloop" and phase == "frozen" else 1)
        result[(phase, who, "counted")] = ips * done / (args.peak_tflops * 1e12)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="vgg16,inception_v3")
    parser.add_argument("--quick", action="store_true", help="CPU mode: tiny images, few images, few steps")
    parser.add_argument("--image-size", type=int, default=0, help="default: 224 / 299 (quick: 32 / 75)")
    parser.add_argument("--images", type=int, default=0, help="images per measured epoch (default 1024)")
    parser.add_argument("--batch-size", type=int, default=0, help="default 64 (quick: 8)")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds (default 5, quick 2)")
    parser.add_argument("--head-epochs", type=int, default=0, help="frozen-feature phase epochs (5, quick 3)")
    parser.add_argument("--precision", default="auto", help="tfloop's --precision (default auto)")
    parser.add_argument("--jit-compile", default="auto", help="tfloop's --jit-compile (default auto)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak for MFU (default: detected)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    command = "python benchmarks/training.py " + " ".join(sys.argv[1:])
    args.images = args.images or (32 if args.quick else 1024)
    args.batch_size = args.batch_size or (8 if args.quick else 64)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.head_epochs = args.head_epochs or (3 if args.quick else 5)

    import tensorflow as tf

    from training.accel import choose_devices

    devices = choose_devices(precision=args.precision, jit_compile=args.jit_compile, distribute="none")
    gpus = tf.config.list_physical_devices("GPU")
    gpu_name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else ""
    if args.peak_tflops:
        peak_source = "given with --peak-tflops"
    elif gpus and gpu_peak_tflops(gpu_name):
        args.peak_tflops = gpu_peak_tflops(gpu_name) or 0.0
        peak_source = f"data-sheet dense fp16/bf16 peak of {gpu_name}"
    else:
        args.peak_tflops = measured_matmul_tflops()
        peak_source = "float32 matmul measured on this machine"
    results = []
    for name in args.backbones.split(","):
        workload = WORKLOADS[name]
        if args.quick and not args.image_size:
            workload_args = argparse.Namespace(**{**vars(args), "image_size": 32 if name == "vgg16" else 75})
        else:
            workload_args = args
        results.append(bench_backbone(workload, workload_args, devices))
    load = os.getloadavg()[0]

    other_xla = "off" if devices.jit_compile else "on"
    rows = []
    for result in results:
        for phase, label in (("frozen", "frozen-feature phase"), ("fine_tune", "fine-tune phase")):
            ours, plain = result[(phase, "tfloop")], result[(phase, "plain")]
            rows.append(
                f"| {result['backbone']}@{result['size']} | {label} | {ours:.1f} | {plain:.1f} | "
                f"**{ours / plain:.2f}** | {100 * result[(phase, 'tfloop', 'mfu')]:.1f}% | "
                f"{100 * result[(phase, 'plain', 'mfu')]:.1f}% | "
                f"{100 * result[(phase, 'tfloop', 'counted')]:.1f}% |"
            )
        flipped, plain = result[("fine_tune", "xla_flipped")], result[("fine_tune", "plain")]
        rows.append(
            f"| {result['backbone']}@{result['size']} | fine-tune phase, XLA {other_xla} | {flipped:.1f} | "
            f"{plain:.1f} | {flipped / plain:.2f} | "
            f"{100 * result[('fine_tune', 'xla_flipped', 'mfu')]:.1f}% | "
            f"{100 * result[('fine_tune', 'plain', 'mfu')]:.1f}% | "
            f"{100 * result[('fine_tune', 'xla_flipped', 'counted')]:.1f}% |"
        )
    xla = "on" if devices.jit_compile else "off"
    device = gpu_name or f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    body = "\n".join(
        [
            "## Training (fine-tune speed)",
            "",
            f"Command: `{command.strip()}`",
            "",
            f"Device: {device}; tfloop: precision {devices.precision}, XLA {xla}, strategy "
            f"{type(devices.strategy).__name__.strip('_')}; baseline: keras.applications + model.fit with "
            "Keras' defaults. "
            f"{results[0]['images']} images per epoch, batch {args.batch_size}, {args.rounds} "
            f"alternating rounds (medians), random weights. Peak {args.peak_tflops:.2f} TFLOP/s "
            f"({peak_source}). TensorFlow {tf.__version__}; 1-min load average at the end {load:.1f}.",
            "",
            "| model | phase | tfloop img/s | plain img/s | ratio | tfloop MFU | plain MFU "
            "| tfloop MFU, work done |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            "MFU counts a training image as 3 forward passes and a frozen-feature image as 1 (the goal's "
            "convention). The fine-tune phase computes gradients for the top layers only ("
            + ", ".join(f"{r['backbone']}: {100 * r['share']:.0f}% of the forward work" for r in results)
            + "), so the last column counts forward + 2 x that share: the work really done. The "
            "frozen-feature phase of tfloop is its one forward pass plus the head epochs on the cached "
            f"features; its images/s counts the phase's {args.head_epochs} epochs (image-epochs per "
            "second) and its last column the one forward pass. On a shared CPU the measured matmul peak is "
            "low and moves with the load, so CPU MFU figures can exceed 100%.",
        ]
    )
    if args.quick:
        body += (
            "\n\nThese are CPU numbers from the quick mode (tiny images, a few steps): they check that the "
            "benchmark runs and how the two sides compare on this machine, not GPU speed. **GPU figures "
            "are not measured yet** (goals: tfloop ahead of the plain baseline in both phases, VGG16 "
            "fine-tune at >= 35% MFU). On a GPU machine run: `python benchmarks/training.py` "
            "(add `--peak-tflops N` when the card is not in the known list)."
        )
    print(body)
    if not args.no_write:
        replace_section(args.output, SECTION, body)


if __name__ == "__main__":
    main()
