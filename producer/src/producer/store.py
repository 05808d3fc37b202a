"""The producer's statements on orders and stock: what the order routes and the dashboard store
and read. (The relay's claims are in outbox.py, the crawl routes' in crawls.py.)"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, TypeAlias
from uuid import UUID

import asyncpg

from shared import db
from shared.batch import Batcher
from shared.messages import OrderRequest, items_json

Connection: TypeAlias = (
    "asyncpg.pool.PoolConnectionProxy[Any]"  # from ``pool.acquire()``, in a transaction
)

ORDER_COLUMNS = """id, status, customer_id, items, priority, attempts, reason, next_attempt_at,
                   created_at, updated_at, completed_at, processed_by"""

# One statement, so one atomic step: each order and its outbox row exist together or not at
# all. The single-order requests in flight share it (group commit, shared/batch.py): keys in
# order, so that two producers' statements never deadlock on them, and of two requests with one
# key, the first to arrive makes the order.
SUBMIT = f"""
    WITH new AS (
        INSERT INTO orders (id, customer_id, items, priority, status, idempotency_key, request_hash,
                            api_key, callback_url)
        SELECT id, customer_id, items::jsonb, priority, 'accepted', key, hash, owner, callback
          FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[], $6::bytea[],
                      $7::text[], $8::text[])
               WITH ORDINALITY AS n (id, customer_id, items, priority, key, hash, owner, callback,
                                     arrival)
         ORDER BY key, arrival
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING {ORDER_COLUMNS}
    ), queued AS (
        INSERT INTO outbox (order_id, priority) SELECT id, priority FROM new
    )
    SELECT * FROM new
"""

# A whole ``POST /orders/batch`` in one statement; keys that already exist are resolved after.
SUBMIT_BATCH = """
    WITH input AS (
        SELECT * FROM jsonb_to_recordset($1::jsonb) AS t(
            id uuid, customer_id text, items jsonb, priority smallint, key text, hash text,
            callback_url text)
    ), new AS (
        INSERT INTO orders (id, customer_id, items, priority, status, idempotency_key, request_hash,
                            api_key, callback_url)
        SELECT id, customer_id, items, priority, 'accepted', key, decode(hash, 'hex'), $2,
               callback_url
          FROM input
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING id, priority
    ), queued AS (
        INSERT INTO outbox (order_id, priority) SELECT id, priority FROM new
    )
    SELECT id FROM new
"""


@dataclass(frozen=True)
class Submission:
    """One ``POST /orders`` for the shared statement."""

    id: UUID
    order: OrderRequest  # its callback_url checked
    key: str | None
    digest: bytes | None
    owner: str  # the name of the API key that submits it


Submitter = Batcher[Submission, asyncpg.Record | None]


def submitter(pool: asyncpg.Pool) -> Submitter:
    """Stores submissions in batches; a request gets its row, or None if its key was used."""

    async def store(batch: Sequence[Submission]) -> list[asyncpg.Record | None]:
        async with pool.acquire() as conn, db.replicated(conn):
            rows = await conn.fetch(
                SUBMIT,
                [s.id for s in batch],
                [s.order.customer_id for s in batch],
                [items_json(s.order) for s in batch],
                [s.order.priority for s in batch],
                [s.key for s in batch],
                [s.digest for s in batch],
                [s.owner for s in batch],
                [s.order.callback_url for s in batch],
            )
        stored = {row["id"]: row for row in rows}
        return [stored.get(s.id) for s in batch]

    return Batcher(store, key=attrgetter("id"))


async def submit_batch(conn: Connection, rows: list[dict[str, Any]], owner: str) -> set[UUID]:
    """Store ``rows`` (``SUBMIT_BATCH``'s input) with their outbox rows, as submitted with the
    key named ``owner``; the ids it created."""
    return {r["id"] for r in await conn.fetch(SUBMIT_BATCH, rows, owner)}


async def order(pool: asyncpg.Pool, order_id: UUID) -> asyncpg.Record | None:
    return await pool.fetchrow(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1", order_id)


# An order found by its key is answered 202 only once the synchronous standby holds it: the
# request that made it may have been answered 503 because its commit's wait for the standby was
# cancelled (db.NotReplicated). ``hold_orders`` locks the rows found (schema 0010), so the
# lookup's commit waits for the standby to flush everything written before it.
async def order_with_key(pool: asyncpg.Pool, key: str) -> asyncpg.Record | None:
    """The order an Idempotency-Key made, with the ``request_hash`` of the body it came with."""
    async with pool.acquire() as conn, db.replicated(conn), conn.transaction():
        await conn.execute("SELECT hold_orders($1)", [key])
        return await conn.fetchrow(
            f"SELECT {ORDER_COLUMNS}, request_hash FROM orders WHERE idempotency_key = $1", key
        )


async def orders_with_keys(conn: Connection, keys: list[str]) -> dict[str, asyncpg.Record]:
    """The orders these keys made, by key: id, status and ``request_hash``."""
    await conn.execute("SELECT hold_orders($1)", keys)
    rows = await conn.fetch(
        "SELECT id, status, idempotency_key, request_hash FROM orders"
        " WHERE idempotency_key = ANY($1::text[])",
        keys,
    )
    return {r["idempotency_key"]: r for r in rows}


async def set_stock(pool: asyncpg.Pool, sku: str, available: int) -> asyncpg.Record:
    row = await pool.fetchrow(
        """INSERT INTO inventory (sku, available) VALUES ($1, $2)
           ON CONFLICT (sku) DO UPDATE SET available = $2, updated_at = clock_timestamp()
           RETURNING sku, available, updated_at""",
        sku,
        available,
    )
    assert row is not None
    return row


async def stock(pool: asyncpg.Pool, sku: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT sku, available, updated_at FROM inventory WHERE sku = $1", sku
    )


async def add_stock_once(pool: asyncpg.Pool, levels: Iterable[tuple[str, int]]) -> None:
    """Record each SKU's level unless the SKU already has one."""
    await pool.executemany(
        "INSERT INTO inventory (sku, available) VALUES ($1, $2) ON CONFLICT (sku) DO NOTHING",
        levels,
    )


async def counts_by_status(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM orders GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


async def completions(pool: asyncpg.Pool, bucket_s: int, window_s: int) -> list[list[float]]:
    """Orders completed per ``bucket_s`` over the last ``window_s``: [bucket start, count]."""
    rows = await pool.fetch(
        """SELECT floor(extract(epoch FROM completed_at) / $1) * $1 AS t, count(*) AS n
           FROM orders WHERE completed_at > clock_timestamp() - $2 * interval '1 second'
           GROUP BY 1 ORDER BY 1""",
        bucket_s,
        window_s,
    )
    return [[float(r["t"]), r["n"]] for r in rows]


async def latest_failures(pool: asyncpg.Pool, limit: int) -> list[dict[str, Any]]:
    # The predicate is the ``orders_failures`` index's, word for word, so the index serves it.
    rows = await pool.fetch(
        """SELECT id, status, reason, updated_at FROM orders
           WHERE status IN ('rejected', 'failed') ORDER BY updated_at DESC LIMIT $1""",
        limit,
    )
    return [dict(r) for r in rows]
