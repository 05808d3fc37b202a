"""What the API reads before it takes work: how much waits, and whether the broker answers.

Each API process watches for itself, wherever its relay runs (``RELAY_INLINE``): the orders in
the outbox, the messages ready in each queue, once per ``RELAY_INTERVAL``, over a connection of
its own. Past ``MAX_OUTBOX`` or ``MAX_QUEUE_DEPTH``, new orders get a 503 rather than pile up.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import asyncpg
from aio_pika.abc import AbstractConnection, AbstractQueue

from producer.metrics import Metrics
from shared import amqp, logs, topology
from shared.errors import Misconfigured
from shared.settings import ProducerSettings

log = logging.getLogger(__name__)
READ_TIMEOUT = 5.0  # seconds: a broker that does not answer counts as unreachable


class Backlog:
    """The outbox's and the queues' depths, kept fresh by ``run``; ``connected``: /readyz."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: ProducerSettings,
        metrics: Metrics,
        misconfigured: Callable[[Misconfigured], None],
    ) -> None:
        self._pool, self._settings, self._misconfigured = pool, settings, misconfigured
        self._topology = topology.of(settings.queue_kind)
        self._stopping = asyncio.Event()
        self.connected = False
        self.outbox_depth = 0
        self.depths: dict[str, int] = {}  # messages ready per queue; empty while disconnected
        self.queue_depth: int | None = None  # ready in the order lane's work queues, if known
        metrics.outbox_backlog.set_function(lambda: self.outbox_depth)
        metrics.queue_depth.set_function(lambda: self.queue_depth or 0)

    @property
    def overloaded(self) -> bool:
        """Past a configured bound: new orders should wait (503) rather than pile up."""
        s = self._settings
        return self.outbox_depth >= s.max_outbox or (self.queue_depth or 0) >= s.max_queue_depth

    def _measured(self, depths: dict[str, int]) -> None:
        """Each queue's depth, and the work queues' sum that every ``POST /orders`` reads."""
        work = [depths.get(q.name) for q in self._topology.orders.work]
        self.depths = depths
        self.queue_depth = None if None in work else sum(w or 0 for w in work)

    async def run(self) -> None:
        """Measure once per ``relay_interval`` until stopped: the outbox from the database, the
        queues over a connection kept open, reconnected as every client is (``amqp``)."""
        counting = asyncio.create_task(self._count_outbox())
        try:
            await amqp.reconnecting(self._watch, self._stopping, "backlog")
        except Misconfigured as exc:  # retrying cannot help: say why, and let the owner stop
            log.critical("%s", exc, extra=logs.event("misconfigured"))
            self._misconfigured(exc)
        finally:
            counting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await counting

    async def _count_outbox(self) -> None:
        while True:
            try:
                self.outbox_depth = await self._pool.fetchval("SELECT count(*) FROM outbox")
            except Exception as exc:  # the database is down: POST answers 503 anyway
                log.debug("outbox gauge: %r", exc)
            await asyncio.sleep(self._settings.relay_interval)

    async def _watch(self, connected: Callable[[], None]) -> None:
        """Read the queues' depths until the broker fails to answer (an unknown depth must not
        hold orders back: /readyz answers 503 meanwhile)."""
        connection, queues = await self._connect()
        try:
            while not self._stopping.is_set():
                async with asyncio.timeout(READ_TIMEOUT):
                    self._measured({q.name: (await q.declare()).message_count or 0 for q in queues})
                self.connected = True
                connected()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._settings.relay_interval)
        finally:
            self.connected = False
            self._measured({})
            await _close(connection)

    async def _connect(self) -> tuple[AbstractConnection, list[AbstractQueue]]:
        connection = await amqp.connect(self._settings.rabbitmq_url, "producer-backlog")
        try:
            async with asyncio.timeout(amqp.SETUP_TIMEOUT):
                channel = await connection.channel(publisher_confirms=False)
                await topology.declare(channel, self._settings.queue_kind, "producer")
                return connection, [
                    await channel.get_queue(q.name, ensure=False) for q in self._topology.queues
                ]
        except BaseException:
            await _close(connection)
            raise


async def _close(connection: AbstractConnection | None) -> None:
    if connection is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 5)


@contextlib.asynccontextmanager
async def watching(
    pool: asyncpg.Pool,
    settings: ProducerSettings,
    metrics: Metrics,
    misconfigured: Callable[[Misconfigured], None],
) -> AsyncIterator[Backlog]:
    """A backlog kept fresh while the block runs; on leaving, it stops at once. It calls
    ``misconfigured`` if the broker's queues are not of ``QUEUE_KIND``."""
    backlog = Backlog(pool, settings, metrics, misconfigured)
    task = asyncio.create_task(backlog.run(), name="backlog")
    try:
        yield backlog
    finally:
        # aio-pika may swallow a cancellation mid-handshake: the loop then ends at its next turn.
        backlog._stopping.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
