"""Dramatiq with its RabbitMQ broker, publisher confirms on, a priority queue; its worker's two
processes of eight threads."""

import time

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.peers.common import AMQP_URL, apply_effect

QUEUE = "peers_dramatiq"
broker = RabbitmqBroker(url=AMQP_URL, confirm_delivery=True, max_priority=9)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop(n: int) -> None:
    return None


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def effect(n: int) -> None:
    apply_effect(n)


def enqueue(count: int, task: str, priority: int = 0) -> float:
    """``count`` tasks sent one after another (each confirmed); tasks per second."""
    chosen = noop if task == "noop" else effect
    started = time.perf_counter()
    for n in range(count):
        chosen.send_with_options(args=(n,), broker_priority=priority)
    return count / (time.perf_counter() - started)


WORKER = ["dramatiq", "bench.peers.dramatiq_peer", "--processes", "2", "--threads", "8"]
