"""PostgreSQL, the system of record: schema, migrations and the connection pool.

Order states::

    accepted ──► processing ──► completed
        ▲            │  ▲   └──► rejected   (not enough stock: permanent, nothing reserved)
        │            ▼  │
        │         retrying                  (transient error: the broker holds the retry)
        │            │
        └─replay── failed                   (poison message or attempts exhausted: in the DLQ)
"""

import asyncio
import logging
import re
import time
from enum import StrEnum

import asyncpg
import orjson

log = logging.getLogger(__name__)


class Status(StrEnum):
    ACCEPTED = "accepted"
    PROCESSING = "processing"
    RETRYING = "retrying"
    COMPLETED = "completed"
    REJECTED = "rejected"
    FAILED = "failed"


FINAL = (Status.COMPLETED, Status.REJECTED, Status.FAILED)
FINAL_SQL = ", ".join(f"'{status}'" for status in FINAL)  # for ``status NOT IN (...)``


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """``text`` as PostgreSQL's ``text`` takes it: NUL and lone surrogates become U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


class CrawlStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"  # no page left queued or being fetched
    CANCELLED = "cancelled"


class PageStatus(StrEnum):
    QUEUED = "queued"  # found; its crawl task is in the outbox or the broker
    FETCHING = "fetching"  # claimed by a consumer until claimed_until
    FETCHED = "fetched"  # any HTTP answer that is not an error: 2xx, or a redirect (3xx)
    FAILED = "failed"  # HTTP error, too large, refused address, or attempts exhausted
    BLOCKED = "blocked"  # disallowed by robots.txt: never fetched
    CANCELLED = "cancelled"  # still queued when its crawl was cancelled


# NOTIFY on this channel (by the triggers of the last migration): rows to publish were committed,
# the relays should publish now. The payload names whose: 'orders' or 'crawls'.
OUTBOX_CHANNEL = "outbox"

# Append only: each entry runs once, in order, under an advisory lock.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE orders (
        id              uuid PRIMARY KEY,
        customer_id     text NOT NULL,
        items           jsonb NOT NULL,
        priority        smallint NOT NULL CHECK (priority BETWEEN 0 AND 9),
        status          text NOT NULL CHECK (status IN
                          ('accepted','processing','retrying','completed','rejected','failed')),
        attempts        integer NOT NULL DEFAULT 0,
        reason          text,
        idempotency_key text UNIQUE,
        request_hash    bytea,
        next_attempt_at timestamptz,
        created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
        completed_at    timestamptz
    );
    CREATE INDEX orders_status ON orders (status);
    CREATE TABLE outbox (
        seq        bigserial PRIMARY KEY,
        order_id   uuid NOT NULL UNIQUE REFERENCES orders (id),
        priority   smallint NOT NULL
    );
    CREATE INDEX outbox_next ON outbox (priority DESC, seq);
    CREATE TABLE inventory (
        sku        text PRIMARY KEY,
        available  integer NOT NULL CHECK (available >= 0),
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE TABLE reservations (
        order_id   uuid NOT NULL REFERENCES orders (id),
        sku        text NOT NULL REFERENCES inventory (sku),
        quantity   integer NOT NULL CHECK (quantity > 0),
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (order_id, sku)
    );
    """,
    "ALTER TABLE orders ADD COLUMN processed_by text",
    # Was ``reserve_order``, one order's reservation: the batch's rule since migration 8.
    "SELECT 1",
    # For the dashboard: recent completions and the latest failures without a scan.
    """
    CREATE INDEX orders_completed_at ON orders (completed_at) WHERE completed_at IS NOT NULL;
    CREATE INDEX orders_failures ON orders (updated_at) WHERE status IN ('rejected', 'failed');
    """,
    # The crawler (docs/crawler.md). A page row is its crawl task's outbox entry while
    # ``unpublished``; the unique (crawl_id, url) is what fetches each URL once per crawl.
    """
    CREATE TABLE crawls (
        id            uuid PRIMARY KEY,
        root_url      text NOT NULL,
        frontier      text NOT NULL CHECK (frontier IN ('fifo', 'lifo', 'priority')),
        max_depth     integer NOT NULL CHECK (max_depth >= 0),
        max_pages     integer NOT NULL CHECK (max_pages >= 1),
        allowed_hosts text[] NOT NULL,
        status        text NOT NULL CHECK (status IN ('running', 'completed', 'cancelled')),
        pages         integer NOT NULL DEFAULT 0,
        idempotency_key text UNIQUE,
        request_hash  bytea,
        created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
        finished_at   timestamptz
    );
    CREATE SEQUENCE crawl_visits;
    CREATE TABLE crawl_pages (
        id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        crawl_id      uuid NOT NULL REFERENCES crawls (id),
        url           text NOT NULL,
        depth         integer NOT NULL,
        redirects     integer NOT NULL DEFAULT 0,
        found_from    uuid,
        seq           bigserial,
        status        text NOT NULL DEFAULT 'queued' CHECK (status IN
                        ('queued','fetching','fetched','failed','blocked','cancelled')),
        unpublished   boolean NOT NULL DEFAULT true,
        attempts      integer NOT NULL DEFAULT 0,
        claimed_until timestamptz,
        visit         bigint,
        http_status   integer,
        content_type  text,
        title         text,
        links         integer,
        links_out     text[],
        error         text,
        fetched_at    timestamptz,
        UNIQUE (crawl_id, url)
    );
    CREATE INDEX crawl_pages_unpublished ON crawl_pages (seq) WHERE unpublished;
    CREATE INDEX crawl_pages_open ON crawl_pages (crawl_id) WHERE status IN ('queued', 'fetching');
    """,
    # Was ``reserve_orders`` calling ``reserve_order``: migration 8 has the one rule.
    "SELECT 1",
    # What adds rows to publish wakes the relays (in any process) at its commit, one
    # notification per transaction: 'orders' from the outbox, 'crawls' from crawl pages.
    f"""
    CREATE FUNCTION notify_relay() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{OUTBOX_CHANNEL}', TG_ARGV[0]);
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER notify_relay AFTER INSERT ON outbox
        FOR EACH STATEMENT EXECUTE FUNCTION notify_relay('orders');
    CREATE TRIGGER notify_relay AFTER INSERT ON crawl_pages
        FOR EACH STATEMENT EXECUTE FUNCTION notify_relay('crawls');
    """,
    # The reservation rule, once (consumer/orders.py): each order reserves every line or none and
    # becomes final in the transaction. Every lock is taken up front, the orders' rows then the
    # stock rows, each in key order, so two batches never deadlock. When every order is still
    # open and the stock covers the whole batch (the usual case), all of them complete in three
    # set-based statements. Otherwise each order is a batch of one, in batch order: completed,
    # ``duplicate`` if already final (a redelivery), or rejected with the lines that are short.
    # The lines come flattened: ``p_orders[i]`` wants ``p_quantities[i]`` of ``p_skus[i]``, one
    # line per order and SKU.
    f"""
    CREATE OR REPLACE FUNCTION
        reserve_orders(p_orders uuid[], p_skus text[], p_quantities int[], p_by text)
    RETURNS TABLE (reserved uuid, outcome text) LANGUAGE plpgsql
    -- Every statement here looks rows up by key. A plan cached while ``orders`` was small (a
    -- new database, statistics not gathered yet) would scan the whole table on every call.
    SET enable_seqscan = off AS $$
    DECLARE
        one uuid;
        current text;
        short text;
    BEGIN
        PERFORM 1 FROM orders WHERE id = ANY (p_orders) ORDER BY id FOR UPDATE;
        PERFORM 1 FROM inventory WHERE sku = ANY (p_skus) ORDER BY sku FOR UPDATE;
        SELECT string_agg(
                   s.sku || CASE WHEN s.available IS NULL THEN ' (unknown SKU)'
                            ELSE format(' (requested %s, available %s)', s.wanted, s.available)
                            END,
                   ', ' ORDER BY s.sku)
          INTO short
          FROM (SELECT l.sku, sum(l.quantity) AS wanted, i.available
                  FROM unnest(p_skus, p_quantities) AS l (sku, quantity)
                  LEFT JOIN inventory i ON i.sku = l.sku
                 GROUP BY l.sku, i.available) s
         WHERE s.available IS NULL OR s.available < s.wanted;
        IF short IS NULL
           AND (SELECT count(*) FROM orders WHERE id = ANY (p_orders)
                   AND status NOT IN ({FINAL_SQL}))
               = (SELECT count(DISTINCT o) FROM unnest(p_orders) AS o)
        THEN
            UPDATE inventory i SET available = i.available - d.wanted,
                                   updated_at = clock_timestamp()
              FROM (SELECT l.sku, sum(l.quantity) AS wanted
                      FROM unnest(p_skus, p_quantities) AS l (sku, quantity) GROUP BY l.sku) d
             WHERE i.sku = d.sku;
            INSERT INTO reservations (order_id, sku, quantity)
            SELECT * FROM unnest(p_orders, p_skus, p_quantities);
            RETURN QUERY
            UPDATE orders SET status = 'completed', reason = NULL, processed_by = p_by,
                              completed_at = clock_timestamp(), updated_at = clock_timestamp()
             WHERE id = ANY (p_orders)
            RETURNING id, 'completed'::text;
            RETURN;
        END IF;
        IF (SELECT count(DISTINCT o) FROM unnest(p_orders) AS o) > 1 THEN
            FOR one IN SELECT t.o FROM unnest(p_orders) WITH ORDINALITY AS t (o, n)
                        GROUP BY t.o ORDER BY min(t.n) LOOP
                RETURN QUERY
                SELECT r.reserved, r.outcome
                  FROM (SELECT array_agg(l.sku ORDER BY l.sku) AS skus,
                               array_agg(l.quantity ORDER BY l.sku) AS quantities
                          FROM unnest(p_orders, p_skus, p_quantities) AS l (id, sku, quantity)
                         WHERE l.id = one) a,
                       reserve_orders(ARRAY[one], a.skus, a.quantities, p_by) r;
            END LOOP;
            RETURN;
        END IF;
        reserved := p_orders[1];
        SELECT status INTO current FROM orders WHERE id = reserved;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'order % does not exist', reserved;
        ELSIF current IN ({FINAL_SQL}) THEN
            outcome := 'duplicate';
        ELSE
            UPDATE orders SET status = 'rejected', reason = 'insufficient stock: ' || short,
                              processed_by = p_by, updated_at = clock_timestamp()
             WHERE id = reserved;
            outcome := 'rejected';
        END IF;
        RETURN NEXT;
    END
    $$;
    DROP FUNCTION IF EXISTS reserve_order(uuid, text[], int[], text);
    """,
)

