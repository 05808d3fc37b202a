"""Failures heal or show: retries in the broker, a lossless dead-letter queue, poison, replay."""

import asyncio
import itertools
import subprocess
import sys
import time
import uuid
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
import httpx
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq import spec

from shared import amqp, topology
from shared.messages import Outgoing
from tests.integration.conftest import (
    ApiFactory,
    ProxyFactory,
    WorkerFactory,
    consuming,
    depth,
    set_stock,
    settled,
    status_of,
    submit,
    wait_until,
)


def order_body(order_id: str, sku: str = "PEN-1", quantity: int = 1) -> dict[str, Any]:
    return {
        "version": 1,
        "id": order_id,
        "customer_id": "c-f",
        "items": [{"sku": sku, "quantity": quantity}],
        "priority": 0,
    }


async def publish(
    channel: AbstractChannel,
    body: bytes,
    message_id: str,
    type_: str = "order.created",
    exchange: str = "orders",
    routing_key: str = "order.created",
) -> None:
    target = await channel.get_exchange(exchange)
    await target.publish(
        aio_pika.Message(
            body,
            content_type="application/json",
            type=type_,
            message_id=message_id,
            delivery_mode=2,
        ),
        routing_key=routing_key,
    )


async def dead_letters(channel: AbstractChannel) -> list[AbstractIncomingMessage]:
    """Every message in the DLQ (taken unacked; they return when the channel closes)."""
    queue = await channel.get_queue(topology.DEAD_LETTERS.name)
    taken = []
    while (message := await queue.get(no_ack=False, fail=False)) is not None:
        taken.append(message)
    return taken


async def test_database_outage_orders_retry_and_all_complete_once(
    api: httpx.AsyncClient,
    start_worker: WorkerFactory,
    database_url: str,
    conn: asyncpg.Connection,
    channel: AbstractChannel,
    proxy_to: ProxyFactory,
) -> None:
    await set_stock(api, **{"PEN-1": 100})
    passes = 0  # every retry re-enters through the orders exchange

    async def passed(message: AbstractIncomingMessage) -> None:
        nonlocal passes
        passes += 1

    tap = await channel.declare_queue(exclusive=True)
    await tap.bind(topology.ORDERS.name, topology.ORDER_ROUTING_KEY)
    await tap.consume(passed, no_ack=True)
    proxy = await proxy_to(database_url)
    await start_worker(
        database_url=proxy.url(database_url), max_attempts=30, concurrency=4, prefetch=4
    )
    await wait_until(lambda: consuming(channel), 20, "the worker to consume")
    await proxy.cut()
    ids = [await submit(api, ("PEN-1", 2)) for _ in range(20)]
    await asyncio.sleep(3)  # the worker fails and schedules retries all along
    assert await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'completed'") == 0
    await proxy.restore()
    await settled(conn, ids, timeout=60)
    assert {(await status_of(api, i))["status"] for i in ids} == {"completed"}
    assert await conn.fetchval("SELECT count(*) FROM reservations") == 20
    assert (await api.get("/inventory/PEN-1")).json()["available"] == 100 - 40
    assert await depth(channel, topology.DEAD_LETTERS.name) == 0
    assert passes > 2 * len(ids), "the outage should have caused retries"


