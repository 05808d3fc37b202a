"""consumer/acks.py on a real channel: shared frames, every delivery settled exactly once."""

import asyncio
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from consumer.acks import Acks
from consumer.delivery import Delivery


@pytest.fixture
async def queue(channel: AbstractChannel) -> Any:
    queue = await channel.declare_queue("test.acks", durable=True, auto_delete=False)
    await queue.purge()
    yield queue
    await queue.delete(if_unused=False, if_empty=False)


async def take(queue: AbstractQueue, n: int, acks: Acks) -> list[Delivery]:
    for i in range(n):
        await queue.channel.default_exchange.publish(aio_pika.Message(b"%d" % i), queue.name)
    underlay = await queue.channel.get_underlay_channel()
    taken = []
    for _ in range(n):
        message = Delivery(await underlay.basic_get(queue.name, no_ack=False, timeout=5))
        acks.delivered(message)
        taken.append(message)
    return taken


async def test_acks_settled_together_share_a_frame_and_settle_each_delivery_once(
    channel: AbstractChannel, queue: AbstractQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[int, bool]] = []
    basic_ack = aiormq.Channel.basic_ack

    async def spy(self: aiormq.Channel, delivery_tag: int, multiple: bool = False) -> None:
        sent.append((delivery_tag, multiple))
        await basic_ack(self, delivery_tag, multiple)

    monkeypatch.setattr(aiormq.Channel, "basic_ack", spy)
    acks = Acks()
    m = await take(queue, 10, acks)  # delivery tags 1..10
    tag = [message.delivery_tag for message in m]

    # 1, 2, 3 and 5 done in one turn: one frame for the oldest three, 5 alone (4 is still open).
    await asyncio.gather(*(acks.ack(m[i]) for i in (2, 0, 4, 1)))
    assert sent == [(tag[4], False), (tag[2], True)]
    # 4 goes back; acking it now would be a second settlement, so requeueing twice is a no-op.
    await acks.requeue(m[3])
    await acks.requeue(m[3])
    await acks.requeue(m[0])  # already acked: nothing is sent
    sent.clear()
    await asyncio.gather(*(acks.ack(message) for message in m[5:]))
    assert sent == [(tag[9], True)]

    # The channel is alive (a double settlement would have closed it) and only 4 is left.
    await asyncio.sleep(0.2)
    assert not channel.is_closed
    again = await queue.get(no_ack=False, timeout=5)
    assert again is not None
    assert (again.body, again.redelivered) == (b"3", True)
    await again.ack()
    assert await queue.get(no_ack=False, fail=False) is None
