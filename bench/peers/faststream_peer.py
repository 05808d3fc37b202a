"""FastStream with RabbitMQ: persistent messages, publisher confirms, a priority queue. A message
is ``{"task": ..., "args": [...]}``."""

from typing import Any

from faststream import FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

from bench.peers.common import AMQP_URL, apply_effect_async, record

QUEUE = "peers.faststream"
# Publisher confirms on (the channel's default); 64 deliveries held at once, as taskiq's qos.
broker = RabbitBroker(
    AMQP_URL, log_level=30, default_channel=Channel(prefetch_count=64, publisher_confirms=True)
)
queue = RabbitQueue(QUEUE, durable=True, arguments={"x-max-priority": 9})
app = FastStream(broker)


@broker.subscriber(queue)
async def handle(body: dict[str, Any]) -> None:
    if body["task"] != "noop":
        await apply_effect_async(body["args"][0])
    if body["task"] == "timed":
        record(*body["args"][1:])


async def start() -> None:
    """Connected, to publish: its subscriber is not started."""
    await broker.connect()
    await broker.declare_queue(queue)


async def stop() -> None:
    await broker.stop()


async def send(task: str, args: tuple[Any, ...], priority: int) -> None:
    """One task, sent and confirmed."""
    await broker.publish({"task": task, "args": args}, queue, persist=True, priority=priority)


def worker(processes: int) -> list[str]:
    return ["faststream", "run", "bench.peers.faststream_peer:app", "--workers", str(processes)]
