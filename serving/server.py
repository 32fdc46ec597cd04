"""Run the serving app under uvicorn for one :class:`ServingSettings` (used by ``python -m serving`` and
``tfloop serve``), with TF Serving's gRPC API on ``grpc_port`` in the same process and event loop (it shares
the app's model manager and batcher), and a Kubernetes-friendly drain on SIGTERM.

SIGTERM: ``/readyz`` answers 503 at once while every request, new ones included, is still served for
``drain_s`` seconds (endpoints take a moment to drop the pod); then the server stops accepting connections,
lets requests in progress finish for up to ``shutdown_timeout_s``, and the process exits 0. A second
SIGTERM, or SIGINT (Ctrl-C), skips what is left of the drain. gRPC follows the same drain: its health service
answers NOT_SERVING from the first SIGTERM, and at the end it refuses new calls and lets those in progress
finish before the REST side shuts down, both within the one ``shutdown_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

from serving.settings import ServingSettings

if TYPE_CHECKING:
    import socket

    import uvicorn

    from serving.grpc_api import GrpcFrontEnd

logger = logging.getLogger(__name__)


def draining_server(
    config: uvicorn.Config,
    *,
    drain_s: float,
    on_drain: Callable[[], None],
    grpc: GrpcFrontEnd | None = None,
    grpc_host: str = "0.0.0.0",
    grpc_port: int = 0,
) -> uvicorn.Server:
    """A uvicorn server whose first SIGTERM starts a drain of ``drain_s`` seconds (``on_drain`` is called at
    once) before uvicorn's graceful shutdown; the process then ends with status 0, not by the signal. With
    ``grpc``, that front end listens on ``grpc_host:grpc_port`` once the app has started (its batcher runs)
    and stops before the app does; a gRPC port that cannot be bound stops the server (``exit_code`` 1)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.exit_at: float | None = None
            self.exit_code = 0

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if grpc is None or self.should_exit or not self.started:
                return
            try:
                await grpc.start(host=grpc_host, port=grpc_port)
            except OSError as error:
                logger.error("%s; free the port or choose another with --grpc-port (0: no gRPC)", error)
                self.exit_code = 1
                self.should_exit = True

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if grpc is not None:  # one shutdown timeout for both: REST gets what gRPC left of it
                budget = config.timeout_graceful_shutdown
                started = time.monotonic()
                await grpc.stop(grace_s=budget if budget is not None else 24 * 3600.0)
                if budget is not None:
                    spent = time.monotonic() - started
                    config.timeout_graceful_shutdown = max(0, math.floor(budget - spent))
            await super().shutdown(sockets=sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if sig == signal.SIGTERM and self.exit_at is None and not self.should_exit:
                self.exit_at = time.monotonic() + drain_s
                logger.info("SIGTERM: draining for %.1fs, then finishing the requests in progress", drain_s)
                on_drain()
                return  # not captured: uvicorn would re-raise it at exit, and the status would be 143
            if sig == signal.SIGTERM:
                self.should_exit = True  # a second SIGTERM: shut down gracefully now
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.exit_at is not None and time.monotonic() >= self.exit_at:
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer()


class HeadJoiningTransport:
    """A connection's transport that holds a response head (status line and headers) until its body is
    written, so head and body leave in one write: one syscall and one TCP segment per small answer instead
    of two (uvicorn writes them separately). A head with no body written in the same event-loop turn (a
    streamed response) is sent at the end of that turn; everything else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is None and data[:5] == b"HTTP/" and data[-4:] == b"\r\n\r\n":
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def writelines(self, lines: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(lines))

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def head_joining_protocol() -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with :class:`HeadJoiningTransport` on each connection ("auto", uvicorn's
    choice, where httptools is not installed)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class HeadJoiningHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self.transport = HeadJoiningTransport(transport, self.loop)  # type: ignore[arg-type,assignment]

    return HeadJoiningHttpToolsProtocol


def run_server(settings: ServingSettings) -> None:
    """Serve until SIGTERM (drained) or SIGINT. The model loads in the background; /readyz turns 200 once
    it is warm."""
    from serving.model import configure_tensorflow_threads

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    intra_op, inter_op = settings.tensorflow_threads()
    configure_tensorflow_threads(intra_op=intra_op, inter_op=inter_op)
    server = build_server(settings)
    server.run()
    if getattr(server, "exit_code", 0):
        raise SystemExit(server.exit_code)


def build_server(settings: ServingSettings) -> uvicorn.Server:
    """The app and, unless ``grpc_port`` is 0, its gRPC front end, under one draining uvicorn server (call
    ``run()``; in a thread other than the main one it installs no signal handlers)."""
    import uvicorn

    from serving.app import create_app

    app = create_app(settings)
    services = app.state.services
    front = None
    if settings.grpc_port:
        from serving.grpc_api import GrpcFrontEnd

        front = GrpcFrontEnd(services)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=uvicorn.config.LOG_LEVELS.get(settings.log_level.lower(), logging.INFO) <= logging.INFO,
        http=head_joining_protocol(),
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
    )
    return draining_server(
        config,
        drain_s=settings.drain_s,
        on_drain=services.drain,
        grpc=front,
        grpc_host=settings.host,
        grpc_port=settings.grpc_port,
    )
