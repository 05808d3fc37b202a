"""Connections and confirmed publishing, the same way in both services."""

import asyncio
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from yarl import URL

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
