"""The services as real processes: killed mid-work, stopped with SIGTERM, started as documented."""

import asyncio
import signal

import asyncpg
import httpx
from aio_pika.abc import AbstractChannel

from shared import topology
from tests.integration.conftest import depth, settled, wait_until


async def _post(client: httpx.AsyncClient, sku: str, quantity: int) -> str:
    body = {"customer_id": "c-9", "items": [{"sku": sku, "quantity": quantity}]}
    response = await client.post("/orders", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def _status_is(conn: asyncpg.Connection, ids: list[str], status: str) -> bool:
    count = await conn.fetchval(
        "SELECT count(*) FROM orders WHERE id = ANY($1::uuid[]) AND status = $2", ids, status
    )
    return bool(count == len(ids))


async def test_consumer_killed_mid_work_the_order_completes_exactly_once(
    spawn, conn: asyncpg.Connection
) -> None:
    producer = spawn("producer", "producer-kill", DEMO_CATALOGUE="true")
    await producer.wait_healthy()
    slow = spawn("consumer", "consumer-killed", ORDER_WORK_MS="30000")
    await slow.wait_for_event("consuming")
    async with producer.client() as client:
        order_id = await _post(client, "MUG-1", 7)
        await wait_until(lambda: _status_is(conn, [order_id], "processing"), 20, "processing")
        slow.kill()

        spawn("consumer", "consumer-survivor", ORDER_WORK_MS="0")
        await settled(conn, [order_id])
        order = (await client.get(f"/orders/{order_id}")).json()
        assert order["status"] == "completed"
        assert order["attempts"] == 2  # the killed attempt, then the redelivery
        assert (await client.get("/inventory/MUG-1")).json()["available"] == 500 - 7
    assert await conn.fetchval("SELECT count(*) FROM reservations") == 1


async def test_sigterm_finishes_and_acks_in_flight_orders_then_exits(
    spawn, conn: asyncpg.Connection, channel: AbstractChannel
) -> None:
    producer = spawn("producer", "producer-term", DEMO_CATALOGUE="true")
    await producer.wait_healthy()
    consumer = spawn(
        "consumer", "consumer-term", ORDER_WORK_MS="2000", PREFETCH="4", CONCURRENCY="4"
    )
    await consumer.wait_for_event("consuming")
    async with producer.client() as client:
        in_flight = [await _post(client, "PEN-1", 1) for _ in range(4)]
        await wait_until(lambda: _status_is(conn, in_flight, "processing"), 20, "4 in flight")
        waiting = [await _post(client, "PEN-1", 1) for _ in range(3)]
        await wait_until(lambda: _depth(channel, 3), 20, "3 more orders queued")

        consumer.signal(signal.SIGTERM)
        assert await consumer.wait(timeout=20) == 0
        assert "waiting for 4 in-flight orders" in consumer.log()

    await settled(conn, in_flight, timeout=1)
    rows = await conn.fetch(
        "SELECT status, attempts FROM orders WHERE id = ANY($1::uuid[])", in_flight
    )
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}
    # Acked exactly once: only the 3 never started are still queued, none left unacked.
    await asyncio.sleep(0.5)
    assert await depth(channel, topology.WORK.name) == 3
    assert await _status_is(conn, waiting, "accepted")


async def _depth(channel: AbstractChannel, n: int) -> bool:
    return await depth(channel, topology.WORK.name) == n


async def test_producer_process_serves_the_documented_interface(spawn) -> None:
    producer = spawn("producer", "producer-interface")
    await producer.wait_healthy()
    async with producer.client() as client:
        ready = await wait_until(lambda: _ready(client), 20, "/readyz")
        assert ready.json() == {"status": "ready", "database": "ok", "broker": "ok"}
        assert (await client.get("/openapi.json")).status_code == 200
    await _idle_connection_outlives_httpx_keep_alive(producer.port)
    producer.signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal: exit status 128 + 15.
    assert await producer.wait(timeout=20) == -signal.SIGTERM
    assert "Application shutdown complete" in producer.log()


async def _idle_connection_outlives_httpx_keep_alive(port: int) -> None:
    """httpx drops an idle connection after 5 s, uvicorn's default too: a client reusing one at
    that moment got a reset (KEEP_ALIVE_SECONDS). The producer keeps it open longer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for pause in (0, 6):
            await asyncio.sleep(pause)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: producer\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
    finally:
        writer.close()


async def _ready(client: httpx.AsyncClient) -> httpx.Response | None:
    response = await client.get("/readyz")
    return response if response.status_code == 200 else None


async def test_a_relay_of_its_own_killed_mid_stream_loses_no_order(
    spawn, conn: asyncpg.Connection
) -> None:
    """RELAY_INLINE=false, as compose runs it: the relay process is killed while orders stream
    in; its successor publishes the rest, and each order reserves its stock once."""
    producer = spawn("producer", "producer-apart", DEMO_CATALOGUE="true", RELAY_INLINE="false")
    relay = spawn("relay", "relay-killed", RELAY_INTERVAL="60")
    consumer = spawn("consumer", "consumer-apart", ORDER_WORK_MS="0")
    await producer.wait_healthy()
    await relay.wait_for_event("relay_connected")
    await consumer.wait_for_event("consuming")
    async with producer.client() as client:
        ids = [await _post(client, "PEN-1", 1)]
        await settled(conn, ids, timeout=20)  # woken by the outbox's NOTIFY: no sweep for 60 s

        async def stream(n: int) -> list[str]:
            return [await _post(client, "PEN-1", 1) for _ in range(n)]

        streams = [asyncio.create_task(stream(50)) for _ in range(4)]
        await wait_until(lambda: _completed_at_least(conn, 30), 20, "the stream to flow")
        relay.kill()
        ids += [i for s in streams for i in await s]
        ids += await stream(20)  # after the kill: they wait in the outbox
        assert await conn.fetchval("SELECT count(*) FROM outbox") >= 20

        successor = spawn("relay", "relay-successor", RELAY_INTERVAL="60")
        await settled(conn, ids, timeout=60)
        assert await _status_is(conn, ids, "completed")
        assert (await client.get("/inventory/PEN-1")).json()["available"] == 5_000 - len(ids)
    assert await conn.fetchval("SELECT count(*) FROM reservations") == len(ids)
    assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
    async with httpx.AsyncClient() as scraper:
        metrics = (await scraper.get(f"http://127.0.0.1:{successor.port}/metrics")).text
    assert "outbox_publish_confirm_seconds_count" in metrics
    assert "outbox_backlog" not in metrics  # the API's figures: not measured here
    successor.signal(signal.SIGTERM)
    assert await successor.wait(timeout=20) == 0


async def _completed_at_least(conn: asyncpg.Connection, n: int) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'completed'") >= n)
