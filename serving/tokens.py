"""Signed prediction ids: ``/classify`` answers a self-contained token that any replica can verify.

A token names what was predicted (:class:`PredictionClaim`: the image's sha256, the model name and version,
the top-k labels with scores, when it was issued) and carries an HMAC-SHA256 of it under a key the replicas
share (``TFLOOP_FEEDBACK_SECRET``), so ``/feedback`` needs no memory of the classification: it checks the
signature (``hmac.compare_digest``), the age, and that the image sent with the token is the one it names.

Format: ``p1.<base64url(compact JSON payload)>.<base64url(HMAC over "p1.<payload>")>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import SecretStr

from serving.errors import ExpiredPredictionId, InvalidPredictionId

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "p1"
MAX_TOKEN_CHARS = 4096
CLOCK_SKEW_S = 300.0  # replicas' clocks may differ this much
_KEY_CONTEXT = b"tfloop prediction id v1"
_SCORE_DIGITS = 6
_SHA256_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class PredictionClaim:
    """What a prediction id says: which image, which model version, what it predicted, and when."""

    image_sha256: str
    model_name: str
    model_version: int
    top_k: tuple[tuple[str, float], ...]
    issued_at: int

    def predicted(self) -> list[dict[str, str | float]]:
        """The top-k as feedback records store it: ``[{"label": ..., "score": ...}, ...]``."""
        return [{"label": label, "score": score} for label, score in self.top_k]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PredictionSigner:
    """Issues and verifies prediction ids under one key; ``clock`` returns Unix seconds."""

    def __init__(self, secret: bytes, *, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("the signing secret must not be empty")
        self._key = hmac.new(secret, _KEY_CONTEXT, hashlib.sha256).digest()
        self.ttl_s = ttl_s
        self._clock = clock

    def _mac(self, signed: bytes) -> bytes:
        return hmac.new(self._key, signed, hashlib.sha256).digest()

    def issue(
        self,
        *,
        image_sha256: str,
        model_name: str,
        model_version: int,
        top_k: Sequence[tuple[str, float]],
    ) -> str:
        """A prediction id for this classification."""
        payload = {
            "s": image_sha256,
            "m": model_name,
            "v": model_version,
            "k": [[label, round(float(score), _SCORE_DIGITS)] for label, score in top_k],
            "t": int(self._clock()),
        }
        body = _b64encode(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        signed = f"{TOKEN_PREFIX}.{body}"
        return f"{signed}.{_b64encode(self._mac(signed.encode('ascii')))}"

    def verify(self, token: str) -> PredictionClaim:
        """The claim of a genuine, unexpired id; InvalidPredictionId (400) or ExpiredPredictionId (404)."""
        parts = token.split(".") if len(token) <= MAX_TOKEN_CHARS else []
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise InvalidPredictionId(
                "prediction_id is not a prediction id issued by /classify; send the value of "
                "'prediction_id' from a /classify answer as it is, or send only the image as 'file'"
            )
        try:
            mac = _b64decode(parts[2])
        except (binascii.Error, ValueError):
            mac = b""
        if not hmac.compare_digest(mac, self._mac(f"{parts[0]}.{parts[1]}".encode("ascii", "replace"))):
            raise InvalidPredictionId(
                "prediction_id has a bad signature: it was changed, or issued by a server with another "
                "TFLOOP_FEEDBACK_SECRET (every replica needs the same one); classify the image again"
            )
        claim = _parse_claim(parts[1])
        age = self._clock() - claim.issued_at
        if age > self.ttl_s:
            raise ExpiredPredictionId(
                f"prediction_id expired ({age / 3600:.1f} h old; ids are accepted for "
                f"{self.ttl_s / 3600:.1f} h); classify the image again, or send it as 'file' without "
                "prediction_id"
            )
        if age < -CLOCK_SKEW_S:
            raise InvalidPredictionId(
                "prediction_id was issued in the future: the replicas' clocks disagree; sync them (NTP)"
            )
        return claim


def _parse_claim(body: str) -> PredictionClaim:
    """The claim of a correctly signed payload (a check against a signer's own bugs)."""
    try:
        data = json.loads(_b64decode(body))
        claim = PredictionClaim(
            image_sha256=data["s"],
            model_name=data["m"],
            model_version=data["v"],
            top_k=tuple((label, float(score)) for label, score in data["k"]),
            issued_at=data["t"],
        )
        valid = (
            isinstance(claim.image_sha256, str)
            and len(claim.image_sha256) == 64
            and set(claim.image_sha256) <= _SHA256_HEX
            and isinstance(claim.model_name, str)
            and isinstance(claim.model_version, int)
            and isinstance(claim.issued_at, int)
            and all(isinstance(label, str) for label, _ in claim.top_k)
        )
    except (binascii.Error, ValueError, KeyError, TypeError) as error:
        raise InvalidPredictionId(f"prediction_id carries a malformed payload ({error})") from error
    if not valid:
        raise InvalidPredictionId("prediction_id carries a malformed payload")
    return claim


def signer_for(secret: SecretStr | None, *, ttl_s: float) -> PredictionSigner:
    """The signer of a serving process: the shared secret, or (with a warning) a random per-process key."""
    if secret is None:
        logger.warning(
            "TFLOOP_FEEDBACK_SECRET is not set: prediction ids are signed with a random key of this process, "
            "so feedback citing them is accepted only here and only until it restarts. Give every replica "
            "the same TFLOOP_FEEDBACK_SECRET (e.g. `openssl rand -hex 32`) for feedback on any replica"
        )
        return PredictionSigner(secrets.token_bytes(32), ttl_s=ttl_s)
    return PredictionSigner(secret.get_secret_value().encode("utf-8"), ttl_s=ttl_s)
