"""Code tier: the demo's helpers (samples, summary table, commands); the full demo is `make demo`."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipeline.commands.demo import fresh_samples, make_data, reset_state, summary_lines
from pipeline.settings import TfloopSettings

pytestmark = pytest.mark.code


def test_fresh_samples_are_decodable_images_of_the_asked_labels() -> None:
    from PIL import Image

    samples = fresh_samples(("circle", "stripes"), per_class=2, image_size=32, seed=7)
    assert [label for label, _ in samples] == ["circle", "circle", "stripes", "stripes"]
    for _, data in samples:
        assert Image.open(io.BytesIO(data)).size == (32, 32)
    assert samples[0][1] != samples[1][1]


def test_make_data_writes_once_and_reset_only_touches_the_demo_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_data(str(data), per_class=2, image_size=32, seed=0, labels=("circle", "square"))
    assert sorted(p.name for p in data.iterdir()) == ["circle", "square"]
    make_data(str(data), per_class=5, image_size=32, seed=0, labels=("circle", "square"))
    assert len(list((data / "circle").iterdir())) == 2  # reused, not rewritten
    other = tmp_path / "not-demo"
    other.mkdir()
    (other / "keep").write_text("x")
    reset_state(other)
    assert (other / "keep").exists()
    demo = tmp_path / "demo-run"
    (demo / "old").mkdir(parents=True)
    reset_state(demo)
    assert demo.exists() and not (demo / "old").exists()


def test_summary_shows_both_models_side_by_side(tmp_path: Path) -> None:
    settings = TfloopSettings(home=tmp_path)
    v1 = {"run_id": "r1", "skipped": ["image build skipped: no builder"]}
    v2 = {
        "run_id": "r2",
        "gate_passed": True,
        "gate_reason": "passed: ok",
        "candidate_metrics": {
            "accuracy": 0.9,
            "macro_f1": 0.88,
            "corrected_accuracy": 1.0,
            "count": 20,
            "corrected_count": 3,
        },
        "champion_metrics": {"accuracy": 0.7, "macro_f1": 0.65, "corrected_accuracy": 0.0},
        "skipped": [],
    }
    text = "\n".join(summary_lines(settings, v1=v1, v2=v2, serving_url="http://127.0.0.1:1"))
    assert "0.700" in text and "0.900" in text
    assert "gate for v2: PASSED" in text
    assert "mlflow ui --backend-store-uri sqlite:///" in text
    assert "serving URL: http://127.0.0.1:1" in text
    assert "skipped: image build skipped" in text


def test_summary_says_what_is_live_after_the_demo_promoted(tmp_path: Path) -> None:
    settings = TfloopSettings(home=tmp_path)
    v2 = {
        "run_id": "r2",
        "gate_passed": True,
        "gate_reason": "passed",
        "skipped": ["rollout skipped: no image was built", "promotion: delivery.promote=false; ..."],
    }
    lines = summary_lines(settings, v1={}, v2=v2, serving_url="http://x", live_version=2)
    assert "live: version 2 (unpinned requests, X-Model-Version)" in lines
    assert "skipped: rollout skipped: no image was built" in lines
    assert not any("promotion:" in line for line in lines)  # the demo promoted v2 after the flow
    before = summary_lines(settings, v1={}, v2=v2, serving_url="http://x")
    assert any("promotion: delivery.promote=false" in line for line in before)
