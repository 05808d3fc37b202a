"""The schema migrates once, safely, however many replicas start at the same moment."""

import asyncio
import uuid

import asyncpg
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
            "crawl_pages",
            "crawls",
            "inventory",
            "orders",
            "outbox",
            "reservations",
            "schema_version",
        }
        await db.migrate(pools[0], 30)  # and again later: nothing to do
    finally:
        for pool in pools:
            await pool.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
