"""Fast tests of the signed prediction ids: round trip, forgery, tampering, another key, expiry, clock skew,
the secret setting, and the image check of /feedback on the app (no model needed)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving.errors import ExpiredPredictionId, InvalidPredictionId
from serving.settings import ServingSettings
from serving.tokens import MAX_TOKEN_CHARS, PredictionSigner, signer_for

SHA = hashlib.sha256(b"an image").hexdigest()
TOP_K = [("cat", 0.75), ("dog", 0.2), ("fish", 0.05)]
DAY = 24 * 3600.0


class Clock:
    """A settable clock (Unix seconds) handed to the signer."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def issue(signer: PredictionSigner, **overrides: object) -> str:
    values: dict[str, object] = {
        "image_sha256": SHA,
        "model_name": "tiny",
        "model_version": 3,
        "top_k": TOP_K,
        **overrides,
    }
    return signer.issue(**values)  # type: ignore[arg-type]


def test_a_token_names_the_image_the_model_version_and_the_prediction() -> None:
    clock = Clock(1_800_000_000.0)
    signer = PredictionSigner(b"k" * 32, ttl_s=7 * DAY, clock=clock)
    token = issue(signer, model_name="flowers ünïcode")
    claim = PredictionSigner(b"k" * 32, ttl_s=7 * DAY, clock=clock).verify(token)  # another replica
    assert claim.image_sha256 == SHA and claim.model_name == "flowers ünïcode" and claim.model_version == 3
    assert claim.top_k == tuple(TOP_K) and claim.issued_at == 1_800_000_000
    assert claim.predicted() == [{"label": label, "score": score} for label, score in TOP_K]
    assert token.isascii() and len(token) < 400 and token.startswith("p1.")


def test_another_key_or_any_changed_character_is_refused() -> None:
    signer = PredictionSigner(b"k" * 32, ttl_s=DAY)
    token = issue(signer)
    with pytest.raises(InvalidPredictionId, match="TFLOOP_FEEDBACK_SECRET"):
        PredictionSigner(b"other" * 8, ttl_s=DAY).verify(token)
    prefix, payload, mac = token.split(".")
    for index in range(0, len(payload), 7):  # flip payload characters: the signature no longer matches
        flipped = payload[:index] + ("A" if payload[index] != "A" else "B") + payload[index + 1 :]
        with pytest.raises(InvalidPredictionId):
            signer.verify(f"{prefix}.{flipped}.{mac}")
    with pytest.raises(InvalidPredictionId):
        signer.verify(f"{prefix}.{payload}.{mac[:-2]}")


def test_a_forged_payload_with_the_old_signature_is_refused() -> None:
    signer = PredictionSigner(b"k" * 32, ttl_s=DAY)
    prefix, _, mac = issue(signer).split(".")
    forged = {"s": hashlib.sha256(b"another image").hexdigest(), "m": "tiny", "v": 3, "k": TOP_K, "t": 0}
    body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidPredictionId, match="bad signature"):
        signer.verify(f"{prefix}.{body}.{mac}")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "0" * 32,
        "p1.",
        "p1.a.b.c",
        "p2.e30.AAAA",
        "p1.e30.%%%",
        "p1.ünï.cödé",
        "p1." + "a" * MAX_TOKEN_CHARS,
    ],
)
def test_malformed_tokens_are_refused_with_a_clear_error(token: str) -> None:
    with pytest.raises(InvalidPredictionId, match="prediction_id"):
        PredictionSigner(b"k" * 32, ttl_s=DAY).verify(token)


def test_tokens_expire_and_future_ones_are_refused() -> None:
    clock = Clock(1_800_000_000.0)
    signer = PredictionSigner(b"k" * 32, ttl_s=7 * DAY, clock=clock)
    token = issue(signer)
    clock.now += 7 * DAY  # the last second of its life
    assert signer.verify(token).model_version == 3
    clock.now += 2
    with pytest.raises(ExpiredPredictionId, match="expired"):
        signer.verify(token)
    clock.now = 1_800_000_000.0 - 3600  # a replica whose clock is an hour behind the issuer's
    with pytest.raises(InvalidPredictionId, match="clocks"):
        signer.verify(token)
    clock.now = 1_800_000_000.0 - 60  # small skew is tolerated
    assert signer.verify(token).model_version == 3


def test_without_a_secret_each_process_signs_with_its_own_random_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = signer_for(None, ttl_s=DAY)
    assert "TFLOOP_FEEDBACK_SECRET" in caplog.text
    token = issue(first)
    assert first.verify(token).image_sha256 == SHA
    with pytest.raises(InvalidPredictionId):
        signer_for(None, ttl_s=DAY).verify(token)


def test_the_secret_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFLOOP_FEEDBACK_SECRET", "s" * 32)
    monkeypatch.setenv("TFLOOP_SERVE_PREDICTION_TTL_S", "3600")
    settings = ServingSettings()
    assert settings.feedback_secret is not None and "s" * 32 not in repr(settings)
    assert settings.prediction_ttl_s == 3600
    shared = signer_for(settings.feedback_secret, ttl_s=settings.prediction_ttl_s)
    assert signer_for(settings.feedback_secret, ttl_s=60).verify(issue(shared)).model_version == 3
    monkeypatch.setenv("TFLOOP_FEEDBACK_SECRET", "")
    assert ServingSettings().feedback_secret is None
    monkeypatch.setenv("TFLOOP_FEEDBACK_SECRET", "short")
    with pytest.raises(ValueError, match="at least 16"):
        ServingSettings()


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed, 7, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_feedback_checks_the_token_and_the_image_before_anything_is_stored(tmp_path: Path) -> None:
    # No model is needed for these refusals (new labels allowed): each answer says what to do, and the
    # queue stays empty.
    from serving.app import create_app

    secret = "t" * 32
    settings = ServingSettings(
        model_base=str(tmp_path / "models"),
        model_name="tiny",
        feedback_uri=str(tmp_path / "feedback"),
        feedback_secret=secret,
        allow_new_labels=True,
        poll_interval_s=60,
    )
    signer = signer_for(settings.feedback_secret, ttl_s=DAY)
    image, other = png(1), png(2)
    token = issue(signer, image_sha256=hashlib.sha256(image).hexdigest())
    with TestClient(create_app(settings)) as api:

        def post(prediction_id: str | None, data: bytes | None) -> tuple[int, str]:
            files = {"file": ("x.png", data, "image/png")} if data is not None else None
            form = {"label": "cat", **({"prediction_id": prediction_id} if prediction_id else {})}
            response = api.post("/feedback", data=form, files=files)
            return response.status_code, response.json().get("error", "")

        status, error = post(token, other)
        assert status == 400 and "not the one this prediction_id was issued for" in error
        status, error = post(token, None)  # this replica never classified it and nothing was sent
        assert status == 422 and "send the image with the prediction_id" in error
        status, error = post(issue(signer_for(None, ttl_s=DAY)), image)  # another key
        assert status == 400 and "bad signature" in error
        status, error = post("0" * 32, image)
        assert status == 400 and "not a prediction id" in error
        assert not (tmp_path / "feedback").exists()
        status, _ = post(token, image)
        assert status == 202
    ((record_file),) = (tmp_path / "feedback" / "records").iterdir()
    record = json.loads(record_file.read_text())
    assert (
        record["model_name"] == "tiny" and record["model_version"] == 3 and record["prediction_id"] == token
    )
    assert [entry["label"] for entry in record["predicted"]] == ["cat", "dog", "fish"]
    assert record["predicted_at"] is not None
