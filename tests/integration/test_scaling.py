"""Five consumers started the way `make dev` starts them: the work spreads, and nothing is lost
when consumers leave or join while orders flow."""

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx

from testbed.processes import API_KEY, ARTIFACTS, AUTH, free_port
from tests.integration.conftest import settled, wait_until

ROOT = Path(__file__).resolve().parents[2]


async def post_many(client: httpx.AsyncClient, n: int) -> list[str]:
    body = {"customer_id": "c-s", "items": [{"sku": "PEN-1", "quantity": 1}]}

    async def one() -> str:
        response = await client.post("/orders", json=body)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    ids: list[str] = []
    for _ in range(0, n, 50):
        ids += await asyncio.gather(*(one() for _ in range(min(50, n - len(ids)))))
    return ids


async def test_five_consumers_share_the_work_and_lose_nothing_as_they_come_and_go(
    clean: None, rabbitmq_url: str, database_url: str, conn: asyncpg.Connection, spawn
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    log_path = ARTIFACTS / "dev.log"
    env = {
        **os.environ,
        "RABBITMQ_URL": rabbitmq_url,
        "DATABASE_URL": database_url,
        "CONSUMERS": "5",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "ORDER_WORK_MS": "10",
        "API_KEYS": f"tests:{API_KEY}",
        "RATE_LIMIT_PER_SECOND": "0",
    }
    with log_path.open("wb") as log:
        dev = subprocess.Popen(
            [sys.executable, "scripts/dev.py"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        pids = await wait_until(lambda: _pids(log_path, 5), 30, "5 consumers to start")
        await wait_until(lambda: _consuming(log_path, 5), 30, "5 consumers to consume")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as client:
            await wait_until(lambda: _ready(client), 30, "the producer")
            await client.put("/inventory/PEN-1", json={"available": 1_000_000})

            first = await post_many(client, 2_000)
            await settled(conn, first, timeout=120)
            shares = dict(
                await conn.fetch("SELECT processed_by, count(*) FROM orders GROUP BY processed_by")
            )
            assert set(shares) == {f"consumer-{i}" for i in range(1, 6)}, shares
            assert min(shares.values()) >= 200, f"every consumer takes >= 10%: {shares}"

            # Two leave (SIGTERM, as a scale-down does) and one joins while orders flow.
            second = asyncio.create_task(post_many(client, 2_000))
            await wait_until(lambda: _count_done(conn, 2_300), 60, "the second batch to flow")
            for name in ("consumer-2", "consumer-4"):
                os.kill(pids[name], signal.SIGTERM)
            spawn("consumer", "consumer-joined", CONSUMER_NAME="consumer-6", ORDER_WORK_MS="10")
            ids = first + await second
            await settled(conn, ids, timeout=120)

        assert (
            await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'completed'") == 4_000
        )
        assert await conn.fetchval("SELECT count(*) FROM reservations") == 4_000
        assert await conn.fetchval("SELECT available FROM inventory WHERE sku = 'PEN-1'") == (
            1_000_000 - 4_000
        )
        log_text = log_path.read_text()
        assert "consumer-2 exited with status 0" in log_text
        assert "consumer-4 exited with status 0" in log_text
        assert (
            await conn.fetchval("SELECT count(*) FROM orders WHERE processed_by = 'consumer-6'") > 0
        )
    finally:
        dev.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(dev.wait, 60)
    assert code == 0, log_path.read_text()[-3000:]
    assert "dev        | stopped" in log_path.read_text()


async def _pids(log_path: Path, n: int) -> dict[str, int] | None:
    found = dict(re.findall(r"started (consumer-\d+) pid (\d+)", log_path.read_text()))
    return {k: int(v) for k, v in found.items()} if len(found) >= n else None


async def _consuming(log_path: Path, n: int) -> bool:
    return log_path.read_text().count("consuming orders.work") >= n


async def _ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def _count_done(conn: asyncpg.Connection, n: int) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'completed'") >= n)