_MIGRATION_LOCK = 0x0D_E5  # any constant shared by every service

# What each service's own database role may do (docs/security.md): no DDL, no DELETE but the
# producer's on the outbox it empties. ``grant`` applies them; the tests prove they suffice.
PRIVILEGES: dict[str, tuple[str, ...]] = {
    "producer": (
        "SELECT, INSERT ON orders",
        "SELECT, INSERT, UPDATE, DELETE ON outbox",  # UPDATE: its claims lock rows
        "SELECT, INSERT, UPDATE ON inventory",
        "SELECT ON reservations",
        "SELECT, INSERT, UPDATE ON crawls, crawl_pages",
        "USAGE ON SEQUENCE outbox_seq_seq, crawl_pages_seq_seq",
        "SELECT ON schema_version",
    ),
    "consumer": (
        "SELECT, INSERT, UPDATE ON orders",
        "SELECT, UPDATE ON inventory",
        "SELECT, INSERT ON reservations",
        "SELECT, UPDATE ON crawls",
        "SELECT, INSERT, UPDATE ON crawl_pages",
        "USAGE ON SEQUENCE crawl_pages_seq_seq, crawl_visits",
        "EXECUTE ON FUNCTION reserve_orders(uuid[], text[], int[], text)",
        "SELECT ON schema_version",
    ),
}


