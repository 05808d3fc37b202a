"""PostgreSQL, the system of record: the migrator (of ``schema/*.sql``) and the connection pool.

Order states::

    accepted ──► processing ──► completed
        ▲            │  ▲   └──► rejected   (not enough stock: permanent, nothing reserved)
        │            ▼  │
        │         retrying                  (transient error: the broker holds the retry)
        │            │
        └─replay── failed                   (poison message or attempts exhausted: in the DLQ)
"""

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from enum import StrEnum
from importlib import resources
from typing import Any, cast

import asyncpg
import orjson

from shared import hosts, logs

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


class DeliveryStatus(StrEnum):
    """A webhook delivery's (docs/notifications.md)."""

    PENDING = "pending"  # in the outbox, the broker, or being retried
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # attempts exhausted: in the webhooks' dead-letter queue
    CANCELLED = "cancelled"  # its endpoint was deleted or disabled before it was delivered


# NOTIFY on this channel (by the triggers of schema/0007_notify_relay.sql): rows to publish were
# committed, the relays should publish now. The payload names whose: 'orders' or 'crawls'.
OUTBOX_CHANNEL = "outbox"

# NOTIFY on this channel (schema/0009_order_events.sql): order events were committed.
EVENTS_CHANNEL = "order_events"

# The schema: ``schema/NNNN_name.sql``, append only, each run once in order under an advisory lock.
# ``:name`` in a file stands for a constant of this module (``_render``), so the SQL and the code
# share one spelling of it.
_VARIABLES = {
    "final_statuses": FINAL_SQL,
    "outbox_channel": f"'{OUTBOX_CHANNEL}'",
    "events_channel": f"'{EVENTS_CHANNEL}'",
}
_VARIABLE = re.compile(r"(?<![:\w]):(\w+)")


def _render(sql: str) -> str:
    """``sql`` with each ``:name`` of ``_VARIABLES`` replaced by its value."""
    return _VARIABLE.sub(lambda m: _VARIABLES.get(m[1], m[0]), sql)


SCHEMA = resources.files(__package__) / "schema"
MIGRATIONS: tuple[str, ...] = tuple(
    _render(SCHEMA.joinpath(name).read_text())
    for name in sorted(f.name for f in SCHEMA.iterdir() if f.name.endswith(".sql"))
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
        "SELECT ON order_events",  # the event streams; the triggers write them
        "EXECUTE ON FUNCTION expire_order_events(interval, integer)",  # the relay's retention
        "EXECUTE ON FUNCTION hold_orders(text[]), hold_crawls(text[])",  # keys found, replicated
        # A key's endpoints: made, listed, enabled again and deleted, their secrets written once,
        # never read.
        "SELECT (id, api_key, url, event_types, created_at, failing_since, disabled_at,"
        " disabled_reason, deleted_at), INSERT, UPDATE (secret, deleted_at, failing_since,"
        " disabled_at, disabled_reason) ON webhook_endpoints",
        "SELECT (api_key, created_at), INSERT, UPDATE (secret, created_at) ON callback_secrets",
        "SELECT, UPDATE (unpublished) ON webhook_deliveries",  # the relay's claims
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
        "SELECT, UPDATE (failing_since, disabled_at, disabled_reason) ON webhook_endpoints",
        "SELECT ON callback_secrets",  # to sign
        "SELECT, UPDATE (status, attempts, last_status, last_error, delivered_at)"
        " ON webhook_deliveries",
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


CONNECT_TIMEOUT = 10.0  # seconds, for each host a URL names

# A host that cannot take this connection now: the next one may.
_NEXT_HOST = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,  # starting up, shutting down, in recovery
    asyncpg.exceptions.TargetServerAttributeNotMatched,  # a standby
    asyncpg.InvalidCatalogNameError,  # a standby that has not replayed the database's creation
)


async def connect(url: str, **kwargs: Any) -> asyncpg.Connection:
    """A connection to ``url``'s database. A URL that names several hosts (``shared/hosts.py``: a
    primary and its standbys, libpq's way) gets the one that takes writes: each is tried in turn,
    with a timeout of its own (asyncpg's multi-host connect spends one timeout on all of them,
    and a host cut off, rather than refusing, uses it up)."""
    nodes = hosts.each(url)
    kwargs.setdefault("timeout", CONNECT_TIMEOUT)
    if len(nodes) > 1 and "target_session_attrs" not in url:  # the URL's own choice wins
        kwargs.setdefault("target_session_attrs", "read-write")
    for n, node in enumerate(nodes, 1):
        try:
            return await asyncpg.connect(node, **kwargs)
        except _NEXT_HOST as exc:
            if n == len(nodes):
                raise
            log.warning(
                "database host %s unavailable (%r); trying the next",
                hosts.redact(node),
                exc,
                extra=logs.event("database_host_unavailable", host=hosts.redact(node)),
            )
    raise AssertionError("a URL names at least one host")


class NotReplicated(Exception):
    """A commit PostgreSQL reported as done after its wait for the synchronous standby was
    cancelled (``pg_cancel_backend``, a server-side ``statement_timeout``): it is visible on the
    primary, but the standby may not have it, and a failover may erase it. Nothing may be
    answered as stored on its strength: the caller is in doubt, as when a connection drops
    during COMMIT."""


@contextlib.asynccontextmanager
async def replicated(conn: Any) -> AsyncIterator[None]:
    """Raises ``NotReplicated`` after the block if a commit in it was cancelled while it waited
    for the synchronous standby. PostgreSQL says so only in a warning (SQLSTATE 01000, "canceling
    wait for synchronous replication ..."), which is matched in English, the servers' default
    ``lc_messages``."""
    warnings: list[Any] = []

    def heard(_conn: object, message: Any) -> None:
        warnings.append(message)

    conn.add_log_listener(heard)
    try:
        yield
        await asyncio.sleep(0)  # asyncpg calls its listeners soon, not at once
    finally:
        conn.remove_log_listener(heard)
    for message in warnings:
        if message.sqlstate == "01000" and "synchronous replication" in message.message:
            log.warning(
                "commit not replicated: %s",
                message.message,
                extra={"event": "commit_not_replicated"},
            )
            raise NotReplicated(message.message)


async def create_pool(url: str, size: int) -> asyncpg.Pool:
    """A pool that connects lazily, so a service can start while the database is down."""
    pool = await asyncpg.create_pool(
        url,
        min_size=0,
        max_size=size,
        connect=cast(Any, connect),  # called as connect(url, **the pool's connect arguments)
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
