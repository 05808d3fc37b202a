"""FastStream with RabbitMQ: persistent messages, publisher confirms, a priority queue; one
worker process."""

import asyncio
import time

from faststream import FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

from bench.peers.common import AMQP_URL, apply_effect_async

QUEUE = "peers.faststream"
# Publisher confirms on (the channel's default); 64 deliveries held at once, as taskiq's qos.
broker = RabbitBroker(
    AMQP_URL, log_level=30, default_channel=Channel(prefetch_count=64, publisher_confirms=True)
)
queue = RabbitQueue(QUEUE, durable=True, arguments={"x-max-priority": 9})
app = FastStream(broker)


@broker.subscriber(queue)
async def handle(body: dict[str, object]) -> None:
    if body["task"] == "effect":
        await apply_effect_async(int(body["n"]))  # type: ignore[call-overload]


async def _enqueue(count: int, task: str, priority: int) -> float:
    async with broker:
        await broker.declare_queue(queue)
        slots = asyncio.Semaphore(1_000)  # in flight at once

        async def one(n: int) -> None:
            async with slots:
                await broker.publish({"task": task, "n": n}, queue, persist=True, priority=priority)

        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(count)))
        return count / (time.perf_counter() - started)


def enqueue(count: int, task: str, priority: int = 0) -> float:
    """``count`` tasks, 1,000 in flight; tasks per second."""
    return asyncio.run(_enqueue(count, task, priority))


WORKER = ["faststream", "run", "bench.peers.faststream_peer:app", "--workers", "1"]
