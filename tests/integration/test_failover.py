"""Services that name a primary and its standbys in ``DATABASE_URL`` reach the one that takes
writes, past members that refuse, stay silent or only read. (The failovers themselves are the
fault suite's ``db-*`` scenarios.)"""

import asyncio
import logging

import asyncpg
import pytest
from yarl import URL

from shared import db
from testbed.processes import free_port
from tests.faults.nodes import PostgresNode
from tests.integration.conftest import ApiFactory


def _hosts(database_url: str, *ports: int) -> str:
    """``database_url`` with the hosts 127.0.0.1:<port> for each port (0: the real server's)."""
    real = URL(database_url)
    listed = ",".join(f"{real.host}:{port or real.port}" for port in ports)
    return str(database_url).replace(f"{real.host}:{real.port}", listed, 1)


async def test_members_that_refuse_or_never_answer_are_passed_over_each_in_its_own_time(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # accepts connections and never says a word: a member cut off, not down
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _, writer: held.append(writer), "127.0.0.1", 0)
    refused = free_port()
    url = _hosts(database_url, silent.sockets[0].getsockname()[1], refused, 0)
    try:
        with caplog.at_level(logging.WARNING, logger="shared.db"):
            conn = await db.connect(url, timeout=1)  # each; asyncpg's would be spent on the first
        try:
            assert await conn.fetchval("SELECT NOT pg_is_in_recovery()")
        finally:
            await conn.close()
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()
    passed = [r for r in caplog.records if getattr(r, "event", None) == "database_host_unavailable"]
    assert len(passed) == 2


async def test_a_member_that_is_not_what_is_asked_for_is_passed_over(database_url: str) -> None:
    # the same server twice: a primary, so taken where a primary is asked for, and passed over
    # (each time, then the last one's error) where a standby is
    url = _hosts(database_url, 0, 0)
    conn = await db.connect(url, target_session_attrs="primary")
    await conn.close()
    with pytest.raises(asyncpg.exceptions.TargetServerAttributeNotMatched):
        await db.connect(url, target_session_attrs="standby")


async def test_an_order_whose_commit_was_not_replicated_is_answered_503_and_202_once_it_is(
    start_api: ApiFactory,
) -> None:
    """A server of the test's own whose synchronous standby never answers, so every commit waits
    for it; cancelling that wait (as ``pg_cancel_backend`` or a ``statement_timeout`` does) makes
    PostgreSQL report the commit as done. The API answers it 503, never 202; the client's retry
    with its key waits for the standby in turn, and is answered 202 only once the standby is
    there (here: once synchronous replication is turned off)."""
    server = PostgresNode()
    await server.start()
    try:
        admin = await asyncpg.connect(server.url())
        await admin.execute("CREATE DATABASE orders")
        owner = await db.create_pool(server.url("orders"), 1)
        try:  # the API as it runs deployed: as the producer's own role, not a superuser
            await db.migrate(owner, 10)
            await db.grant(owner, "producer", "orders_producer", "pw")
        finally:
            await owner.close()
        producer_url = server.url("orders").replace("postgres@", "orders_producer@", 1)
        api = await start_api(database_url=producer_url, relay_inline=False)
        await admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        await admin.execute("SELECT pg_reload_conf()")

        async def cancel_the_wait_for_the_standby() -> None:
            while not await admin.fetchval(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
            ):
                await asyncio.sleep(0.05)

        body = {"customer_id": "c-1", "items": [{"sku": "PEN-1", "quantity": 1}]}
        key = {"Idempotency-Key": "not-replicated-1"}
        for _ in range(2):  # the order's commit, then the retry's lookup: each waits, each 503
            answer, _ = await asyncio.gather(
                api.post("/orders", json=body, headers=key), cancel_the_wait_for_the_standby()
            )
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"]
            assert answer.headers["Content-Type"] == "application/problem+json"
        stored = await asyncpg.connect(server.url("orders"))
        assert await stored.fetchval("SELECT count(*) FROM orders") == 1  # visible on the primary
        await stored.close()

        await admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        await admin.execute("SELECT pg_reload_conf()")
        answer = await api.post("/orders", json=body, headers=key)
        assert answer.status_code == 202, answer.text
        await admin.close()
    finally:
        await server.stop()
