"""``python -m serving``: serve with settings from the environment (``TFLOOP_SERVE_*``, see settings.py)."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pydantic import ValidationError

    from serving.server import run_server
    from serving.settings import ServingSettings

    try:
        settings = ServingSettings()
    except ValidationError as error:
        print(f"error: invalid serving settings (TFLOOP_SERVE_*): {error}", file=sys.stderr)
        sys.exit(1)
    run_server(settings)


if __name__ == "__main__":
    main()