async def grant(pool: asyncpg.Pool, service: str, role: str, password: str) -> None:
    """Create or update ``role`` (login, ``password``) with exactly ``service``'s privileges."""
    async with pool.acquire() as conn, conn.transaction():
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        verb = "ALTER" if exists else "CREATE"
        # DDL takes no parameters: format() quotes the name and the password server-side.
        statement = await conn.fetchval(
            "SELECT format('%s ROLE %I LOGIN PASSWORD %L', $1::text, $2::text, $3::text)",
            verb,
            role,
            password,
        )
        await conn.execute(statement)
        quoted = await conn.fetchval("SELECT quote_ident($1)", role)
        await conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {quoted}")
        await conn.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {quoted}")
        for privilege in PRIVILEGES[service]:
            await conn.execute(f"GRANT {privilege} TO {quoted}")


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset on release: nothing here sets session state (no SET, LISTEN, cursors or session
    locks), so asyncpg's default reset would only add a round trip to every query."""


async def create_pool(url: str, size: int) -> asyncpg.Pool:
    """A pool that connects lazily, so a service can start while the database is down."""
    pool = await asyncpg.create_pool(
        url,
        min_size=0,
        max_size=size,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=30,
        timeout=10,
    )
    assert pool is not None
    return pool


async def _current(pool: asyncpg.Pool) -> bool:
    """The schema is at the latest version (read without DDL or locks)."""
    async with pool.acquire() as conn:
        if await conn.fetchval("SELECT to_regclass('schema_version')") is None:
            return False
        version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
        return bool(version >= len(MIGRATIONS))


async def migrate(pool: asyncpg.Pool, wait_up_to: float) -> None:
    """Bring the schema up to date, retrying until the database answers or ``wait_up_to`` passes.

    Safe when several replicas start at once: they queue on an advisory lock. A service whose
    own role may not migrate finds the schema current (``python -m shared.setup`` ran first).
    """
    deadline = time.monotonic() + wait_up_to
    while True:
        try:
            if await _current(pool):
                return  # nothing to do, and nothing a service's own role may not do
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
                )
                version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
                for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_version VALUES ($1)", number)
                    log.info("database migrated to version %d", number)
            return
        except (TimeoutError, OSError, asyncpg.CannotConnectNowError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("database not reachable yet (%s); retrying", exc)
            await asyncio.sleep(1)
