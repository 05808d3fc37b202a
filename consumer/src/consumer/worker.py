"""The consumer loop, and the one place that decides ack, retry or dead-letter.

    delivery ─► window ─► handler ─► ack                       (completed, rejected, duplicate, ...)
                             │
                             └─ transient error, attempts left ─► publish to a retry queue ─► ack
                             └─ transient error, exhausted ────┐
                             └─ poison (InvalidMessage) ───────┴► publish to the DLQ ─────► ack

One worker runs one handler per lane (orders, crawl tasks): each lane has its own channel,
prefetch, window (consumer/window.py) and runners, and every lane gets the same settling rules.
Every move to another queue is a confirmed publish *before* the ack, so a crash in between
duplicates a message (harmless) instead of losing one. Acks settled together share one frame
(consumer/acks.py).

No delivery waits unstarted in the window for longer than ``HOLD_LIMIT``: past it, it goes back
to its queue. With bands (the quorum kind), its band's consumer is cancelled first, so the band
waits in RabbitMQ, not in this process, and is consumed again once nothing above it is left.
"""

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Protocol

from aio_pika.abc import AbstractChannel, AbstractExchange
from aiormq.abc import DeliveredMessage
from prometheus_client import Gauge

from consumer.acks import Acks
from consumer.delivery import Delivery
from consumer.metrics import Metrics
from consumer.window import Window
from shared import amqp, hosts, logs, messages, topology
from shared.errors import InvalidMessage, PermanentError, Unrecognised
from shared.messages import Frontier
from shared.settings import ConsumerSettings

log = logging.getLogger(__name__)


def retry_delay_ms(
    attempt: int, base_ms: int, cap_ms: int, rand: Callable[[], float] = random.random
) -> int:
    """Exponential backoff with equal jitter, rounded down to a delay level of the topology."""
    ceiling = min(cap_ms, base_ms * 2 ** (attempt - 1))
    return topology.retry_level(ceiling / 2 + rand() * ceiling / 2)


def prefetch(handler: "Handler") -> int:
    """Each of the handler's consumers' prefetch: its own; with bands (the quorum kind), enough
    that a band with a backlog still has a delivery waiting in the window for each runner that
    finishes while its band's next ones are on their way, or the runner takes a lower band's."""
    if len(handler.lane.bands) == 1:
        return handler.prefetch
    return max(handler.prefetch, 2 * handler.concurrency + 1)


class Handler(Protocol):
    """What one lane's work means; the worker does the acking, retrying and dead-lettering."""

    lane: topology.Lane
    noun: str  # "order", "crawl task": for logs
    subject: str  # the log field that names the message being handled: "order_id", "page_id"
    metrics: Metrics
    concurrency: int  # runners
    prefetch: int
    max_attempts: int
    retry_base_ms: int  # the backoff (``retry_delay_ms``)
    retry_cap_ms: int
    timeout: float  # seconds one attempt may take

    def place(self, message: Delivery) -> tuple[Frontier, int]:
        """Where a delivery waits in the window: which queue, and its key there."""

    async def process(self, message: Delivery, attempt: int) -> str:
        """Handle one attempt and return its outcome; raise to retry or dead-letter."""

    async def retrying(self, message: Delivery, error: str, delay_ms: int) -> None:
        """Record that the attempt failed and the next one comes in ``delay_ms``."""

    async def failed(self, message: Delivery, error: str) -> None:
        """Record that the message went to the dead-letter queue."""


@dataclass
class _Lane:
    """A handler's broker side during one connection."""

    handler: Handler
    channel: AbstractChannel
    retry: AbstractExchange
    dead: AbstractExchange
    window: Window = field(default_factory=Window)
    acks: Acks = field(default_factory=Acks)
    consumers: dict[str, str] = field(default_factory=dict)  # consumer tag -> band queue
    paused: list[str] = field(default_factory=list)  # band queues left unconsumed for now
    busy: int = 0  # deliveries being handled now

    def __post_init__(self) -> None:
        self.handler.metrics.in_flight.set_function(lambda: self.busy)  # read when scraped


