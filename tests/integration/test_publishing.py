"""shared/amqp.py's ``publish_all`` on a real broker: an outcome per message, and only a confirm
counts as published (the outbox relay forgets a row on nothing else)."""

from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue
from aio_pika.exceptions import PublishError
from aiormq import spec

from shared import amqp
from shared.messages import Outgoing

EXCHANGE = "test.publishing"


@pytest.fixture
async def confirmed(rabbitmq_url: str) -> AsyncIterator[AbstractChannel]:
    async with await amqp.connect(rabbitmq_url, "test-publishing") as connection:
        yield await amqp.confirmed_channel(connection)


@pytest.fixture
async def bound(confirmed: AbstractChannel) -> AsyncIterator[AbstractQueue]:
    exchange = await confirmed.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT)
    queue = await confirmed.declare_queue("test.publishing", durable=False)
    await queue.purge()
    await queue.bind(exchange, "routed")
    yield queue
    await queue.delete(if_unused=False, if_empty=False)
    await exchange.delete()


def outgoing(n: int) -> Outgoing:
    return Outgoing(b"%d" % n, spec.Basic.Properties(delivery_mode=2, message_id=str(n)))


async def test_each_message_gets_its_own_outcome(
    confirmed: AbstractChannel, bound: AbstractQueue
) -> None:
    routed = await amqp.publish_all(
        confirmed, EXCHANGE, [outgoing(n) for n in range(500)], "routed", 10
    )
    assert routed == [None] * 500
    assert await amqp.publish_all(confirmed, EXCHANGE, [], "routed", 10) == []
    assert (await bound.declare()).message_count == 500

    # Unroutable with mandatory set: returned, so not published, and the channel stays usable.
    unroutable = await amqp.publish_all(confirmed, EXCHANGE, [outgoing(1)], "nowhere", 10)
    assert [type(e) for e in unroutable] == [PublishError]
    assert await amqp.publish_all(confirmed, EXCHANGE, [outgoing(2)], "routed", 10) == [None]
    assert (await bound.declare()).message_count == 501


async def test_what_is_not_confirmed_in_time_is_in_doubt_and_the_channel_recovers(
    confirmed: AbstractChannel, bound: AbstractQueue
) -> None:
    outcomes = await amqp.publish_all(
        confirmed, EXCHANGE, [outgoing(n) for n in range(2_000)], "routed", 0
    )
    assert any(isinstance(e, TimeoutError) for e in outcomes)
    assert all(e is None or isinstance(e, TimeoutError) for e in outcomes)
    assert await amqp.publish_all(confirmed, EXCHANGE, [outgoing(0)], "routed", 10) == [None]
    # Whatever was confirmed is queued; what was in doubt may or may not be.
    assert ((await bound.declare()).message_count or 0) >= outcomes.count(None) + 1
