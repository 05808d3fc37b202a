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
