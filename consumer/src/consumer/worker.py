"""The consumer loop, and the one place that decides ack, retry or dead-letter.

    delivery ─► decode ─► process ─► ack                       (completed, rejected, duplicate)
                  │          │
                  │          └─ transient error, attempts left ─► publish to a retry queue ─► ack
                  │          └─ transient error, exhausted ────┐
                  └─ poison (InvalidMessage) ──────────────────┴► publish to the DLQ ─────► ack

Every move to another queue is a confirmed publish *before* the ack, so a crash in between
duplicates a message (harmless) instead of losing one.
"""

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from wsgiref.simple_server import WSGIServer

import asyncpg
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from prometheus_client import start_http_server

from consumer import orders
from consumer.metrics import Metrics
from shared import amqp, db, logs, messages, topology
from shared.errors import InvalidMessage, PermanentError
from shared.settings import ConsumerSettings

log = logging.getLogger(__name__)


def retry_delay_ms(
    attempt: int, base_ms: int, cap_ms: int, rand: Callable[[], float] = random.random
) -> int:
    """Exponential backoff with equal jitter, rounded down to a delay level of the topology."""
    ceiling = min(cap_ms, base_ms * 2 ** (attempt - 1))
    return topology.retry_level(ceiling / 2 + rand() * ceiling / 2)


