"""POST /orders's fast path: it answers a valid order as the route would, and hands on the rest.

The route's own dependency (the API key check) is replaced by one that notes each call, so a
test can tell which of the two answered: the fast path never runs it.
"""

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from producer.api import OrderView
from producer.fastpath import SubmitFastPath
from producer.services import require_key
from testbed.processes import AUTH
from tests.integration.conftest import ApiFactory

GOOD: dict[str, Any] = {"customer_id": "c-1", "items": [{"sku": "BOOK-1", "quantity": 2}]}


def _noting(app: Any) -> list[str]:
    """Each request ``app``'s route sees, by replacing its key check with one that notes it."""
    seen: list[str] = []

    async def noted() -> str:
        seen.append("route")
        return "tests"

    app.dependency_overrides[require_key] = noted
    return seen


@pytest.fixture
def routed(api: httpx.AsyncClient) -> list[str]:
    """The requests FastAPI's route saw."""
    return _noting(api.app)  # type: ignore[attr-defined]


async def _without_fast_path(start_api: ApiFactory) -> httpx.AsyncClient:
    """Another producer app, its fast path taken out: FastAPI answers every request."""
    client = await start_api(demo_catalogue=True)
    app = client.app  # type: ignore[attr-defined]
    app.user_middleware = [m for m in app.user_middleware if m.cls is not SubmitFastPath]
    app.middleware_stack = None  # rebuilt from the list on the next request
    return client


def _as_the_view_writes_it(response: httpx.Response) -> None:
    body = response.json()
    assert OrderView.model_validate(body).model_dump(mode="json") == body
    assert response.headers["content-type"] == "application/json"
    assert response.headers["location"] == f"/orders/{body['id']}"


async def test_a_valid_order_takes_the_fast_path_and_gets_the_routes_answer(
    api: httpx.AsyncClient, routed: list[str], start_api: ApiFactory, conn: asyncpg.Connection
) -> None:
    fast = await api.post("/orders", json=GOOD)
    assert fast.status_code == 202, fast.text
    assert routed == []

    plain = await _without_fast_path(start_api)
    seen = _noting(plain.app)  # type: ignore[attr-defined]
    slow = await plain.post("/orders", json=GOOD)
    assert slow.status_code == 202, slow.text
    assert seen == ["route"]
    for response in (fast, slow):
        _as_the_view_writes_it(response)
    a, b = fast.json(), slow.json()
    same = ("status", "customer_id", "items", "priority", "attempts", "reason", "processed_by")
    assert list(a) == list(b)
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
    assert set(fast.headers) == set(slow.headers)
    assert await conn.fetchval("SELECT count(*) FROM orders") == 2


async def test_keys_are_honoured_on_the_fast_path(
    api: httpx.AsyncClient, routed: list[str], conn: asyncpg.Connection
) -> None:
    key = {"Idempotency-Key": "fast-1"}
    first = await api.post("/orders", json=GOOD, headers=key)
    again = await api.post("/orders", json=GOOD, headers=key)
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["id"] == first.json()["id"]
    _as_the_view_writes_it(again)
    reused = await api.post("/orders", json={**GOOD, "priority": 5}, headers=key)
    assert reused.status_code == 422
    assert reused.headers["content-type"] == "application/problem+json"
    assert reused.json()["type"] == "/problems/idempotency-key-reused"
    assert reused.json()["instance"] == "/orders"
    assert routed == []
    assert await conn.fetchval("SELECT count(*) FROM orders") == 1


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        pytest.param({"Idempotency-Key": ""}, GOOD, id="empty key"),
        pytest.param({"Idempotency-Key": "has space"}, GOOD, id="key with a space"),
        pytest.param({}, {**GOOD, "priority": 10}, id="invalid order"),
        pytest.param({}, [GOOD], id="not an object"),
    ],
)
async def test_anything_the_route_would_refuse_is_handed_on_to_it(
    api: httpx.AsyncClient,
    routed: list[str],
    headers: dict[str, str],
    body: Any,
) -> None:
    await api.post("/orders", json=body, headers=headers)
    assert routed == ["route"]


def _problem(response: httpx.Response) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {k: v for k, v in response.headers.items() if k != "content-length"}
    return response.status_code, response.json(), headers