async def test_always_failing_order_is_tried_max_attempts_with_growing_delays_then_dead_lettered(
    api: httpx.AsyncClient,
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
    channel: AbstractChannel,
) -> None:
    arrivals: list[float] = []
    tap = await channel.declare_queue(exclusive=True)
    await tap.bind(topology.ORDERS.name, topology.ORDER_ROUTING_KEY)

    async def arrived(message: AbstractIncomingMessage) -> None:
        arrivals.append(time.monotonic())

    await tap.consume(arrived, no_ack=True)

    await start_worker(
        payment_failure_rate=1.0, max_attempts=5, retry_base_ms=200, retry_cap_ms=1_000
    )
    order_id = await submit(api, ("BOOK-1", 1))
    await settled(conn, [order_id], timeout=30)

    order = await status_of(api, order_id)
    assert order["status"] == "failed"
    assert "PaymentUnavailable" in order["reason"]
    assert order["attempts"] == 5
    assert len(arrivals) == 5  # the first publish and four retries, no more
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    ceilings = [min(1_000, 200 * 2**i) / 1000 for i in range(4)]  # 0.2 0.4 0.8 1.0 s
    for gap, ceiling in zip(gaps, ceilings, strict=True):
        assert ceiling / 2 / 2.5 <= gap <= ceiling + 0.5, (gaps, ceilings)
    assert gaps[-1] > gaps[0]

    [letter] = await dead_letters(channel)
    headers = letter.headers or {}
    assert letter.message_id == order_id
    assert headers["attempt"] == 5
    assert headers["error-type"] == "PaymentUnavailable"
    assert "payment gateway unavailable" in str(headers["error-message"])
    first, last = (
        datetime.fromisoformat(str(headers[k])) for k in ("first-failure-at", "last-failure-at")
    )
    assert first < last
    assert letter.priority == 0
    assert await conn.fetchval("SELECT count(*) FROM reservations") == 0


async def test_poison_goes_to_the_dlq_once_and_good_orders_complete(
    api: httpx.AsyncClient,
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
    channel: AbstractChannel,
) -> None:
    await set_stock(api, **{"PEN-1": 5_000})
    good = [str(uuid.uuid4()) for _ in range(1_000)]
    poison: dict[str, tuple[bytes, str]] = {}
    for i in range(100):
        valid = orjson.dumps(order_body(str(uuid.uuid4())))
        poison[f"not-json-{i}"] = (b"{not json", "order.created")
        poison[f"bad-schema-{i}"] = (
            orjson.dumps({"version": 1, "id": "x", "items": []}),
            "order.created",
        )
        poison[f"unknown-{i}"] = (
            (valid, "order.cancelled")
            if i % 2
            else (orjson.dumps({**order_body(str(uuid.uuid4())), "version": 2}), "order.created")
        )
        poison[f"bad-utf8-{i}"] = (b'{"version": 1, "customer_id": "\xff\xfe"}', "order.created")
        poison[f"misnamed-{i}"] = (valid, "order.created")  # message_id is not the body's id
    mixed = [(i, orjson.dumps(order_body(i)), "order.created") for i in good]
    mixed += [(k, body, type_) for k, (body, type_) in poison.items()]
    mixed.sort(key=lambda m: hash(m[0]))
    for message_id, body, type_ in mixed:
        await publish(channel, body, message_id, type_)

    await start_worker(concurrency=8, prefetch=16)
    await start_worker(concurrency=8, prefetch=16)
    await wait_until(lambda: _dlq_has(channel, 500), 120, "500 dead letters")
    await settled(conn, good, timeout=120)

    assert await conn.fetchval("SELECT count(*) FROM orders") == 1_000  # none from poison
    assert await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'completed'") == 1_000
    assert (await api.get("/inventory/PEN-1")).json()["available"] == 4_000
    letters = await dead_letters(channel)
    assert sorted(m.message_id or "" for m in letters) == sorted(poison)  # each exactly once
    for letter in letters:
        headers = letter.headers or {}
        assert headers["error-type"] == "InvalidMessage"
        assert headers["error-message"]
        assert headers["attempt"] == 1
    assert await depth(channel, topology.WORK.name) == 0


async def test_a_dead_letter_keeps_the_properties_it_came_with_an_absent_message_id_too(
    start_worker: WorkerFactory, channel: AbstractChannel, rabbitmq_url: str
) -> None:
    """docs/messages.md: a dead letter keeps every property unchanged. aiormq invents a
    message_id for a message published without one, so this one is sent as other AMQP clients
    send it, through ``publish_all``."""
    await start_worker()
    body = orjson.dumps(order_body(str(uuid.uuid4())))
    properties = spec.Basic.Properties(
        content_type="application/json",
        message_type="order.created",
        delivery_mode=2,
        priority=3,
        correlation_id="corr-1",
        app_id="other-shop",
    )
    async with await amqp.connect(rabbitmq_url, "test-anonymous") as connection:
        confirmed = await amqp.confirmed_channel(connection)
        sent = [Outgoing(body, properties)]
        assert await amqp.publish_all(confirmed, "orders", sent, "order.created", 10) == [None]
    await wait_until(lambda: _dlq_has(channel, 1), 20, "the dead letter")
    [letter] = await dead_letters(channel)
    assert letter.message_id is None
    assert (letter.body, letter.priority, letter.type) == (body, 3, "order.created")
    assert (letter.correlation_id, letter.app_id) == ("corr-1", "other-shop")
    assert (letter.headers or {})["error-type"] == "InvalidMessage"


