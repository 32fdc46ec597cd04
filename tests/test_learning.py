"""Real data that learns: scikit-learn's handwritten digits as PNG folders, trained from scratch with the
three-way split, scored on the test split only; the same run quarantines a planted conflict, counts a
planted duplicate once and leaves out a label with too few images; and the gate, fed this model's real
answers, passes it against a worse champion and refuses it as the champion of a better one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.model]

PER_CLASS = 40
SIZE = 32


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<digit>/<i>.png``: 8x8 digits upsampled to 32x32 RGB, plus the planted problems."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits") / "data"
    written: dict[int, int] = {}
    data = load_digits()
    for image, target in zip(data.images, data.target, strict=True):
        digit = int(target)
        if written.get(digit, 0) >= PER_CLASS:
            continue
        written[digit] = written.get(digit, 0) + 1
        pixels = (image / 16.0 * 255).astype(np.uint8)
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").resize((SIZE, SIZE), Image.BILINEAR).convert("RGB").save(
            folder / f"{written[digit]}.png"
        )
    (root / "3" / "copy-of-1.png").write_bytes((root / "3" / "1.png").read_bytes())  # duplicate
    (root / "8" / "really-a-4.png").write_bytes((root / "4" / "2.png").read_bytes())  # conflict
    (root / "x").mkdir()
    for i in range(2):  # a new label with too few images (mirrored sevens: new bytes)
        mirrored = (data.images[data.target == 7][i][:, ::-1] / 16.0 * 255).astype(np.uint8)
        Image.fromarray(mirrored, "L").resize((SIZE, SIZE)).convert("RGB").save(root / "x" / f"{i}.png")
    return root


def test_digits_learn_far_above_chance_and_the_data_problems_are_handled(
    digits: Path, tmp_path: Path
) -> None:
    import hashlib

    from mlflow import MlflowClient

    from training.evaluate import keras_top1_fn
    from training.fit import TrainConfig, train
    from training.gate import GatePolicy, ModelAnswers, answer_records, evaluate_gate, gate_items
    from training.tracking import TrackingSettings

    tracking = TrackingSettings(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "art")
    )
    config = TrainConfig(
        data=(str(digits),),
        backbone="efficientnet_b0",
        image_size=SIZE,
        epochs=10,
        batch_size=32,
        patience=10,
        model_name="digits",
    )
    result = train(config, tracking=tracking, checkpoint_dir=tmp_path / "ckpt", verbose=0)

    # Learns: test accuracy (a split nothing was selected on) far above the 10% of chance.
    assert result.labels == [str(d) for d in range(10)]
    assert result.accuracy > 0.6, result.summary()
    report = result.data_report
    assert report.excluded_labels == {"x": 2}
    assert report.duplicates == 1 and report.quarantined_count == 1
    conflict = hashlib.sha256((digits / "4" / "2.png").read_bytes()).hexdigest()
    assert result.dataset.quarantined == (conflict,)
    assert report.images == 10 * PER_CLASS - 1 == sum(report.split_counts.values())
    summary = result.summary()
    assert summary["split"] == report.split_counts and summary["quarantined"] == 1
    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    local = client.download_artifacts(result.run_id, "split.json", str(tmp_path / "dl"))
    split = json.loads(Path(local).read_text())
    assert split["quarantined"] == [conflict]
    assert all(conflict not in split[name] for name in ("train", "validation", "test"))
    local = client.download_artifacts(result.run_id, "data_report.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())["quarantined"][0]["labels"] == ["4", "8"]

    # The gate on this model's real answers: against a champion that always answers the digit after the
    # true one (worse on every class, whatever this training run learned), and the other way round.
    records = result.dataset.side("test")
    items = gate_items(records, corrected_roots=())
    real = answer_records(keras_top1_fn(result.model, result.labels, image_size=SIZE), records)
    shifted = ModelAnswers(
        labels=tuple(str((int(item.label) + 1) % 10) for item in items), confidences=real.confidences
    )
    policy = GatePolicy(min_accuracy=0.0, min_class_items=5)
    assert evaluate_gate(items, real, shifted, policy=policy).passed
    refused = evaluate_gate(items, shifted, real, policy=policy)
    assert not refused.passed and refused.reason.startswith("refused: accuracy")
    assert evaluate_gate(items, shifted, real, policy=policy).to_dict() == refused.to_dict()
