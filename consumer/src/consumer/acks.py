"""Acks, coalesced: the deliveries settled in one turn of the event loop share one frame.

RabbitMQ's ``multiple`` flag acks every unsettled delivery of a channel up to a tag. Deliveries
finish out of order (priorities, retries, a slow one), so only the oldest unsettled deliveries,
when all of them are done, share one ack; any other done delivery is acked on its own. Nothing
is acked before its handler is done with it, and no delivery is settled twice.
"""

import asyncio
from itertools import takewhile

from aio_pika.abc import AbstractIncomingMessage


class Acks:
    """One channel's unsettled deliveries, in delivery order, and the acks waiting to go out."""

    def __init__(self) -> None:
        self._open: dict[int, AbstractIncomingMessage | None] = {}  # tag -> the message once done
        self._flushing: asyncio.Task[None] | None = None

    def delivered(self, message: AbstractIncomingMessage) -> None:
        self._open[_tag(message)] = None

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Ack ``message`` with whatever else is done by the end of this turn of the loop."""
        self._open[_tag(message)] = message
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())  # after the other runners
        await asyncio.shield(self._flushing)

    async def requeue(self, message: AbstractIncomingMessage) -> None:
        """Give ``message`` back to its queue at once, unless it is done or already settled."""
        if self._open.get(_tag(message), 0) is None:
            del self._open[_tag(message)]
            await message.nack(requeue=True)

    async def _flush(self) -> None:
        self._flushing = None  # acks from now on go out with the next flush
        done = [message for message in self._open.values() if message is not None]
        oldest = sum(1 for _ in takewhile(lambda m: m is not None, self._open.values()))
        for message in done:
            del self._open[_tag(message)]
        sends = [message.ack() for message in done[oldest:]]
        if oldest:
            sends.append(done[oldest - 1].ack(multiple=True))
        await asyncio.gather(*sends)


def _tag(message: AbstractIncomingMessage) -> int:
    assert message.delivery_tag is not None  # a delivery, not a basic.get
    return message.delivery_tag
