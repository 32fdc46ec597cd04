"""The quarantine and the no-repeat rule of the feedback queue: a consumed correction resubmitted is a
duplicate; images under different labels stay pending, marked and listed (``/feedback/stats``, ``tfloop
feedback quarantined``) until ``tfloop feedback resolve`` settles them for every later run."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import storage
from pipeline.cli import app
from pipeline.feedback_queue import (
    consume_feedback,
    gather_roots,
    mark_quarantined,
    pending_files,
    resolve_quarantined,
)
from serving.feedback import FeedbackItem, FeedbackQueue
from training.data import scan_dataset

pytestmark = pytest.mark.data


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (seed % 256, 40, seed // 256 % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["local", "gcs"])
def queue_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "feedback")
    return request.getfixturevalue("gcs_bucket") + "/feedback"


def test_a_consumed_correction_resubmitted_is_a_duplicate_and_not_queued_again(queue_root: str) -> None:
    queue = FeedbackQueue(queue_root)
    image = png(1)
    first = queue.submit(FeedbackItem(image=image, extension="png", label="dog"))
    assert not first.duplicate and pending_files(queue_root) == [f"dog/{sha(image)}.png"]
    consume_feedback(feedback_root=queue_root, run_id="run-1", files=pending_files(queue_root))
    assert pending_files(queue_root) == []

    again = queue.submit(FeedbackItem(image=image, extension="png", label="dog", note="resubmitted"))
    assert again.duplicate and again.feedback_id == first.feedback_id
    assert pending_files(queue_root) == []  # not trained on twice
    assert queue.stats()["consumed"] == 1 and queue.stats()["total"] == 1
    # A different label for the same image is new information: queued (and later quarantined).
    other = queue.submit(FeedbackItem(image=image, extension="png", label="cat"))
    assert not other.duplicate and pending_files(queue_root) == [f"cat/{sha(image)}.png"]


def base_dataset(root: Path, *, shared: bytes) -> None:
    for index in range(6):
        for offset, label in enumerate(("cat", "dog")):
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / label / f"{index}.png").write_bytes(png(100 + 10 * index + offset))
    (root / "cat" / "shared.png").write_bytes(shared)


def scan(roots_all: list[str], overrides: dict[str, str], cache: Path) -> tuple[dict[str, str], set[str]]:
    scanned = scan_dataset(
        roots_all, min_images_per_label=1, validation_fraction=0.2, test_fraction=0.2,
        label_overrides=overrides, cache_dir=cache,
    )  # fmt: skip
    return {r.sha256: r.label for r in scanned.records}, set(scanned.quarantined)


def test_conflicts_stay_pending_listed_and_a_resolution_settles_them(queue_root: str, tmp_path: Path) -> None:
    base = tmp_path / "base"
    with_base, pending_only = png(1), png(2)  # base says cat, feedback dog / feedback says cat and dog
    base_dataset(base, shared=with_base)
    queue = FeedbackQueue(queue_root)
    for image, label in ((with_base, "dog"), (pending_only, "cat"), (pending_only, "dog"), (png(3), "dog")):
        queue.submit(FeedbackItem(image=image, extension="png", label=label))
    # Pending conflicts show before any run.
    stats = queue.stats()
    assert stats["quarantined"] == 1
    assert stats["quarantined_items"] == [{"sha256": sha(pending_only), "labels": ["cat", "dog"]}]

    roots = gather_roots(data_uri=str(base), feedback_root=queue_root)
    labels, quarantined = scan(roots.all, dict(roots.resolutions), tmp_path / "cache")
    assert quarantined == {sha(with_base), sha(pending_only)}
    assert sha(with_base) not in labels and sha(pending_only) not in labels and labels[sha(png(3))] == "dog"

    # What a run does with them: mark them, consume the rest, keep them pending.
    conflicts = {digest: ["cat", "dog"] for digest in quarantined}
    assert mark_quarantined(feedback_root=queue_root, conflicts=conflicts) == 2
    assert mark_quarantined(feedback_root=queue_root, conflicts=conflicts) == 0  # unchanged marks stay
    consumed = consume_feedback(
        feedback_root=queue_root, run_id="run-1", files=roots.pending_files, quarantined=tuple(quarantined)
    )
    assert consumed.moved == 1 and consumed.quarantined == 3
    assert len(pending_files(queue_root, include_quarantined=True)) == 3
    assert pending_files(queue_root) == []  # nothing left for a run: the rest waits for a person
    stats = queue.stats()
    assert stats["quarantined"] == 2 and "tfloop feedback resolve" in stats["resolve"]

    # The base-dataset conflict: the person says dog; the base copy's cat is overridden in later runs.
    first = resolve_quarantined(feedback_root=queue_root, sha256=sha(with_base), label="dog")
    assert first.rejected == [] and first.queued is None
    # The pending conflict: cat wins; the dog copy moves to rejected/ (never deleted).
    second = resolve_quarantined(feedback_root=queue_root, sha256=sha(pending_only), label="cat")
    assert second.rejected == [f"dog/{sha(pending_only)}.png"]
    assert storage.read_bytes(storage.join(queue_root, "rejected", "dog", f"{sha(pending_only)}.png")) == (
        pending_only
    )
    assert queue.stats()["quarantined"] == 0
    roots = gather_roots(data_uri=str(base), feedback_root=queue_root)
    assert roots.resolutions == {sha(with_base): "dog", sha(pending_only): "cat"}
    assert sorted(roots.pending_files) == sorted(
        [f"dog/{sha(with_base)}.png", f"cat/{sha(pending_only)}.png"]
    )
    labels, quarantined = scan(roots.all, dict(roots.resolutions), tmp_path / "cache")
    assert quarantined == set()
    assert labels[sha(with_base)] == "dog" and labels[sha(pending_only)] == "cat"
    with pytest.raises(storage.TfloopError, match="not quarantined"):
        resolve_quarantined(feedback_root=queue_root, sha256=sha(png(3)), label="cat")


def test_resolve_to_a_label_no_copy_has_queues_the_image_under_it(tmp_path: Path) -> None:
    root = str(tmp_path / "feedback")
    queue = FeedbackQueue(root)
    image = png(9)
    for label in ("cat", "dog"):
        queue.submit(FeedbackItem(image=image, extension="png", label=label))
    resolution = resolve_quarantined(feedback_root=root, sha256=sha(image), label="fish")
    assert resolution.queued == f"fish/{sha(image)}.png"
    assert sorted(resolution.rejected) == [f"cat/{sha(image)}.png", f"dog/{sha(image)}.png"]
    assert pending_files(root) == [f"fish/{sha(image)}.png"]


def test_feedback_cli_lists_and_resolves_with_json_and_clear_errors(tmp_path: Path) -> None:
    root = str(tmp_path / "feedback")
    queue = FeedbackQueue(root)
    image = png(4)
    for label in ("cat", "dog"):
        queue.submit(FeedbackItem(image=image, extension="png", label=label))
    runner = CliRunner()
    listed = runner.invoke(app, ["feedback", "quarantined", "--feedback-uri", root, "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output.strip().splitlines()[-1])["items"] == {sha(image): ["cat", "dog"]}
    resolved = runner.invoke(
        app, ["feedback", "resolve", sha(image), "--label", "dog", "--feedback-uri", root, "--json"]
    )
    assert resolved.exit_code == 0, resolved.output
    answer = json.loads(resolved.output.strip().splitlines()[-1])
    assert answer["label"] == "dog" and answer["rejected"] == [f"cat/{sha(image)}.png"]
    assert (
        "no quarantined images"
        in runner.invoke(app, ["feedback", "quarantined", "--feedback-uri", root]).output
    )

    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "feedback", "resolve", "abc", "--label", "dog",
         "--feedback-uri", root],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1 and "not a sha256" in bad.stderr and "Traceback" not in bad.stderr
    json.loads(
        storage.read_text(storage.join(root, "resolutions", f"{sha(image)}.json"))
    )  # the record a person's choice left
