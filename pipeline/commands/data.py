"""CLI commands ``tfloop data ...``: write the demo dataset, check a dataset (layers over training.data)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from pipeline.commands._output import emit_json, info

data_app = typer.Typer(
    help="Datasets: make the offline demo dataset, check a dataset before training.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to app."""
    app.add_typer(data_app, name="data")


@data_app.command("make-demo")
def make_demo(
    out: Annotated[str, typer.Argument(help="Folder or gs:// prefix to write <label>/<image>.jpg files to.")],
    per_class: Annotated[int, typer.Option(help="Images per class.", min=1)] = 150,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same images.")] = 0,
    image_size: Annotated[int, typer.Option(help="Side of the square images in pixels.", min=16)] = 64,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object as the last stdout line.")
    ] = False,
) -> None:
    """Write a procedurally drawn image dataset (six shape/pattern classes, noisy JPEGs) for offline demos."""
    from training.demo_data import make_demo_dataset

    started = time.monotonic()
    info(f"drawing {per_class} images for each demo class into {out}")
    summary = make_demo_dataset(out, per_class=per_class, seed=seed, image_size=image_size)
    seconds = round(time.monotonic() - started, 2)
    if json_output:
        emit_json(
            {
                "root": summary.root,
                "labels": list(summary.labels),
                "files": summary.files,
                "per_class": summary.per_class,
                "image_size": summary.image_size,
                "seconds": seconds,
            }
        )
        return
    typer.echo(
        f"wrote {summary.files} images of {len(summary.labels)} classes ({', '.join(summary.labels)}) "
        f"to {summary.root} in {seconds}s"
    )


@data_app.command("check")
def check(
    data: Annotated[
        list[str], typer.Argument(help="Dataset roots (folders or gs:// prefixes) <label>/<image>.")
    ],
    validation_fraction: Annotated[
        float, typer.Option(help="Share of images (by content hash) for early stopping.")
    ] = 0.2,
    test_fraction: Annotated[
        float, typer.Option(help="Share of images (by content hash) held out for the gate.")
    ] = 0.2,
    min_images: Annotated[
        int, typer.Option(help="Labels with fewer distinct images are left out.", min=1)
    ] = 5,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the data report as the last stdout line.")
    ] = False,
) -> None:
    """Validate every file of a dataset and print the data report (what training would use and skip)."""
    from training.data import scan_dataset

    info(f"scanning {', '.join(data)}")
    with tempfile.TemporaryDirectory(prefix="tfloop-scan-") as cache:
        scanned = scan_dataset(
            data,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            min_images_per_label=min_images,
            cache_dir=Path(cache),
        )
    report = scanned.report
    if json_output:
        emit_json(report.to_dict())
        return
    typer.echo(
        f"{report.images} valid images, {len(report.labels)} labels, fingerprint {report.fingerprint[:12]}"
    )
    for label in report.labels:
        typer.echo(
            f"  {label:>20}: train {report.train_counts[label]:5d}  "
            f"validation {report.validation_counts[label]:5d}  test {report.test_counts[label]:5d}"
        )
    typer.echo(
        f"{report.duplicates} duplicate file(s) counted once; {report.quarantined_count} image(s) "
        "quarantined (same bytes, different labels)"
    )
    for conflict in report.quarantined[:20]:
        typer.echo(f"  quarantined {conflict.sha256[:12]}: {' vs '.join(conflict.labels)}: {conflict.files}")
    for label, count in report.excluded_labels.items():
        typer.echo(f"  left out: label {label!r} has {count} image(s), fewer than {min_images}")
    skipped = {reason: count for reason, count in report.skipped_counts.items() if count}
    typer.echo(f"skipped {report.skipped_total} files" + (f": {skipped}" if skipped else ""))
    for item in report.skipped[:20]:
        typer.echo(f"  {item.reason}: {item.uri}")
