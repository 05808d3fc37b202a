"""taskiq with taskiq-aio-pika: persistent messages on a confirmed channel, a priority queue."""

from typing import Any

from taskiq_aio_pika import AioPikaBroker
from taskiq_aio_pika.queue import Queue, QueueType

from bench.peers.common import AMQP_URL, apply_effect_async, record

QUEUE = "peers.taskiq"
broker = AioPikaBroker(
    AMQP_URL, qos=64, task_queues=[Queue(name=QUEUE, type=QueueType.CLASSIC, max_priority=9)]
)


@broker.task(task_name="noop")
async def noop(n: Any) -> None:
    return None


@broker.task(task_name="effect")
async def effect(n: int) -> None:
    await apply_effect_async(n)


@broker.task(task_name="timed")
async def timed(n: int, sent: float, priority: int) -> None:
    await apply_effect_async(n)
    record(sent, priority)


TASKS = {"noop": noop, "effect": effect, "timed": timed}


async def start() -> None:
    await broker.startup()


async def stop() -> None:
    await broker.shutdown()


async def send(task: str, args: tuple[Any, ...], priority: int) -> None:
    """One task, sent and confirmed."""
    await TASKS[task].kicker().with_labels(priority=priority).kiq(*args)


def worker(processes: int) -> list[str]:
    return ["taskiq", "worker", "bench.peers.taskiq_peer:broker", "--workers", str(processes)]
