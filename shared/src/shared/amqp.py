"""Connections and confirmed publishing, the same way in both services."""

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from yarl import URL

from shared.messages import Outgoing

CONNECT_TIMEOUT = 10.0
SETUP_TIMEOUT = 30.0  # channels, QoS and declarations after (re)connecting
HEARTBEAT = 10  # seconds; a dead peer is noticed after about three missed beats


async def connect(url: str, name: str) -> AbstractConnection:
    """A plain connection: callers own the reconnect loop, so recovery is explicit."""
    parsed = URL(url)
    if "heartbeat" not in parsed.query:
        parsed = parsed.update_query(heartbeat=HEARTBEAT)
    return await aio_pika.connect(
        parsed, timeout=CONNECT_TIMEOUT, client_properties={"connection_name": name}
    )


async def confirmed_channel(connection: AbstractConnection) -> AbstractChannel:
    """A channel whose publishes wait for a confirm and raise on an unroutable message."""
    return await connection.channel(publisher_confirms=True, on_return_raises=True)


async def publish(
    exchange: AbstractExchange, message: aio_pika.Message, routing_key: str, confirm_within: float
) -> None:
    """Publish and wait for the confirm. A timeout means *in doubt*: it may still arrive."""
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
    ``PublishError`` for an unroutable message (``confirmed_channel``), ``TimeoutError`` when in
    doubt. Straight on the underlying aiormq channel, as ``Exchange.publish`` does, with one
    timer for the lot instead of one per message: the outbox relay's hot path.
    """
    if not messages:
        return []
    # The concrete channel: ``wait=False`` spares the writer a drain per message.
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    sent = [
        asyncio.ensure_future(
            underlay.basic_publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=message.properties,
                mandatory=True,
                wait=False,
            )
        )
        for message in messages
    ]
    try:
        _, unconfirmed = await asyncio.wait(sent, timeout=confirm_within)
    finally:
        for publishing in sent:
            publishing.cancel()  # a no-op once it is done
    if unconfirmed:  # let them settle: a publish cancelled before it was sent takes its tag back
        await asyncio.wait(unconfirmed)
    return [_outcome(publishing, confirm_within) for publishing in sent]


def _outcome(publishing: "asyncio.Future[Any]", confirm_within: float) -> BaseException | None:
    if publishing.cancelled():
        return TimeoutError(f"no confirm within {confirm_within}s")
    return publishing.exception()


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