class Worker:
    """Consumes ``orders.work`` with manual acks, ``concurrency`` orders at a time."""

    def __init__(self, settings: ConsumerSettings, pool: asyncpg.Pool, metrics: Metrics) -> None:
        self.settings, self.pool, self.metrics = settings, pool, metrics
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._retry: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, reconnecting after any broker trouble; then drain."""
        delay = 0.5
        while not stop.is_set():
            try:
                await self._session(stop)
                delay = 0.5
            except Exception as exc:
                log.warning("broker unavailable (%r); reconnecting in %.1fs", exc, delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10.0)

    async def _session(self, stop: asyncio.Event) -> None:
        url = self.settings.rabbitmq_url
        # Separate connections: a memory or disk alarm blocks publishers, not consumers.
        async with (
            await amqp.connect(url, f"consumer {self.settings.consumer_name}") as consuming,
            await amqp.connect(url, f"publisher {self.settings.consumer_name}") as publishing,
        ):
            async with asyncio.timeout(amqp.SETUP_TIMEOUT):
                channel = await consuming.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=self.settings.prefetch)
                await topology.declare(channel)
                publisher = await amqp.confirmed_channel(publishing)
                self._retry = await publisher.get_exchange(topology.RETRY.name, ensure=False)
                self._dead = await publisher.get_exchange(topology.DEAD.name, ensure=False)
                queue = await channel.get_queue(topology.WORK.name, ensure=False)
                self._stopping = False
                tag = await queue.consume(self._on_message)
            log.info("consuming %s from %s", topology.WORK.name, amqp.redact(url))
            lost = asyncio.ensure_future(
                amqp.until_closed(consuming, channel, publishing, publisher)
            )
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait([lost, stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                lost.cancel()
            self._stopping = True
            if stop.is_set() and not channel.is_closed:
                with contextlib.suppress(Exception):  # closing the channel cancels it anyway
                    await queue.cancel(tag, timeout=amqp.SETUP_TIMEOUT)
            await self._drain()
            if not stop.is_set():
                raise ConnectionError("broker connection lost")

    async def _drain(self) -> None:
        """Let in-flight orders finish and ack; whatever is left unacked goes back to the queue."""
        if self._tasks:
            log.info("waiting for %d in-flight orders", len(self._tasks))
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.shutdown_grace)
            for task in pending:
                task.cancel()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        logs.order_id.set(message.message_id)  # this task's log lines name the order
        try:
            async with self._slots:
                if self._stopping:
                    await message.nack(requeue=True)
                    return
                if message.redelivered:
                    self.metrics.redeliveries.inc()
                with self.metrics.in_flight.track_inprogress():
                    await self.handle(message)
        except Exception:
            log.exception("could not settle message %s; requeueing it", message.message_id)
            if not message.processed:  # never leave a delivery unacked on a live channel
                with contextlib.suppress(Exception):  # a closed channel requeues it anyway
                    await message.nack(requeue=True)
        finally:
            self._tasks.discard(task)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Process one delivery and settle it: ack, retry or dead-letter."""
        attempt = messages.attempt_of(message)
        try:
            order = messages.decode(message)
        except InvalidMessage as exc:
            await self._dead_letter(message, exc, attempt, "poison")
            return
        try:
            with self.metrics.processing_seconds.time():
                async with asyncio.timeout(self.settings.order_timeout):
                    outcome = await orders.process(self.pool, order, attempt, self.settings)
        except PermanentError as exc:
            await self._dead_letter(message, exc, attempt, "permanent")
        except Exception as exc:
            if attempt >= self.settings.max_attempts:
                await self._dead_letter(message, exc, attempt, "exhausted")
            else:
                await self._retry_later(message, exc, attempt)
        else:
            await message.ack()
            self.metrics.processed.labels(outcome).inc()
            log.info("order %s %s (attempt %d)", order.id, outcome, attempt)

    async def _retry_later(
        self, message: AbstractIncomingMessage, exc: Exception, attempt: int
    ) -> None:
        s = self.settings
        delay = retry_delay_ms(attempt, s.retry_base_ms, s.retry_cap_ms)
        error = _describe(exc)
        log.warning(
            "order %s attempt %d failed (%s); retry in %d ms",
            message.message_id,
            attempt,
            error,
            delay,
        )
        order_id = messages.order_id_of(message)
        if order_id is not None:
            await self._best_effort(orders.mark_retrying(self.pool, order_id, error, delay))
        headers = {messages.ATTEMPT: attempt + 1, **_failure_headers(message, exc)}
        self.metrics.retries.inc()
        assert self._retry is not None
        await self._move(message, self._retry, headers, topology.delay_name(delay))

    async def _dead_letter(
        self, message: AbstractIncomingMessage, exc: Exception, attempt: int, reason: str
    ) -> None:
        error = _describe(exc)
        log.error(
            "dead-lettering message %s after attempt %d: %s", message.message_id, attempt, error
        )
        order_id = messages.order_id_of(message)
        if order_id is not None:
            await self._best_effort(orders.mark_failed(self.pool, order_id, error))
        headers = {messages.ATTEMPT: attempt, **_failure_headers(message, exc)}
        self.metrics.dead_lettered.labels(reason).inc()
        assert self._dead is not None
        await self._move(message, self._dead, headers, "")

    async def _move(
        self,
        message: AbstractIncomingMessage,
        exchange: AbstractExchange,
        headers: dict[str, object],
        routing_key: str,
    ) -> None:
        """Confirmed publish of a copy, then ack; if the publish fails, requeue the original."""
        try:
            await amqp.publish(
                exchange,
                messages.forward(message, headers),
                routing_key,
                self.settings.publish_timeout,
            )
        except Exception:
            log.exception(
                "could not move message %s to %s; requeueing it", message.message_id, exchange.name
            )
            await asyncio.sleep(1)  # no hot loop while the broker is in trouble
            await message.nack(requeue=True)
            return
        await message.ack()

    async def _best_effort(self, update: Awaitable[None]) -> None:
        """A status update that must not stop the message from moving on."""
        try:
            await update
        except Exception as exc:
            log.warning("could not record order status: %r", exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "TimeoutError: the attempt took longer than ORDER_TIMEOUT"
    return f"{type(exc).__name__}: {exc}"


def _failure_headers(message: AbstractIncomingMessage, exc: Exception) -> dict[str, object]:
    now = datetime.now(UTC).isoformat()
    first = (message.headers or {}).get(messages.FIRST_FAILURE_AT, now)
    return {
        messages.ERROR_TYPE: type(exc).__name__,
        messages.ERROR_MESSAGE: str(exc)[:1000] or _describe(exc),
        messages.FIRST_FAILURE_AT: first,
        messages.LAST_FAILURE_AT: now,
    }


async def serve(settings: ConsumerSettings, stop: asyncio.Event) -> None:
    """Open the pool, migrate, and run one worker until ``stop``."""
    metrics = Metrics.create()
    server = _serve_metrics(metrics, settings.metrics_port)
    pool = await db.create_pool(settings.database_url, settings.concurrency + 2)
    try:
        await db.migrate(pool, settings.startup_timeout)
        await Worker(settings, pool, metrics).run(stop)
    finally:
        await pool.close()
        if server is not None:
            server.shutdown()


def _serve_metrics(metrics: Metrics, port: int) -> WSGIServer | None:
    """Prometheus /metrics on ``port`` in a thread; a taken port costs the metrics, not the work."""
    if not port:
        return None
    try:
        server, _ = start_http_server(port, registry=metrics.registry)
    except OSError as exc:
        log.error("metrics not served: port %d: %s", port, exc)
        return None
    log.info("metrics on :%d/metrics", port)
    return server
