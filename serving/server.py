"""Run the serving app under uvicorn for one :class:`ServingSettings` (used by ``python -m serving`` and
``tfloop serve``)."""

from __future__ import annotations

import logging

from serving.settings import ServingSettings


def run_server(settings: ServingSettings) -> None:
    """Serve until interrupted. The model loads in the background; /readyz turns 200 once it is warm."""
    import uvicorn

    from serving.app import create_app
    from serving.model import configure_tensorflow_threads

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    intra_op, inter_op = settings.tensorflow_threads()
    configure_tensorflow_threads(intra_op=intra_op, inter_op=inter_op)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
