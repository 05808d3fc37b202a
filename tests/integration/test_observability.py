"""Metrics count what happened; log lines are JSON and name their order."""

import asyncio
import os
import sys
import uuid

import aio_pika
import asyncpg
import httpx
import orjson
from aio_pika.abc import AbstractChannel
from prometheus_client.parser import text_string_to_metric_families

from consumer.__main__ import healthy
from testbed.processes import free_port
from tests.integration.conftest import (
    ProxyFactory,
    WorkerFactory,
    consuming,
    set_stock,
    settled,
    submit,
    wait_until,
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_producer_metrics_count_accepted_orders_and_requests(api: httpx.AsyncClient) -> None:
    ids = [await submit(api, ("BOOK-1", 1)) for _ in range(3)]
    batch = {"orders": [{"customer_id": "m", "items": [{"sku": "PEN-1", "quantity": 1}]}] * 2}
    assert (await api.post("/orders/batch", json=batch)).status_code == 202
    assert (await api.post("/orders", json={"customer_id": ""})).status_code == 422
    assert len(ids) == 3
    assert (await api.get(f"/orders/{uuid.uuid4()}")).status_code == 404
    assert (await api.get("/no-such-route")).status_code == 404

    found = samples((await api.get("/metrics")).text)
    assert found[("orders_accepted_total", (("endpoint", "single"),))] == 3
    assert found[("orders_accepted_total", (("endpoint", "batch"),))] == 2
    requests = (("handler", "/orders"), ("method", "POST"))
    assert found[("http_requests_total", (*requests, ("status", "2xx")))] == 3
    assert found[("http_requests_total", (*requests, ("status", "4xx")))] == 1
    # By the route's template, whatever the path held; a path no route matched is "none".
    status = (("handler", "/orders/{order_id}"), ("method", "GET"), ("status", "4xx"))
    assert found[("http_requests_total", status)] == 1
    assert found[("http_requests_total", (("handler", "none"), ("method", "GET"), status[2]))] == 1
    assert found[("http_request_duration_seconds_count", requests)] == 4
    assert not any(labels and dict(labels).get("handler") == "/metrics" for _, labels in found)
    assert ("outbox_backlog", ()) in found
    assert ("work_queue_depth", ()) in found


async def test_consumer_metrics_and_json_logs(
    api: httpx.AsyncClient, spawn, conn: asyncpg.Connection, channel: AbstractChannel
) -> None:
    await set_stock(api, **{"MUG-1": 3})
    port = free_port()
    consumer = spawn("consumer", "consumer-observed", METRICS_PORT=str(port), LOG_FORMAT="json")
    await wait_until(lambda: consuming(channel), 30, "the consumer")
    ids = [await submit(api, ("MUG-1", 1)) for _ in range(4)]  # the fourth finds no stock
    poison = str(uuid.uuid4())
    exchange = await channel.get_exchange("orders")
    await exchange.publish(
        aio_pika.Message(b"{not json", type="order.created", message_id=poison),
        routing_key="order.created",
    )
    await settled(conn, ids)

    async with httpx.AsyncClient() as client:

        async def scraped() -> dict | None:
            found = samples((await client.get(f"http://127.0.0.1:{port}/metrics")).text)
            key = ("orders_dead_lettered_total", (("reason", "poison"),))
            return found if found.get(key) == 1 else None

        found = await wait_until(scraped, 10, "the poison message to be counted")
    assert found[("orders_processed_total", (("outcome", "completed"),))] == 3
    assert found[("orders_processed_total", (("outcome", "rejected"),))] == 1
    assert found[("order_processing_seconds_count", ())] == 5  # every delivery, poison too
    assert found[("orders_in_flight", ())] == 0
    # The crawl lane has the same metrics under its own names (docs/crawler.md).
    assert found[("crawl_tasks_in_flight", ())] == 0
    assert found[("crawl_task_processing_seconds_count", ())] == 0

    lines = [orjson.loads(line) for line in consumer.log().splitlines() if line.strip()]
    about = {line.get("order_id") for line in lines if "completed" in line["message"]}
    completed = await conn.fetch("SELECT id::text FROM orders WHERE status = 'completed'")
    assert {r["id"] for r in completed} <= about
    assert any(line.get("order_id") == poison and line["level"] == "ERROR" for line in lines)


async def test_the_consumer_healthcheck_says_whether_it_consumes(
    start_worker: WorkerFactory, proxy_to: ProxyFactory, rabbitmq_url: str
) -> None:
    """``python -m consumer health``, compose's healthcheck: healthy while every lane's queue is
    consumed; not while the broker is out of reach, nor once the worker has stopped."""
    port = free_port()
    assert await health_command(port) == 1  # nothing serves metrics yet
    proxy = await proxy_to(rabbitmq_url)
    stop = await start_worker(rabbitmq_url=proxy.url(rabbitmq_url), metrics_port=port)
    await wait_until(lambda: is_healthy(port, True), 30, "a healthy consumer")
    assert await health_command(port) == 0
    await proxy.cut()
    await wait_until(lambda: is_healthy(port, False), 60, "the consumer to say it cannot consume")
    await proxy.restore()
    await wait_until(lambda: is_healthy(port, True), 60, "the consumer to recover")
    stop.set()
    await wait_until(lambda: is_healthy(port, False), 30, "a stopped consumer to be unhealthy")
    assert await health_command(port) == 1


async def is_healthy(port: int, expected: bool) -> bool:
    return await asyncio.to_thread(healthy, port) is expected


async def health_command(port: int) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", "health", env={**os.environ, "METRICS_PORT": str(port)}
    )
    return await asyncio.wait_for(process.wait(), 30)