async def _dlq_has(channel: AbstractChannel, n: int) -> bool:
    return await depth(channel, topology.DEAD_LETTERS.name) >= n


async def test_poison_naming_a_known_order_marks_it_failed(
    api: httpx.AsyncClient,
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
    channel: AbstractChannel,
) -> None:
    await start_worker()
    order_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO orders (id, customer_id, items, priority, status)"
        " VALUES ($1, 'c', '[]', 0, 'accepted')",
        uuid.UUID(order_id),
    )
    await publish(channel, orjson.dumps({**order_body(order_id), "version": 7}), order_id)
    await settled(conn, [order_id], timeout=20)
    order = await status_of(api, order_id)
    assert order["status"] == "failed"
    assert order["reason"] == "InvalidMessage: unknown schema version 7"


async def test_an_attempt_over_its_time_limit_is_retried_then_dead_lettered(
    api: httpx.AsyncClient,
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
    channel: AbstractChannel,
) -> None:
    await start_worker(order_work_ms=5_000, order_timeout=0.3, max_attempts=2)
    order_id = await submit(api, ("BOOK-1", 1))
    await settled(conn, [order_id], timeout=20)
    order = await status_of(api, order_id)
    assert order["status"] == "failed"
    assert "TimeoutError" in order["reason"]
    [letter] = await dead_letters(channel)
    assert (letter.headers or {})["error-type"] == "TimeoutError"


async def test_a_short_retry_delay_is_not_held_up_behind_a_long_one(
    api: httpx.AsyncClient,
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
    channel: AbstractChannel,
) -> None:
    await set_stock(api, **{"PEN-1": 10})
    slow, fast = str(uuid.uuid4()), str(uuid.uuid4())
    for order_id in (slow, fast):  # retries only continue orders the database holds
        await conn.execute(
            "INSERT INTO orders (id, customer_id, items, priority, status) VALUES"
            " ($1, 'c-f', '[{\"sku\": \"PEN-1\", \"quantity\": 1}]', 0, 'retrying')",
            uuid.UUID(order_id),
        )
    await start_worker()
    await publish(
        channel, orjson.dumps(order_body(slow)), slow, exchange="orders.retry", routing_key="30s"
    )
    await publish(
        channel, orjson.dumps(order_body(fast)), fast, exchange="orders.retry", routing_key="200ms"
    )
    started = time.monotonic()
    await settled(conn, [fast], timeout=10)
    assert time.monotonic() - started < 5
    status = "SELECT status FROM orders WHERE id = $1"
    assert await conn.fetchval(status, uuid.UUID(fast)) == "completed"
    assert await conn.fetchval(status, uuid.UUID(slow)) == "retrying"
    assert await depth(channel, "orders.retry.30s") == 1


