"""``python -m consumer`` runs one worker; ``python -m consumer dlq ...`` handles dead letters;
``python -m consumer health`` is the container's healthcheck."""

import argparse
import asyncio
import logging
import signal
import sys
import urllib.request

import uvloop

from consumer import dlq
from consumer.service import serve
from shared import logs
from shared.errors import Misconfigured
from shared.settings import ConsumerSettings

log = logging.getLogger("consumer")


async def _work(settings: ConsumerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


def healthy(port: int) -> bool:
    """Whether the consumer serving metrics on ``port`` consumes every lane's queue now."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return False
    return "\nconsumer_consuming 1.0\n" in text


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m consumer", description=__doc__)
    sub = root.add_subparsers(dest="command")
    sub.add_parser(
        "health", help="exit 0 if the consumer on METRICS_PORT is consuming (the healthcheck)"
    )
    dead = sub.add_parser("dlq", help="inspect, replay or purge dead-lettered messages")
    actions = dead.add_subparsers(dest="action", required=True)
    for name, help_ in (
        ("list", "one JSON line per dead letter: id, attempts, error, failure times"),
        ("show", "one dead letter in full: headers and body"),
        ("replay", "send dead letters back to work with a fresh attempt count"),
        ("purge", "drop every dead letter"),
    ):
        action = actions.add_parser(name, help=help_)
        if name == "show":
            action.add_argument("message_id")
        if name == "replay":
            action.add_argument(
                "message_ids", nargs="*", help="message ids (order, page or delivery ids)"
            )
            action.add_argument("--all", action="store_true", help="replay every dead letter")
        if name == "purge":
            action.add_argument("--yes", action="store_true", help="confirm")
        action.add_argument("--limit", type=int, default=10_000, help="most messages to look at")
        action.add_argument(
            "--lane", choices=dlq.LANES, default="orders", help="whose dead letters"
        )
    return root


def main() -> None:
    args = parser().parse_args()
    settings = ConsumerSettings()
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "health":
        sys.exit(0 if healthy(settings.metrics_port) else 1)
    try:
        if args.command == "dlq":
            sys.exit(
                uvloop.run(
                    dlq.command(
                        settings,
                        args.action,
                        message_id=getattr(args, "message_id", None),
                        message_ids=getattr(args, "message_ids", []),
                        every=getattr(args, "all", False),
                        yes=getattr(args, "yes", False),
                        limit=args.limit,
                        lane=args.lane,
                    )
                )
            )
        uvloop.run(_work(settings))
    except Misconfigured as exc:
        log.critical("%s", exc, extra=logs.event("misconfigured"))
        sys.exit(2)


if __name__ == "__main__":
    main()
