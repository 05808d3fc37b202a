"""Inspect and replay the dead-letter queues: ``python -m consumer dlq list|show|replay|purge``.

Each lane has its own (``--lane orders``, the default: ``orders.dead``, or ``orders.quorum.dead``
on the quorum kind; ``--lane crawls``: ``crawls.dead``, ``crawls.quorum.dead``; ``--lane
webhooks``: ``webhooks.dead``, ``webhooks.quorum.dead``). Browsing takes
messages without acking them and closes the channel afterwards, which puts every message back;
replay is a confirmed publish to the lane's work exchange, with the routing key of its priority's
band and a fresh attempt count, then the ack of the dead letter; a dead letter that names no
order, crawl page or webhook delivery the database holds is never replayed.
"""

import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from shared import amqp, db, messages, topology
from shared.settings import ConsumerSettings

LANES = ("orders", "crawls", "webhooks")  # each kind's lanes, by name (``Topology.lane``)

DROP_ON_REPLAY = (
    messages.ERROR_TYPE,
    messages.ERROR_MESSAGE,
    messages.FIRST_FAILURE_AT,
    messages.LAST_FAILURE_AT,
    "CC",  # a retry's band (worker): replay routes by the band of its priority
    "x-delivery-count",  # the quorum queue's count of the listings: a replay starts afresh
)


@dataclass
class DeadLetter:
    message: AbstractIncomingMessage

    def summary(self) -> dict[str, Any]:
        headers = self.message.headers or {}
        return {
            "message_id": self.message.message_id,
            "type": self.message.type,
            "priority": self.message.priority,
            "attempt": headers.get(messages.ATTEMPT),
            "error_type": headers.get(messages.ERROR_TYPE),
            "error_message": headers.get(messages.ERROR_MESSAGE),
            "first_failure_at": headers.get(messages.FIRST_FAILURE_AT),
            "last_failure_at": headers.get(messages.LAST_FAILURE_AT),
        }

    def detail(self) -> dict[str, Any]:
        body = self.message.body
        return {
            **self.summary(),
            "content_type": self.message.content_type,
            "headers": {k: _plain(v) for k, v in (self.message.headers or {}).items()},
            "body": body.decode("utf-8", "replace"),
        }


@asynccontextmanager
async def _dead_letters(
    settings: ConsumerSettings, lane: topology.Lane, limit: int
) -> AsyncIterator[list[DeadLetter]]:
    """Up to ``limit`` dead letters, held unacked; any not acked go back when this exits."""
    async with await amqp.connect(settings.rabbitmq_url, "dlq-tool") as connection:
        channel = await connection.channel(publisher_confirms=False)
        await topology.declare(channel, settings.queue_kind)
        queue = await channel.get_queue(lane.dead_letters.name, ensure=False)
        yield [DeadLetter(m) for m in await _take(queue, limit)]


async def _take(queue: AbstractQueue, limit: int) -> list[AbstractIncomingMessage]:
    taken: list[AbstractIncomingMessage] = []
    while len(taken) < limit:
        message = await queue.get(no_ack=False, fail=False, timeout=10)
        if message is None:
            break
        taken.append(message)
    return taken


async def list_dead(
    settings: ConsumerSettings, limit: int, lane: topology.Lane
) -> list[dict[str, Any]]:
    async with _dead_letters(settings, lane, limit) as letters:
        return [d.summary() for d in letters]


async def show_dead(
    settings: ConsumerSettings,
    message_id: str,
    limit: int,
    lane: topology.Lane,
) -> dict[str, Any] | None:
    async with _dead_letters(settings, lane, limit) as letters:
        return next((d.detail() for d in letters if d.message.message_id == message_id), None)


# What a dead letter must stand for to be replayed, by lane: an order, crawl page or webhook
# delivery the database holds. Anyone who may publish to a dead-letter exchange (a consumer) can
# put a message there; replaying it must not create work that nobody submitted (docs/security.md).
KNOWN = {
    "orders": "SELECT EXISTS (SELECT FROM orders WHERE id = $1)",
    "crawls": "SELECT EXISTS (SELECT FROM crawl_pages WHERE id = $1)",
    "webhooks": "SELECT EXISTS (SELECT FROM webhook_deliveries WHERE id = $1)",
}
# What replay resets, by lane: the order goes back to ``accepted``; the crawl page to
# ``queued`` and its crawl, if it had completed, to ``running``; the delivery to ``pending``.
REOPEN = {
    "orders": [
        """UPDATE orders SET status = 'accepted', reason = NULL, attempts = 0,
                             next_attempt_at = NULL, updated_at = clock_timestamp()
           WHERE id = $1 AND status = 'failed'"""
    ],
    "crawls": [
        """UPDATE crawls SET status = 'running', finished_at = NULL, updated_at = clock_timestamp()
           WHERE status = 'completed'
             AND id = (SELECT crawl_id FROM crawl_pages WHERE id = $1 AND status = 'failed')""",
        """UPDATE crawl_pages SET status = 'queued', attempts = 0, error = NULL
           WHERE id = $1 AND status = 'failed'""",
    ],
    "webhooks": [
        """UPDATE webhook_deliveries SET status = 'pending', attempts = 0
           WHERE id = $1 AND status = 'failed'"""
    ],
}


