"""Every exchange, queue, binding and ``x-`` argument, in one place.

::

    producer ──publish──► [orders] ──order.created──► (orders.work) ──► consumer
                 (direct)    ▲                          x-max-priority 9      │
                             │                          DLX orders.dead       │
                             │ TTL expired: dead-lettered back                │ transient error:
                             │ with routing key order.created                 │ confirmed publish,
                             │                                                │ then ack
                  (orders.retry.100ms) ... (orders.retry.1h) ◄──<delay>── [orders.retry]
                   x-message-ttl per queue                                (direct)
                                                                              │ poison or exhausted:
                  (orders.dead) ◄──────────── [orders.dead] ◄─────────────────┘ confirmed publish,
                                               (fanout)                          then ack

Both services call ``declare``. Arguments are constants here, never settings: RabbitMQ
refuses a redeclare with different arguments (PRECONDITION_FAILED).
"""

from dataclasses import dataclass, field
from typing import Any

from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel

from shared.messages import MAX_PRIORITY, MESSAGE_TYPE


@dataclass(frozen=True)
class Exchange:
    name: str
    type: ExchangeType


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Binding:
    queue: Queue
    exchange: Exchange
    routing_key: str


ORDERS = Exchange("orders", ExchangeType.DIRECT)
RETRY = Exchange("orders.retry", ExchangeType.DIRECT)
DEAD = Exchange("orders.dead", ExchangeType.FANOUT)

ORDER_ROUTING_KEY = MESSAGE_TYPE

# Classic queues: quorum queues refuse x-max-priority on RabbitMQ 3.x.
WORK = Queue(
    "orders.work",
    {
        "x-queue-type": "classic",
        "x-max-priority": MAX_PRIORITY,
        # Safety net: anything rejected without requeue lands in the DLQ, never in the void.
        "x-dead-letter-exchange": DEAD.name,
    },
)
DEAD_LETTERS = Queue("orders.dead", {"x-queue-type": "classic"})

# One queue per delay level: a queue-level TTL expires in order, so a short delay never
# waits behind a long one (per-message TTLs only expire at the head of a queue).
RETRY_DELAYS_MS: tuple[int, ...] = (
    *(100, 200, 500),
    *(1_000 * s for s in (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1_200, 1_800, 3_600)),
)  # 100ms 200ms 500ms 1s 2s 5s 10s 20s 30s 1m 2m 5m 10m 20m 30m 1h


def delay_name(delay_ms: int) -> str:
    """``100ms``, ``5s``, ``2m``, ``1h``: the routing key and queue suffix of a delay level."""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1_000)):
        if delay_ms % size == 0:
            return f"{delay_ms // size}{unit}"
    return f"{delay_ms}ms"


def retry_queue(delay_ms: int) -> Queue:
    return Queue(
        f"{RETRY.name}.{delay_name(delay_ms)}",
        {
            "x-queue-type": "classic",
            "x-message-ttl": delay_ms,
            "x-dead-letter-exchange": ORDERS.name,
            "x-dead-letter-routing-key": ORDER_ROUTING_KEY,
        },
    )


def retry_level(delay_ms: float) -> int:
    """The longest delay level not above ``delay_ms`` (the shortest level if all are)."""
    return max((d for d in RETRY_DELAYS_MS if d <= delay_ms), default=RETRY_DELAYS_MS[0])


RETRY_QUEUES = tuple(retry_queue(d) for d in RETRY_DELAYS_MS)

EXCHANGES = (ORDERS, RETRY, DEAD)
QUEUES = (WORK, DEAD_LETTERS, *RETRY_QUEUES)
BINDINGS = (
    Binding(WORK, ORDERS, ORDER_ROUTING_KEY),
    Binding(DEAD_LETTERS, DEAD, ""),
    *(Binding(retry_queue(d), RETRY, delay_name(d)) for d in RETRY_DELAYS_MS),
)


async def declare(channel: AbstractChannel) -> None:
    """Declare the whole topology; idempotent, safe from any number of processes at once."""
    exchanges = {
        e.name: await channel.declare_exchange(e.name, e.type, durable=True) for e in EXCHANGES
    }
    queues = {
        q.name: await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
        for q in QUEUES
    }
    for b in BINDINGS:
        await queues[b.queue.name].bind(exchanges[b.exchange.name], b.routing_key)
