"""``python -m producer``: serve the API on HOST:PORT."""

import gc

import uvicorn

from producer.app import create_app
from shared import logs
from shared.settings import ProducerSettings


def main() -> None:
    settings = ProducerSettings()
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    # What exists now (modules, the app, its routes and models) lives as long as the process.
    # Frozen, the collector no longer scans it: its full collections otherwise paused the event
    # loop for up to 70 ms under load (submit p99 at c=16: 80 -> 33 ms; docs/performance.md).
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,  # uvicorn logs through the root handler, like everything else
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_keep_alive=settings.keep_alive_seconds,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
