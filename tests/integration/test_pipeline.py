"""The path of an order, HTTP to stock table, on the real broker and database."""

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import httpx
import orjson
import pytest
from aio_pika.abc import AbstractChannel

from producer.outbox import ORDERS, SOURCES, Source
from shared import topology
from tests.integration.conftest import (
    ApiFactory,
    ProxyFactory,
    WorkerFactory,
    depth,
    set_stock,
    settled,
    status_of,
    submit,
    wait_until,
)


async def test_order_completes_and_reserves_exactly_its_quantities(
    api: httpx.AsyncClient, start_worker: WorkerFactory, conn: asyncpg.Connection
) -> None:
    await set_stock(api, **{"BOOK-1": 10, "MUG-1": 5})
    response = await api.post(
        "/orders",
        json={
            "customer_id": "c-1",
            "items": [
                {"sku": "BOOK-1", "quantity": 2},
                {"sku": "MUG-1", "quantity": 3},
                {"sku": "BOOK-1", "quantity": 1},
            ],
            "priority": 5,
        },
    )
    assert response.status_code == 202
    order = response.json()
    assert order["status"] == "accepted"
    assert response.headers["location"] == f"/orders/{order['id']}"
    await start_worker()
    await settled(conn, [order["id"]])

    final = await status_of(api, order["id"])
    assert final["status"] == "completed"
    assert final["attempts"] == 1
    assert final["completed_at"] >= final["created_at"]
    assert (await api.get("/inventory/BOOK-1")).json()["available"] == 7
    assert (await api.get("/inventory/MUG-1")).json()["available"] == 2
    reserved = await conn.fetch("SELECT sku, quantity FROM reservations ORDER BY sku")
    assert [tuple(r) for r in reserved] == [("BOOK-1", 3), ("MUG-1", 3)]


async def test_short_stock_is_rejected_with_its_reason_and_reserves_nothing(
    api: httpx.AsyncClient, start_worker: WorkerFactory, conn: asyncpg.Connection
) -> None:
    await set_stock(api, **{"BOOK-1": 10, "MUG-1": 1})
    order_id = await submit(api, ("BOOK-1", 2), ("MUG-1", 2), ("NOPE-1", 1))
    await start_worker()
    await settled(conn, [order_id])

    final = await status_of(api, order_id)
    assert final["status"] == "rejected"
    assert "MUG-1 (requested 2, available 1)" in final["reason"]
    assert "NOPE-1 (unknown SKU)" in final["reason"]
    assert (await api.get("/inventory/BOOK-1")).json()["available"] == 10
    assert await conn.fetchval("SELECT count(*) FROM reservations") == 0


