"""taskiq with taskiq-aio-pika: persistent messages on a confirmed channel, a priority queue;
its worker's two processes."""

import asyncio
import time

from taskiq_aio_pika import AioPikaBroker
from taskiq_aio_pika.queue import Queue, QueueType

from bench.peers.common import AMQP_URL, apply_effect_async

QUEUE = "peers.taskiq"
broker = AioPikaBroker(
    AMQP_URL, qos=64, task_queues=[Queue(name=QUEUE, type=QueueType.CLASSIC, max_priority=9)]
)


@broker.task(task_name="noop")
async def noop(n: int) -> None:
    return None


@broker.task(task_name="effect")
async def effect(n: int) -> None:
    await apply_effect_async(n)


async def _enqueue(count: int, task: str, priority: int) -> float:
    chosen = noop if task == "noop" else effect
    await broker.startup()
    slots = asyncio.Semaphore(1_000)  # in flight at once

    async def one(n: int) -> None:
        async with slots:
            await chosen.kicker().with_labels(priority=priority).kiq(n)

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(count)))
    rate = count / (time.perf_counter() - started)
    await broker.shutdown()
    return rate


def enqueue(count: int, task: str, priority: int = 0) -> float:
    """``count`` tasks, 1,000 in flight; tasks per second."""
    return asyncio.run(_enqueue(count, task, priority))


WORKER = ["taskiq", "worker", "bench.peers.taskiq_peer:broker", "--workers", "2"]
