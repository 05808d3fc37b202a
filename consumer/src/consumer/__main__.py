"""``python -m consumer`` runs one worker; ``python -m consumer dlq ...`` handles dead letters."""

import argparse
import asyncio
import signal
import sys

import uvloop

from consumer import dlq
from consumer.worker import serve
from shared import logs
from shared.settings import ConsumerSettings


async def _work(settings: ConsumerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


async def _dlq(settings: ConsumerSettings, args: argparse.Namespace) -> int:
    if args.action == "list":
        rows = await dlq.list_dead(settings, args.limit)
        for row in rows:
            dlq.print_json(row)
        print(f"{len(rows)} dead-lettered message(s)", file=sys.stderr)
    elif args.action == "show":
        found = await dlq.show_dead(settings, args.message_id, args.limit)
        if found is None:
            print(f"no dead letter with message id {args.message_id}", file=sys.stderr)
            return 1
        dlq.print_json(found)
    elif args.action == "replay":
        if not args.all and not args.message_ids:
            print("name message ids to replay, or pass --all", file=sys.stderr)
            return 2
        wanted = set(args.message_ids)
        done = await dlq.replay(
            settings, lambda d: args.all or d.message.message_id in wanted, args.limit
        )
        for message_id in done:
            print(message_id)
        print(f"replayed {len(done)} message(s)", file=sys.stderr)
        if not args.all and len(done) < len(wanted):
            print(f"not found: {', '.join(sorted(wanted - set(done)))}", file=sys.stderr)
            return 1
    elif args.action == "purge":
        if not args.yes:
            print("purge drops every dead letter for good; pass --yes to confirm", file=sys.stderr)
            return 2
        print(f"purged {await dlq.purge(settings)} message(s)", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m consumer", description=__doc__)
    sub = root.add_subparsers(dest="command")
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
            action.add_argument("message_ids", nargs="*", help="message ids (order ids)")
            action.add_argument("--all", action="store_true", help="replay every dead letter")
        if name == "purge":
            action.add_argument("--yes", action="store_true", help="confirm")
        action.add_argument("--limit", type=int, default=10_000, help="most messages to look at")
    return root


def main() -> None:
    args = parser().parse_args()
    settings = ConsumerSettings()
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "dlq":
        sys.exit(uvloop.run(_dlq(settings, args)))
    uvloop.run(_work(settings))


if __name__ == "__main__":
    main()
