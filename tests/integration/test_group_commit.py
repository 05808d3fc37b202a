"""Group commit on the real database: batches of orders from two consumers at once.

The consumer records attempts and reserves stock for many orders per transaction
(shared/batch.py, ``reserve_orders`` in shared/schema/0008_reserve_orders.sql). Two consumers'
batches contend for the same stock rows here, with duplicates inside and across batches: nothing
deadlocks, no order reserves twice, and the stock adds up.
"""

import asyncio
import random
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from consumer.metrics import Metrics
from consumer.orders import OrderHandler, Outcome
from shared import db
from shared.messages import Item, OrderMessage
from shared.settings import ConsumerSettings

SKUS = [f"SKU-{i}" for i in range(5)]


def order(*lines: tuple[str, int]) -> OrderMessage:
    items = [Item(sku=sku, quantity=q) for sku, q in lines]
    return OrderMessage(id=uuid.uuid4(), customer_id="c-1", items=items, priority=0)


class Consumer:
    """One consumer's order handler on its own pool, recording the size of its batches."""

    def __init__(self, pool: asyncpg.Pool, settings: ConsumerSettings) -> None:
        self.handler = OrderHandler(
            pool, settings, Metrics.create(CollectorRegistry(), "order", "orders")
        )
        self.sizes: list[int] = []
        for batcher in (self.handler.start, self.handler.reserve):
            batcher.run = self._recording(batcher.run)

    def _recording(self, run: Any) -> Any:
        async def recorded(items: Sequence[Any]) -> Any:
            self.sizes.append(len(items))
            return await run(items)

        return recorded

    async def attempt(self, message: OrderMessage) -> str:
        if await self.handler.start((message, False)) is None:  # a first publish, or its copy
            return Outcome.DUPLICATE
        return await self.handler.reserve(message)


@pytest.fixture
async def consumers(
    conn: asyncpg.Connection, database_url: str, consumer_settings: Callable[..., ConsumerSettings]
) -> Any:
    await conn.executemany(
        "INSERT INTO inventory (sku, available) VALUES ($1, 300)", [(s,) for s in SKUS]
    )
    pools = [await db.create_pool(database_url, 4) for _ in range(2)]
    yield [Consumer(pool, consumer_settings(consumer_name=f"c{i}")) for i, pool in enumerate(pools)]
    for pool in pools:
        await pool.close()


async def test_batches_from_two_consumers_never_deadlock_nor_reserve_twice(
    consumers: list[Consumer], conn: asyncpg.Connection
) -> None:
    rand = random.Random(7)
    orders = [
        order(*((sku, rand.randint(1, 3)) for sku in rand.sample(SKUS, rand.randint(1, 4))))
        for _ in range(400)
    ]
    # Every order goes to a random consumer; a quarter of them a second time to either.
    deliveries = [(rand.choice(consumers), o) for o in orders]
    deliveries += [(rand.choice(consumers), o) for o in rand.sample(orders, 100)]
    rand.shuffle(deliveries)
    async with asyncio.timeout(60):
        outcomes = await asyncio.gather(*(c.attempt(o) for c, o in deliveries))

    assert all(max(c.sizes) > 1 for c in consumers)  # they did batch
    final = {r["id"]: r["status"] for r in await conn.fetch("SELECT id, status FROM orders")}
    assert set(final) == {o.id for o in orders}
    assert set(final.values()) <= {"completed", "rejected"}
    assert outcomes.count(Outcome.COMPLETED) == list(final.values()).count("completed")
    # Stock: every unit is either still available or reserved by exactly one completed order.
    reserved = await conn.fetch(
        """SELECT r.order_id, r.sku, r.quantity, o.status FROM reservations r
           JOIN orders o ON o.id = r.order_id"""
    )
    assert all(r["status"] == "completed" for r in reserved)
    wanted = {(o.id, i.sku): i.quantity for o in orders for i in o.items}
    assert {(r["order_id"], r["sku"]): r["quantity"] for r in reserved} == {
        key: q for key, q in wanted.items() if final[key[0]] == "completed"
    }
    left = dict(await conn.fetch("SELECT sku, available FROM inventory"))
    for sku in SKUS:
        assert left[sku] + sum(r["quantity"] for r in reserved if r["sku"] == sku) == 300
    assert min(left.values()) >= 0


async def test_an_order_the_database_refuses_fails_alone_in_its_batch(
    consumers: list[Consumer], conn: asyncpg.Connection
) -> None:
    handler = consumers[0].handler
    good = [order(("SKU-1", 1)) for _ in range(5)]
    for message in good:
        await handler.start((message, False))
    never_started = order(("SKU-2", 1))  # a batch of one raises: no such order row
    results = await asyncio.gather(
        *(handler.reserve(m) for m in [*good, never_started]), return_exceptions=True
    )
    assert results[:5] == [Outcome.COMPLETED] * 5
    assert isinstance(results[5], asyncpg.RaiseError)
    assert await conn.fetchval("SELECT available FROM inventory WHERE sku = 'SKU-1'") == 295
    assert await conn.fetchval("SELECT available FROM inventory WHERE sku = 'SKU-2'") == 300
