"""The HTTP contract: bad input is a clear problem+json and writes nothing; idempotent retries."""

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

GOOD: dict[str, Any] = {"customer_id": "c-1", "items": [{"sku": "BOOK-1", "quantity": 2}]}


def order(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


def line(**changes: Any) -> dict[str, Any]:
    return order(items=[{"sku": "BOOK-1", "quantity": 1, **changes}])


JSON = {"content-type": "application/json"}

# (case, raw body, headers, status, problem type)
BAD_REQUESTS: list[tuple[str, bytes | dict[str, Any], dict[str, str], int, str]] = [
    ("malformed JSON", b'{"customer_id": ', JSON, 400, "/problems/malformed-json"),
    ("invalid UTF-8", b'{"customer_id": "\xff\xfe"}', JSON, 400, "/problems/malformed-json"),
    (
        "not JSON media type",
        b"customer_id=c-1",
        {"content-type": "text/plain"},
        415,
        "/problems/unsupported-media-type",
    ),
    (
        "form body",
        b"customer_id=c-1",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        "/problems/unsupported-media-type",
    ),
    (
        "body too large",
        b'{"customer_id": "' + b"x" * 2_000_000 + b'"}',
        JSON,
        413,
        "/problems/too-large",
    ),
    ("array body", b"[]", JSON, 422, "/problems/validation-error"),
    ("empty object", {}, {}, 422, "/problems/validation-error"),
    ("unknown field", order(coupon="FREE"), {}, 422, "/problems/validation-error"),
    ("customer_id empty", order(customer_id=""), {}, 422, "/problems/validation-error"),
    ("customer_id too long", order(customer_id="c" * 65), {}, 422, "/problems/validation-error"),
    ("customer_id a number", order(customer_id=12), {}, 422, "/problems/validation-error"),
    ("customer_id with NUL", order(customer_id="c\x00d"), {}, 422, "/problems/validation-error"),
    (
        "customer_id lone surrogate",
        b'{"customer_id": "c\\ud800", "items": [{"sku": "A", "quantity": 1}]}',
        JSON,
        422,
        "/problems/validation-error",
    ),
    ("no items", order(items=[]), {}, 422, "/problems/validation-error"),
    (
        "101 items",
        order(items=[{"sku": "A", "quantity": 1}] * 101),
        {},
        422,
        "/problems/validation-error",
    ),
    ("items not a list", order(items={"sku": "A"}), {}, 422, "/problems/validation-error"),
    ("sku empty", line(sku=""), {}, 422, "/problems/validation-error"),
    ("sku too long", line(sku="A" * 65), {}, 422, "/problems/validation-error"),
    ("sku with space", line(sku="BOOK 1"), {}, 422, "/problems/validation-error"),
    ("sku with slash", line(sku="BOOK/1"), {}, 422, "/problems/validation-error"),
    ("quantity zero", line(quantity=0), {}, 422, "/problems/validation-error"),
    ("quantity negative", line(quantity=-1), {}, 422, "/problems/validation-error"),
    ("quantity 10001", line(quantity=10_001), {}, 422, "/problems/validation-error"),
    ("quantity string", line(quantity="3"), {}, 422, "/problems/validation-error"),
    ("quantity bool", line(quantity=True), {}, 422, "/problems/validation-error"),
    ("quantity float", line(quantity=3.0), {}, 422, "/problems/validation-error"),
    ("quantity huge", line(quantity=10**30), {}, 422, "/problems/validation-error"),
    ("line unknown field", line(price=1), {}, 422, "/problems/validation-error"),
    ("priority 10", order(priority=10), {}, 422, "/problems/validation-error"),
    ("priority -1", order(priority=-1), {}, 422, "/problems/validation-error"),
    ("priority string", order(priority="9"), {}, 422, "/problems/validation-error"),
    ("priority null", order(priority=None), {}, 422, "/problems/validation-error"),
    (
        "idempotency key too long",
        GOOD,
        {"Idempotency-Key": "k" * 256},
        422,
        "/problems/validation-error",
    ),
]


@pytest.mark.parametrize(
    ("body", "headers", "status", "problem_type"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
async def test_bad_input_is_a_problem_and_writes_nothing(
    api: httpx.AsyncClient,
    conn: asyncpg.Connection,
    body: bytes | dict[str, Any],
    headers: dict[str, str],
    status: int,
    problem_type: str,
) -> None:
    if isinstance(body, bytes):
        response = await api.post("/orders", content=body, headers=headers)
    else:
        response = await api.post("/orders", json=body, headers=headers)
    assert response.status_code == status, response.text
    assert assert_problem(response, "/orders")["type"] == problem_type
    assert await conn.fetchval("SELECT count(*) FROM orders") == 0
    assert await conn.fetchval("SELECT count(*) FROM outbox") == 0


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/orders/8d0f6f8e-6b53-4b8e-9d55-111111111111", None, 404),
        ("GET", "/orders/not-a-uuid", None, 404),  # no such order
        ("GET", "/inventory/NOPE-1", None, 404),
        ("GET", "/inventory/bad%20sku", None, 422),
        ("PUT", "/inventory/BOOK-1", {"available": -1}, 422),
        ("PUT", "/inventory/BOOK-1", {"available": "5"}, 422),
        ("PUT", "/inventory/BOOK-1", {"available": 5, "x": 1}, 422),
        ("DELETE", "/orders", None, 405),
        ("GET", "/nowhere", None, 404),
    ],
)
async def test_other_errors_are_problems(
    api: httpx.AsyncClient, method: str, path: str, body: Any, status: int
) -> None:
    response = await api.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert_problem(response, path)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/orders", "POST"),
        ("GET", "/orders/batch", "POST"),  # not an order's id
        # two routes share the path; a fixed id, so that every xdist worker collects the same
        ("PUT", "/crawls/5f0c7a56-3b1e-4d8a-9f2e-1c6b8e4d2a90", "DELETE, GET"),
        ("PATCH", "/inventory/BOOK-1", "GET, PUT"),
    ],
)
async def test_a_method_the_path_does_not_take_is_a_405_naming_those_it_does(
    api: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    response = await api.request(method, path)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == allow
    problem = assert_problem(response, path)
    assert problem["type"] == "/problems/method-not-allowed"
    assert problem["detail"] == f"{path} does not take {method}; it takes {allow}."


def assert_problem(response: httpx.Response, path: str) -> dict[str, Any]:
    """RFC 9457 problem details with every member the README promises, each meaningful."""
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == response.status_code
    assert problem["type"].startswith("/problems/"), problem  # never about:blank
    assert problem["title"]
    assert problem["detail"]
    assert problem["instance"] == httpx.URL(path).path
    return problem


async def test_repeated_and_concurrent_posts_with_one_key_make_one_order(
    api: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    headers = {"Idempotency-Key": "checkout-42"}
    responses = await asyncio.gather(
        *(api.post("/orders", json=GOOD, headers=headers) for _ in range(20))
    )
    responses.append(await api.post("/orders", json=GOOD, headers=headers))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert len({r.headers["location"] for r in responses}) == 1
    assert await conn.fetchval("SELECT count(*) FROM orders") == 1
    assert await conn.fetchval("SELECT count(*) FROM outbox") <= 1

    # Key order in the JSON does not matter; the body's meaning does.
    same = {"items": GOOD["items"], "customer_id": "c-1", "priority": 0}
    assert (await api.post("/orders", json=same, headers=headers)).json()["id"] == responses[
        0
    ].json()["id"]
    other = await api.post("/orders", json=order(priority=3), headers=headers)
    assert other.status_code == 422
    assert other.json()["type"] == "/problems/idempotency-key-reused"
    assert await conn.fetchval("SELECT count(*) FROM orders") == 1


async def test_concurrent_posts_share_one_statement_and_each_gets_its_own_order(
    api: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    submit = api.app.state.services.submit  # type: ignore[attr-defined]
    sizes: list[int] = []
    store = submit.run

    async def recorded(batch: Any) -> Any:
        sizes.append(len(batch))
        return await store(batch)

    submit.run = recorded
    posts = [api.post("/orders", json=order(customer_id=f"c-{n}")) for n in range(40)]
    posts += [
        api.post("/orders", json=order(customer_id=f"k-{n}"), headers={"Idempotency-Key": f"k{n}"})
        for n in range(20)
    ]
    # The same keys again, half with the same body and half with another one.
    posts += [
        api.post(
            "/orders",
            json=order(customer_id=f"k-{n}", priority=0 if n % 2 else 5),
            headers={"Idempotency-Key": f"k{n}"},
        )
        for n in range(20)
    ]
    responses = await asyncio.gather(*posts)

    assert max(sizes) > 1  # they shared statements
    codes = [r.status_code for r in responses]
    assert codes[:60] + codes[61::2] == [202] * 70
    assert codes[60::2] == [422] * 10
    assert [r.json()["customer_id"] for r in responses[:60]] == [
        *(f"c-{n}" for n in range(40)),
        *(f"k-{n}" for n in range(20)),
    ]
    assert [r.json()["id"] for r in responses[61::2]] == [
        r.json()["id"] for r in responses[41:60:2]
    ]
    assert await conn.fetchval("SELECT count(*) FROM orders") == 60
    assert await conn.fetchval("SELECT count(*) FROM outbox") <= 60
    # Time-ordered ids (version 7): neighbours in the primary key's index.
    assert {uuid.UUID(r.json()["id"]).version for r in responses[:60]} == {7}


async def test_inventory_can_be_set_and_read(api: httpx.AsyncClient) -> None:
    put = await api.put("/inventory/NEW-1", json={"available": 42})
    assert put.status_code == 200
    assert put.json()["available"] == 42
    got = await api.get("/inventory/NEW-1")
    assert got.json()["sku"] == "NEW-1"
    assert got.json()["available"] == 42


def entry(n: int, **changes: Any) -> dict[str, Any]:
    return {
        "customer_id": f"c-{n}",
        "items": [{"sku": "PEN-1", "quantity": 1 + n % 3}],
        "priority": n % 10,
        **changes,
    }


async def test_a_batch_is_stored_in_one_transaction_each_order_idempotent(
    api: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    orders = [entry(n, idempotency_key=f"batch-{n}") for n in range(3)] + [entry(3)]
    first = await api.post("/orders/batch", json={"orders": orders})
    assert first.status_code == 202, first.text
    listed = first.json()["orders"]
    assert [o["created"] for o in listed] == [True] * 4
    assert [o["priority"] for o in listed] == [0, 1, 2, 3]
    rows = await conn.fetch("SELECT id::text, priority, customer_id FROM orders")
    assert {(r["id"], r["priority"]) for r in rows} == {(o["id"], o["priority"]) for o in listed}

    again = await api.post("/orders/batch", json={"orders": [*orders[:3], entry(4)]})
    assert again.status_code == 202
    assert [o["id"] for o in again.json()["orders"][:3]] == [o["id"] for o in listed[:3]]
    assert [o["created"] for o in again.json()["orders"]] == [False, False, False, True]
    assert await conn.fetchval("SELECT count(*) FROM orders") == 5

    single = await api.post("/orders", json=entry(0), headers={"Idempotency-Key": "batch-0"})
    assert single.json()["id"] == listed[0]["id"]  # one key, one order, whichever endpoint


@pytest.mark.parametrize(
    ("orders", "problem_type"),
    [
        (
            [entry(0, idempotency_key="k"), entry(1, idempotency_key="k")],
            "/problems/validation-error",
        ),
        ([entry(0), {**entry(1), "priority": 10}], "/problems/validation-error"),
        ([entry(0)] * 1_001, "/problems/validation-error"),
        ([], "/problems/validation-error"),
        (
            [entry(0), entry(1, idempotency_key="taken", priority=5)],
            "/problems/idempotency-key-reused",
        ),
    ],
    ids=["key twice", "one invalid order", "1001 orders", "empty", "key reused with another body"],
)
async def test_a_refused_batch_writes_nothing(
    api: httpx.AsyncClient, conn: asyncpg.Connection, orders: list[Any], problem_type: str
) -> None:
    taken = await api.post("/orders", json=entry(1), headers={"Idempotency-Key": "taken"})
    assert taken.status_code == 202
    response = await api.post("/orders/batch", json={"orders": orders})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == problem_type
    assert await conn.fetchval("SELECT count(*) FROM orders") == 1