async def test_a_valid_order_is_refused_on_the_fast_path_as_the_route_refuses_it(
    start_api: ApiFactory, conn: asyncpg.Connection
) -> None:
    """One admission: the fast path makes the route's key, rate and backlog checks itself (401,
    429, 503), with the route's code and the route's answer."""
    limited = {"rate_limit_per_second": 0.001, "rate_limit_burst": 1}
    fast = await start_api(demo_catalogue=True, **limited)
    seen = _noting(fast.app)  # type: ignore[attr-defined]
    plain = await _without_fast_path(start_api)
    plain.app.state.services.guard.rate, plain.app.state.services.guard.burst = 0.001, 1  # type: ignore[attr-defined]
    answers: dict[str, list[tuple[int, dict[str, Any], dict[str, str]]]] = {}
    for name, client in (("fast", fast), ("plain", plain)):
        services = client.app.state.services  # type: ignore[attr-defined]
        unknown = await client.post("/orders", json=GOOD, headers={"X-API-Key": "wrong"})
        first = await client.post("/orders", json=GOOD)
        limited_out = await client.post("/orders", json=GOOD)
        services.guard.rate = 0  # no limit: the next check is the backlog's
        services.backlog.outbox_depth = services.settings.max_outbox
        overloaded = await client.post("/orders", json=GOOD)
        services.backlog.outbox_depth = 0
        assert first.status_code == 202, first.text
        answers[name] = [_problem(r) for r in (unknown, limited_out, overloaded)]
    assert [status for status, _, _ in answers["fast"]] == [401, 429, 503]
    for answer in (answers["fast"][2][1], answers["plain"][2][1]):
        # Each app's backlog reads the queue's depth on its own clock: the figure may differ.
        assert answer.pop("detail").startswith("100000 orders await publishing and ")
    assert answers["fast"] == answers["plain"]
    assert seen == []  # the fast path answered every one of them
    assert await conn.fetchval("SELECT count(*) FROM orders") == 2


@pytest.mark.parametrize(
    ("path", "order"), [("/orders", GOOD), ("/orders/batch", {"orders": [GOOD]})]
)
async def test_a_content_length_of_digits_that_are_not_ascii_is_no_server_error(
    api: httpx.AsyncClient, path: str, order: dict[str, Any]
) -> None:
    # "²" is a digit to str.isdigit() but not to int(): it was a 500 from the fast path (POST
    # /orders) and from the body guard (any other body). uvicorn's parser refuses such a header;
    # another ASGI server might not.
    body = orjson.dumps(order)
    headers = [(b"content-type", b"application/json"), (b"content-length", "²".encode("latin-1"))]
    headers += [(k.lower().encode(), v.encode()) for k, v in AUTH.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50_000),
        "server": ("orders.test", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await api.app(scope, receive, send)  # type: ignore[attr-defined]
    assert sent[0]["status"] == 202


async def test_an_unreachable_store_is_a_503_problem_from_the_fast_path(
    api: httpx.AsyncClient, routed: list[str], conn: asyncpg.Connection
) -> None:
    await api.app.state.services.pool.close()  # type: ignore[attr-defined]
    response = await api.post("/orders", json=GOOD)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    assert response.json()["type"] == "/problems/unavailable"
    assert routed == []
    assert await conn.fetchval("SELECT count(*) FROM orders") == 0


async def _in_chunks(customer_chunks: int) -> AsyncIterator[bytes]:
    yield b'{"customer_id": "'
    for _ in range(customer_chunks):
        yield b"x" * 100_000
    yield b'", "items": [{"sku": "BOOK-1", "quantity": 1}]}'


async def test_a_body_in_chunks_reaches_the_route_whole_or_is_refused_past_the_limit(
    api: httpx.AsyncClient, routed: list[str], conn: asyncpg.Connection
) -> None:
    json = {"content-type": "application/json"}
    # No Content-Length: the fast path reads the chunks and hands on every one it read.
    too_large = await api.post("/orders", content=_in_chunks(20), headers=json)
    assert too_large.status_code == 413
    assert too_large.json()["type"] == "/problems/too-large"
    whole = await api.post("/orders", content=_in_chunks(1), headers=json)
    assert whole.status_code == 422  # the route saw all 100,000 characters of customer_id
    assert any(e["loc"] == ["body", "customer_id"] for e in whole.json()["errors"])
    assert routed == ["route"]  # the 413 came from the body guard, before any route
    assert await conn.fetchval("SELECT count(*) FROM orders") == 0
