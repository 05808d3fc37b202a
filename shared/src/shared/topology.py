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

That is the classic kind. The crawler's lane has the same shape under the names ``crawls``,
``crawls.work``, ``crawls.retry.<delay>`` and ``crawls.dead``, with routing key ``crawl.task``; so
has the webhooks' (``webhooks.work``, routing key ``webhook.delivery``), whose work is never
prioritised: one work queue on either kind (``webhooks.quorum.work``). The quorum kind (``Kind``)
has the same exchanges, and quorum queues: a work queue per priority (a ``Band``:
``orders.quorum.work.9`` ... ``.0``, keys ``order.created.9`` ... ``.0``), and
``orders.quorum.retry.<delay>`` and ``orders.quorum.dead`` (docs/messages.md, *Queue kinds*).

``python -m shared.setup`` declares one kind's topology as the operator; each service then calls
``declare`` with its kind and role, declaring what it may and checking the rest. Arguments are
constants here, never settings: RabbitMQ refuses a redeclare with different arguments
(PRECONDITION_FAILED).
"""

import re
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import ChannelNotFoundEntity

from shared.errors import Misconfigured
from shared.messages import CRAWL_MESSAGE_TYPE, DEFAULT_PRIORITY, MAX_PRIORITY, WEBHOOK_MESSAGE_TYPE
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


class Kind(StrEnum):
    """How a deployment's queues are made (``QUEUE_KIND``, chosen by ``python -m shared.setup``)."""

    CLASSIC = "classic"  # one priority queue per lane (x-max-priority): one node, not replicated
    QUORUM = "quorum"  # replicated: a quorum queue per priority, the highest taken first

    @property
    def other(self) -> "Kind":
        return Kind.QUORUM if self is Kind.CLASSIC else Kind.CLASSIC


@dataclass(frozen=True)
class Band:
    """A work queue and the priorities it holds: the relay routes each message to its band."""

    queue: Queue
    routing_key: str
    priorities: range


@dataclass(frozen=True)
class Lane:
    """One kind of work: its exchange and work queues (bands, the most urgent first), its retry
    levels, its dead letters."""

    exchange: Exchange
    routing_key: str  # the contract's: into the band of DEFAULT_PRIORITY
    bands: tuple[Band, ...]
    retry: Exchange
    retry_queues: tuple[Queue, ...]
    dead: Exchange
    dead_letters: Queue

    def band(self, priority: int | None) -> Band:
        """The band a message of ``priority`` (None: the contract's default) belongs in: the
        relay asks for every message it publishes."""
        wanted = DEFAULT_PRIORITY if priority is None else min(max(priority, 0), MAX_PRIORITY)
        return self._by_priority[wanted]

    @cached_property
    def _by_priority(self) -> tuple[Band, ...]:
        return tuple(
            next(b for b in self.bands if p in b.priorities) for p in range(MAX_PRIORITY + 1)
        )

    @property
    def work(self) -> tuple[Queue, ...]:
        return tuple(b.queue for b in self.bands)

    @property
    def exchanges(self) -> tuple[Exchange, ...]:
        return (self.exchange, self.retry, self.dead)

    @property
    def queues(self) -> tuple[Queue, ...]:
        return (*self.work, self.dead_letters, *self.retry_queues)

    @property
    def bindings(self) -> tuple[Binding, ...]:
        keyed = {b.routing_key: b.queue for b in self.bands}
        keyed.setdefault(self.routing_key, self.band(None).queue)  # the contract's routing key
        return (
            *(Binding(queue, self.exchange, key) for key, queue in keyed.items()),
            Binding(self.dead_letters, self.dead, ""),
            *(
                Binding(q, self.retry, delay_name(d))
                for q, d in zip(self.retry_queues, RETRY_DELAYS_MS, strict=True)
            ),
        )


