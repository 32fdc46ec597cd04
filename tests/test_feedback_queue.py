"""The durable feedback queue on local disk and on a GCS emulator: layout, idempotence, no overwrite,
label checks, concurrency, and the bounded memory of recently classified images."""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

import storage
from serving.errors import InvalidInput
from serving.feedback import FeedbackItem, FeedbackQueue, RecentImage, RecentImages, check_label

LABELS = ["cat", "dog", "fish"]


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, seed // 256 % 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(params=["local", "gcs"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "feedback")
    return request.getfixturevalue("gcs_bucket") + "/feedback"


def test_item_is_stored_content_addressed_with_its_record(root: str) -> None:
    queue = FeedbackQueue(root)
    image = png(1)
    item = FeedbackItem(
        image=image,
        extension="png",
        label="dog",
        prediction_id="p1",
        predicted=[{"label": "cat", "score": 0.9}],
        model_name="m",
        model_version=3,
        note="blurry",
    )
    receipt = queue.submit(item)
    sha = hashlib.sha256(image).hexdigest()
    assert receipt.image_uri == storage.join(root, "pending", "dog", f"{sha}.png")
    assert storage.read_bytes(receipt.image_uri) == image
    record = json.loads(storage.read_text(receipt.record_uri))
    assert record["label"] == "dog" and record["model_version"] == 3 and record["prediction_id"] == "p1"
    assert record["predicted"] == [{"label": "cat", "score": 0.9}] and record["note"] == "blurry"
    assert record["image"] == f"pending/dog/{sha}.png" and record["received_at"]
    assert not receipt.duplicate


def test_same_image_and_label_is_stored_once_and_never_overwritten(root: str) -> None:
    queue = FeedbackQueue(root)
    first = queue.submit(FeedbackItem(image=png(2), extension="png", label="cat", note="first"))
    second = queue.submit(FeedbackItem(image=png(2), extension="png", label="cat", note="second"))
    other_label = queue.submit(FeedbackItem(image=png(2), extension="png", label="dog"))
    assert second.duplicate and second.feedback_id == first.feedback_id
    assert json.loads(storage.read_text(first.record_uri))["note"] == "first"
    assert not other_label.duplicate and other_label.feedback_id != first.feedback_id
    stats = queue.stats()
    assert stats["total"] == 2 and stats["pending"] == 2
    assert stats["labels"] == {"cat": {"pending": 1, "consumed": 0}, "dog": {"pending": 1, "consumed": 0}}


def test_consumed_items_count_per_label(tmp_path) -> None:
    root = str(tmp_path / "fb")
    queue = FeedbackQueue(root)
    receipt = queue.submit(FeedbackItem(image=png(3), extension="png", label="fish"))
    storage.move(receipt.image_uri, storage.join(root, "consumed", "run1", "fish", "x.png"))
    assert queue.stats()["labels"]["fish"] == {"pending": 0, "consumed": 1}


def test_many_threads_submit_concurrently(root: str) -> None:
    """Racing submissions of the same items (locally and on GCS, whose emulator enforces create-only writes):
    each item is stored once, exactly one submission of it is new, and nothing half-written is listed."""
    queue = FeedbackQueue(root)
    items = [FeedbackItem(image=png(i // 4), extension="png", label=LABELS[(i // 4) % 3]) for i in range(240)]
    with ThreadPoolExecutor(16) as pool:
        receipts = list(pool.map(queue.submit, items))
    unique = {(r.feedback_id) for r in receipts}
    assert len(unique) == 60  # 60 distinct images, each always with the same label
    assert sum(not r.duplicate for r in receipts) == 60
    assert queue.stats()["total"] == 60
    assert not [name for name in storage.list_files(root) if name.endswith(".tmp")]


@pytest.mark.parametrize(
    "label", ["../etc", "a/b", "..", ".hidden", "", " ", "x" * 101, "do\ng", "c:\\x", "é"]
)
def test_unsafe_labels_never_reach_a_path(label: str) -> None:
    with pytest.raises(InvalidInput):
        check_label(label, known=LABELS, allow_new=True)


def test_label_check_names_known_labels() -> None:
    assert check_label(" dog ", known=LABELS, allow_new=False) == "dog"
    with pytest.raises(InvalidInput, match="known labels: cat, dog, fish"):
        check_label("cow", known=LABELS, allow_new=False)
    assert check_label("cow", known=LABELS, allow_new=True) == "cow"


def test_queue_refuses_unsafe_label_even_when_called_directly(tmp_path) -> None:
    with pytest.raises(InvalidInput):
        FeedbackQueue(str(tmp_path)).submit(FeedbackItem(image=png(1), extension="png", label="../x"))
    assert not list(tmp_path.rglob("*"))


def test_recent_images_are_bounded_by_count_and_bytes() -> None:
    recent = RecentImages(max_items=3, max_bytes=100)
    for i in range(5):
        recent.put(str(i), RecentImage(b"x" * 10, "png"))
    assert len(recent) == 3 and recent.get("0") is None and recent.get("4") is not None
    recent.put("4", RecentImage(b"y" * 10, "png"))  # the same image again: one entry, counted once
    assert len(recent) == 3 and recent.get("4") == RecentImage(b"y" * 10, "png")
    recent.put("big", RecentImage(b"x" * 95, "png"))
    assert len(recent) == 1 and recent.get("big") is not None
    recent.put("huge", RecentImage(b"x" * 101, "png"))  # over the byte bound alone: not kept
    assert recent.get("huge") is None and recent.get("big") is not None
