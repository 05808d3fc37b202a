"""The schema migrates once, safely, however many replicas start at the same moment."""

import asyncio
import uuid

import asyncpg
import pytest
from yarl import URL

from shared import db


async def test_concurrent_migrations_on_a_fresh_database(database_url: str) -> None:
    name = f"migrate_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = str(URL(database_url).with_path(f"/{name}"))
    pools = [await db.create_pool(url, 2) for _ in range(6)]
    try:
        await asyncio.gather(*(db.migrate(pool, 30) for pool in pools))
        versions = await pools[0].fetch("SELECT version FROM schema_version ORDER BY version")
        assert [v["version"] for v in versions] == list(range(1, len(db.MIGRATIONS) + 1))
        tables = await pools[0].fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        assert {t["tablename"] for t in tables} == {
            "callback_secrets",
            "crawl_pages",
            "crawls",
            "inventory",
            "order_events",
            "orders",
            "outbox",
            "reservations",
            "schema_version",
            "webhook_deliveries",
            "webhook_endpoints",
        }
        await db.migrate(pools[0], 30)  # and again later: nothing to do
    finally:
        for pool in pools:
            await pool.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_database_from_before_the_one_reservation_rule_ends_as_a_fresh_one(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 8 replaces ``reserve_orders`` and drops ``reserve_order``, the single-order copy
    of the rule that migrations 3 and 6 made (their texts are gone: a fresh database skips them)."""
    name = f"migrate_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    pool = await db.create_pool(str(URL(database_url).with_path(f"/{name}")), 2)
    try:
        with monkeypatch.context() as before:
            before.setattr(db, "MIGRATIONS", db.MIGRATIONS[:7])
            await db.migrate(pool, 30)
        await pool.execute(
            """CREATE FUNCTION reserve_order(uuid, text[], int[], text) RETURNS text
               LANGUAGE sql AS $$ SELECT 'x' $$;
               CREATE FUNCTION reserve_orders(uuid[], text[], int[], text)
               RETURNS TABLE (reserved uuid, outcome text)
               LANGUAGE sql AS $$ SELECT NULL::uuid, 'x' $$"""
        )
        await db.migrate(pool, 30)
        functions = await pool.fetch(
            "SELECT proname FROM pg_proc WHERE proname LIKE 'reserve_order%' ORDER BY proname"
        )
        assert [f["proname"] for f in functions] == ["reserve_orders"]
        order = uuid.uuid4()
        await pool.execute("INSERT INTO inventory (sku, available) VALUES ('S', 1)")
        await pool.execute(
            """INSERT INTO orders (id, customer_id, items, priority, status)
               VALUES ($1, 'c', '[]', 0, 'processing')""",
            order,
        )
        reserve = "SELECT reserved, outcome FROM reserve_orders($1, $2, $3, 'test')"
        assert [tuple(r) for r in await pool.fetch(reserve, [order], ["S"], [2])] == [
            (order, "rejected")
        ]
        assert await pool.fetchval("SELECT reason FROM orders") == (
            "insufficient stock: S (requested 2, available 1)"
        )
        assert [tuple(r) for r in await pool.fetch(reserve, [order], ["S"], [1])] == [
            (order, "duplicate")
        ]
    finally:
        await pool.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
