"""CLI commands ``tfloop feedback quarantined`` and ``tfloop feedback resolve``: list the images held out
of training for carrying different labels, and settle one with the label it has from now on."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.commands._output import emit_json

feedback_app = typer.Typer(
    help="The feedback queue's quarantine: images found under different labels wait here for a person.",
    no_args_is_help=True,
)

FeedbackUriOption = Annotated[
    str | None,
    typer.Option(
        "--feedback-uri",
        help="Feedback queue root (folder or gs:// prefix). Default: TFLOOP_FEEDBACK_URI or "
        "<state folder>/feedback.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object last.")]


def _feedback_root(feedback_uri: str | None) -> str:
    from pipeline.settings import TfloopSettings

    return feedback_uri or TfloopSettings().feedback_root


@feedback_app.command("quarantined")
def quarantined_command(feedback_uri: FeedbackUriOption = None, json_output: JsonOption = False) -> None:
    """List the quarantined images: the same bytes pending under different labels, or marked so by a
    training run (which also sees the base dataset and consumed corrections). None of them is trained on
    until it is resolved."""
    from storage.quarantine import quarantined_images

    root = _feedback_root(feedback_uri)
    found = quarantined_images(root)
    if json_output:
        emit_json({"feedback_uri": root, "quarantined": len(found), "items": found})
        return
    if not found:
        typer.echo(f"no quarantined images in {root}")
        return
    for sha256, labels in found.items():
        typer.echo(f"{sha256}  {' vs '.join(labels)}")
    typer.echo(f"{len(found)} quarantined; settle one with: tfloop feedback resolve SHA256 --label LABEL")


@feedback_app.command("resolve")
def resolve_command(
    sha256: Annotated[str, typer.Argument(help="The image's sha256 (from `tfloop feedback quarantined`).")],
    label: Annotated[str, typer.Option("--label", help="The label the image has from now on.")],
    feedback_uri: FeedbackUriOption = None,
    json_output: JsonOption = False,
) -> None:
    """Give a quarantined image its label: pending copies under other labels move to rejected/ (never
    deleted), the choice is recorded in resolutions/ and overrides every other copy (the base dataset's
    too) in later runs, and the image trains again."""
    from pipeline.feedback_queue import resolve_quarantined

    resolution = resolve_quarantined(feedback_root=_feedback_root(feedback_uri), sha256=sha256, label=label)
    if json_output:
        emit_json(resolution.to_dict())
        return
    moved = f"; moved to rejected/: {', '.join(resolution.rejected)}" if resolution.rejected else ""
    queued = f"; queued as {resolution.queued}" if resolution.queued else ""
    typer.echo(f"{sha256[:12]}... is {label!r} from now on{moved}{queued} ({resolution.record})")


def register(app: typer.Typer) -> None:
    """Add ``tfloop feedback`` to app."""
    app.add_typer(feedback_app, name="feedback")
