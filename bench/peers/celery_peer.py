"""Celery 5.5 as its guide sets it up for work that must not be lost: ``acks_late``, publisher
confirms, persistent messages, a priority queue."""

from typing import Any

from celery import Celery
from kombu import Queue

from bench.peers.common import AMQP_URL, apply_effect, record

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
    # Its default, 4, stalled the drain with the effect at 94.5 tasks/s, the worker idle
    # waiting for deliveries (docs/performance.md); 16 keeps it fed.
    worker_prefetch_multiplier=16,
    # Its remote control's queues are transient and not exclusive, which RabbitMQ 4 refuses.
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(n: Any) -> None:
    return None


@app.task(name="effect")
def effect(n: int) -> None:
    apply_effect(n)


@app.task(name="timed")
def timed(n: int, sent: float, priority: int) -> None:
    apply_effect(n)
    record(sent, priority)


TASKS = {"noop": noop, "effect": effect, "timed": timed}


def send(task: str, args: tuple[Any, ...], priority: int) -> None:
    """One task, sent and confirmed (a producer from Celery's pool)."""
    TASKS[task].apply_async(args, priority=priority)


def worker(processes: int) -> list[str]:
    """One process: the solo pool, a task at a time (its thread pool, eight threads, drained a
    no-op backlog at about 120 tasks/s here, its CPU idle: docs/performance.md). More: the
    prefork pool."""
    pool = ["-P", "solo"] if processes == 1 else ["-P", "prefork", "-c", str(processes)]
    return [
        "celery", "-A", "bench.peers.celery_peer", "worker", *pool, "-Q", QUEUE,
        "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING",
    ]  # fmt: skip
