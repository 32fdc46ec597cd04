"""Prefect events over plain HTTP: ``tfloop.feedback.received`` for the retraining trigger.

Posts to the Prefect 3 server's ``POST {PREFECT_API_URL}/events`` endpoint (a JSON list of events) with
httpx, without importing prefect; an API key (``PREFECT_API_KEY``) goes as ``Authorization: Bearer``.
Sending happens in background tasks: an outage is logged and counted, and never delays or refuses
feedback.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from pydantic import SecretStr

logger = logging.getLogger(__name__)

FEEDBACK_EVENT = "tfloop.feedback.received"


def feedback_event(*, model_name: str, label: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The event as Prefect's events API takes it (docs/contracts.md "serving -> pipeline")."""
    return {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": FEEDBACK_EVENT,
        "resource": {
            "prefect.resource.id": f"tfloop.model.{model_name}",
            "tfloop.label": label,
            "tfloop.model": model_name,
        },
        "related": [],
        "payload": payload,
    }


class PrefectEventSender:
    """Fire-and-forget sender of events to one Prefect API; ``on_result(ok)`` counts outcomes."""

    def __init__(
        self,
        api_url: str,
        *,
        timeout_s: float,
        api_key: SecretStr | None = None,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self.events_url = api_url.rstrip("/") + "/events"
        self._timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
        self._on_result = on_result
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[bool]] = set()

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self._timeout_s, headers=self._headers)

    async def stop(self, *, drain_s: float = 2.0) -> None:
        """Give pending sends ``drain_s`` to finish, then close the client."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=drain_s)
        for task in self._tasks:
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def emit(self, event: dict[str, Any]) -> None:
        """Schedule sending ``event``; returns at once."""
        task = asyncio.create_task(self.send(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send(self, event: dict[str, Any]) -> bool:
        """POST one event; True when Prefect accepted it. Never raises."""
        ok = False
        try:
            client = self._client
            if client is None:
                raise RuntimeError("event sender not started")
            response = await client.post(self.events_url, json=[event])
            ok = response.is_success
            if not ok:
                logger.warning(
                    "Prefect refused event %s: HTTP %d %s",
                    event["event"],
                    response.status_code,
                    response.text[:200],
                )
        except (httpx.HTTPError, RuntimeError, OSError) as error:
            logger.warning("Prefect event %s not sent to %s: %s", event["event"], self.events_url, error)
        if self._on_result is not None:
            self._on_result(ok)
        return ok