async def test_message_on_the_wire_follows_the_contract(
    api: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    tap = await channel.declare_queue(exclusive=True)
    await tap.bind(topology.ORDERS.name, topology.ORDER_ROUTING_KEY)
    order_id = await submit(api, ("BOOK-1", 2), priority=7)

    message = await wait_until(lambda: tap.get(no_ack=True, fail=False), 10, "the tapped message")
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    assert message.message_id == order_id
    assert message.priority == 7
    assert message.type == "order.created"
    assert message.headers == {"attempt": 1}
    assert message.exchange == "orders"
    assert message.routing_key == "order.created"
    assert orjson.loads(message.body) == {
        "version": 1,
        "id": order_id,
        "customer_id": "c-1",
        "items": [{"sku": "BOOK-1", "quantity": 2}],
        "priority": 7,
    }


async def test_an_order_published_by_another_amqp_client_is_processed(
    api: httpx.AsyncClient,
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    conn: asyncpg.Connection,
) -> None:
    """docs/messages.md is enough to publish an order without the producer."""
    await set_stock(api, **{"PEN-1": 5})
    order_id = str(uuid.uuid4())
    body = {
        "version": 1,
        "id": order_id,
        "customer_id": "ext",
        "items": [{"sku": "PEN-1", "quantity": 4}],
        "priority": 3,
    }
    exchange = await channel.get_exchange("orders")
    await exchange.publish(
        aio_pika.Message(
            orjson.dumps(body),
            content_type="application/json",
            type="order.created",
            message_id=order_id,
            priority=3,
            delivery_mode=2,
        ),
        routing_key="order.created",
    )
    await start_worker()
    await wait_until(lambda: conn.fetchval("SELECT id FROM orders WHERE id = $1", order_id), 10)
    await settled(conn, [order_id])
    assert (await status_of(api, order_id))["status"] == "completed"
    assert (await api.get("/inventory/PEN-1")).json()["available"] == 1


async def test_duplicate_messages_take_effect_once(
    api: httpx.AsyncClient,
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    conn: asyncpg.Connection,
) -> None:
    await set_stock(api, **{"BOOK-1": 100})
    tap = await channel.declare_queue(exclusive=True)
    await tap.bind(topology.ORDERS.name, topology.ORDER_ROUTING_KEY)
    order_id = await submit(api, ("BOOK-1", 3))
    original = await wait_until(lambda: tap.get(no_ack=True, fail=False), 10, "the tapped message")
    exchange = await channel.get_exchange("orders")
    copy = aio_pika.Message(
        original.body,
        content_type=original.content_type,
        type=original.type,
        message_id=original.message_id,
        delivery_mode=2,
    )
    for _ in range(5):
        await exchange.publish(copy, routing_key="order.created")
    await start_worker(concurrency=4, prefetch=4)
    await wait_until(lambda: _empty(channel), 20, "the work queue to drain")
    await settled(conn, [order_id])
    assert (await api.get("/inventory/BOOK-1")).json()["available"] == 97
    assert await conn.fetchval("SELECT count(*) FROM reservations") == 1


async def _empty(channel: AbstractChannel) -> bool:
    return await depth(channel, topology.WORK.name) == 0


async def test_priority_is_honoured_under_backlog(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    channel: AbstractChannel,
    conn: asyncpg.Connection,
) -> None:
    api = await start_api()
    await set_stock(api, **{"PEN-1": 1_000_000})
    normal = [await submit(api, ("PEN-1", 1), priority=0) for _ in range(300)]
    urgent = [await submit(api, ("PEN-1", 1), priority=9) for _ in range(30)]
    await wait_until(lambda: _depth_is(channel, 330), 30, "330 queued orders")

    await start_worker(prefetch=1, concurrency=1)
    await settled(conn, urgent)
    rows = await conn.fetch(
        "SELECT id::text, priority FROM orders WHERE completed_at IS NOT NULL ORDER BY completed_at"
    )
    finished = [r["id"] for r in rows]
    assert set(urgent) <= set(finished)
    last_urgent = max(finished.index(u) for u in urgent)
    normals_before = sum(1 for r in rows[:last_urgent] if r["priority"] == 0)
    assert normals_before < 40, (
        f"{normals_before} normal orders finished before the last urgent one"
    )
    await settled(conn, normal)


async def test_orders_held_behind_urgent_ones_go_back_to_their_queue_and_finish_once(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
    each_kind: dict[str, Any],
    rabbitmq_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``HOLD_LIMIT``: four normal orders are in the consumer's window (one being processed) when
    30 urgent ones arrive, which take six seconds; those still waiting go back to their queue
    after two seconds (their band paused on the quorum kind) and finish after the urgent ones, once
    each."""
    caplog.set_level(logging.INFO, logger="consumer.worker")
    api = await start_api(**each_kind)
    await set_stock(api, **{"PEN-1": 1_000})
    kind = topology.of(topology.Kind(each_kind.get("queue_kind", "classic")))
    await start_worker(**each_kind, prefetch=8, concurrency=1, order_work_ms=200, hold_limit=2.0)
    normal = [await submit(api, ("PEN-1", 1), priority=0) for _ in range(4)]
    async with await aio_pika.connect(each_kind.get("rabbitmq_url", rabbitmq_url)) as c:
        channel = await c.channel()

        async def delivered() -> bool:  # published, none left in the queue, one under way
            published = await conn.fetchval(
                "SELECT NOT EXISTS (SELECT FROM outbox) AND EXISTS"
                " (SELECT FROM orders WHERE status = 'processing')"
            )
            ready = [await depth(channel, q.name) for q in kind.orders.work]
            return bool(published) and sum(ready) == 0

        await wait_until(delivered, 10, "the normal orders delivered")
    one = {"customer_id": "c-1", "items": [{"sku": "PEN-1", "quantity": 1}], "priority": 9}
    response = await api.post("/orders/batch", json={"orders": [one] * 30})
    assert response.status_code == 202, response.text
    urgent = [o["id"] for o in response.json()["orders"]]
    await settled(conn, normal + urgent)

    rows = await conn.fetch("SELECT priority, status, attempts, completed_at FROM orders")
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}
    assert await conn.fetchval("SELECT available FROM inventory WHERE sku = 'PEN-1'") == 966
    given = [r for r in caplog.records if getattr(r, "event", None) == "given_back"]
    assert sum(r.event_fields["count"] for r in given) >= 2
    # What was given back waited in RabbitMQ, behind the urgent ones, and came back once.
    last_urgent = max(r["completed_at"] for r in rows if r["priority"] == 9)
    back = datetime.fromtimestamp(given[0].created, UTC)
    late = [r for r in rows if r["priority"] == 0 and r["completed_at"] > back]
    assert len(late) >= 2
    assert all(r["completed_at"] > last_urgent for r in late)
    events = [getattr(r, "event", None) for r in caplog.records]
    if kind.kind is topology.Kind.QUORUM:
        assert given[0].event_fields["paused"] == [kind.orders.band(0).queue.name]
        assert "resumed" in events
    else:
        assert all(r.event_fields["paused"] == [] for r in given)
        assert "resumed" not in events


async def _depth_is(channel: AbstractChannel, n: int) -> bool:
    return await depth(channel, topology.WORK.name) == n


async def test_orders_are_accepted_while_the_broker_is_unreachable(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    rabbitmq_url: str,
    conn: asyncpg.Connection,
    proxy_to: ProxyFactory,
) -> None:
    proxy = await proxy_to(rabbitmq_url)
    api = await start_api(rabbitmq_url=proxy.url(rabbitmq_url), demo_catalogue=True)
    await wait_until(lambda: _ready(api), 20, "the producer to be ready")
    await proxy.cut()
    await wait_until(lambda: _not_ready(api), 20, "/readyz to report the broker down")

    ids = [await submit(api, ("BOOK-1", 1)) for _ in range(20)]
    assert {(await status_of(api, i))["status"] for i in ids} == {"accepted"}
    assert await conn.fetchval("SELECT count(*) FROM outbox") == 20

    await start_worker()
    await asyncio.sleep(1)
    await proxy.restore()
    await settled(conn, ids, timeout=60)
    assert {(await status_of(api, i))["status"] for i in ids} == {"completed"}
    assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
    assert (await api.get("/inventory/BOOK-1")).json()["available"] == 1_000 - 20
    await wait_until(lambda: _ready(api), 20, "the producer to be ready again")


async def _ready(api: httpx.AsyncClient) -> bool:
    return (await api.get("/readyz")).status_code == 200


async def _not_ready(api: httpx.AsyncClient) -> bool:
    response = await api.get("/readyz")
    return response.status_code == 503 and response.json()["broker"] == "unreachable"


async def test_health_and_openapi(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    await wait_until(lambda: _ready(api), 20, "the producer to be ready")
    spec = (await api.get("/openapi.json")).json()
    assert {"/orders", "/orders/{order_id}", "/inventory/{sku}", "/healthz", "/readyz"} <= set(
        spec["paths"]
    )
    assert (await api.get("/docs")).status_code == 200


async def test_two_producer_replicas_publish_every_order_exactly_once(
    start_api: ApiFactory, channel: AbstractChannel, conn: asyncpg.Connection
) -> None:
    seen: list[str] = []
    tap = await channel.declare_queue(exclusive=True)
    await tap.bind(topology.ORDERS.name, topology.ORDER_ROUTING_KEY)

    async def record(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        seen.append(message.message_id or "")

    await tap.consume(record, no_ack=True)
    replicas = [await start_api(relay_interval=0.05), await start_api(relay_interval=0.05)]
    await set_stock(replicas[0], **{"PEN-1": 10_000})
    ids = await asyncio.gather(*(submit(replicas[i % 2], ("PEN-1", 1)) for i in range(300)))
    await wait_until(lambda: _count(seen, 300), 20, "300 published orders")
    await asyncio.sleep(0.5)
    assert sorted(seen) == sorted(ids)
    assert await conn.fetchval("SELECT count(*) FROM outbox") == 0


async def test_a_round_claims_only_the_sources_that_are_due(
    start_api: ApiFactory, conn: asyncpg.Connection
) -> None:
    """An order's commit wakes a claim of orders alone; the sweep still looks at every source
    once per RELAY_INTERVAL, even while orders keep waking the relay."""
    api = await start_api(relay_interval=3.0, demo_catalogue=True)
    relay = api.app.state.services.relay  # type: ignore[attr-defined]
    await wait_until(lambda: _connected(relay), 20, "the relay to connect")
    rounds: list[list[str]] = []
    publish_pending = relay.publish_pending

    async def recorded(channel: Any, sources: Sequence[Source]) -> None:
        rounds.append([s.lane for s in sources])
        await publish_pending(channel, sources)

    relay.publish_pending = recorded
    await asyncio.sleep(0.2)  # the first round, at connect, looked at every source
    rounds.clear()
    orders, every = [ORDERS.lane], [s.lane for s in SOURCES]
    for _ in range(10):
        await submit(api, ("PEN-1", 1))
    await wait_until(lambda: _outbox_empty(conn), 10, "the orders to be published")
    assert orders in rounds
    assert sum(r == every for r in rounds) <= 1, rounds  # a sweep may fall in; no more

    async def swept_while_busy() -> bool:
        await submit(api, ("PEN-1", 1))
        return every in rounds

    rounds.clear()
    await wait_until(swept_while_busy, 10, "the sweep while orders keep coming")


async def test_one_round_in_flight_until_a_claim_comes_back_full(
    start_api: ApiFactory, conn: asyncpg.Connection
) -> None:
    """Orders committed while a round waits for its confirms go out together in the next round;
    behind a backlog (a claim that comes back full) the second publisher joins in."""
    api = await start_api(relay_batch=3, relay_interval=3.0, demo_catalogue=True)
    relay = api.app.state.services.relay  # type: ignore[attr-defined]
    await wait_until(lambda: _connected(relay), 20, "the relay to connect")
    in_flight, most = 0, 0
    publish_pending = relay.publish_pending

    async def slow(channel: Any, sources: Sequence[Source]) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.3)  # a round waiting on slow confirms
            await publish_pending(channel, sources)
        finally:
            in_flight -= 1

    relay.publish_pending = slow
    await asyncio.sleep(0.5)  # the round at connect
    most = 0
    for _ in range(2):  # the second is committed while the first one's round is in flight
        await submit(api, ("PEN-1", 1))
        await asyncio.sleep(0.05)
    await wait_until(lambda: _outbox_empty(conn), 10, "two orders to be published")
    assert most == 1
    most = 0
    await asyncio.gather(*(submit(api, ("PEN-1", 1)) for _ in range(12)))
    await wait_until(lambda: _outbox_empty(conn), 10, "twelve orders to be published")
    assert most == 2


async def _connected(relay: Any) -> bool:
    return bool(relay.connected)


async def _outbox_empty(conn: asyncpg.Connection) -> bool:
    return await conn.fetchval("SELECT count(*) FROM outbox") == 0


async def _count(items: list[str], n: int) -> bool:
    return len(items) >= n


async def test_backpressure_answers_503_with_retry_after_then_recovers(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    rabbitmq_url: str,
    conn: asyncpg.Connection,
    proxy_to: ProxyFactory,
) -> None:
    proxy = await proxy_to(rabbitmq_url)
    api = await start_api(
        rabbitmq_url=proxy.url(rabbitmq_url),
        demo_catalogue=True,
        max_outbox=5,
        relay_interval=0.1,
    )
    await wait_until(lambda: _ready(api), 20, "the producer to be ready")
    await proxy.cut()
    ids = [await submit(api, ("BOOK-1", 1)) for _ in range(5)]
    response = await wait_until(_refused(api, ids), 10, "backpressure")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.json()["type"] == "/problems/backpressure"
    stored = await conn.fetchval("SELECT count(*) FROM orders")
    assert stored == len(ids)  # the refused order wrote nothing

    await start_worker()
    await proxy.restore()
    await settled(conn, ids, timeout=60)
    await wait_until(lambda: _accepting(api), 20, "backpressure to lift")


async def _accepting(api: httpx.AsyncClient) -> bool:
    return (await api.post("/orders", json=_ORDER)).status_code == 202


async def test_an_api_whose_relay_runs_apart_refuses_past_its_bounds_and_the_relay_catches_up(
    start_api: ApiFactory,
    start_relay: WorkerFactory,
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
) -> None:
    """RELAY_INLINE=false: the API stores orders and watches the backlog itself; a relay of
    its own publishes them, woken by the outbox's NOTIFY, not by its sweep."""
    api = await start_api(relay_inline=False, demo_catalogue=True, max_outbox=5, relay_interval=0.1)
    await wait_until(lambda: _ready(api), 20, "the producer to be ready without a relay")
    ids: list[str] = []
    response = await wait_until(_refused(api, ids), 10, "backpressure")
    assert response.json()["type"] == "/problems/backpressure"
    assert len(ids) >= 5
    assert await conn.fetchval("SELECT count(*) FROM outbox") == len(ids)  # none published

    await start_worker()
    await start_relay(relay_interval=60)  # sweeps once, at connect: the orders waiting
    await settled(conn, ids, timeout=30)
    await wait_until(lambda: _accepting(api), 20, "backpressure to lift")

    more = [await submit(api, ("BOOK-1", 1)) for _ in range(3)]
    batch = await api.post("/orders/batch", json={"orders": [_ORDER, _ORDER]})
    assert batch.status_code == 202, batch.text
    more += [o["id"] for o in batch.json()["orders"]]
    await settled(conn, more, timeout=30)  # well before the relay's next sweep
    assert await conn.fetchval("SELECT count(*) FROM outbox") == 0


_ORDER = {"customer_id": "c", "items": [{"sku": "BOOK-1", "quantity": 1}]}


def _refused(api: httpx.AsyncClient, accepted: list[str]) -> Any:
    """Post orders until one is refused; the ids of those accepted go to ``accepted``."""

    async def check() -> httpx.Response | None:
        response = await api.post("/orders", json=_ORDER)
        if response.status_code == 202:
            accepted.append(response.json()["id"])
            return None
        return response

    return check