# A quorum queue returns a message to its queue at most this often before dead-lettering it
# (RabbitMQ's default is 20, and drops it where no dead-letter exchange is set). The worker's
# attempt header is what bounds retries; this only ends a loop of deliveries that never settle,
# such as a consumer that crashes on the message.
DELIVERY_LIMIT = 50
_QUORUM = {
    "x-queue-type": "quorum",
    # Dead-lettering confirmed by the target queue (the default drops on the way if it fails);
    # it needs reject-publish, with no length limit set, so a publish is never refused for it.
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


def lane(name: str, routing_key: str, kind: Kind, prioritised: bool = True) -> Lane:
    """The queues and exchanges of a lane called ``name`` (``orders``: the diagram above); a lane
    not ``prioritised`` has one work queue on the quorum kind too, and its messages no priority."""
    exchange = Exchange(name, ExchangeType.DIRECT)
    dead = Exchange(f"{name}.dead", ExchangeType.FANOUT)
    retry = Exchange(f"{name}.retry", ExchangeType.DIRECT)
    if kind is Kind.CLASSIC:
        work = Queue(
            f"{name}.work",
            {
                "x-queue-type": "classic",
                **({"x-max-priority": MAX_PRIORITY} if prioritised else {}),
                # Safety net: anything rejected without requeue lands in the DLQ, never in the void.
                "x-dead-letter-exchange": dead.name,
            },
        )
        bands: tuple[Band, ...] = (Band(work, routing_key, range(MAX_PRIORITY + 1)),)
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
        return Lane(
            exchange,
            routing_key,
            bands,
            retry,
            retry_queues,
            dead,
            Queue(dead.name, {"x-queue-type": "classic"}),
        )
    # Quorum queues have no strict priorities before RabbitMQ 4.3: a queue per priority, and
    # consumers that take the highest band first (docs/messages.md).
    work_arguments = {
        **_QUORUM,
        "x-dead-letter-exchange": dead.name,
        "x-delivery-limit": DELIVERY_LIMIT,
    }
    if prioritised:
        bands = tuple(
            Band(
                Queue(f"{name}.quorum.work.{p}", work_arguments),
                f"{routing_key}.{p}",
                range(p, p + 1),
            )
            for p in range(MAX_PRIORITY, -1, -1)
        )
    else:
        bands = (
            Band(
                Queue(f"{name}.quorum.work", work_arguments), routing_key, range(MAX_PRIORITY + 1)
            ),
        )
    # No dead-letter routing key: an expired retry goes back with the keys it was published
    # with, and the worker publishes it with its band's in ``CC`` (``messages.forward``).
    retry_queues = tuple(
        Queue(
            f"{name}.quorum.retry.{delay_name(d)}",
            {**_QUORUM, "x-message-ttl": d, "x-dead-letter-exchange": exchange.name},
        )
        for d in RETRY_DELAYS_MS
    )
    # Listing dead letters returns them unacked: never count that against them.
    dead_letters = Queue(f"{name}.quorum.dead", {"x-queue-type": "quorum", "x-delivery-limit": -1})
    return Lane(exchange, routing_key, bands, retry, retry_queues, dead, dead_letters)


@dataclass(frozen=True)
class Topology:
    """Every lane of a deployment of one kind."""

    kind: Kind
    orders: Lane
    crawls: Lane
    webhooks: Lane

    @property
    def lanes(self) -> tuple[Lane, ...]:
        return (self.orders, self.crawls, self.webhooks)

    def lane(self, name: str) -> Lane:
        """The lane called ``name`` (its exchange's name): ``orders``, ``crawls``, ``webhooks``."""
        return next(ln for ln in self.lanes if ln.exchange.name == name)

    @property
    def exchanges(self) -> tuple[Exchange, ...]:
        return tuple(e for ln in self.lanes for e in ln.exchanges)

    @property
    def queues(self) -> tuple[Queue, ...]:
        return tuple(q for ln in self.lanes for q in ln.queues)

    @property
    def bindings(self) -> tuple[Binding, ...]:
        return tuple(b for ln in self.lanes for b in ln.bindings)


def _topology(kind: Kind) -> Topology:
    return Topology(
        kind,
        lane("orders", ORDER_MESSAGE_TYPE, kind),
        lane("crawls", CRAWL_MESSAGE_TYPE, kind),
        lane("webhooks", WEBHOOK_MESSAGE_TYPE, kind, prioritised=False),
    )


TOPOLOGIES = {kind: _topology(kind) for kind in Kind}


def of(kind: Kind | str) -> Topology:
    return TOPOLOGIES[Kind(kind)]


CLASSIC, QUORUM = of(Kind.CLASSIC), of(Kind.QUORUM)

# The exchanges and routing keys every kind shares, as the message contract (docs/messages.md)
# calls them; and the classic kind's queues, the default deployment's.
ORDERS, RETRY, DEAD = CLASSIC.orders.exchange, CLASSIC.orders.retry, CLASSIC.orders.dead
ORDER_ROUTING_KEY = CLASSIC.orders.routing_key
EXCHANGES = CLASSIC.exchanges
WORK, DEAD_LETTERS = CLASSIC.orders.work[0], CLASSIC.orders.dead_letters


@dataclass(frozen=True)
class Permissions:
    """A RabbitMQ user's configure / write / read patterns on the vhost."""

    configure: str
    write: str
    read: str


def _names(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


class WrongKind(Misconfigured):
    """The vhost holds the other kind's queues: a deployment's kinds never mix."""


# Least privilege (docs/security.md), the same for both kinds. The producer declares and
# publishes to the lanes' exchanges; the consumer consumes the work queues and publishes to the
# retry and dead-letter exchanges. Neither can declare queues (a queue's dead-letter exchange
# would need write on it), so ``setup`` declares the whole topology as the operator.
PERMISSIONS = {
    "producer": Permissions(
        configure=_names(*(ln.exchange.name for ln in CLASSIC.lanes)),
        write=_names(*(ln.exchange.name for ln in CLASSIC.lanes)),
        read="^$",
    ),
    "consumer": Permissions(
        configure="^$",
        write=_names(*(e.name for ln in CLASSIC.lanes for e in (ln.retry, ln.dead))),
        read=_names(*(q.name for t in TOPOLOGIES.values() for ln in t.lanes for q in ln.work)),
    ),
    "operator": Permissions(configure=".*", write=".*", read=".*"),
}


async def declare(
    channel: AbstractChannel, kind: Kind, role: str = "operator", alongside: bool = False
) -> None:
    """Declare what ``role`` may configure of the ``kind`` topology, and check the rest exists;
    idempotent, safe from any number of processes at once. The operator (``python -m
    shared.setup``) declares it all. Raises ``WrongKind`` where the other kind's queues are,
    unless ``alongside`` (a move to this kind: ``shared.move``)."""
    topology, other = of(kind), of(Kind(kind).other)
    if not alongside and await exists(channel, other.orders.work[0].name):
        raise WrongKind(
            f"the broker holds {other.kind} queues ({other.orders.work[0].name}) but QUEUE_KIND"
            f" is {topology.kind}: set QUEUE_KIND={other.kind}, as python -m shared.setup was"
            " run with; a deployment's queues are of one kind (docs/messages.md)"
        )
    may = re.compile(PERMISSIONS[role].configure)
    for e in topology.exchanges:
        passive = not may.fullmatch(e.name)
        await channel.declare_exchange(e.name, e.type, durable=True, passive=passive)
    for q in topology.queues:
        passive = not may.fullmatch(q.name)
        await channel.declare_queue(q.name, durable=True, arguments=q.arguments, passive=passive)
    if role == "operator":
        for b in topology.bindings:
            queue = await channel.get_queue(b.queue.name, ensure=False)
            await queue.bind(b.exchange.name, b.routing_key)


async def exists(channel: AbstractChannel, queue: str) -> bool:
    """Whether the vhost holds a queue called ``queue``."""
    try:
        await channel.declare_queue(queue, passive=True)
    except ChannelNotFoundEntity:
        await channel.reopen()  # the broker closed it
        return False
    return True
