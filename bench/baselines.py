"""Baselines (b) and (c): raw aio-pika publishing with confirms, and consuming with manual acks.
(Connected by ``amqp.connect``: an ``aio_pika.Connection`` to a node that answers.)"""

import asyncio
import time

import aio_pika

from shared import amqp

QUEUE = "bench.raw"
BODY = b'{"customer_id":"bench","items":[{"sku":"SKU-1","quantity":1}],"priority":0}'


def _message() -> aio_pika.Message:
    return aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def publish(url: str, count: int, in_flight: int = 1_000) -> float:
    """Persistent messages to a durable queue, ``in_flight`` confirms outstanding; msgs/s."""
    async with await amqp.connect(url, "bench-baseline") as connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(QUEUE, durable=True)
        await queue.purge()
        slots = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with slots:
                await channel.default_exchange.publish(_message(), routing_key=QUEUE)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        return count / (time.perf_counter() - started)


async def consume(url: str, count: int, prefetch: int = 100) -> float:
    """Manual acks, a no-op handler, ``prefetch`` unacked; msgs/s. Consumes what ``publish``
    left in the queue, or publishes ``count`` first (untimed) when it left too few."""
    async with await amqp.connect(url, "bench-baseline") as connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(QUEUE, durable=True)
        assert queue.declaration_result.message_count is not None
        if queue.declaration_result.message_count < count:
            await publish(url, count)
        done = asyncio.Event()
        seen = 0

        async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            await message.ack()
            seen += 1
            if seen == count:
                done.set()

        started = time.perf_counter()
        tag = await queue.consume(handle)
        await done.wait()
        rate = count / (time.perf_counter() - started)
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        return rate


async def publish_rounds(url: str, size: int, count: int) -> float:
    """Persistent messages to a durable priority queue in rounds of ``size``, each round
    waiting for all its confirms before the next (as one outbox publisher does); msgs/s."""
    async with await amqp.connect(url, "bench-baseline") as connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            QUEUE + ".rounds", durable=True, arguments={"x-max-priority": 9}
        )
        await queue.purge()
        started = time.perf_counter()
        for _ in range(count // size):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        _message(),
                        routing_key=queue.name,
                    )
                    for _ in range(size)
                )
            )
        rate = count // size * size / (time.perf_counter() - started)
        await queue.delete(if_unused=False, if_empty=False)
        return rate
