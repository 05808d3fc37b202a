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

The crawler's lane has the same shape under the names ``crawls``, ``crawls.work``,
``crawls.retry.<delay>`` and ``crawls.dead``, with routing key ``crawl.task``.

``python -m shared.setup`` declares all of it as the operator; each service then calls
``declare`` with its role, declaring what it may and checking the rest. Arguments are constants
here, never settings: RabbitMQ refuses a redeclare with different arguments (PRECONDITION_FAILED).
"""

import re
from dataclasses import dataclass, field
from typing import Any

from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel

from shared.messages import CRAWL_MESSAGE_TYPE, MAX_PRIORITY
from shared.messages import MESSAGE_TYPE as ORDER_MESSAGE_TYPE


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


def retry_level(delay_ms: float) -> int:
    """The longest delay level not above ``delay_ms`` (the shortest level if all are)."""
    return max((d for d in RETRY_DELAYS_MS if d <= delay_ms), default=RETRY_DELAYS_MS[0])


@dataclass(frozen=True)
class Lane:
    """One kind of work: its exchange and work queue, its retry levels, its dead letters."""

    exchange: Exchange
    routing_key: str
    work: Queue
    retry: Exchange
    retry_queues: tuple[Queue, ...]
    dead: Exchange
    dead_letters: Queue

    @property
    def exchanges(self) -> tuple[Exchange, ...]:
        return (self.exchange, self.retry, self.dead)

    @property
    def queues(self) -> tuple[Queue, ...]:
        return (self.work, self.dead_letters, *self.retry_queues)

    @property
    def bindings(self) -> tuple[Binding, ...]:
        return (
            Binding(self.work, self.exchange, self.routing_key),
            Binding(self.dead_letters, self.dead, ""),
            *(
                Binding(q, self.retry, delay_name(d))
                for q, d in zip(self.retry_queues, RETRY_DELAYS_MS, strict=True)
            ),
        )


def lane(name: str, routing_key: str) -> Lane:
    """The queues and exchanges of a lane called ``name`` (``orders``: the diagram above)."""
    exchange = Exchange(name, ExchangeType.DIRECT)
    dead = Exchange(f"{name}.dead", ExchangeType.FANOUT)
    retry = Exchange(f"{name}.retry", ExchangeType.DIRECT)
    # Classic queues: quorum queues refuse x-max-priority on RabbitMQ 3.x.
    work = Queue(
        f"{name}.work",
        {
            "x-queue-type": "classic",
            "x-max-priority": MAX_PRIORITY,
            # Safety net: anything rejected without requeue lands in the DLQ, never in the void.
            "x-dead-letter-exchange": dead.name,
        },
    )
    retry_queues = tuple(
        Queue(
            f"{retry.name}.{delay_name(d)}",
            {
                "x-queue-type": "classic",
                "x-message-ttl": d,
                "x-dead-letter-exchange": exchange.name,
                "x-dead-letter-routing-key": routing_key,
            },
        )
        for d in RETRY_DELAYS_MS
    )
    dead_letters = Queue(dead.name, {"x-queue-type": "classic"})
    return Lane(exchange, routing_key, work, retry, retry_queues, dead, dead_letters)


ORDER_LANE = lane("orders", ORDER_MESSAGE_TYPE)
CRAWL_LANE = lane("crawls", CRAWL_MESSAGE_TYPE)
LANES = (ORDER_LANE, CRAWL_LANE)

# The order lane's parts by name, as the message contract (docs/messages.md) calls them.
ORDERS, WORK, RETRY = ORDER_LANE.exchange, ORDER_LANE.work, ORDER_LANE.retry
DEAD, DEAD_LETTERS = ORDER_LANE.dead, ORDER_LANE.dead_letters
ORDER_ROUTING_KEY = ORDER_LANE.routing_key

EXCHANGES = tuple(e for ln in LANES for e in ln.exchanges)
QUEUES = tuple(q for ln in LANES for q in ln.queues)
BINDINGS = tuple(b for ln in LANES for b in ln.bindings)


@dataclass(frozen=True)
class Permissions:
    """A RabbitMQ user's configure / write / read patterns on the vhost."""

    configure: str
    write: str
    read: str


def _names(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


# Least privilege (docs/security.md). The producer declares and publishes to the lanes'
# exchanges; the consumer consumes the work queues and publishes to the retry and dead-letter
# exchanges. Neither can declare queues (a queue's dead-letter exchange would need write on it),
# so ``setup`` declares the whole topology as the operator.
PERMISSIONS = {
    "producer": Permissions(
        configure=_names(*(ln.exchange.name for ln in LANES)),
        write=_names(*(ln.exchange.name for ln in LANES)),
        read="^$",
    ),
    "consumer": Permissions(
        configure="^$",
        write=_names(*(e.name for ln in LANES for e in (ln.retry, ln.dead))),
        read=_names(*(ln.work.name for ln in LANES)),
    ),
    "operator": Permissions(configure=".*", write=".*", read=".*"),
}


async def declare(channel: AbstractChannel, role: str = "operator") -> None:
    """Declare what ``role`` may configure, and check the rest exists; idempotent, safe from any
    number of processes at once. The operator (``python -m shared.setup``) declares it all."""
    may = re.compile(PERMISSIONS[role].configure)
    for e in EXCHANGES:
        passive = not may.fullmatch(e.name)
        await channel.declare_exchange(e.name, e.type, durable=True, passive=passive)
    for q in QUEUES:
        passive = not may.fullmatch(q.name)
        await channel.declare_queue(q.name, durable=True, arguments=q.arguments, passive=passive)
    if role == "operator":
        for b in BINDINGS:
            queue = await channel.get_queue(b.queue.name, ensure=False)
            await queue.bind(b.exchange.name, b.routing_key)
