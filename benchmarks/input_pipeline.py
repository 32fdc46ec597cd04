"""Benchmark of the training input pipeline, written to BENCHMARKS.md (section ``input_pipeline``).

1. Training throughput of one compiled model fed by the real ``tf.data`` pipeline from disk (decode, cache,
   shuffle, augmentation, prefetch) versus the same model fed synthetic in-memory tensors (cached and
   prefetched: a true upper bound of what any input pipeline can feed). Epochs of the two
   alternate, so load from other processes on a shared machine hits both alike; medians are reported.
   Target: real / synthetic >= 0.9.
2. The head phase on cached backbone features versus an uncached head-phase epoch (frozen backbone, images
   from the pipeline), and versus the one forward pass that computes the features.

Run: ``.venv/bin/python benchmarks/input_pipeline.py`` (options: ``--help``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sections import replace_section

SECTION = "input_pipeline"


def _epoch_seconds(model, dataset, *, epochs: int = 1) -> float:
    started = time.perf_counter()
    model.fit(dataset, epochs=epochs, verbose=0, shuffle=False)
    return (time.perf_counter() - started) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=64, help="demo images per class (6 classes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="alternating real/synthetic epochs measured")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    args = parser.parse_args()
    command = "python benchmarks/input_pipeline.py " + " ".join(sys.argv[1:])

    import keras
    import numpy as np
    import tensorflow as tf

    from training.data import AugmentConfig, make_image_dataset, scan_dataset
    from training.demo_data import make_demo_dataset
    from training.fit import compute_features, feature_dataset
    from training.models import build_model, feature_extractor, head_model, set_trainable

    with tempfile.TemporaryDirectory(prefix="tfloop-bench-") as workdir:
        root = Path(workdir) / "demo"
        make_demo_dataset(str(root), per_class=args.per_class, seed=0, image_size=args.image_size)
        scanned = scan_dataset([str(root)], min_images_per_label=2)
        records = scanned.side("train")
        labels = scanned.labels
        n_images = len(records)
        steps = -(-n_images // args.batch_size)
        keras.utils.set_random_seed(0)

        # --- 1. real pipeline vs synthetic tensors, same compiled model ---
        model = build_model(args.backbone, len(labels), image_size=args.image_size, weights="none")
        set_trainable(model, phase="full")
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile="auto",
        )
        real = make_image_dataset(
            records,
            labels,
            image_size=args.image_size,
            batch_size=args.batch_size,
            training=True,
            augment=AugmentConfig(),
            seed=0,
        )
        rng = np.random.default_rng(0)
        images = tf.constant(
            rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)), dtype=tf.float32
        )
        targets = tf.constant(rng.integers(0, len(labels), args.batch_size), dtype=tf.int32)
        full, rest = divmod(n_images, args.batch_size)
        synthetic = tf.data.Dataset.from_tensors((images, targets)).repeat(full)
        if rest:
            synthetic = synthetic.concatenate(tf.data.Dataset.from_tensors((images[:rest], targets[:rest])))
        # The ceiling: batches already in memory, cached and prefetched, so the model never waits on input.
        synthetic = synthetic.cache().prefetch(tf.data.AUTOTUNE)

        print(f"compiling and filling the cache ({n_images} images, {steps} steps/epoch)", file=sys.stderr)
        first_real = _epoch_seconds(model, real)
        _epoch_seconds(model, synthetic)
        plain_real = make_image_dataset(
            records, labels, image_size=args.image_size, batch_size=args.batch_size, training=True, seed=0
        )
        _epoch_seconds(model, plain_real)
        real_times, synthetic_times, plain_times = [], [], []
        for round_index in range(args.rounds):
            real_times.append(_epoch_seconds(model, real))
            synthetic_times.append(_epoch_seconds(model, synthetic))
            plain_times.append(_epoch_seconds(model, plain_real))
            print(
                f"round {round_index + 1}: real {real_times[-1]:.2f}s synthetic {synthetic_times[-1]:.2f}s",
                file=sys.stderr,
            )
        real_ips = n_images / statistics.median(real_times)
        synthetic_ips = n_images / statistics.median(synthetic_times)
        ratio = real_ips / synthetic_ips
        plain_ips = n_images / statistics.median(plain_times)

        # --- 2. cached-feature head phase vs uncached head epoch ---
        frozen = build_model(args.backbone, len(labels), image_size=args.image_size, weights="none")
        set_trainable(frozen, phase="head")
        frozen.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile="auto",
        )
        plain = make_image_dataset(
            records,
            labels,
            image_size=args.image_size,
            batch_size=args.batch_size,
            training=True,
            augment=None,
            seed=0,
        )
        _epoch_seconds(frozen, plain)
        uncached = statistics.median(_epoch_seconds(frozen, plain) for _ in range(args.rounds))
        extractor = feature_extractor(frozen)
        compute_features(
            extractor,
            records[: args.batch_size],
            labels,
            image_size=args.image_size,
            batch_size=args.batch_size,
        )  # traces the predict function outside the timing
        started = time.perf_counter()
        features, feature_targets = compute_features(
            extractor, records, labels, image_size=args.image_size, batch_size=args.batch_size
        )
        forward_pass = time.perf_counter() - started
        head = head_model(frozen)
        head.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile="auto",
        )
        cached_data = feature_dataset(
            features, feature_targets, batch_size=args.batch_size, training=True, seed=0
        )
        _epoch_seconds(head, cached_data)
        cached = statistics.median(_epoch_seconds(head, cached_data) for _ in range(args.rounds))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [
        (
            "real pipeline from disk (decode+cache+shuffle+augment+prefetch), steady epochs",
            f"{real_ips:.1f} img/s",
        ),
        ("same model, synthetic in-memory tensors", f"{synthetic_ips:.1f} img/s"),
        ("**ratio real / synthetic** (target >= 0.9)", f"**{ratio:.2f}**"),
        ("real pipeline without augmentation (decode+cache+shuffle+prefetch)", f"{plain_ips:.1f} img/s"),
        ("ratio real without augmentation / synthetic", f"{plain_ips / synthetic_ips:.2f}"),
        ("first real epoch (reads and decodes every file, includes tracing)", f"{first_real:.1f} s"),
        ("head phase, uncached epoch (frozen backbone over images)", f"{uncached:.2f} s"),
        ("head phase, one forward pass computing the features (once)", f"{forward_pass:.2f} s"),
        ("head phase, cached-feature epoch", f"{cached:.3f} s"),
        ("**cached epoch / forward pass**", f"**{cached / forward_pass:.3f}**"),
        ("**cached epoch / uncached epoch**", f"**{cached / uncached:.3f}**"),
    ]
    body = "\n".join(
        [
            "## Input pipeline (training)",
            "",
            f"Command: `{command.strip()}`",
            "",
            f"Setup: {args.backbone} from random weights at {args.image_size}px, batch {args.batch_size}, "
            f"{n_images} demo training images, {args.rounds} alternating rounds (medians); TensorFlow "
            f"{tf.__version__}, {platform.machine()}, {os.cpu_count()} CPU(s), "
            f"{len(tf.config.list_physical_devices('GPU'))} GPU(s), 1-min load average at the end {load:.1f} "
            "(the machine is shared: absolute numbers move with its load, the ratios less so).",
            "",
            "| measurement | value |",
            "| --- | --- |",
            *[f"| {name} | {value} |" for name, value in rows],
        ]
    )
    replace_section(args.output, SECTION, body)
    print(body)


if __name__ == "__main__":
    main()
