"""CLI command ``tfloop train``: train, evaluate and log an image classifier (a layer over training.fit)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.commands._output import emit_json, fail, info

BACKBONE_HELP = "vgg16 or inception_v3 (GPU); efficientnet_b0 or mobilenet_v2 (small, for CPU)."


def register(app: typer.Typer) -> None:
    """Add this stage's commands to app."""
    app.command("train")(train_command)


def train_command(
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="Dataset root, a folder or gs:// prefix laid out <label>/<image>; repeat to combine roots "
            "(e.g. the base dataset and the feedback queue's pending/). Default: the demo dataset in the "
            "state folder.",
        ),
    ] = None,
    backbone: Annotated[str, typer.Option(help=BACKBONE_HELP)] = "efficientnet_b0",
    weights: Annotated[
        str,
        typer.Option(
            help="imagenet (Keras' cached file in ~/.keras/models, downloaded when missing), none (random "
            "init), or a .weights.h5 path/gs:// URI of the backbone without its top."
        ),
    ] = "none",
    image_size: Annotated[int, typer.Option(help="Square input size in pixels.", min=32)] = 64,
    epochs: Annotated[
        int, typer.Option(help="Epochs of the first phase (head, or all layers for weights none).", min=1)
    ] = 15,
    fine_tune_epochs: Annotated[
        int, typer.Option(help="Epochs of the fine-tune phase (0: skip it).", min=0)
    ] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per batch.", min=1)] = 16,
    learning_rate: Annotated[float, typer.Option(help="Learning rate of the first phase.")] = 2e-3,
    fine_tune_learning_rate: Annotated[
        float, typer.Option(help="Learning rate of the fine-tune phase.")
    ] = 1e-4,
    unfreeze: Annotated[
        int, typer.Option(help="Top backbone layers trained in the fine-tune phase.", min=0)
    ] = 20,
    augment: Annotated[
        bool,
        typer.Option(
            "--augment/--no-augment",
            help="Flip/rotate/zoom training images. Off + frozen "
            "backbone: the head trains on cached features.",
        ),
    ] = False,
    validation_fraction: Annotated[
        float,
        typer.Option(help="Share of images (by content hash) for early stopping and best-epoch choice."),
    ] = 0.2,
    test_fraction: Annotated[
        float, typer.Option(help="Share of images (by content hash) held out for the promotion gate only.")
    ] = 0.2,
    min_images: Annotated[
        int,
        typer.Option(help="Labels with fewer distinct images are reported and left out of the run.", min=1),
    ] = 5,
    patience: Annotated[
        int, typer.Option(help="Early stopping: epochs without a better validation accuracy.", min=1)
    ] = 8,
    precision: Annotated[
        str,
        typer.Option(
            help="float32, mixed_float16 or mixed_bfloat16 (Keras mixed precision; the output stays "
            "float32). auto: bfloat16 on GPUs of compute capability >= 8.0, float16 on >= 7.0, else float32."
        ),
    ] = "auto",
    jit_compile: Annotated[
        str, typer.Option(help="XLA compilation of the train step: on, off; auto: on for GPUs, off for CPUs.")
    ] = "auto",
    distribute: Annotated[
        str,
        typer.Option(
            help="none, mirrored (MirroredStrategy over this machine's GPUs), multi-worker "
            "(MultiWorkerMirroredStrategy over the workers in TF_CONFIG); auto: multi-worker when TF_CONFIG "
            "names several workers, mirrored with several GPUs, else none."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed (initialisation, shuffling, augmentation).")] = 0,
    model_name: Annotated[
        str | None, typer.Option(help="Model name (MLflow tag, export folder). Default: TFLOOP_MODEL_NAME.")
    ] = None,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint folder; a crashed run started again resumes from it. "
            "Default: <state folder>/checkpoints/<model name>."
        ),
    ] = None,
    export_to: Annotated[
        str | None,
        typer.Option(
            help="After training, export the model as the next version below this base (path or gs://)."
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object as the last stdout line.")
    ] = False,
) -> None:
    """Train a transfer-learning classifier (early stopping on the validation split), score it on the test
    split and log the run to MLflow."""
    from pydantic import ValidationError

    from pipeline.settings import TfloopSettings

    settings = TfloopSettings()
    name = model_name or settings.model_name
    info(f"loading TensorFlow and training {backbone} on {', '.join(data or [settings.dataset_uri])}")
    from training.fit import TrainConfig, train
    from training.tracking import TrackingSettings

    try:
        config = TrainConfig(
            data=tuple(data or [settings.dataset_uri]),
            backbone=backbone,
            weights=weights,
            image_size=image_size,
            epochs=epochs,
            fine_tune_epochs=fine_tune_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            fine_tune_learning_rate=fine_tune_learning_rate,
            unfreeze=unfreeze,
            augment=augment,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            min_images_per_label=min_images,
            patience=patience,
            seed=seed,
            model_name=name,
            precision=precision,
            jit_compile=jit_compile,
            distribute=distribute,
        )
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        fail(f"invalid training options: {problems}")
    tracking = TrackingSettings(
        tracking_uri=settings.tracking_uri,
        experiment=settings.experiment,
        artifact_root=settings.artifact_root,
    )
    # Keras writes progress bars to stdout; send them to stderr so stdout carries only results.
    with contextlib.redirect_stdout(sys.stderr):
        result = train(
            config,
            tracking=tracking,
            checkpoint_dir=checkpoint_dir or settings.checkpoints_dir / name,
            verbose=1,
        )
    payload: dict[str, Any] = result.summary()
    payload["tracking_uri"] = settings.tracking_uri
    payload["experiment"] = settings.experiment
    if export_to and not result.chief:
        info("not the chief worker: the chief logs the run and exports the model")
    elif export_to:
        from export.api import export_run

        info(f"exporting run {result.run_id} below {export_to}")
        exported = export_run(
            result.run_id, base=export_to, tracking_uri=settings.tracking_uri, model_name=name
        )
        payload["export"] = {
            "version": exported.version,
            "path": exported.path,
            "registered_version": exported.registered_version,
        }
    if json_output:
        emit_json(payload)
        return
    report = result.data_report
    typer.echo(f"run {result.run_id} ({result.model_name}, {', '.join(result.phases)} on {result.device})")
    split = report.split_counts
    typer.echo(
        f"data: {report.images} images, {len(result.labels)} labels, {report.skipped_total} files skipped, "
        f"fingerprint {report.fingerprint[:12]}"
    )
    typer.echo(
        f"split: train {split['train']}, validation {split['validation']}, test {split['test']}; "
        f"{report.duplicates} duplicate file(s) counted once, {report.quarantined_count} image(s) "
        "quarantined (same bytes, different labels)"
    )
    for label, count in report.excluded_labels.items():
        minimum = report.min_images_per_label
        typer.echo(f"left out: label {label!r} has {count} image(s), fewer than {minimum}")
    typer.echo(
        f"test accuracy {result.accuracy:.3f}, macro F1 {result.macro_f1:.3f} "
        f"(validation accuracy {result.validation_report.accuracy:.3f})"
    )
    for label, metrics in result.eval_report.per_class.items():
        typer.echo(
            f"  {label:>20}: precision {metrics.precision:.3f} recall {metrics.recall:.3f} "
            f"f1 {metrics.f1:.3f}"
        )
    if "export" in payload:
        typer.echo(f"exported version {payload['export']['version']} to {payload['export']['path']}")
    typer.echo(f"MLflow: {settings.tracking_uri} (experiment {settings.experiment!r})")
    typer.echo(f"open the UI: mlflow ui --backend-store-uri {settings.tracking_uri}")
