"""``python -m producer`` serves the API on HOST:PORT; ``python -m producer relay`` runs the outbox
relay alone (with ``RELAY_INLINE=false`` in the API), its Prometheus metrics on PORT."""

import argparse
import asyncio
import gc
import signal
import sys

import uvicorn
import uvloop

from producer import outbox
from producer.app import create_app
from shared import logs
from shared.errors import Misconfigured
from shared.settings import ProducerSettings


def serve_api(settings: ProducerSettings) -> None:
    found: list[Misconfigured] = []

    def misconfigured(exc: Misconfigured) -> None:  # already logged
        found.append(exc)
        server.should_exit = True  # a graceful stop, as on SIGTERM

    app = create_app(settings, misconfigured)
    # What exists now (modules, the app, its routes and models) lives as long as the process.
    # Frozen, the collector no longer scans it: its full collections otherwise paused the event
    # loop for up to 70 ms under load (submit p99 at c=16: 80 -> 33 ms;
    # docs/performance-history.md).
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
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
    server = uvicorn.Server(config)
    server.run()
    if found:
        sys.exit(2)


async def relay(settings: ProducerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gc.collect()
    gc.freeze()
    await outbox.serve(settings, stop)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m producer", description=__doc__)
    parser.add_argument("command", nargs="?", choices=("relay",), help="run the relay alone")
    args = parser.parse_args()
    settings = ProducerSettings()
    logs.configure(settings.log_level, settings.log_format)
    if args.command != "relay":
        serve_api(settings)
        return
    try:
        uvloop.run(relay(settings))
    except Misconfigured:  # the relay logged why
        sys.exit(2)


if __name__ == "__main__":
    main()
