"""Run the serving app under uvicorn for one :class:`ServingSettings` (used by ``python -m serving`` and
``tfloop serve``), with a Kubernetes-friendly drain on SIGTERM.

SIGTERM: ``/readyz`` answers 503 at once while every request, new ones included, is still served for
``drain_s`` seconds (endpoints take a moment to drop the pod); then the server stops accepting connections,
lets requests in progress finish for up to ``shutdown_timeout_s``, and the process exits 0. A second
SIGTERM, or SIGINT (Ctrl-C), skips what is left of the drain.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from serving.settings import ServingSettings

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger(__name__)


def draining_server(
    config: uvicorn.Config, *, drain_s: float, on_drain: Callable[[], None]
) -> uvicorn.Server:
    """A uvicorn server whose first SIGTERM starts a drain of ``drain_s`` seconds (``on_drain`` is called at
    once) before uvicorn's graceful shutdown; the process then ends with status 0, not by the signal."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.exit_at: float | None = None

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


def run_server(settings: ServingSettings) -> None:
    """Serve until SIGTERM (drained) or SIGINT. The model loads in the background; /readyz turns 200 once
    it is warm."""
    import uvicorn

    from serving.app import create_app
    from serving.model import configure_tensorflow_threads

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    intra_op, inter_op = settings.tensorflow_threads()
    configure_tensorflow_threads(intra_op=intra_op, inter_op=inter_op)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
    )
    draining_server(config, drain_s=settings.drain_s, on_drain=app.state.services.drain).run()
