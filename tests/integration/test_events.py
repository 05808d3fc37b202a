"""Order events (docs/notifications.md): written with each change, in its transaction, and
streamed as server-sent events by a real producer process, with a consumer at work."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from testbed.processes import API_KEY, Producer, Service
from tests.integration.conftest import wait_until
from tests.integration.test_dashboard import browser

OTHER_KEY = "another-test-key"
KEYS = f"tests:{API_KEY},other:{OTHER_KEY}"
ORDER = {"customer_id": "c-1", "items": [{"sku": "PEN-1", "quantity": 1}]}


async def _events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The events of an SSE response as they come: each with its ``id``, ``event`` and ``data``
    (decoded); keep-alive comments are skipped."""
    fields: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if not line:
            if fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = orjson.loads(value) if name == "data" else value


async def _read(
    client: httpx.AsyncClient, path: str, count: int | None = None, **headers: str
) -> list[dict[str, Any]]:
    """The events a stream sends until it ends (or ``count`` of them), within 30 s."""
    got: list[dict[str, Any]] = []

    async def read() -> None:
        async with client.stream("GET", path, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            async for event in _events(response):
                got.append(event)
                if count is not None and len(got) == count:
                    return

    await asyncio.wait_for(read(), 30)
    return got


@pytest.fixture
async def running(spawn: Callable[..., Service]) -> Producer:
    """A producer (two keys, demo stock) and a consumer."""
    producer = spawn("producer", "producer-events", API_KEYS=KEYS, DEMO_CATALOGUE="true")
    assert isinstance(producer, Producer)
    await producer.wait_healthy()
    spawn("consumer", "consumer-events", ORDER_WORK_MS="300")
    return producer


async def test_an_order_stream_sends_its_history_then_each_change_and_ends_at_the_final_one(
    running: Producer,
) -> None:
    async with running.client(timeout=30) as client:
        order_id = (await client.post("/orders", json=ORDER)).json()["id"]
        events = await _read(client, f"/orders/{order_id}/events")
        assert [e["event"] for e in events] == ["accepted", "processing", "completed"]
        ids = [int(e["id"]) for e in events]
        assert ids == sorted(ids)
        assert len(set(ids)) == 3
        for event in events:
            assert event["data"]["order_id"] == order_id
            assert event["data"]["type"] == event["event"] == event["data"]["status"]
            assert event["data"]["id"] == int(event["id"])
        assert events[1]["data"]["attempts"] == 1

        # Resumed after the first: the rest, once each; after the last: the stream just ends.
        rest = await _read(
            client, f"/orders/{order_id}/events", **{"Last-Event-ID": events[0]["id"]}
        )
        assert rest == events[1:]
        assert (
            await _read(client, f"/orders/{order_id}/events", **{"Last-Event-ID": events[-1]["id"]})
            == []
        )

        missing = await client.get("/orders/00000000-0000-4000-8000-000000000000/events")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"


async def test_a_key_stream_sends_the_changes_of_that_keys_orders_only(running: Producer) -> None:
    async with running.client(timeout=30) as client:
        other = {"X-API-Key": OTHER_KEY}
        reading = asyncio.create_task(_read(client, "/events", count=9, **other))
        await asyncio.sleep(1)  # the stream is open
        mine = [
            (await client.post("/orders", json=ORDER, headers=other)).json()["id"] for _ in range(3)
        ]
        theirs = (await client.post("/orders", json=ORDER)).json()["id"]
        events = await reading
        assert {e["data"]["order_id"] for e in events} == set(mine)
        assert theirs not in {e["data"]["order_id"] for e in events}
        by_order = {o: [e["event"] for e in events if e["data"]["order_id"] == o] for o in mine}
        assert all(kinds == ["accepted", "processing", "completed"] for kinds in by_order.values())

        # Resumed after the fourth: the five after it, in the same order.
        again = await _read(
            client, "/events", count=5, **{**other, "Last-Event-ID": events[3]["id"]}
        )
        assert again == events[4:]


async def test_a_browser_opens_a_stream_with_a_token_made_by_its_key(running: Producer) -> None:
    async with (
        running.client(timeout=30) as client,
        httpx.AsyncClient(base_url=running.base_url, timeout=30) as browser,
    ):
        order_id = (await client.post("/orders", json=ORDER)).json()["id"]
        made = await client.post("/events/tokens")
        assert made.status_code == 201, made.text
        token = made.json()["token"]
        assert API_KEY not in token
        events = await _read(browser, f"/orders/{order_id}/events?access_token={token}")
        assert [e["event"] for e in events] == ["accepted", "processing", "completed"]

        for refused in (f"?access_token={token}x", "?access_token=tests.1.x", ""):
            answer = await browser.get(f"/orders/{order_id}/events{refused}")
            assert answer.status_code == 401, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
        # A token opens streams only.
        assert (await browser.get(f"/orders/{order_id}?access_token={token}")).status_code == 401


async def test_streams_past_a_keys_share_are_refused_with_a_clear_429(
    spawn: Callable[..., Service],
) -> None:
    producer = spawn("producer", "producer-streams", STREAMS_PER_KEY="2", DEMO_CATALOGUE="true")
    assert isinstance(producer, Producer)
    await producer.wait_healthy()
    async with producer.client(timeout=30) as client, contextlib.AsyncExitStack() as held:
        for _ in range(2):
            opened = await held.enter_async_context(client.stream("GET", "/events"))
            assert opened.status_code == 200
        refused = await client.get("/events")
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"]
        assert refused.headers["content-type"] == "application/problem+json"
    async with producer.client(timeout=30) as client:  # closed streams give their room back
        for _ in range(50):
            async with client.stream("GET", "/events") as opened:
                if opened.status_code == 200:
                    break
            await asyncio.sleep(0.1)
        assert opened.status_code == 200


async def test_an_event_is_written_with_its_change_and_none_for_one_rolled_back(
    running: Producer, database_url: str
) -> None:
    async with running.client(timeout=30) as client:
        kept = await client.post("/orders", json=ORDER, headers={"Idempotency-Key": "k-1"})
        assert kept.status_code == 202
        reused = {**ORDER, "customer_id": "c-2", "idempotency_key": "k-1"}
        batch = {"orders": [{**ORDER, "idempotency_key": "k-2"}, reused]}
        refused = await client.post("/orders/batch", json=batch)
        assert refused.status_code == 422, refused.text  # k-1 reused: the whole batch undone
        await _read(client, f"/orders/{kept.json()['id']}/events")  # until it is final
    conn = await asyncpg.connect(database_url)
    try:
        events = await conn.fetch(
            "SELECT o.idempotency_key, e.type, e.api_key FROM order_events e"
            " JOIN orders o ON o.id = e.order_id ORDER BY e.tx, e.id"
        )
        assert [(e["idempotency_key"], e["type"], e["api_key"]) for e in events] == [
            ("k-1", "accepted", "tests"),
            ("k-1", "processing", "tests"),
            ("k-1", "completed", "tests"),
        ]
        assert await conn.fetchval("SELECT count(*) FROM order_events") == 3
    finally:
        await conn.close()


async def test_the_documented_page_follows_an_order_to_completed_without_a_reload(
    spawn: Callable[..., Service],
) -> None:
    """docs/notifications.md's page, as written there, in headless Chromium."""
    producer = spawn("producer", "producer-page", DEMO_CATALOGUE="true")
    assert isinstance(producer, Producer)
    await producer.wait_healthy()
    spawn("consumer", "consumer-page", ORDER_WORK_MS="1500")
    guide = (Path(__file__).parents[2] / "docs" / "notifications.md").read_text()
    page = guide.split("```html\n", 1)[1].split("```", 1)[0]
    markup, script = page.split("<script>", 1)
    script = script.split("</script>", 1)[0]
    chrome = await asyncio.to_thread(browser)
    try:
        await asyncio.to_thread(chrome.get, f"{producer.base_url}/healthz")  # the same origin
        async with producer.client(timeout=30) as client:
            order_id = (await client.post("/orders", json=ORDER)).json()["id"]
            token = (await client.post("/events/tokens")).json()["token"]
        await asyncio.to_thread(
            chrome.execute_script,
            "document.body.innerHTML = arguments[0]; window.loadedOnce = true;"
            f"const ORDER_ID = arguments[1], TOKEN = arguments[2];\n{script}",
            markup,
            order_id,
            token,
        )

        async def shown() -> list[str]:
            items: list[str] = await asyncio.to_thread(
                chrome.execute_script,
                "return [...document.querySelectorAll('#statuses li')].map(li => li.textContent)",
            )
            return items

        await wait_until(lambda: _at_least(shown, 1), 20, "the first event")
        first = await shown()
        assert first[0] == "accepted"
        assert "completed" not in first  # it was still at work when the page showed it
        await wait_until(lambda: _at_least(shown, 3), 30, "the order to complete")
        assert await shown() == ["accepted", "processing", "completed"]
        assert await asyncio.to_thread(chrome.execute_script, "return window.loadedOnce === true")
    finally:
        await asyncio.to_thread(chrome.quit)


async def _at_least(shown: Callable[[], Any], n: int) -> bool:
    return len(await shown()) >= n


async def test_an_idle_stream_gets_a_keep_alive_comment_every_15_seconds(
    running: Producer,
) -> None:
    async with running.client(timeout=30) as client, client.stream("GET", "/events") as stream:
        started = asyncio.get_running_loop().time()
        lines = stream.aiter_lines()
        first = await asyncio.wait_for(anext(lines), 20)
        assert first == ": ping"
        assert 14 < asyncio.get_running_loop().time() - started < 20


async def test_the_relay_deletes_events_past_their_retention_and_only_those(
    start_relay: Callable[..., Any], conn: asyncpg.Connection
) -> None:
    old = "INSERT INTO order_events (order_id, type, status, attempts, at)"
    await conn.execute(
        f"{old} SELECT gen_random_uuid(), 'accepted', 'accepted', 0, now() - interval '2 hours'"
        " FROM generate_series(1, 25000)"
    )
    await conn.execute(
        f"{old} SELECT gen_random_uuid(), 'accepted', 'accepted', 0, now()"
        " FROM generate_series(1, 3)"
    )
    await start_relay(events_retention_hours=1)

    async def expired() -> bool:
        return await conn.fetchval("SELECT count(*) FROM order_events") == 3

    await wait_until(expired, 30, "the events older than an hour to go")
    assert await conn.fetchval("SELECT min(at) > now() - interval '1 hour' FROM order_events")
