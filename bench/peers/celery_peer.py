"""Celery 5.5 as its guide sets it up for work that must not be lost: ``acks_late``, publisher
confirms, persistent messages, a priority queue; the worker's solo pool."""

import time

from celery import Celery
from kombu import Queue

from bench.peers.common import AMQP_URL, apply_effect

QUEUE = "peers.celery"
app = Celery("peers", broker=AMQP_URL)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    task_default_queue=QUEUE,
    task_queues=[Queue(QUEUE, queue_arguments={"x-max-priority": 9}, durable=True)],
    task_default_delivery_mode="persistent",
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=4,
    # Its remote control's queues are transient and not exclusive, which RabbitMQ 4 refuses.
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(n: int) -> None:
    return None


@app.task(name="effect")
def effect(n: int) -> None:
    apply_effect(n)


def enqueue(count: int, task: str, priority: int = 0) -> float:
    """``count`` tasks sent one after another (each confirmed); tasks per second."""
    chosen = noop if task == "noop" else effect
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for n in range(count):
            chosen.apply_async((n,), priority=priority, producer=producer)
    return count / (time.perf_counter() - started)


WORKER = [
    "celery",
    "-A",
    "bench.peers.celery_peer",
    "worker",
    "-P",
    "solo",
    "-Q",
    QUEUE,
    "--without-gossip",
    "--without-mingle",
    "--without-heartbeat",
    "--loglevel",
    "WARNING",
]
