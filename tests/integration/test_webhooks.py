"""Webhooks (docs/notifications.md): registered endpoints and an order's callback_url receive its
events signed as Standard Webhooks, verified here with the ``standardwebhooks`` package, at least
once, through a receiver of the test's own on 127.0.0.1."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest

from consumer import dlq
from shared import topology
from shared.settings import ConsumerSettings
from testbed.processes import API_KEY, free_port
from testbed.receiver import Receiver
from tests.integration.conftest import (
    ApiFactory,
    WorkerFactory,
    depth,
    set_stock,
    settled,
    submit,
    wait_until,
)

LOCAL = {"webhook_allowed_private_hosts": "127.0.0.1"}
OTHER_KEY = "other-test-key"  # a second caller's (not a secret: tests only)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = await Receiver().start()
    yield started
    await started.stop()


async def _register(api: httpx.AsyncClient, receiver: Receiver, path: str, **body: Any) -> str:
    response = await api.post("/webhooks", json={"url": receiver.url(path), **body})
    assert response.status_code == 201, response.text
    endpoint = response.json()
    assert endpoint["secret"].startswith("whsec_")
    receiver.secrets[path] = endpoint["secret"]
    return str(endpoint["id"])


async def _deliveries(conn: asyncpg.Connection, status: str | None = None) -> list[Any]:
    return await conn.fetch(
        "SELECT * FROM webhook_deliveries WHERE $1::text IS NULL OR status = $1 ORDER BY seq",
        status,
    )


async def _none_pending(conn: asyncpg.Connection) -> bool:
    return not await conn.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
    )


async def test_every_final_status_reaches_the_endpoint_and_the_callback_url_signed(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    receiver: Receiver,
    conn: asyncpg.Connection,
) -> None:
    api = await start_api(**LOCAL)
    endpoint_id = await _register(api, receiver, "/hooks")
    listed = (await api.get("/webhooks")).json()
    assert [e["id"] for e in listed] == [endpoint_id]
    assert "secret" not in listed[0]  # shown once
    assert listed[0]["event_types"] == ["order.completed", "order.failed", "order.rejected"]
    made = await api.post("/webhooks/callback-secret")
    assert made.status_code == 201, made.text
    receiver.secrets["/callback"] = made.json()["secret"]
    await set_stock(api, **{"W-1": 5})
    metrics_port = free_port()
    await start_worker(**LOCAL, metrics_port=metrics_port)

    completed = [await submit(api, ("W-1", 1)) for _ in range(3)]
    rejected = await submit(api, ("W-1", 100))
    body = {
        "customer_id": "c-1",
        "items": [{"sku": "W-1", "quantity": 1}],
        "callback_url": receiver.url("/callback"),
    }
    response = await api.post("/orders", json=body)
    assert response.status_code == 202, response.text
    called_back = response.json()["id"]
    await settled(conn, [*completed, rejected, called_back])
    await wait_until(lambda: _none_pending(conn), 30, "every delivery")

    hooks = [r for r in receiver.received if r.path == "/hooks"]
    final = {r.payload["data"]["order_id"]: r.payload["data"]["status"] for r in hooks}
    assert final == {
        **dict.fromkeys([*completed, called_back], "completed"),
        rejected: "rejected",
    }
    assert {r.payload["type"] for r in hooks} == {"order.completed", "order.rejected"}
    callbacks = [r for r in receiver.received if r.path == "/callback"]
    assert [r.payload["data"]["order_id"] for r in callbacks] == [called_back]
    assert receiver.forged == 0
    stored = await _deliveries(conn)
    assert sorted(receiver.ids()) == sorted(str(d["id"]) for d in stored)  # webhook-id
    assert {d["status"] for d in stored} == {"delivered"}
    assert {str(d["endpoint_id"]) for d in stored if d["url"].endswith("/hooks")} == {endpoint_id}
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    assert f'webhook_attempts_total{{endpoint="{endpoint_id}",result="delivered"}} 5.0' in metrics
    assert 'webhook_attempts_total{endpoint="callback",result="delivered"} 1.0' in metrics
    assert f'webhook_attempt_seconds_count{{endpoint="{endpoint_id}"}} 5.0' in metrics
    assert 'webhooks_processed_total{outcome="delivered"} 6.0' in metrics


async def test_a_receiver_down_for_a_minute_gets_every_event_late_with_the_same_webhook_id(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    receiver: Receiver,
    conn: asyncpg.Connection,
) -> None:
    api = await start_api(**LOCAL)
    await _register(api, receiver, "/hooks")
    await set_stock(api, **{"W-2": 100})
    await receiver.stop()  # down: connections refused
    await start_worker(**LOCAL, webhook_max_attempts=100, webhook_retry_cap_ms=5_000)
    orders = [await submit(api, ("W-2", 1)) for _ in range(10)]
    await settled(conn, orders)
    down_until = time.monotonic() + 60
    await asyncio.sleep(30)
    # Then half a minute of answers that fail after the receiver has read them: duplicates.
    receiver.answer = lambda _path, _id: 503 if time.monotonic() < down_until else 200
    await receiver.start()
    await wait_until(lambda: _none_pending(conn), 90, "every delivery, late")

    assert receiver.final() == dict.fromkeys(orders, "completed")
    ids = receiver.ids()
    assert len(ids) > len(set(ids)), "no duplicate: the receiver never failed after reading"
    for d in await _deliveries(conn):
        assert d["status"] == "delivered"
        assert d["attempts"] > 1
    assert receiver.forged == 0


async def test_exhausted_deliveries_are_dead_lettered_with_their_reason_and_replayed(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    receiver: Receiver,
    conn: asyncpg.Connection,
    consumer_settings: Callable[..., ConsumerSettings],
    channel: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    api = await start_api(**LOCAL)
    await _register(api, receiver, "/hooks")
    await set_stock(api, **{"W-3": 10})
    receiver.answer = lambda _path, _id: 500
    await start_worker(**LOCAL, webhook_max_attempts=2)
    order = await submit(api, ("W-3", 1))
    await settled(conn, [order])
    dead = topology.CLASSIC.webhooks.dead_letters.name

    async def dead_lettered() -> bool:
        return await depth(channel, dead) == 1

    await wait_until(dead_lettered, 30, "the delivery in the dead letters")
    [failed] = await _deliveries(conn, "failed")
    assert failed["attempts"] == 2
    assert failed["last_status"] == 500
    assert "HTTP 500" in failed["last_error"]

    settings = consumer_settings(**LOCAL)
    assert await dlq.command(settings, "list", lane="webhooks") == 0
    listed = capsys.readouterr().out
    assert str(failed["id"]) in listed
    assert "Undelivered" in listed
    assert "HTTP 500" in listed

    receiver.answer = lambda _path, _id: 200
    assert await dlq.command(settings, "replay", every=True, lane="webhooks") == 0
    await wait_until(lambda: _none_pending(conn), 30, "the replayed delivery")
    [delivered] = await _deliveries(conn, "delivered")
    assert delivered["id"] == failed["id"]
    assert receiver.final() == {order: "completed"}
    assert set(receiver.ids()) == {str(failed["id"])}  # one webhook-id on every attempt


async def test_a_410_disables_the_endpoint_and_so_does_failing_for_the_set_time(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    receiver: Receiver,
    conn: asyncpg.Connection,
) -> None:
    api = await start_api(**LOCAL)
    gone = await _register(api, receiver, "/gone")
    failing = await _register(api, receiver, "/failing")
    answers = {"/gone": 410, "/failing": 500}
    receiver.answer = lambda path, _id: answers[path]
    await set_stock(api, **{"W-4": 10})
    await start_worker(**LOCAL, webhook_disable_after_hours=2 / 3600, webhook_max_attempts=100)
    order = await submit(api, ("W-4", 1))
    await settled(conn, [order])

    async def both_disabled() -> dict[str, Any] | None:
        listed = {e["id"]: e for e in (await api.get("/webhooks")).json()}
        return listed if all(e["disabled_at"] for e in listed.values()) else None

    listed = await wait_until(both_disabled, 30, "both endpoints disabled")
    assert listed[gone]["disabled_reason"] == "the receiver answered 410 Gone"
    assert listed[failing]["disabled_reason"].startswith("failing since ")
    assert listed[failing]["failing_since"] is not None
    assert {d["status"] for d in await _deliveries(conn)} == {"cancelled"}
    assert sum(r.path == "/gone" for r in receiver.received) == 1

    later = await submit(api, ("W-4", 1))  # a disabled endpoint is sent nothing new
    await settled(conn, [later])
    assert len(await _deliveries(conn)) == 2

    answers["/gone"] = 200  # its receiver is back: enabled again, it gets the next event
    enabled = await api.post(f"/webhooks/{gone}/enable")
    assert enabled.status_code == 200, enabled.text
    view = enabled.json()
    assert (view["disabled_at"], view["disabled_reason"], view["failing_since"]) == (None,) * 3
    assert (await api.get(f"/webhooks/{failing}")).json()["disabled_at"] is not None
    third = await submit(api, ("W-4", 1))
    await settled(conn, [third])
    await wait_until(lambda: _none_pending(conn), 30, "the delivery to the endpoint enabled again")
    [delivered] = await _deliveries(conn, "delivered")
    assert delivered["endpoint_id"] == UUID(gone)
    assert len(await _deliveries(conn)) == 3  # what it missed while disabled is not sent
    assert sum(r.path == "/gone" for r in receiver.received) == 2


async def test_webhook_urls_are_checked_at_registration_and_at_every_delivery(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    receiver: Receiver,
    conn: asyncpg.Connection,
) -> None:
    strict = await start_api()
    for url, problem in (
        ("http://127.0.0.1:9/", "/problems/address-refused"),
        ("http://10.1.2.3/hook", "/problems/address-refused"),
        ("http://169.254.169.254/latest/meta-data/", "/problems/address-refused"),
        ("http://[::1]:8080/", "/problems/address-refused"),
        ("ftp://example.com/hook", "/problems/validation-error"),
        ("http://no-such-host.invalid/", "/problems/unknown-host"),
    ):
        response = await strict.post("/webhooks", json={"url": url})
        assert response.status_code == 422, (url, response.text)
        assert response.json()["type"] == problem, url
        assert "WEBHOOK_ALLOWED_PRIVATE_HOSTS" in response.text or problem != (
            "/problems/address-refused"
        )
    await strict.post("/webhooks/callback-secret")
    body = {"customer_id": "c", "items": [{"sku": "W-5", "quantity": 1}]}
    refused = await strict.post("/orders", json={**body, "callback_url": "http://10.0.0.1/"})
    assert refused.status_code == 422
    assert refused.json()["type"] == "/problems/address-refused"

    # Registered where the API allows it, sent by a consumer that does not: refused there too.
    api = await start_api(**LOCAL)
    hooks = await _register(api, receiver, "/hooks")
    # Enabling checks the URL again: where this API allows no private host, a 422, still disabled.
    await conn.execute("UPDATE webhook_endpoints SET disabled_at = now(), disabled_reason = 'x'")
    refused = await strict.post(f"/webhooks/{hooks}/enable")
    assert refused.status_code == 422, refused.text
    assert refused.json()["type"] == "/problems/address-refused"
    assert (await strict.get(f"/webhooks/{hooks}")).json()["disabled_at"] is not None
    assert (await api.post(f"/webhooks/{hooks}/enable")).json()["disabled_at"] is None
    await api.post("/webhooks/callback-secret")
    await set_stock(api, **{"W-5": 10})
    await start_worker(webhook_max_attempts=1)
    called = await api.post("/orders", json={**body, "callback_url": receiver.url("/cb")})
    assert called.status_code == 202, called.text
    await settled(conn, [called.json()["id"]])
    await wait_until(lambda: _none_pending(conn), 30, "the refused deliveries")
    failed = await _deliveries(conn, "failed")
    assert len(failed) == 2
    assert all("WEBHOOK_ALLOWED_PRIVATE_HOSTS" in d["last_error"] for d in failed)
    assert receiver.received == []


async def test_redirects_are_not_followed_and_keys_see_only_their_own_webhooks(
    start_api: ApiFactory,
    start_worker: WorkerFactory,
    receiver: Receiver,
    conn: asyncpg.Connection,
) -> None:
    api = await start_api(**LOCAL, api_keys=f"tests:{API_KEY},other:{OTHER_KEY}")
    endpoint = await _register(api, receiver, "/redirect")
    receiver.secrets["/target"] = receiver.secrets["/redirect"]
    receiver.answer = lambda path, _id: 307 if path == "/redirect" else 200
    await set_stock(api, **{"W-6": 10})
    await start_worker(**LOCAL, webhook_max_attempts=1)
    order = await submit(api, ("W-6", 1))
    await settled(conn, [order])
    await wait_until(lambda: _none_pending(conn), 30, "the delivery")
    [failed] = await _deliveries(conn, "failed")
    assert failed["last_status"] == 307
    assert [r.path for r in receiver.received] == ["/redirect"]  # /target never asked

    other = {"X-API-Key": OTHER_KEY}
    assert (await api.get("/webhooks", headers=other)).json() == []
    assert (await api.get(f"/webhooks/{endpoint}", headers=other)).status_code == 404
    assert (await api.delete(f"/webhooks/{endpoint}", headers=other)).status_code == 404
    assert (await api.post(f"/webhooks/{endpoint}/enable", headers=other)).status_code == 404
    failing = await api.post(f"/webhooks/{endpoint}/enable")  # not disabled: left as it is
    assert failing.status_code == 200, failing.text
    assert failing.json()["disabled_at"] is None
    assert failing.json()["failing_since"] is not None
    assert (await api.delete(f"/webhooks/{endpoint}")).status_code == 204
    assert (await api.post(f"/webhooks/{endpoint}/enable")).status_code == 404
    assert (await api.get(f"/webhooks/{endpoint}")).status_code == 404
    assert (await api.get("/webhooks")).json() == []
    no_secret = await api.post(
        "/orders",
        json={
            "customer_id": "c",
            "items": [{"sku": "W-6", "quantity": 1}],
            "callback_url": receiver.url("/cb"),
        },
        headers=other,
    )
    assert no_secret.status_code == 422
    assert no_secret.json()["type"] == "/problems/no-callback-secret"
