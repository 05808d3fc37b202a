"""The outbox relay: publishes committed work to RabbitMQ and forgets it only after the confirm.

Three sources feed it. ``POST /orders`` commits the order and its outbox row together; a crawl's
pages are rows of ``crawl_pages`` still marked ``unpublished``, written by ``POST /crawls`` and by
the consumers that find links; webhook deliveries are rows of ``webhook_deliveries`` still marked
``unpublished``, written with each order event that has a receiver. The relay claims rows (``FOR
UPDATE SKIP LOCKED``, so relays, and the two publishers of each, share the work), publishes them
with publisher confirms, and forgets the confirmed ones in the same transaction. Whatever is left
(broker down, confirm timed out, process killed) is published on a later round: at least once, and
the consumers make a duplicate harmless. It runs in the API's process (``RELAY_INLINE=true``) or
alone (``python -m producer relay``, ``serve``): either way the same.

A round looks only at the sources that are due: woken by a commit (an insert of rows to publish
sends ``NOTIFY outbox`` at its commit: a trigger of the schema), or still holding rows after a
full claim, or every source after a (re)connect and once per ``RELAY_INTERVAL`` (the sweep that
catches whatever a lost wake-up left behind). An order's commit costs no claim of crawl pages,
and a publisher that finds nothing due goes back to sleep without a query.

One round is in flight at a time until a claim comes back full: what is committed meanwhile goes
out with the next round. RabbitMQ's work per message falls steeply with the round's size
(``python -m bench --rounds``: about 780 µs of its CPU per message alone, 380 in fours, 160 in
sixteens), so fewer, fuller rounds leave the cores to the requests; behind a backlog the second
publisher joins in.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
from aio_pika.abc import AbstractChannel

from producer.metrics import Metrics
from shared import amqp, db, hosts, logs, topology
from shared.errors import Misconfigured
from shared.messages import (
    CrawlTask,
    Outgoing,
    WebhookTask,
    encode_stored,
    encode_task,
    encode_webhook,
)
from shared.metrics import serving_metrics
from shared.settings import ProducerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # one of each: compared by identity
class Source:
    """Rows to publish to a lane: how to claim them, encode one, and forget the confirmed."""

    lane: str  # the lane's name: ``orders``, ``crawls``, ``webhooks`` (``Topology.lane``)
    claim: str  # $1: how many; the first column is the row's key
    encode: Callable[[dict[str, Any]], Outgoing]
    forget: str  # $1: the keys of the confirmed rows


ORDERS = Source(
    "orders",
    """SELECT o.id, o.customer_id, o.items, o.priority
       FROM outbox b JOIN orders o ON o.id = b.order_id
       ORDER BY b.priority DESC, b.seq
       LIMIT $1
       FOR UPDATE OF b SKIP LOCKED""",
    encode_stored,
    "DELETE FROM outbox WHERE order_id = ANY($1::uuid[])",
)
# In the order pages were found: a FIFO crawl's tasks reach the broker breadth-first.
CRAWL_TASKS = Source(
    "crawls",
    """SELECT p.id AS page_id, p.crawl_id, p.url, p.depth, c.frontier
       FROM crawl_pages p JOIN crawls c ON c.id = p.crawl_id
       WHERE p.unpublished
       ORDER BY p.seq
       LIMIT $1
       FOR UPDATE OF p SKIP LOCKED""",
    lambda row: encode_task(CrawlTask.model_validate(row)),
    "UPDATE crawl_pages SET unpublished = false WHERE id = ANY($1::uuid[])",
)
WEBHOOKS = Source(
    "webhooks",
    """SELECT id AS delivery_id FROM webhook_deliveries
       WHERE unpublished
       ORDER BY seq
       LIMIT $1
       FOR UPDATE SKIP LOCKED""",
    lambda row: encode_webhook(WebhookTask.model_validate(row)),
    "UPDATE webhook_deliveries SET unpublished = false WHERE id = ANY($1::uuid[])",
)
SOURCES = (ORDERS, CRAWL_TASKS, WEBHOOKS)
BY_NAME = {s.lane: s for s in SOURCES}  # as ``NOTIFY outbox`` names them
PUBLISHERS = 2  # rounds in flight at once behind a backlog; one otherwise
EXPIRY_INTERVAL, EXPIRED_BATCH = 600.0, 10_000  # order events: seconds between runs, rows a delete


class Relay:
    """Moves orders from the outbox to the ``orders`` exchange, crawl pages to ``crawls``, webhook
    deliveries to ``webhooks``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: ProducerSettings,
        metrics: Metrics,
        misconfigured: Callable[[Misconfigured], None],
    ) -> None:
        self._pool, self._settings, self._metrics = pool, settings, metrics
        self._misconfigured = misconfigured
        self._topology = topology.of(settings.queue_kind)
        self._wake = asyncio.Event()
        self._due: set[Source] = set()  # what the next round looks at
        self._next_sweep = 0.0  # monotonic time when every source is due again
        self._rounds = 0  # rounds in flight
        self._behind = False  # the last claim was full: more rows wait than one round takes
        self._stopping = asyncio.Event()
        self.connected = False

    def wake(self, source: Source) -> None:
        """Publish ``source``'s new rows now rather than at the next sweep."""
        self._due.add(source)
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Connect, publish, reconnect after any broker trouble, until ``stop``."""
        listener = asyncio.create_task(self._listen(), name="outbox-listener")
        expiring = asyncio.create_task(self._expire_events(), name="event-expiry")
        try:
            await amqp.reconnecting(self._session, self._stopping, "outbox relay")
        except Misconfigured as exc:  # retrying cannot help: say why, and let the owner stop
            log.critical("%s", exc, extra=logs.event("misconfigured"))
            self._misconfigured(exc)
        finally:
            listener.cancel()
            expiring.cancel()

    async def _expire_events(self) -> None:
        """Delete the order events older than ``EVENTS_RETENTION_HOURS``, every ten minutes, in
        batches (schema/0009_order_events.sql)."""
        retention = timedelta(hours=self._settings.events_retention_hours)
        while not self._stopping.is_set():
            try:
                while (
                    await self._pool.fetchval(
                        "SELECT expire_order_events($1, $2)", retention, EXPIRED_BATCH
                    )
                    == EXPIRED_BATCH
                    and not self._stopping.is_set()
                ):
                    pass
            except Exception as exc:
                log.debug("event expiry: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), EXPIRY_INTERVAL)

    async def _listen(self) -> None:
        """Wake on ``NOTIFY outbox`` (every commit of rows to publish, from any process); the
        sweep covers any gap."""

        def woken(*args: Any) -> None:
            source = BY_NAME.get(args[-1])  # the payload; anything else wakes every source
            for due in (source,) if source else SOURCES:
                self.wake(due)

        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(self._settings.database_url)
                await conn.add_listener(db.OUTBOX_CHANNEL, woken)
                while not conn.is_closed() and not self._stopping.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), 5)
                    # a host cut off closes nothing: ask, so that a new primary is found
                    await conn.execute("SELECT 1", timeout=5)
            except Exception as exc:
                log.debug("outbox listener: %r", exc)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._settings.relay_interval)

    async def _session(self, connected: Callable[[], None]) -> None:
        try:
            await self._publishing(connected)
        finally:
            self.connected = False

    async def publish_pending(self, channel: AbstractChannel, sources: Sequence[Source]) -> None:
        """One round over ``sources``: claim, publish, forget what was confirmed."""
        for source in sources:
            await self._publish(source, channel)

    async def _publish(self, source: Source, channel: AbstractChannel) -> None:
        failure: BaseException | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            rows = [dict(row) for row in await conn.fetch(source.claim, self._settings.relay_batch)]
            self._behind = len(rows) == self._settings.relay_batch
            if not rows:
                return
            if self._behind:
                self.wake(source)  # there may be more: another publisher claims them meanwhile
            started = time.perf_counter()
            results = await self._publish_by_band(
                channel, self._topology.lane(source.lane), [source.encode(row) for row in rows]
            )
            self._metrics.confirm_seconds.observe(time.perf_counter() - started)
            confirmed = [
                next(iter(row.values())) for row, r in zip(rows, results, strict=True) if r is None
            ]
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            await conn.execute(source.forget, confirmed)
        if failure is not None:
            raise failure

    async def _publish_by_band(
        self, channel: AbstractChannel, lane: topology.Lane, outgoing: list[Outgoing]
    ) -> list[BaseException | None]:
        """Publish each message with its band's routing key (one band on the classic kind),
        the bands' rounds at once; each message's confirm, or why it has none."""
        bands: dict[str, list[int]] = {}
        for i, message in enumerate(outgoing):
            bands.setdefault(lane.band(message.properties.priority).routing_key, []).append(i)
        s = self._settings
        rounds = await asyncio.gather(
            *(
                amqp.publish_all(
                    channel,
                    lane.exchange.name,
                    [outgoing[i] for i in indices],
                    key,
                    s.publish_timeout,
                    s.amqp_fast_path,
                )
                for key, indices in bands.items()
            )
        )
        results: list[BaseException | None] = [None] * len(outgoing)
        for indices, confirms in zip(bands.values(), rounds, strict=True):
            for i, confirm in zip(indices, confirms, strict=True):
                results[i] = confirm
        return results

    async def _publishing(self, connected: Callable[[], None]) -> None:
        async with await amqp.connect(self._settings.rabbitmq_url, "producer") as connection:
            async with asyncio.timeout(amqp.SETUP_TIMEOUT):
                channel = await amqp.confirmed_channel(connection)
                await topology.declare(channel, self._settings.queue_kind, "producer")
            lost = asyncio.ensure_future(amqp.until_closed(connection, channel))
            self._next_sweep = 0.0  # sweep at once: rows may have been left while disconnected
            self.connected = True
            connected()
            log.info(
                "outbox relay connected to %s",
                hosts.redact(str(connection.url)),
                extra=logs.event("relay_connected"),
            )
            try:
                # Each publisher claims its own rows (SKIP LOCKED) in its own transaction: one
                # publishes while another waits for its confirms, commits or claims.
                ended = await asyncio.gather(
                    *(self._publisher(channel, lost) for _ in range(PUBLISHERS)),
                    return_exceptions=True,
                )
            finally:
                lost.cancel()
            for end in ended:
                if isinstance(end, BaseException):
                    raise end

    async def _publisher(self, channel: AbstractChannel, lost: "asyncio.Future[None]") -> None:
        """Publish rounds while rows are committed, until ``stop`` or the connection is lost."""
        interval, failures = self._settings.relay_interval, 0
        while not self._stopping.is_set():
            if lost.done():
                raise ConnectionError("broker connection lost")
            self._wake.clear()  # whatever is committed from now on wakes a publisher again
            if (now := time.monotonic()) >= self._next_sweep:  # however busy the relay is
                self._next_sweep = now + interval
                self._due.update(SOURCES)
            if self._rounds and not self._behind:  # the round in flight takes what is due next
                await self._sleep(self._next_sweep - now, lost, self._wake)
                continue
            due = [source for source in SOURCES if source in self._due]
            self._due.difference_update(due)
            self._rounds += 1
            try:
                await self.publish_pending(channel, due)
            except Exception as exc:
                self._due.update(due)
                if lost.done():
                    raise
                failures += 1
                backoff = min(interval * 2**failures, 10.0)
                log.warning(
                    "outbox relay: round failed (%r); next in %.1fs",
                    exc,
                    backoff,
                    extra=logs.event("relay_round_failed", error=type(exc).__name__),
                )
                # New orders do not cut this short: the rows in doubt would only be
                # published again, piling up copies while the broker is blocked.
                await self._sleep(backoff, lost, self._stopping)
                continue
            finally:
                self._rounds -= 1
            failures = 0
            if not self._due:
                await self._sleep(self._next_sweep - time.monotonic(), lost, self._wake)

    async def _sleep(
        self, seconds: float, lost: "asyncio.Future[None]", until: asyncio.Event
    ) -> None:
        """Sleep ``seconds``, or until ``until`` is set or the connection is lost."""
        waiter = asyncio.ensure_future(until.wait())
        waits: list[asyncio.Future[Any]] = [waiter, lost]
        try:
            await asyncio.wait(waits, timeout=max(seconds, 0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()


@contextlib.asynccontextmanager
async def running(
    pool: asyncpg.Pool,
    settings: ProducerSettings,
    metrics: Metrics,
    misconfigured: Callable[[Misconfigured], None],
) -> AsyncIterator[Relay]:
    """A relay at work while the block runs; on leaving, its rounds in flight finish first. It
    calls ``misconfigured`` (and stops) if the broker's queues are not of ``QUEUE_KIND``."""
    relay = Relay(pool, settings, metrics, misconfigured)
    task = asyncio.create_task(relay.run(), name="outbox-relay")
    try:
        yield relay
    finally:
        relay.stop()
        try:
            await asyncio.wait_for(task, settings.publish_timeout)
        except TimeoutError:
            log.warning("outbox relay did not stop in time; unpublished rows stay in the outbox")


async def serve(settings: ProducerSettings, stop: asyncio.Event) -> None:
    """``python -m producer relay``: the relay alone, its metrics on PORT, until ``stop``."""
    metrics = Metrics.create()
    for unmeasured in (  # here: the API's, at zero, would mislead
        metrics.requests,
        metrics.request_seconds,
        metrics.accepted,
        metrics.outbox_backlog,
        metrics.queue_depth,
    ):
        metrics.registry.unregister(unmeasured)
    with serving_metrics(metrics.registry, settings.port):
        pool = await db.create_pool(settings.database_url, PUBLISHERS)
        try:
            await db.migrate(pool, settings.startup_timeout)
            found: list[Misconfigured] = []

            def misconfigured(exc: Misconfigured) -> None:
                found.append(exc)
                stop.set()

            async with running(pool, settings, metrics, misconfigured):
                await stop.wait()
            if found:
                raise found[0]
        finally:
            await pool.close()
