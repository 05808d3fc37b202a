"""``python -m producer``: serve the API on HOST:PORT."""

import uvicorn

from producer.app import create_app
from shared import logs
from shared.settings import ProducerSettings


def main() -> None:
    settings = ProducerSettings()
    logs.configure(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,  # uvicorn logs through the root handler, like everything else
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
