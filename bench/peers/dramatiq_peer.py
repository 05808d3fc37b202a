"""Dramatiq with its RabbitMQ broker, publisher confirms on, a priority queue."""

from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.peers.common import AMQP_URL, apply_effect, record

QUEUE = "peers_dramatiq"
broker = RabbitmqBroker(url=AMQP_URL, confirm_delivery=True, max_priority=9)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop(n: Any) -> None:
    return None


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def effect(n: int) -> None:
    apply_effect(n)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def timed(n: int, sent: float, priority: int) -> None:
    apply_effect(n)
    record(sent, priority)


TASKS = {"noop": noop, "effect": effect, "timed": timed}


def send(task: str, args: tuple[Any, ...], priority: int) -> None:
    """One task, sent and confirmed (a channel per thread, Dramatiq's own)."""
    TASKS[task].send_with_options(args=args, broker_priority=priority)


def worker(processes: int) -> list[str]:
    """Eight threads a process, Dramatiq's default."""
    return [
        "dramatiq", "bench.peers.dramatiq_peer", "--processes", str(processes), "--threads", "8"
    ]  # fmt: skip
