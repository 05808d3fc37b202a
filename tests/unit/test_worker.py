"""The worker's decision table, with a fake handler and fake exchanges: ack, retry with the next
attempt, or dead-letter (poison, permanent, exhausted), and whether the handler records it."""

import asyncio
from typing import Any

import aio_pika
import pytest
from prometheus_client import CollectorRegistry, Gauge

from consumer.delivery import Delivery
from consumer.metrics import Metrics
from consumer.worker import Worker, _Lane, prefetch
from shared import messages, topology
from shared.errors import (
    InvalidMessage,
    PaymentUnavailable,
    PermanentError,
    TransientError,
    Unrecognised,
)
from shared.settings import ConsumerSettings
from tests.unit.test_contract import ORDER, delivery

MAX_ATTEMPTS = 3


class Handler:
    lane = topology.CLASSIC.orders
    noun = "order"
    subject = "order_id"
    concurrency = prefetch = 1
    max_attempts = MAX_ATTEMPTS
    retry_base_ms, retry_cap_ms = 100, 1_000
    timeout = 0.2

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.registry = CollectorRegistry()
        self.metrics = Metrics.create(self.registry, "order", "orders")
        self.recorded: list[str] = []
        self.errors: list[str] = []

    async def process(self, message: Delivery, attempt: int) -> str:
        if isinstance(self.error, TimeoutError) and not str(self.error):
            await asyncio.sleep(1)  # past ``timeout``
        if self.error is not None:
            raise self.error
        return "completed"

    async def retrying(self, message: Delivery, error: str, delay_ms: int) -> None:
        self.recorded.append("retrying")
        self.errors.append(error)

    async def failed(self, message: Delivery, error: str) -> None:
        self.recorded.append("failed")


class Exchange:
    def __init__(self, name: str, broken: bool = False) -> None:
        self.name, self.broken = name, broken
        self.published: list[tuple[aio_pika.Message, str]] = []

    async def publish(self, message: aio_pika.Message, routing_key: str, **_: Any) -> None:
        if self.broken:
            raise ConnectionError("the broker is away")
        self.published.append((message, routing_key))


class Acks:
    def __init__(self) -> None:
        self.settled: list[str] = []

    async def ack(self, message: Delivery) -> None:
        self.settled.append("ack")

    async def requeue(self, message: Delivery) -> None:
        self.settled.append("requeue")


def lane(error: BaseException | None, broken: bool = False) -> _Lane:
    retry, dead = Exchange("orders.retry", broken), Exchange("orders.dead", broken)
    return _Lane(Handler(error), None, retry, dead, acks=Acks())  # type: ignore[arg-type]


async def handle(lane: _Lane, attempt: int) -> None:
    settings = ConsumerSettings(retry_base_ms=100, retry_cap_ms=1_000, metrics_port=0)
    worker = Worker(settings, [lane.handler], Gauge("c", "c", registry=CollectorRegistry()))
    await worker.handle(lane, delivery(messages.encode(ORDER, attempt=attempt)))


def moved(lane: _Lane) -> tuple[str, str, int] | None:
    """Where the delivery was copied to: exchange, routing key, its attempt header."""
    for exchange in (lane.retry, lane.dead):
        for message, key in exchange.published:  # type: ignore[attr-defined]
            return exchange.name, key, (message.headers or {})[messages.ATTEMPT]
    return None


DELAYS = {topology.delay_name(d) for d in topology.RETRY_DELAYS_MS}


@pytest.mark.parametrize(
    ("error", "attempt", "to", "next_attempt", "recorded", "reason"),
    [
        (None, 1, None, None, [], None),
        (PaymentUnavailable("gateway"), 1, "orders.retry", 2, ["retrying"], None),
        (TransientError("flaky"), 2, "orders.retry", 3, ["retrying"], None),
        (RuntimeError("unexpected"), 1, "orders.retry", 2, ["retrying"], None),
        (TimeoutError(), 1, "orders.retry", 2, ["retrying"], None),
        (PaymentUnavailable("gateway"), MAX_ATTEMPTS, "orders.dead", 3, ["failed"], "exhausted"),
        (RuntimeError("unexpected"), MAX_ATTEMPTS + 4, "orders.dead", 7, ["failed"], "exhausted"),
        (InvalidMessage("not JSON"), 1, "orders.dead", 1, ["failed"], "poison"),
        (Unrecognised("no such order"), 2, "orders.dead", 2, [], "poison"),
        (PermanentError("crash loop?"), 1, "orders.dead", 1, ["failed"], "permanent"),
    ],
)
async def test_each_outcome_is_settled_in_one_way(
    error: BaseException | None,
    attempt: int,
    to: str | None,
    next_attempt: int | None,
    recorded: list[str],
    reason: str | None,
) -> None:
    settled = lane(error)
    await handle(settled, attempt)
    assert settled.acks.settled == ["ack"]  # type: ignore[attr-defined]
    assert settled.handler.recorded == recorded  # type: ignore[attr-defined]
    where = moved(settled)
    if to is None:
        assert where is None
    else:
        assert where is not None
        assert (where[0], where[2]) == (to, next_attempt)
        assert where[1] in (DELAYS if to == "orders.retry" else {""})
    registry = settled.handler.registry  # type: ignore[attr-defined]
    for each in ("poison", "exhausted", "permanent"):
        counted = registry.get_sample_value("orders_dead_lettered_total", {"reason": each})
        assert (counted or 0) == (each == reason)


async def test_a_move_the_broker_does_not_confirm_gives_the_delivery_back() -> None:
    """Never acked unless its copy was confirmed: a failed publish requeues the original."""
    settled = lane(PaymentUnavailable("gateway"), broken=True)
    await handle(settled, 1)
    assert settled.acks.settled == ["requeue"]  # type: ignore[attr-defined]
    assert moved(settled) is None


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (TimeoutError(), "TimeoutError: the attempt took longer than 0.2 s"),
        (TimeoutError("fetch: no answer in 10 s"), "TimeoutError: fetch: no answer in 10 s"),
    ],
)
async def test_an_attempt_past_its_handler_s_timeout_says_so_and_no_other_timeout_does(
    error: TimeoutError, reason: str
) -> None:
    settled = lane(error)
    await handle(settled, 1)
    assert settled.handler.errors == [reason]  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", list(topology.Kind))
async def test_a_retry_carries_its_band_in_cc(kind: topology.Kind) -> None:
    """On the quorum kind the retry queue sends it back with that key: to its band."""
    retrying = lane(PaymentUnavailable("gateway"))
    retrying.handler.lane = topology.of(kind).orders  # type: ignore[misc]
    await handle(retrying, 1)
    [(message, _)] = retrying.retry.published  # type: ignore[attr-defined]
    assert (message.headers or {})["CC"] == [topology.of(kind).orders.band(4).routing_key]
    assert message.priority == 4


def test_a_band_holds_a_delivery_more_than_its_runners_take() -> None:
    handler = Handler(None)
    handler.prefetch, handler.concurrency = 1, 4  # type: ignore[misc]
    assert prefetch(handler) == 1  # the classic kind: PREFETCH as set
    handler.lane = topology.QUORUM.orders  # type: ignore[misc]
    assert prefetch(handler) == 9
    handler.prefetch = 16  # type: ignore[misc]
    assert prefetch(handler) == 16
