"""Production mode of /feedback (on for a gs:// queue, or when asked): the token is required, each client is
rate-limited, and one client can add only so many items to a label; plus the limiter on its own."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving.app import create_app
from serving.errors import LabelCapReached, TooManyRequests
from serving.limits import FeedbackLimiter
from serving.settings import ServingSettings

TOKEN = "production-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, seed // 256 % 256, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


def settings(tmp_path: Path, **overrides: object) -> ServingSettings:
    values: dict[str, object] = {
        "model_base": str(tmp_path / "models"),
        "model_name": "tiny",
        "feedback_uri": str(tmp_path / "feedback"),
        "allow_new_labels": True,  # no model is loaded: labels are not checked against one
        "poll_interval_s": 60,
        **overrides,
    }
    return ServingSettings(**values)


def post(api: TestClient, seed: int, label: str = "cat", **kwargs: object) -> tuple[int, dict]:
    files = {"file": ("x.png", png(seed), "image/png")}
    response = api.post("/feedback", data={"label": label}, files=files, **kwargs)  # type: ignore[arg-type]
    return response.status_code, response.json() | {"retry_after": response.headers.get("retry-after")}


def test_production_mode_is_on_for_a_gcs_queue_or_when_asked() -> None:
    assert ServingSettings(feedback_uri="gs://bucket/feedback").production_mode
    assert not ServingSettings(feedback_uri="gs://bucket/feedback", production=False).production_mode
    assert not ServingSettings(feedback_uri="/var/feedback").production_mode
    assert ServingSettings(feedback_uri="/var/feedback", production=True).production_mode


def test_production_mode_without_a_token_takes_no_feedback(tmp_path: Path) -> None:
    with TestClient(create_app(settings(tmp_path, production=True))) as api:
        status, body = post(api, 1)
        assert status == 503 and "TFLOOP_SERVE_TOKEN" in body["error"]
        assert api.get("/feedback/stats").status_code == 503
    assert not (tmp_path / "feedback").exists()
    # Outside production mode the same server takes it (the open default for a laptop).
    with TestClient(create_app(settings(tmp_path))) as api:
        assert post(api, 1)[0] == 202


def test_production_mode_requires_the_token_and_rate_limits_each_client(tmp_path: Path) -> None:
    config = settings(tmp_path, production=True, token=TOKEN, feedback_burst=3, feedback_rate_per_minute=1)
    with TestClient(create_app(config)) as api:
        assert post(api, 1)[0] == 401
        assert [post(api, seed, headers=AUTH)[0] for seed in range(2, 5)] == [202, 202, 202]
        status, body = post(api, 5, headers=AUTH)
        assert status == 429 and "per minute" in body["error"] and int(body["retry_after"]) >= 1
        # Another client (behind a proxy the settings trust) has its own budget: this one still has none.
    trusted = settings(
        tmp_path, production=True, token=TOKEN, feedback_burst=1, feedback_rate_per_minute=1,
        trust_forwarded_for=True,
    )  # fmt: skip
    with TestClient(create_app(trusted)) as api:
        first = {**AUTH, "X-Forwarded-For": "203.0.113.7, 10.0.0.1"}
        second = {**AUTH, "X-Forwarded-For": "198.51.100.2"}
        assert post(api, 10, headers=first)[0] == 202
        assert post(api, 11, headers=first)[0] == 429
        assert post(api, 12, headers=second)[0] == 202
    pending = sorted(p.name for p in (tmp_path / "feedback" / "pending" / "cat").iterdir())
    assert len(pending) == 5  # the refused posts stored nothing


def test_one_client_can_move_a_label_only_so_far(tmp_path: Path) -> None:
    config = settings(tmp_path, production=True, token=TOKEN, feedback_burst=100, feedback_label_cap=2)
    with TestClient(create_app(config)) as api:
        assert [post(api, seed, "dog", headers=AUTH)[0] for seed in (1, 2)] == [202, 202]
        duplicate_status, duplicate = post(api, 1, "dog", headers=AUTH)  # duplicates add nothing
        assert duplicate_status == 202 and duplicate["duplicate"]
        status, body = post(api, 3, "dog", headers=AUTH)
        assert status == 429 and "label 'dog'" in body["error"]
        assert post(api, 3, "cat", headers=AUTH)[0] == 202  # other labels are not capped by it
    assert len(list((tmp_path / "feedback" / "pending" / "dog").iterdir())) == 2


def test_limiter_refills_at_its_rate_and_forgets_old_label_additions() -> None:
    now = [0.0]
    limiter = FeedbackLimiter(
        rate_per_minute=60, burst=2, label_cap=2, cap_window_s=100, clock=lambda: now[0]
    )
    limiter.admit("a")
    limiter.admit("a")
    with pytest.raises(TooManyRequests) as refused:
        limiter.admit("a")
    assert 0 < refused.value.retry_after_s <= 1.0
    now[0] = 1.0  # one post per second comes back
    limiter.admit("a")
    limiter.added("a", "dog")
    limiter.check_cap("a", "dog")
    limiter.added("a", "dog")
    now[0] = 10.0
    with pytest.raises(LabelCapReached, match="label 'dog'") as capped:
        limiter.check_cap("a", "dog")
    assert capped.value.retry_after_s == pytest.approx(91.0)
    limiter.check_cap("a", "cat")  # other labels are not capped by it
    limiter.check_cap("b", "dog")  # clients are counted apart
    now[0] = 101.5  # the additions left the window
    limiter.check_cap("a", "dog")


def test_limiter_memory_is_bounded() -> None:
    limiter = FeedbackLimiter(rate_per_minute=1, burst=1, label_cap=1, cap_window_s=60, max_clients=3)
    for client in "abcd":
        limiter.admit(client)
    limiter.admit("a")  # "a" was forgotten (least recently seen), so it starts with a full burst
    with pytest.raises(TooManyRequests):
        limiter.admit("d")
