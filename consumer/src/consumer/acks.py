"""Acks, coalesced: the deliveries settled in one turn of the event loop share one frame.

RabbitMQ's ``multiple`` flag acks every unsettled delivery of a channel up to a tag. Deliveries
finish out of order (priorities, retries, a slow one), so only the oldest unsettled deliveries,
when all of them are done, share one ack; any other done delivery is acked on its own. Nothing
is acked before its handler is done with it, and no delivery is settled twice.
"""

import asyncio
from functools import partial
from itertools import takewhile

from consumer.delivery import Delivery


class Acks:
    """One channel's unsettled deliveries, in delivery order, and the acks waiting to go out."""

    def __init__(self) -> None:
        self._open: dict[int, Delivery | None] = {}  # tag -> the delivery once done
        self._waiting: list[asyncio.Future[None]] | None = None  # the callers of the next flush

    def delivered(self, message: Delivery) -> None:
        self._open[message.delivery_tag] = None

    async def ack(self, message: Delivery) -> None:
        """Ack ``message`` with whatever else is done by the end of this turn of the loop."""
        self._open[message.delivery_tag] = message
        # A future per caller (cheaper than a shield each): a cancelled caller stops only itself.
        sent = asyncio.get_running_loop().create_future()
        if self._waiting is None:
            self._waiting = [sent]
            flush = asyncio.ensure_future(self._flush())  # after the other runners
            flush.add_done_callback(partial(_tell, self._waiting))
        else:
            self._waiting.append(sent)
        await sent

    async def requeue(self, message: Delivery) -> None:
        """Give ``message`` back to its queue at once, unless it is done or already settled."""
        if self._open.get(message.delivery_tag, 0) is None:
            del self._open[message.delivery_tag]
            await message.nack(requeue=True)

    async def _flush(self) -> None:
        self._waiting = None  # acks from now on go out with the next flush
        done = [message for message in self._open.values() if message is not None]
        oldest = sum(1 for _ in takewhile(lambda m: m is not None, self._open.values()))
        for message in done:
            del self._open[message.delivery_tag]
        sends = [message.ack() for message in done[oldest:]]
        if oldest:
            sends.append(done[oldest - 1].ack(multiple=True))
        await asyncio.gather(*sends)


def _tell(waiting: list["asyncio.Future[None]"], flush: "asyncio.Future[None]") -> None:
    """Hand a flush's outcome to each of its callers still waiting."""
    for sent in waiting:
        if sent.done():
            continue
        if flush.cancelled():
            sent.cancel()
        elif (error := flush.exception()) is not None:
            sent.set_exception(error)
        else:
            sent.set_result(None)
