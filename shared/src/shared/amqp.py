"""Connections, consuming and confirmed publishing, the same way in both services."""

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import DeliveryError, PublishError
from yarl import URL

from shared import aiormq_private, hosts, logs
from shared.errors import Misconfigured
from shared.messages import Outgoing

CONNECT_TIMEOUT = 10.0
SETUP_TIMEOUT = 30.0  # channels, QoS and declarations after (re)connecting
HEARTBEAT = 10  # seconds; a dead peer is noticed after about three missed beats
RECONNECT_FIRST, RECONNECT_CAP = 0.5, 10.0  # seconds between sessions: doubling, capped

log = logging.getLogger(__name__)


async def connect(url: str, name: str) -> aio_pika.Connection:
    """A plain connection to a node of ``url``: callers own the reconnect loop, so recovery is
    explicit. A URL that names several nodes (``shared/hosts.py``) has them tried in turn, from
    one picked at random (clients spread over a cluster); the last one's error if none answers."""
    nodes = hosts.each(url)
    first = random.randrange(len(nodes))
    for n, node in enumerate(nodes[first:] + nodes[:first], 1):
        try:
            return await _connect(node, name)
        except Exception as exc:
            if n == len(nodes):
                raise
            log.warning(
                "%s: %s unavailable (%r); trying the next node",
                name,
                hosts.redact(node),
                exc,
                extra=logs.event("node_unavailable", node=hosts.redact(node), error=repr(exc)),
            )
    raise AssertionError("a URL names at least one node")


async def _connect(url: str, name: str) -> aio_pika.Connection:
    """``aio_pika.connect`` drops a connection whose handshake failed without closing it; its
    ``__del__`` then makes a ``close()`` coroutine that nobody awaits when the collector runs in
    a thread without an event loop (RuntimeWarning). This one is closed here instead."""
    parsed = URL(url)
    if "heartbeat" not in parsed.query:
        parsed = parsed.update_query(heartbeat=HEARTBEAT)
    connection = aio_pika.Connection(parsed, client_properties={"connection_name": name})
    try:
        await connection.connect(timeout=CONNECT_TIMEOUT)
    except BaseException:
        await connection.close()
        raise
    return connection


async def reconnecting(
    session: Callable[[Callable[[], None]], Awaitable[None]], stop: asyncio.Event, who: str
) -> None:
    """Run ``session`` (connect, then work until the connection is lost) until ``stop`` is set.

    The one reconnect loop of every long-running client (consumer, relay, the API's backlog): a
    session that fails is logged and started again after a pause that doubles from 0.5 s up to
    10 s, unless it raises ``Misconfigured``. ``session`` calls the function it is given once it
    is connected, which starts the pauses at 0.5 s again."""
    delay = RECONNECT_FIRST

    def connected() -> None:
        nonlocal delay
        delay = RECONNECT_FIRST

    while not stop.is_set():
        try:
            await session(connected)
        except Misconfigured:
            raise  # a reconnect would fail the same way
        except Exception as exc:
            log.warning(
                "%s: broker unavailable (%r); reconnecting in %.1fs",
                who,
                exc,
                delay,
                extra=logs.event(
                    "broker_unavailable", who=who, error=type(exc).__name__, retry_in=delay
                ),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RECONNECT_CAP)


async def confirmed_channel(connection: AbstractConnection) -> AbstractChannel:
    """A channel whose publishes wait for a confirm and raise on an unroutable message."""
    return await connection.channel(publisher_confirms=True, on_return_raises=True)


