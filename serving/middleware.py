"""ASGI middleware of the REST app: the body size limit (with nginx-style lingering discard) and the
request metrics; and the one shape of an error answer, ``{"error": "..."}``."""

from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics import ServingMetrics
from serving.services import InFlight

INTERNAL_ERROR = "internal error; the server logged the details"


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimitMiddleware:
    """Answers 413 for bodies over ``max_bytes`` (declared or streamed) before any route reads them.

    A client that writes its whole body before it reads (``urllib``, ``requests``, ``http.client``) sees
    a connection reset instead of the 413 when the server closes while the body is still arriving. So,
    as nginx's lingering close does, the rest of a refused body is read and dropped first, up to
    ``discard_bytes`` in all and for at most ``discard_s``; a body declared larger than that, or a client
    that waits for ``100 Continue``, is answered at once.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, discard_bytes: int, discard_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.discard_bytes = discard_bytes
        self.discard_s = discard_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(send)
            elif int(declared) > self.max_bytes:
                waits = headers.get(b"expect", b"").lower() == b"100-continue"
                if not waits and int(declared) <= self.discard_bytes:
                    await self._discard(receive, received=0)
                await self._refuse(send)
            else:
                await self.app(scope, receive, send)
            return
        if headers.get(b"transfer-encoding") is None:
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._discard(receive, received=size)
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _discard(self, receive: Receive, *, received: int) -> None:
        """Read and drop the rest of the body, until it ends, passes ``discard_bytes`` or ``discard_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.discard_s):
                while received <= self.discard_bytes:
                    message = await receive()
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        return
                    received += len(message.get("body", b""))

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"error": f"the request body is over the limit of {self.max_bytes} bytes"}, status_code=413
        )
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class MetricsMiddleware:
    """Counts requests by route template and status and observes their latency."""

    def __init__(self, app: ASGIApp, *, metrics: ServingMetrics, in_flight: InFlight) -> None:
        self.app = app
        self.metrics = metrics
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        counted = scope.get("method") == "POST"
        if counted:
            self.in_flight.enter()
        try:
            await self.app(scope, receive, record_status)
        finally:
            if counted:
                self.in_flight.leave()
            template = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.record_request(
                "rest", scope.get("method", ""), template, str(status), time.perf_counter() - started
            )