@dataclass
class Replayed:
    done: list[str]  # message ids sent back to work
    unknown: list[str]  # message ids that name nothing the database holds: left in the queue


async def replay(
    settings: ConsumerSettings,
    select: Callable[[DeadLetter], bool],
    limit: int,
    lane: topology.Lane,
) -> Replayed:
    """Send the selected dead letters back to work; what they stand for is reopened. A dead
    letter that names no order (or crawl page) the database holds stays where it is."""
    result = Replayed([], [])
    conn = await db.connect(settings.database_url)
    try:
        async with (
            await amqp.connect(settings.rabbitmq_url, "dlq-replay") as connection,
            _dead_letters(settings, lane, limit) as letters,
        ):
            channel = await amqp.confirmed_channel(connection)
            exchange = await channel.get_exchange(lane.exchange.name, ensure=False)
            for letter in filter(select, letters):
                message = letter.message
                key = messages.order_id_of(message)
                if key is None or not await conn.fetchval(KNOWN[lane.exchange.name], key):
                    result.unknown.append(message.message_id or "")
                    continue  # not acked: it goes back to the dead-letter queue
                async with conn.transaction():
                    for statement in REOPEN[lane.exchange.name]:
                        await conn.execute(statement, key)
                await amqp.publish(
                    exchange,
                    messages.forward(message, {messages.ATTEMPT: 1}, drop=DROP_ON_REPLAY),
                    lane.band(message.priority).routing_key,
                    settings.publish_timeout,
                )
                await message.ack()
                result.done.append(message.message_id or "")
    finally:
        await conn.close()
    return result


async def purge(settings: ConsumerSettings, lane: topology.Lane) -> int:
    """Drop every dead letter; what they stand for stays ``failed``."""
    async with await amqp.connect(settings.rabbitmq_url, "dlq-tool") as connection:
        channel = await connection.channel(publisher_confirms=False)
        await topology.declare(channel, settings.queue_kind)
        queue = await channel.get_queue(lane.dead_letters.name, ensure=False)
        result = await queue.purge()
        return int(result.message_count or 0)


async def command(
    settings: ConsumerSettings,
    action: str,
    *,
    message_id: str | None = None,
    message_ids: Sequence[str] = (),
    every: bool = False,
    yes: bool = False,
    limit: int = 10_000,
    lane: str = "orders",
) -> int:
    """One operator command (list, show, replay, purge): prints its result, returns the exit code.

    Shared by ``python -m consumer dlq`` and ``orders dlq``. Results go to stdout (JSON lines or
    message ids), counts and errors to stderr.
    """
    if lane not in LANES:
        print(f"unknown lane {lane!r}: choose {' or '.join(LANES)}", file=sys.stderr)
        return 2
    chosen = topology.of(settings.queue_kind).lane(lane)
    if action == "list":
        rows = await list_dead(settings, limit, chosen)
        for row in rows:
            print_json(row)
        print(f"{len(rows)} dead-lettered message(s)", file=sys.stderr)
    elif action == "show":
        found = await show_dead(settings, message_id or "", limit, chosen)
        if found is None:
            print(f"no dead letter with message id {message_id}", file=sys.stderr)
            return 1
        print_json(found)
    elif action == "replay":
        if not every and not message_ids:
            print("name message ids to replay, or pass --all", file=sys.stderr)
            return 2
        wanted = set(message_ids)
        result = await replay(
            settings, lambda d: every or d.message.message_id in wanted, limit, chosen
        )
        for replayed in result.done:
            print(replayed)
        print(f"replayed {len(result.done)} message(s)", file=sys.stderr)
        if result.unknown:
            print(
                f"not replayed, naming nothing the database holds: {', '.join(result.unknown)}",
                file=sys.stderr,
            )
        missing = wanted - set(result.done) - set(result.unknown)
        if missing and not every:
            print(f"not found: {', '.join(sorted(missing))}", file=sys.stderr)
        if result.unknown or (missing and not every):
            return 1
    elif action == "purge":
        if not yes:
            print("purge drops every dead letter for good; pass --yes to confirm", file=sys.stderr)
            return 2
        print(f"purged {await purge(settings, chosen)} message(s)", file=sys.stderr)
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, default=str).decode() + "\n")