def dlq_cli(database_url: str, rabbitmq_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer", "dlq", *args],
        env={"RABBITMQ_URL": rabbitmq_url, "DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_dead_letters_can_be_listed_shown_replayed_and_purged(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
    channel: AbstractChannel,
    database_url: str,
    rabbitmq_url: str,
) -> None:
    api = await start_api()
    await set_stock(api, **{"MUG-1": 10})
    broken = await start_worker(payment_failure_rate=1.0, max_attempts=2)
    ids = [await submit(api, ("MUG-1", 2), priority=p) for p in (0, 5, 9)]
    await settled(conn, ids, timeout=20)
    assert {(await status_of(api, i))["status"] for i in ids} == {"failed"}
    broken.set()

    listed = await asyncio.to_thread(dlq_cli, database_url, rabbitmq_url, "list")
    assert listed.returncode == 0, listed.stderr
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(r["message_id"] for r in rows) == sorted(ids)
    assert {r["error_type"] for r in rows} == {"PaymentUnavailable"}
    assert {r["attempt"] for r in rows} == {2}

    shown = await asyncio.to_thread(dlq_cli, database_url, rabbitmq_url, "show", ids[2])
    detail = orjson.loads(shown.stdout)
    assert detail["priority"] == 9
    assert orjson.loads(detail["body"])["id"] == ids[2]

    replayed = await asyncio.to_thread(
        dlq_cli, database_url, rabbitmq_url, "replay", ids[0], ids[2]
    )
    assert replayed.returncode == 0, replayed.stderr
    assert sorted(replayed.stdout.split()) == sorted([ids[0], ids[2]])
    assert (await status_of(api, ids[0]))["status"] == "accepted"

    await start_worker()  # the cause is fixed
    await settled(conn, [ids[0], ids[2]], timeout=20)
    rest = await asyncio.to_thread(dlq_cli, database_url, rabbitmq_url, "replay", "--all")
    assert rest.stdout.split() == [ids[1]]
    await settled(conn, ids, timeout=20)
    assert {(await status_of(api, i))["status"] for i in ids} == {"completed"}
    assert (await api.get("/inventory/MUG-1")).json()["available"] == 10 - 6
    assert await conn.fetchval("SELECT count(*) FROM reservations") == 3
    assert await depth(channel, topology.DEAD_LETTERS.name) == 0

    await publish(channel, b"junk", "junk-1", exchange="orders.dead", routing_key="")
    refused = await asyncio.to_thread(dlq_cli, database_url, rabbitmq_url, "purge")
    assert refused.returncode == 2
    purged = await asyncio.to_thread(dlq_cli, database_url, rabbitmq_url, "purge", "--yes")
    assert "purged 1 message" in purged.stderr
    assert await depth(channel, topology.DEAD_LETTERS.name) == 0


async def test_a_retrying_order_shows_its_attempt_error_and_next_try(
    api: httpx.AsyncClient, start_worker: WorkerFactory, conn: asyncpg.Connection
) -> None:
    await start_worker(payment_failures_per_order=1, retry_base_ms=2_000, retry_cap_ms=2_000)
    order_id = await submit(api, ("BOOK-1", 1))

    async def retrying() -> dict[str, Any] | None:
        order = await status_of(api, order_id)
        return order if order["status"] == "retrying" else None

    order = await wait_until(retrying, 10, "the order to be retrying")
    assert order["attempts"] == 1
    assert order["reason"].startswith("PaymentUnavailable: payment gateway unavailable")
    next_at = datetime.fromisoformat(order["next_attempt_at"])
    assert next_at > datetime.fromisoformat(order["updated_at"])
    await settled(conn, [order_id], timeout=10)
    final = await status_of(api, order_id)
    assert (final["status"], final["attempts"], final["reason"]) == ("completed", 2, None)


async def test_a_message_redelivered_without_end_is_dead_lettered(
    api: httpx.AsyncClient,
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
    channel: AbstractChannel,
) -> None:
    """Crashes redeliver without passing through the retry path; the database count bounds them."""
    order_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO orders (id, customer_id, items, priority, status, attempts)"
        " VALUES ($1, 'c-f', '[{\"sku\": \"PEN-1\", \"quantity\": 1}]', 0, 'processing', 16)",
        uuid.UUID(order_id),
    )
    await start_worker(max_attempts=8)
    await publish(channel, orjson.dumps(order_body(order_id)), order_id)
    await settled(conn, [order_id], timeout=20)
    order = await status_of(api, order_id)
    assert order["status"] == "failed"
    assert "crash loop" in order["reason"]
    [letter] = await dead_letters(channel)
    assert (letter.headers or {})["error-type"] == "PermanentError"