async def consume(
    channel: AbstractChannel,
    queue: str,
    receive: Callable[[DeliveredMessage], None],
    fast: bool = True,
) -> str:
    """Consume ``queue`` with manual acks, calling ``receive`` with each delivery, in order.

    ``receive`` must not block; an exception from it is logged and closes the channel, which gives
    its unacked deliveries back to the queue (one consumer per channel). With ``fast`` (and an
    aiormq that ``aiormq_private`` knows) ``receive`` is called from the channel's reader, without
    the task per delivery aiormq's ``basic_consume`` makes. Returns the consumer tag.
    """
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    closing: asyncio.Future[None] | None = None

    def failed(exc: Exception) -> None:
        nonlocal closing
        log.error("could not take a delivery from %s; closing its channel", queue, exc_info=exc)
        if closing is None:  # from a task of its own: the reader reads the broker's reply
            closing = asyncio.ensure_future(underlay.close(exc))

    async def on_message(delivered: DeliveredMessage) -> None:
        try:
            receive(delivered)
        except Exception as exc:
            failed(exc)

    if fast and aiormq_private.usable(underlay):
        aiormq_private.read_in_reader(underlay, receive, failed)
    # On the fast path registered for aiormq's consumer bookkeeping (cancel, close) only.
    consuming = await underlay.basic_consume(queue, on_message)
    assert consuming.consumer_tag is not None
    return consuming.consumer_tag


async def publish(
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
    confirm_within: float,
    fast: bool = True,
) -> None:
    """Publish and wait for the confirm. A timeout means *in doubt*: it may still arrive.

    A message without ``message_id`` goes through ``publish_all``, without ``mandatory``; on the
    fast path its id stays absent (aiormq's public ``basic_publish`` invents one)."""
    if message.message_id is None:
        channel = cast(aio_pika.Exchange, exchange).channel
        outgoing = Outgoing(message.body, message.properties)
        [error] = await publish_all(
            channel, exchange.name, [outgoing], routing_key, confirm_within, fast
        )
        if error is not None:
            raise error
        return
    await exchange.publish(message, routing_key, mandatory=True, timeout=confirm_within)


async def publish_all(
    channel: AbstractChannel,
    exchange: str,
    messages: Sequence[Outgoing],
    routing_key: str,
    confirm_within: float,
    fast: bool = True,
) -> list[BaseException | None]:
    """Publish ``messages`` at once and wait up to ``confirm_within`` for all their confirms.

    One outcome per message: None once confirmed, else the error: ``DeliveryError`` for a nack,
    ``PublishError`` for an unroutable message (``confirmed_channel``); in doubt, a
    ``TimeoutError``, or a ``ConnectionError`` when the channel closed first. A return is matched
    to its message by ``message_id``, so a message without one is sent without ``mandatory``: only
    the worker sends such messages (poison, to a lane's fanout dead-letter exchange, which routes
    to its queue whatever the key).

    The outbox relay's hot path. With ``fast`` the round is one socket write
    (``aiormq_private.write_all``), else one aiormq ``basic_publish`` per message, in order.
    """
    if not messages:
        return []
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    if fast and aiormq_private.usable(underlay):
        confirms = await aiormq_private.write_all(underlay, exchange, messages, routing_key)
        _, unconfirmed = await asyncio.wait(confirms, timeout=confirm_within)
    else:
        confirms = [
            asyncio.ensure_future(
                underlay.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=message.properties,
                    mandatory=bool(message.properties.message_id),
                )
            )
            for message in messages
        ]
        try:
            _, unconfirmed = await asyncio.wait(confirms, timeout=confirm_within)
        finally:  # as basic_publish's own timeout would, which undoes what was never written
            for task in confirms:
                task.cancel()
            await asyncio.wait(confirms)
    return [_outcome(confirm, confirm in unconfirmed, confirm_within) for confirm in confirms]


def _outcome(
    confirm: "asyncio.Future[Any]", pending: bool, confirm_within: float
) -> BaseException | None:
    if pending or confirm.cancelled():
        return TimeoutError(f"no confirm within {confirm_within}s")
    error = confirm.exception()
    if error is None or isinstance(error, DeliveryError | PublishError | ConnectionError):
        return error  # confirmed, nacked, returned, or the connection lost
    # aiormq closing the channel rejects what is pending with the close's reason: a
    # CancelledError, a ChannelClosed, or a bare ``Exception()`` when the connection was closed
    # cleanly.
    return ConnectionError(f"channel closed before the confirm: {error!r}")


async def until_closed(*objects: AbstractConnection | AbstractChannel) -> None:
    """Return when any of these connections or channels closes, for whatever reason."""
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_close(*_: Any) -> None:
        if not lost.done():
            lost.set_result(None)

    for obj in objects:
        if obj.is_closed:
            return
        obj.close_callbacks.add(on_close)
    await lost