class Worker:
    """Consumes every handler's work queue with manual acks."""

    def __init__(
        self, settings: ConsumerSettings, handlers: Sequence[Handler], consuming: Gauge
    ) -> None:
        self.settings, self.handlers = settings, handlers
        self.consuming = consuming  # 1 while every lane's queue is consumed: the healthcheck

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, reconnecting after any broker trouble; then drain."""
        await amqp.reconnecting(partial(self._session, stop), stop, "consumer")

    async def _session(self, stop: asyncio.Event, connected: Callable[[], None]) -> None:
        url, name = self.settings.rabbitmq_url, self.settings.consumer_name
        # Separate connections: a memory or disk alarm blocks publishers, not consumers.
        async with (
            await amqp.connect(url, f"consumer {name}") as consuming,
            await amqp.connect(url, f"publisher {name}") as publishing,
        ):
            lanes: list[_Lane] = []
            async with asyncio.timeout(amqp.SETUP_TIMEOUT):
                publisher = await amqp.confirmed_channel(publishing)
                await topology.declare(publisher, self.settings.queue_kind, "consumer")
                for handler in self.handlers:
                    channel = await consuming.channel(publisher_confirms=False)
                    await channel.set_qos(prefetch_count=prefetch(handler))
                    lane = _Lane(
                        handler,
                        channel,
                        await publisher.get_exchange(handler.lane.retry.name, ensure=False),
                        await publisher.get_exchange(handler.lane.dead.name, ensure=False),
                    )
                    for queue in handler.lane.work:
                        await self._consume(lane, queue.name)
                    lanes.append(lane)
            queues = [q.name for ln in lanes for q in ln.handler.lane.work]
            log.info(
                "consuming %s from %s",
                ", ".join(queues),
                hosts.redact(str(consuming.url)),
                extra=logs.event("consuming", queues=queues),
            )
            runners = [
                asyncio.create_task(self._runner(lane))
                for lane in lanes
                for _ in range(lane.handler.concurrency)
            ]
            holds = [asyncio.create_task(self._bound_holds(lane)) for lane in lanes]
            lost = asyncio.ensure_future(
                amqp.until_closed(consuming, publishing, publisher, *(ln.channel for ln in lanes))
            )
            stopped = asyncio.ensure_future(stop.wait())
            self.consuming.set(1)
            connected()
            try:
                await asyncio.wait([lost, stopped, *holds], return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.consuming.set(0)
                for task in (stopped, lost, *holds):
                    task.cancel()
                await asyncio.gather(*holds, return_exceptions=True)
            if stop.is_set():
                for lane in lanes:
                    if not lane.channel.is_closed:
                        with contextlib.suppress(Exception):  # closing cancels it anyway
                            underlay = await lane.channel.get_underlay_channel()
                            for tag in lane.consumers:
                                await underlay.basic_cancel(tag, timeout=amqp.SETUP_TIMEOUT)
            await self._drain(lanes, runners)
            for task in holds:
                if not task.cancelled() and (error := task.exception()) is not None:
                    raise error
            if not stop.is_set():
                raise ConnectionError("broker connection lost")

    async def _consume(self, lane: _Lane, queue: str) -> None:
        tag = await amqp.consume(lane.channel, queue, _receiver(lane), self.settings.amqp_fast_path)
        lane.consumers[tag] = queue

    async def _bound_holds(self, lane: _Lane) -> None:
        """Every quarter of ``HOLD_LIMIT``, give back what waited longer; with bands, consume the
        paused ones again as soon as the window runs dry and no band still consumed has more."""
        limit = self.settings.hold_limit
        while True:
            if lane.paused:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(limit / 4):
                        await lane.window.empty.wait()
                if not lane.window and not await self._ready_in(lane, lane.consumers.values()):
                    await self._resume(lane)
                elif lane.window.empty.is_set():
                    await asyncio.sleep(min(limit / 4, 0.05))  # the next ones are on their way
            else:
                await asyncio.sleep(limit / 4)
            if stale := lane.window.withdraw(limit):
                await self._give_back(lane, stale)

    async def _give_back(self, lane: _Lane, stale: list[Delivery]) -> None:
        """Requeue deliveries held past ``HOLD_LIMIT``; first cancel the consumers of their bands
        that wait behind a more urgent band still consumed, or RabbitMQ would hand them straight
        back. (The most urgent band is never paused: one of its deliveries held that long waits
        behind its own, ``PREFETCH`` too large for the attempts' duration.)"""
        handler = lane.handler
        underlay = await lane.channel.get_underlay_channel()
        bands = [q.name for q in handler.lane.work]  # the most urgent first
        held = {m.consumer_tag for m in stale}
        for tag in [t for t in lane.consumers if t in held]:
            band = bands.index(lane.consumers[tag])
            if any(bands.index(q) < band for q in lane.consumers.values()):  # held behind those
                lane.paused.append(lane.consumers.pop(tag))
                await underlay.basic_cancel(tag, timeout=amqp.SETUP_TIMEOUT)
        for message in stale:
            await _requeue(lane, message)
        handler.metrics.given_back.inc(len(stale))
        log.warning(
            "gave back %d %ss that waited over %g s unstarted%s",
            len(stale),
            handler.noun,
            self.settings.hold_limit,
            f"; pausing {', '.join(lane.paused)}" if lane.paused else "",
            extra=logs.event("given_back", count=len(stale), paused=list(lane.paused)),
        )

    async def _resume(self, lane: _Lane) -> None:
        resumed, lane.paused = lane.paused, []
        for queue in resumed:
            await self._consume(lane, queue)
        log.info("consuming %s again", ", ".join(resumed), extra=logs.event("resumed"))

    @staticmethod
    async def _ready_in(lane: _Lane, queues: Iterable[str]) -> int:
        """Messages ready in ``queues`` (RabbitMQ's count, from a passive declare)."""
        underlay = await lane.channel.get_underlay_channel()
        total = 0
        for queue in queues:
            declared = await underlay.queue_declare(queue, passive=True)
            total += declared.message_count or 0
        return total

    async def _drain(self, lanes: list[_Lane], runners: list["asyncio.Task[None]"]) -> None:
        """Let in-flight work finish and ack; what was never started goes back to its queue."""
        left = [(lane, lane.window.close()) for lane in lanes]  # the runners take no more
        if busy := [f"{ln.busy} in-flight {ln.handler.noun}s" for ln in lanes if ln.busy]:
            log.info("waiting for %s", ", ".join(busy))
        if runners:
            _, pending = await asyncio.wait(runners, timeout=self.settings.shutdown_grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for lane, unstarted in left:
            for message in unstarted + lane.window.close():  # and any delivered since
                await _requeue(lane, message)

    async def _runner(self, lane: _Lane) -> None:
        metrics = lane.handler.metrics
        while (message := await lane.window.get()) is not None:
            if lane.channel.is_closed:
                continue  # RabbitMQ redelivers it; its ack could not land anyway
            # This task's log lines name the message (poison may come without an id).
            found = message.message_id
            logs.subject.set((lane.handler.subject, found) if found else None)
            if message.redelivered:
                metrics.redeliveries.inc()
            lane.busy += 1
            try:
                await self.handle(lane, message)
            except Exception:
                log.exception("could not settle message %s; requeueing it", message.message_id)
                await _requeue(lane, message)
            finally:
                lane.busy -= 1

    async def handle(self, lane: _Lane, message: Delivery) -> None:
        """Process one delivery and settle it: ack, retry or dead-letter."""
        handler = lane.handler
        attempt = messages.attempt_of(message)
        try:
            with handler.metrics.processing_seconds.time():
                outcome = await _within(handler.timeout, handler.process(message, attempt))
        except Unrecognised as exc:  # not believed: the record it names stays as it is
            await self._dead_letter(lane, message, exc, attempt, "poison", record=False)
        except InvalidMessage as exc:
            await self._dead_letter(lane, message, exc, attempt, "poison")
        except PermanentError as exc:
            await self._dead_letter(lane, message, exc, attempt, "permanent")
        except Exception as exc:
            if attempt >= handler.max_attempts:
                await self._dead_letter(lane, message, exc, attempt, "exhausted")
            else:
                await self._retry_later(lane, message, exc, attempt)
        else:
            await lane.acks.ack(message)
            handler.metrics.processed.labels(outcome).inc()
            log.info("%s %s %s (attempt %d)", handler.noun, message.message_id, outcome, attempt)

    async def _retry_later(
        self, lane: _Lane, message: Delivery, exc: Exception, attempt: int
    ) -> None:
        handler = lane.handler
        delay = retry_delay_ms(attempt, handler.retry_base_ms, handler.retry_cap_ms)
        error = _describe(exc)
        log.warning(
            "%s %s attempt %d failed (%s); retry in %d ms",
            lane.handler.noun,
            message.message_id,
            attempt,
            error,
            delay,
        )
        await _best_effort(lane.handler.retrying(message, error, delay))
        headers = {
            messages.ATTEMPT: attempt + 1,
            **_failure_headers(message, exc),
            # Where the retry queue sends it back when its delay ends, on the quorum kind (whose
            # retry queues keep a message's routing keys): its band.
            "CC": [lane.handler.lane.band(message.priority).routing_key],
        }
        lane.handler.metrics.retries.inc()
        await self._move(lane, message, lane.retry, headers, topology.delay_name(delay))

    async def _dead_letter(
        self,
        lane: _Lane,
        message: Delivery,
        exc: Exception,
        attempt: int,
        reason: str,
        record: bool = True,
    ) -> None:
        error = _describe(exc)
        log.error(
            "dead-lettering %s %s after attempt %d: %s",
            lane.handler.noun,
            message.message_id,
            attempt,
            error,
        )
        if record:
            await _best_effort(lane.handler.failed(message, error))
        headers = {messages.ATTEMPT: attempt, **_failure_headers(message, exc)}
        lane.handler.metrics.dead_lettered.labels(reason).inc()
        await self._move(lane, message, lane.dead, headers, "")

    async def _move(
        self,
        lane: _Lane,
        message: Delivery,
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
                self.settings.amqp_fast_path,
            )
        except Exception:
            log.exception(
                "could not move message %s to %s; requeueing it",
                message.message_id,
                exchange.name,
                extra=logs.event("move_failed", exchange=exchange.name),
            )
            await asyncio.sleep(1)  # no hot loop while the broker is in trouble
            await lane.acks.requeue(message)
            return
        await lane.acks.ack(message)


def _receiver(lane: _Lane) -> Callable[[DeliveredMessage], None]:
    """Each delivery into the lane's window, from the channel's reader (``amqp.consume``)."""

    def receive(delivered: DeliveredMessage) -> None:
        message = Delivery(delivered)
        lane.acks.delivered(message)
        lane.window.put(message, *lane.handler.place(message))  # once closed, _drain requeues it

    return receive


async def _requeue(lane: _Lane, message: Delivery) -> None:
    """Give a delivery back at once; never leave one unacked on a live channel."""
    if not lane.channel.is_closed:
        with contextlib.suppress(Exception):  # a closed channel requeues it anyway
            await lane.acks.requeue(message)


async def _best_effort(update: Awaitable[None]) -> None:
    """A status update that must not stop the message from moving on."""
    try:
        await update
    except Exception as exc:
        log.warning("could not record the failure: %r", exc)


async def _within(seconds: float, attempt: Awaitable[str]) -> str:
    """The attempt's outcome; a ``TimeoutError`` that says so if it took longer than ``seconds``."""
    limit = asyncio.timeout(seconds)
    try:
        async with limit:
            return await attempt
    except TimeoutError as exc:
        if limit.expired():
            raise TimeoutError(f"the attempt took longer than {seconds:g} s") from exc
        raise


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _failure_headers(message: Delivery, exc: Exception) -> dict[str, object]:
    now = datetime.now(UTC).isoformat()
    first = (message.headers or {}).get(messages.FIRST_FAILURE_AT, now)
    return {
        messages.ERROR_TYPE: type(exc).__name__,
        messages.ERROR_MESSAGE: str(exc)[:1000] or _describe(exc),
        messages.FIRST_FAILURE_AT: first,
        messages.LAST_FAILURE_AT: now,
    }
