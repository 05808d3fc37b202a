"""Connections, consuming and confirmed publishing, the same way in both services."""

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.exceptions import DeliveryError, PublishError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from yarl import URL

from shared.messages import Outgoing

CONNECT_TIMEOUT = 10.0
SETUP_TIMEOUT = 30.0  # channels, QoS and declarations after (re)connecting
HEARTBEAT = 10  # seconds; a dead peer is noticed after about three missed beats

log = logging.getLogger(__name__)


async def connect(url: str, name: str) -> AbstractConnection:
    """A plain connection: callers own the reconnect loop, so recovery is explicit.

    ``aio_pika.connect`` drops a connection whose handshake failed without closing it; its
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


async def confirmed_channel(connection: AbstractConnection) -> AbstractChannel:
    """A channel whose publishes wait for a confirm and raise on an unroutable message."""
    return await connection.channel(publisher_confirms=True, on_return_raises=True)


async def consume(
    channel: AbstractChannel, queue: str, receive: Callable[[DeliveredMessage], None]
) -> str:
    """Consume ``queue`` with manual acks, calling ``receive`` with each delivery as it is read.

    aiormq runs a consumer's callback in a task of its own per delivery (the task and its done
    callback were 12% of a consumer's CPU, docs/performance-history.md). ``receive`` is called from
    the channel's reader instead, in delivery order, so it must not block; an exception from it is
    logged and closes the channel, which gives its unacked deliveries back to the queue (one
    consumer per channel: every delivery of the channel goes to ``receive``). The frames are read
    with aiormq's own methods, as its ``_on_deliver_frame`` reads them
    (tests/integration/test_publishing.py). Returns the consumer tag.
    """
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    read_header = underlay._Channel__get_content_header  # type: ignore[attr-defined]
    closing: asyncio.Future[None] | None = None

    async def on_deliver(frame: spec.Basic.Deliver) -> None:
        nonlocal closing
        delivered = await underlay._read_content(frame, await read_header())
        try:
            receive(delivered)
        except Exception as exc:
            log.exception("could not take a delivery from %s; closing its channel", queue)
            if closing is None:  # from a task of its own: the reader reads the broker's reply
                closing = asyncio.ensure_future(underlay.close(exc))

    underlay._on_deliver_frame = on_deliver  # type: ignore[method-assign]
    # Registered as well, for aiormq's consumer bookkeeping (cancel, close); it would take a
    # plain function too, wrapped in a coroutine.
    consuming = await underlay.basic_consume(queue, receive)  # type: ignore[arg-type]
    assert consuming.consumer_tag is not None
    return consuming.consumer_tag


async def publish(
    exchange: AbstractExchange, message: aio_pika.Message, routing_key: str, confirm_within: float
) -> None:
    """Publish and wait for the confirm. A timeout means *in doubt*: it may still arrive.

    A message without ``message_id`` keeps it absent (aiormq's ``basic_publish`` would invent one):
    it goes through ``publish_all``, without ``mandatory``."""
    if message.message_id is None:
        channel = cast(aio_pika.Exchange, exchange).channel
        outgoing = Outgoing(message.body, message.properties)
        [error] = await publish_all(channel, exchange.name, [outgoing], routing_key, confirm_within)
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
) -> list[BaseException | None]:
    """Publish ``messages`` at once and wait up to ``confirm_within`` for all their confirms.

    One outcome per message: None once confirmed, else the error: ``DeliveryError`` for a nack,
    ``PublishError`` for an unroutable message (``confirmed_channel``); in doubt, a
    ``TimeoutError``, or a ``ConnectionError`` when the channel closed first. A return is matched
    to its message by ``message_id``, so a message without one is sent without ``mandatory``: only
    the worker sends such messages (poison, to a lane's fanout dead-letter exchange, which routes
    to its queue whatever the key).

    The outbox relay's hot path: the whole round goes to the socket as one write, where aiormq's
    ``basic_publish`` takes the channel's lock, a task and a socket write per message: the relay's
    CPU per order halves and the broker's falls by a quarter (docs/performance-history.md). The
    confirm bookkeeping is aiormq's own: each message's delivery tag, confirm future and message id
    are registered as ``basic_publish`` registers them, so acks, nacks, returns and a closing
    channel settle these futures as they would its (tests/integration/test_publishing.py).
    """
    if not messages:
        return []
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    confirms: list[asyncio.Future[Any]] = []
    frames: list[Any] = []
    async with underlay.lock:  # delivery tags in the order the broker sees the messages
        for message in messages:
            underlay.delivery_tag += 1
            tag = underlay.delivery_tag
            confirm = underlay.create_future()
            underlay.confirmations[tag] = confirm
            if message_id := message.properties.message_id:
                underlay.message_id_delivery_tag[message_id] = tag
                confirm.add_done_callback(partial(_forget, underlay, message_id, tag))
            confirms.append(confirm)
            mandatory = bool(message_id)
            frames += (
                spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
                ContentHeader(properties=message.properties, body_size=len(message.body)),
                *_split(message.body, underlay.max_content_size),
            )
        await underlay.write_queue.put(ChannelFrame.marshall(underlay.number, frames))
    _, unconfirmed = await asyncio.wait(confirms, timeout=confirm_within)
    return [_outcome(confirm, confirm in unconfirmed, confirm_within) for confirm in confirms]


def _forget(channel: aiormq.Channel, message_id: str, tag: int, _: "asyncio.Future[Any]") -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


def _split(body: bytes, size: int) -> list[ContentBody]:
    return [ContentBody(body[i : i + size]) for i in range(0, len(body), size)]


def _outcome(
    confirm: "asyncio.Future[Any]", pending: bool, confirm_within: float
) -> BaseException | None:
    if pending or confirm.cancelled():
        return TimeoutError(f"no confirm within {confirm_within}s")
    error = confirm.exception()
    if error is None or isinstance(error, DeliveryError | PublishError | ConnectionError):
        return error  # confirmed, nacked, returned, or the connection lost
    # aiormq closing the channel rejects what is pending with the close's reason: a
    # CancelledError, or a bare ``Exception()`` when the connection was closed cleanly.
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


def redact(url: str) -> str:
    """A URL safe to log."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url
