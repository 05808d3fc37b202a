"""``python -m producer``: serve the API on HOST:PORT."""

import logging

import uvicorn

from producer.app import create_app
from shared.settings import ProducerSettings


def main() -> None:
    settings = ProducerSettings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
