"""What processing an order means: record the attempt, do the work, reserve stock all or nothing.

Every step is safe to repeat. A redelivered or duplicated message for an order that is already
final changes nothing, and the reservation happens in one transaction with the status change,
serialised on the order's row lock, so stock is never reserved twice.
"""

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from enum import StrEnum
from operator import attrgetter
from uuid import UUID

import asyncpg

from consumer.delivery import Delivery
from consumer.metrics import Metrics
from shared import db, messages, topology
from shared.batch import Batcher
from shared.errors import PaymentUnavailable, PermanentError, Unrecognised
from shared.messages import Frontier, OrderMessage
from shared.settings import ConsumerSettings


class Outcome(StrEnum):
    COMPLETED = "completed"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"  # already final: acked with no effect


# One statement for a whole batch, its rows in id order so that batches never deadlock. A message
# may create its order only when it is a first publish (another AMQP client published it straight
# to the exchange); one that continues work (``messages.continues``) only finds it. Either way the
# body must be the stored order's, or the message is not believed and the row is left alone.
START = f"""
    WITH n AS (
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::bool[])
                 AS n (id, customer_id, items, priority, fresh)
    ), known AS (
        SELECT o.id, o.customer_id = n.customer_id AND o.items = n.items::jsonb AS same
          FROM orders o JOIN n USING (id)
    ), started AS (
        INSERT INTO orders (id, customer_id, items, priority, status, attempts)
        SELECT n.id, n.customer_id, n.items::jsonb, n.priority, 'processing', 1
          FROM n LEFT JOIN known k USING (id)
         WHERE k.same OR (k.id IS NULL AND n.fresh)
         ORDER BY n.id
        ON CONFLICT (id) DO UPDATE
            SET status = 'processing', attempts = orders.attempts + 1,
                next_attempt_at = NULL, updated_at = clock_timestamp()
            WHERE orders.status NOT IN ({db.FINAL_SQL})
        RETURNING id, attempts
    )
    SELECT n.id, s.attempts, k.id IS NOT NULL OR n.fresh AS known, k.same IS NOT false AS same
      FROM n LEFT JOIN known k USING (id) LEFT JOIN started s USING (id)
"""


class OrderHandler:
    """The ``orders`` lane: the most urgent order in the window runs first."""

    noun = "order"
    subject = "order_id"

    def __init__(self, pool: asyncpg.Pool, settings: ConsumerSettings, metrics: Metrics) -> None:
        self.pool, self.settings, self.metrics = pool, settings, metrics
        self.lane = topology.of(settings.queue_kind).orders
        self.concurrency, self.prefetch = settings.concurrency, settings.prefetch
        self.max_attempts, self.timeout = settings.max_attempts, settings.order_timeout
        self.retry_base_ms, self.retry_cap_ms = settings.retry_base_ms, settings.retry_cap_ms
        # The runners' statements go to PostgreSQL in batches: two commits per batch, not per
        # order (shared/batch.py).
        self.start = Batcher(self._start, key=lambda job: job[0].id)
        self.reserve = Batcher(self._reserve, key=attrgetter("id"))

    def place(self, message: Delivery) -> tuple[Frontier, int]:
        return Frontier.PRIORITY, -message.priority

    async def process(self, message: Delivery, attempt: int) -> str:
        """Run one attempt of an order; raises on a transient failure."""
        order = messages.decode(message)
        started = await self.start((order, messages.continues(message)))
        if isinstance(started, Unrecognised):
            raise started
        if started is None:
            return Outcome.DUPLICATE
        if started > 2 * self.max_attempts:
            # Redeliveries after crashes do not pass through the retry path; this bounds them.
            raise PermanentError(f"started {started - 1} times without settling (crash loop?)")
        await external_work(order.id, attempt, self.settings)
        return await self.reserve(order)

    async def retrying(self, message: Delivery, error: str, delay_ms: int) -> None:
        if (order_id := messages.order_id_of(message)) is not None:
            await mark_retrying(self.pool, order_id, error, delay_ms)

    async def failed(self, message: Delivery, error: str) -> None:
        if (order_id := messages.order_id_of(message)) is not None:
            await mark_failed(self.pool, order_id, error)

    async def _start(
        self, jobs: Sequence[tuple[OrderMessage, bool]]
    ) -> list[int | Unrecognised | None]:
        """Record an attempt of each order (with whether its message continues earlier work): its
        attempt count, None if it is already final, or why its message is not believed."""
        orders = [order for order, _ in jobs]
        rows = await self.pool.fetch(
            START,
            [o.id for o in orders],
            [o.customer_id for o in orders],
            [messages.items_json(o) for o in orders],
            [o.priority for o in orders],
            [not continues for _, continues in jobs],
        )
        found = {row["id"]: row for row in rows}
        return [_started(found[o.id]) for o in orders]

    async def _reserve(self, orders: Sequence[OrderMessage]) -> list[Outcome]:
        """Reserve every line of each order or none, and mark it final, in one transaction.

        ``reserve_orders`` (shared/schema/0008_reserve_orders.sql) takes every lock of the batch
        first, in key order; each order then either reserves everything and is marked completed,
        or is marked rejected with the lines that are short. An order already final is left
        alone: that is what makes a redelivery harmless.
        """
        ids: list[UUID] = []
        skus: list[str] = []
        quantities: list[int] = []
        for order in orders:
            wanted = Counter[str]()
            for item in order.items:
                wanted[item.sku] += item.quantity
            for sku, quantity in wanted.items():
                ids.append(order.id)
                skus.append(sku)
                quantities.append(quantity)
        rows = await self.pool.fetch(
            "SELECT reserved, outcome FROM reserve_orders($1, $2, $3, $4)",
            ids,
            skus,
            quantities,
            self.settings.consumer_name,
        )
        outcomes = {row["reserved"]: Outcome(row["outcome"]) for row in rows}
        return [outcomes[o.id] for o in orders]


def _started(row: asyncpg.Record) -> int | Unrecognised | None:
    if not row["known"]:
        return Unrecognised(
            f"no order {row['id']}: a message that continues work (a retry, or one dead-lettered "
            "before) only continues an order the database holds"
        )
    if not row["same"]:
        return Unrecognised(f"the body is not order {row['id']} as the database holds it")
    return row["attempts"]  # type: ignore[no-any-return]


async def external_work(order_id: UUID, attempt: int, settings: ConsumerSettings) -> None:
    """Stand-in for the slow calls an order needs (payment, fraud check); fails on demand."""
    if settings.order_work_ms:
        await asyncio.sleep(settings.order_work_ms / 1000)
    if (
        attempt <= settings.payment_failures_per_order
        or random.random() < settings.payment_failure_rate
    ):
        raise PaymentUnavailable(f"payment gateway unavailable (simulated) for order {order_id}")


async def mark_retrying(pool: asyncpg.Pool, order_id: UUID, error: str, delay_ms: int) -> None:
    await pool.execute(
        f"""UPDATE orders SET status = 'retrying', reason = $2, updated_at = clock_timestamp(),
                              next_attempt_at = clock_timestamp() + $3 * interval '1 millisecond'
            WHERE id = $1 AND status NOT IN ({db.FINAL_SQL})""",
        order_id,
        db.storable(error),
        delay_ms,
    )


async def mark_failed(pool: asyncpg.Pool, order_id: UUID, reason: str) -> None:
    await pool.execute(
        f"""UPDATE orders SET status = 'failed', reason = $2, next_attempt_at = NULL,
                              updated_at = clock_timestamp()
            WHERE id = $1 AND status NOT IN ({db.FINAL_SQL})""",
        order_id,
        db.storable(reason),
    )
