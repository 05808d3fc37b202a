"""The HTTP routes: orders, inventory, health."""

import asyncio
import hashlib
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import asyncpg
import orjson
from fastapi import APIRouter, Header, Path, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from producer import store, webhooks
from producer.backlog import Backlog
from producer.problems import UNAVAILABLE, Problem
from producer.services import Caller, Services, ServicesDep
from shared.db import Status, replicated
from shared.messages import Item, OrderRequest, Sku, new_id

router = APIRouter()  # needs an API key
health = APIRouter(tags=["health"])  # open: probes carry no keys


# An Idempotency-Key: printable ASCII, no spaces.
Key = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")]
IdempotencyKey = Annotated[Key | None, Header(alias="Idempotency-Key")]
SkuPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class OrderView(BaseModel):
    id: UUID
    status: Status
    customer_id: str
    items: list[Item]
    priority: int
    attempts: int = Field(description="processing attempts started so far")
    reason: str | None = Field(
        description="why the order was rejected or failed, or the last error"
    )
    next_attempt_at: datetime | None = Field(description="when a retrying order is tried next")
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    processed_by: str | None = Field(description="the consumer that settled the order")


class BatchEntry(OrderRequest):
    idempotency_key: Key | None = None


class Batch(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    orders: Annotated[list[BatchEntry], Field(min_length=1, max_length=1_000)]


class BatchItem(BaseModel):
    id: UUID
    status: Status
    priority: int
    idempotency_key: str | None
    created: bool = Field(description="false when an earlier request with this key made it")


class BatchView(BaseModel):
    orders: list[BatchItem] = Field(description="in the order of the request")


class StockLevel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    available: Annotated[int, Field(ge=0, le=1_000_000_000)]


class StockView(StockLevel):
    sku: Sku
    updated_at: datetime


def _digest(order: OrderRequest) -> bytes:
    """What makes two requests with one Idempotency-Key the same request (a callback_url only
    when given, so that the digests of orders without one stay as they were)."""
    body = order.model_dump(
        mode="json",
        include={"customer_id", "items", "priority", "callback_url"},
        exclude_none=True,
    )
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()


def key_reused() -> Problem:
    """An Idempotency-Key sent again with another body (orders and crawls alike)."""
    return Problem(
        422,
        "Idempotency-Key reused",
        "This Idempotency-Key was already used with a different request body.",
        "/problems/idempotency-key-reused",
    )


VIEW = tuple(OrderView.model_fields)


def order_json(row: asyncpg.Record | Mapping[str, Any]) -> bytes:
    """An order as ``OrderView`` writes it, from its row, without validating it again."""
    view = {name: row[name] for name in VIEW}
    view["id"] = str(view["id"])
    return orjson.dumps(view, option=orjson.OPT_UTC_Z)


async def accept(
    services: Services, order: OrderRequest, key: str | None, owner: str
) -> asyncpg.Record:
    """Store ``order`` as submitted with the API key named ``owner``, or find the one an earlier
    request with ``key`` stored; its row. The route's and the fast path's one admission of a
    valid order from a known caller.

    Raises a 503 problem when too much work is queued, and a 422 when ``key`` was used with
    another order or the callback_url may not be used.
    """
    _refuse_when_overloaded(services.backlog)
    if order.callback_url is not None:
        url = await webhooks.check_callback(services, order.callback_url, owner)
        order = order.model_copy(update={"callback_url": url})
    digest = _digest(order) if key else None  # only a key's reuse is compared
    row = await services.submit(store.Submission(new_id(), order, key, digest, owner))
    if row is None:  # the key was used before
        assert key is not None
        row = await store.order_with_key(services.pool, key)
        assert row is not None
        if row["request_hash"] != digest:
            raise key_reused()
    else:  # the outbox's NOTIFY wakes the relay
        services.metrics.accepted.labels("single").inc()
    return row


def accepted(row: asyncpg.Record) -> Response:
    """The 202 for a stored order: the order, and where to read its status."""
    headers = {"Location": f"/orders/{row['id']}"}
    return Response(order_json(row), 202, headers, media_type="application/json")


def link(operation: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link: the operation that reads what a response names, and with what."""
    return {"operationId": operation, "parameters": parameters}


@router.post(
    "/orders",
    status_code=202,
    response_model=OrderView,
    responses={
        202: {
            "headers": {
                "Location": {"description": "the order's URL", "schema": {"type": "string"}}
            },
            "links": {"order": link("get_order", order_id="$response.body#/id")},
        },
        422: {"description": "invalid order, or an Idempotency-Key reused with another body"},
        503: {"description": "the order store is unreachable, or too much work is queued"},
    },
)
async def submit_order(
    order: OrderRequest,
    services: ServicesDep,
    owner: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Accept an order: it is stored durably before the 202, then queued for processing."""
    # A valid order with a valid key seldom gets here: producer/fastpath.py answers it first.
    return accepted(await accept(services, order, idempotency_key, owner))


@router.post(
    "/orders/batch",
    status_code=202,
    response_model=BatchView,
    responses={
        202: {"links": {"first_order": link("get_order", order_id="$response.body#/orders/0/id")}},
        422: {"description": "an invalid order, a key twice, or a key reused"},
        503: {"description": "the order store is unreachable, or too much work is queued"},
    },
)
async def submit_batch(batch: Batch, services: ServicesDep, owner: Caller) -> BatchView:
    """Accept up to 1,000 orders in one transaction: all are stored, or none."""
    _refuse_when_overloaded(services.backlog)
    keys = [o.idempotency_key for o in batch.orders if o.idempotency_key]
    if len(keys) != len(set(keys)):
        raise Problem(
            422,
            "Duplicate Idempotency-Key",
            "Each key may appear once in a batch.",
            "/problems/validation-error",
        )
    callbacks = {o.callback_url for o in batch.orders if o.callback_url}
    checked = {url: await webhooks.check_callback(services, url, owner) for url in callbacks}
    entries = [
        o.model_copy(update={"callback_url": checked[o.callback_url]}) if o.callback_url else o
        for o in batch.orders
    ]
    ids = [new_id() for _ in entries]
    digests = [_digest(o) for o in entries]
    rows = [
        {
            "id": str(i),
            "customer_id": o.customer_id,
            "items": [it.model_dump() for it in o.items],
            "priority": o.priority,
            "key": o.idempotency_key,
            "hash": d.hex() if o.idempotency_key else None,
            "callback_url": o.callback_url,
        }
        for i, o, d in zip(ids, entries, digests, strict=True)
    ]
    async with services.pool.acquire() as conn, replicated(conn), conn.transaction():
        created = await store.submit_batch(conn, rows, owner)
        reused = [
            o.idempotency_key
            for o, i in zip(batch.orders, ids, strict=True)
            if i not in created and o.idempotency_key
        ]
        earlier = await store.orders_with_keys(conn, reused) if reused else {}
        items = []
        for order, order_id, digest in zip(batch.orders, ids, digests, strict=True):
            if order_id in created:
                items.append(
                    BatchItem(
                        id=order_id,
                        status=Status.ACCEPTED,
                        priority=order.priority,
                        idempotency_key=order.idempotency_key,
                        created=True,
                    )
                )
                continue
            assert order.idempotency_key is not None  # only a key can have been used before
            row = earlier[order.idempotency_key]
            if row["request_hash"] != digest:
                raise key_reused()  # rolls the whole batch back
            items.append(
                BatchItem(
                    id=row["id"],
                    status=row["status"],
                    priority=order.priority,
                    idempotency_key=order.idempotency_key,
                    created=False,
                )
            )
    if created:
        services.metrics.accepted.labels("batch").inc(len(created))
    return BatchView(orders=items)


def _refuse_when_overloaded(backlog: Backlog) -> None:
    if backlog.overloaded:
        raise Problem(
            503,
            "Too much work queued",
            f"{backlog.outbox_depth} orders await publishing and {backlog.queue_depth} are queued;"
            " nothing was stored. Try again shortly.",
            "/problems/backpressure",
            headers={"Retry-After": "2"},
        )


# Only a UUID is an order's id: GET /orders/batch is a 405, and /orders/not-an-id a 404.
@router.get("/orders/{order_id:uuid}", response_model=OrderView, responses={404: {}})
async def get_order(order_id: UUID, services: ServicesDep) -> Response:
    """An order's status, attempts, reason and timestamps."""
    row = await store.order(services.pool, order_id)
    if row is None:
        raise Problem(
            404, "Order not found", f"No order has the id {order_id}.", "/problems/not-found"
        )
    return Response(order_json(row), media_type="application/json")


@router.put(
    "/inventory/{sku}",
    response_model=StockView,
    responses={200: {"links": {"stock": link("get_stock", sku="$response.body#/sku")}}},
)
async def set_stock(sku: SkuPath, level: StockLevel, services: ServicesDep) -> StockView:
    """Set the stock available for a SKU."""
    row = await store.set_stock(services.pool, sku, level.available)
    return StockView.model_validate(dict(row))


@router.get("/inventory/{sku}", response_model=StockView, responses={404: {}})
async def get_stock(sku: SkuPath, services: ServicesDep) -> StockView:
    """The stock available for a SKU."""
    row = await store.stock(services.pool, sku)
    if row is None:
        raise Problem(
            404, "SKU not found", f"No stock is recorded for {sku}.", "/problems/not-found"
        )
    return StockView.model_validate(dict(row))


@health.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@health.get("/readyz", responses={503: {"description": "broker or database unreachable"}})
async def readyz(services: ServicesDep) -> dict[str, Any]:
    """Both the database and the broker are reachable."""
    try:
        await asyncio.wait_for(services.pool.fetchval("SELECT 1"), 2)
        database = "ok"
    except UNAVAILABLE as exc:
        database = f"unreachable: {exc!r}"
    broker = "ok" if services.backlog.connected else "unreachable"
    if database != "ok" or broker != "ok":
        raise Problem(
            503,
            "Not ready",
            f"The database is {database}; the broker is {broker}.",
            "/problems/not-ready",
            headers={"Retry-After": "1"},
            database=database,
            broker=broker,
        )
    return {"status": "ready", "database": database, "broker": broker}
