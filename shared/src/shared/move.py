"""``python -m shared.setup --move``: a classic deployment's queues moved to quorum ones, none lost.

Run it with the relay and the consumers stopped (the API keeps accepting orders into the outbox
meanwhile), then start them with the new ``QUEUE_KIND``. Every step is safe to repeat: a move
that stops half-way is run again.

1. Declare this kind's topology beside the other's: the queue names differ, the exchanges are
   shared.
2. Unbind the other kind's queues: from then on the exchanges route only to this kind's.
3. Move every message they hold, one at a time: a confirmed publish of a copy, then the ack of
   the original (a crash in between duplicates one, which is harmless; none is lost). Work goes
   to the lane's exchange with its band's routing key; a retry to the retry exchange with its
   delay level's key and its band in ``CC`` (it waits its delay again); a dead letter to the
   dead-letter exchange.
4. Delete the other kind's queues, each once it is empty and nobody consumes it (a consumer
   still attached could give back what it holds after the delete: it would be lost).

Only from classic to quorum: RabbitMQ refuses "delete if unused" on a quorum queue (on 4.0.5:
NOT_IMPLEMENTED, and the connection is closed), and step 4 needs it.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import ChannelPreconditionFailed

from shared import amqp, messages, topology
from shared.errors import Misconfigured

log = logging.getLogger(__name__)

GET_TIMEOUT = 5.0  # seconds for one basic.get
# Where a message of an old queue goes: exchange, routing key, headers to set.
Route = Callable[[AbstractIncomingMessage], tuple[str, str, dict[str, Any]]]


async def move(url: str, kind: topology.Kind, confirm_within: float, wait_up_to: float) -> int:
    """Move the other kind's queues on ``url`` into ``kind``'s; the number of messages moved.

    Raises ``Misconfigured`` if an old queue still has a consumer after ``wait_up_to`` seconds,
    or for a move to the classic kind.
    """
    if kind is not topology.Kind.QUORUM:
        raise Misconfigured(
            "--move goes from classic queues to quorum queues only (QUEUE_KIND=quorum): RabbitMQ"
            " cannot delete a quorum queue only if it is unused, which the move needs"
        )
    new, old = topology.QUORUM, topology.CLASSIC
    moved = 0
    async with await amqp.connect(url, "setup-move") as connection:
        channel = await amqp.confirmed_channel(connection)
        await topology.declare(channel, kind, alongside=True)
        left = {
            q.name: _route(lane, new.lane(lane.exchange.name), q)
            for lane in old.lanes
            for q in lane.queues
            if await topology.exists(channel, q.name)
        }
        for b in old.bindings:
            if b.queue.name in left:
                queue = await channel.get_queue(b.queue.name, ensure=False)
                await queue.unbind(b.exchange.name, b.routing_key)
        deadline = time.monotonic() + wait_up_to
        while left:
            for name, route in list(left.items()):
                moved += await _drain(channel, name, route, confirm_within)
                if await _delete_if_idle(channel, name):
                    del left[name]
            if left and time.monotonic() > deadline:
                raise Misconfigured(
                    f"{', '.join(left)} still consumed after {wait_up_to:g} s: stop the relay"
                    " and the consumers of the old kind, then run the move again"
                )
            if left:
                await asyncio.sleep(0.5)
    log.info("moved %d message(s) into the %s queues", moved, kind)
    return moved


def _route(old: topology.Lane, new: topology.Lane, queue: topology.Queue) -> Route:
    """Where a message of ``queue``, one of ``old``'s, goes in ``new``."""
    if queue in old.work:
        return lambda m: (new.exchange.name, new.band(m.priority).routing_key, {})
    if queue in old.retry_queues:
        level = topology.delay_name(topology.RETRY_DELAYS_MS[old.retry_queues.index(queue)])
        return lambda m: (new.retry.name, level, {"CC": [new.band(m.priority).routing_key]})
    return lambda m: (new.dead.name, "", {})


async def _drain(channel: AbstractChannel, queue: str, route: Route, confirm_within: float) -> int:
    """Move every message ``queue`` holds now; how many."""
    source = await channel.get_queue(queue, ensure=False)
    moved = 0
    while (message := await source.get(no_ack=False, fail=False, timeout=GET_TIMEOUT)) is not None:
        exchange, routing_key, headers = route(message)
        await amqp.publish(
            await channel.get_exchange(exchange, ensure=False),
            messages.forward(message, headers, drop=("CC",)),  # a work copy's old band
            routing_key,
            confirm_within,
        )
        await message.ack()
        moved += 1
    return moved


async def _delete_if_idle(channel: AbstractChannel, queue: str) -> bool:
    """Delete ``queue`` if it is empty and unconsumed; whether it was."""
    try:
        await channel.queue_delete(queue, if_unused=True, if_empty=True)
    except ChannelPreconditionFailed:
        await channel.reopen()  # the broker closed it
        return False
    return True
