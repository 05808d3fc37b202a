"""What processing an order means: record the attempt, do the work, reserve stock all or nothing.

Every step is safe to repeat. A redelivered or duplicated message for an order that is already
final changes nothing, and the reservation happens in one transaction with the status change,
serialised on the order's row lock, so stock is never reserved twice.
"""

import asyncio
import random
from collections import Counter
from enum import StrEnum
from uuid import UUID

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from consumer.metrics import Metrics
from shared import messages, topology
from shared.errors import PaymentUnavailable, PermanentError
from shared.messages import Frontier, OrderMessage
from shared.settings import ConsumerSettings


class Outcome(StrEnum):
    COMPLETED = "completed"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"  # already final: acked with no effect


# Also creates the order when another AMQP client published it straight to the exchange.
START = """
    INSERT INTO orders (id, customer_id, items, priority, status, attempts)
    VALUES ($1, $2, $3, $4, 'processing', 1)
    ON CONFLICT (id) DO UPDATE
        SET status = 'processing', attempts = orders.attempts + 1,
            next_attempt_at = NULL, updated_at = clock_timestamp()
        WHERE orders.status NOT IN ('completed', 'rejected', 'failed')
    RETURNING attempts
"""


class OrderHandler:
    """The ``orders`` lane: the most urgent order in the window runs first."""

    lane = topology.ORDER_LANE
    noun = "order"

    def __init__(self, pool: asyncpg.Pool, settings: ConsumerSettings, metrics: Metrics) -> None:
        self.pool, self.settings, self.metrics = pool, settings, metrics
        self.concurrency, self.prefetch = settings.concurrency, settings.prefetch
        self.max_attempts, self.timeout = settings.max_attempts, settings.order_timeout

    def place(self, message: AbstractIncomingMessage) -> tuple[Frontier, int]:
        return Frontier.PRIORITY, -(message.priority or 0)

    async def process(self, message: AbstractIncomingMessage, attempt: int) -> str:
        return await process(self.pool, messages.decode(message), attempt, self.settings)

    async def retrying(self, message: AbstractIncomingMessage, error: str, delay_ms: int) -> None:
        if (order_id := messages.order_id_of(message)) is not None:
            await mark_retrying(self.pool, order_id, error, delay_ms)

    async def failed(self, message: AbstractIncomingMessage, error: str) -> None:
        if (order_id := messages.order_id_of(message)) is not None:
            await mark_failed(self.pool, order_id, error)


async def process(
    pool: asyncpg.Pool, order: OrderMessage, attempt: int, settings: ConsumerSettings
) -> Outcome:
    """Run one attempt of an order; raises on a transient failure."""
    items = [item.model_dump() for item in order.items]
    started = await pool.fetchval(START, order.id, order.customer_id, items, order.priority)
    if started is None:
        return Outcome.DUPLICATE
    if started > 2 * settings.max_attempts:
        # Redeliveries after crashes do not pass through the retry path; this bounds them too.
        raise PermanentError(f"started {started - 1} times without settling (crash loop?)")
    await external_work(order.id, attempt, settings)
    return await reserve(pool, order, settings.consumer_name)


async def external_work(order_id: UUID, attempt: int, settings: ConsumerSettings) -> None:
    """Stand-in for the slow calls an order needs (payment, fraud check); fails on demand."""
    await asyncio.sleep(settings.order_work_ms / 1000)
    if (
        attempt <= settings.payment_failures_per_order
        or random.random() < settings.payment_failure_rate
    ):
        raise PaymentUnavailable(f"payment gateway unavailable (simulated) for order {order_id}")


async def reserve(pool: asyncpg.Pool, order: OrderMessage, consumer: str) -> Outcome:
    """Reserve every line or none and mark the order final, in one transaction.

    ``reserve_order`` (shared/db.py) locks the order's row, then the stock rows in SKU order,
    and either reserves everything and marks the order completed, or marks it rejected with the
    lines that are short. An order already final is left alone: that is what makes a
    redelivery harmless.
    """
    wanted = Counter[str]()
    for item in order.items:
        wanted[item.sku] += item.quantity
    skus = sorted(wanted)
    result = await pool.fetchval(
        "SELECT reserve_order($1, $2, $3, $4)", order.id, skus, [wanted[s] for s in skus], consumer
    )
    return Outcome(result)


async def mark_retrying(pool: asyncpg.Pool, order_id: UUID, error: str, delay_ms: int) -> None:
    await pool.execute(
        """UPDATE orders SET status = 'retrying', reason = $2, updated_at = clock_timestamp(),
                             next_attempt_at = clock_timestamp() + $3 * interval '1 millisecond'
           WHERE id = $1 AND status NOT IN ('completed', 'rejected', 'failed')""",
        order_id,
        error,
        delay_ms,
    )


async def mark_failed(pool: asyncpg.Pool, order_id: UUID, reason: str) -> None:
    await pool.execute(
        """UPDATE orders SET status = 'failed', reason = $2, next_attempt_at = NULL,
                             updated_at = clock_timestamp()
           WHERE id = $1 AND status NOT IN ('completed', 'rejected', 'failed')""",
        order_id,
        reason,
    )
