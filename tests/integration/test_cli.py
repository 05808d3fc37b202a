"""The `orders` command against the real stack, run the way a person runs it."""

import asyncio
import os
import re
import shutil
import subprocess
import tempfile

import asyncpg
import orjson
from aio_pika.abc import AbstractChannel

from testbed.processes import API_KEY
from tests.integration.conftest import WorkerFactory, settled, wait_until


def orders(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("orders")
    assert binary, "the orders command is installed with the workspace (make sync)"
    return subprocess.run(
        [binary, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", "ORDERS_API_KEY": API_KEY, **(env or {})},
        check=False,
    )


async def test_submit_status_load_and_queues(
    spawn,
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
    rabbitmq_url: str,
    database_url: str,
) -> None:
    producer = spawn("producer", "producer-cli", DEMO_CATALOGUE="true")
    await producer.wait_healthy()
    url = ["--url", producer.base_url]
    await start_worker()

    submitted = await asyncio.to_thread(
        orders, "submit", *url, "--item", "BOOK-1:2", "--item", "MUG-1:1", "--priority", "7"
    )
    assert submitted.returncode == 0, submitted.stderr
    order = orjson.loads(submitted.stdout)
    assert (order["status"], order["priority"]) == ("accepted", 7)
    await settled(conn, [order["id"]])
    shown = await asyncio.to_thread(orders, "status", order["id"], *url)
    assert orjson.loads(shown.stdout)["status"] == "completed"
    keyless = await asyncio.to_thread(
        orders, "status", order["id"], *url, env={"ORDERS_API_KEY": ""}
    )
    assert keyless.returncode == 1
    assert "/problems/unauthorized" in keyless.stderr

    with tempfile.NamedTemporaryFile("wb", suffix=".json") as file:
        file.write(orjson.dumps({"customer_id": "f", "items": [{"sku": "PEN-1", "quantity": 3}]}))
        file.flush()
        from_file = await asyncio.to_thread(
            orders, "submit", *url, "--file", file.name, "--key", "cli-file-1"
        )
        again = await asyncio.to_thread(
            orders, "submit", *url, "--file", file.name, "--key", "cli-file-1"
        )
    assert from_file.returncode == 0, from_file.stderr
    assert orjson.loads(from_file.stdout)["id"] == orjson.loads(again.stdout)["id"]
    with tempfile.NamedTemporaryFile("wb", suffix=".json") as file:
        file.write(b'{"customer_id": ')
        file.flush()
        truncated = await asyncio.to_thread(orders, "submit", *url, "--file", file.name)
    assert truncated.returncode == 1  # the API's answer, printed
    assert "/problems/malformed-json" in truncated.stderr

    loaded = await asyncio.to_thread(
        orders,
        "load",
        *url,
        "--count",
        "60",
        "--rate",
        "120",
        "--priority-mix",
        "0:80,9:20",
        "--wait",
        "30",
    )
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    summary = {
        m.group(1): m.group(2)
        for m in re.finditer(r"│ ([a-z0-9 ]+?)\s+│ ([^│]+?)\s+│", loaded.stdout)
    }
    assert (summary["sent"], summary["accepted"], summary["errors"]) == ("60", "60", "0")
    assert summary["completed"] == "60"
    assert float(summary["latency p99"].split()[0]) > 0
    assert await conn.fetchval("SELECT count(*) FROM orders WHERE customer_id = 'load'") == 60
    assert (
        await conn.fetchval(
            "SELECT count(DISTINCT priority) FROM orders WHERE customer_id = 'load'"
        )
        == 2
    )

    listed = await asyncio.to_thread(
        orders,
        "queues",
        "--interval",
        "0.2",
        env={"RABBITMQ_URL": rabbitmq_url, "DATABASE_URL": database_url},
    )
    assert listed.returncode == 0, listed.stderr
    assert "orders.work" in listed.stdout
    assert "orders.dead" in listed.stdout


async def test_dlq_commands_list_and_replay(
    start_worker: WorkerFactory,
    conn: asyncpg.Connection,
    channel: AbstractChannel,
    rabbitmq_url: str,
    database_url: str,
    api,
) -> None:
    env = {"RABBITMQ_URL": rabbitmq_url, "DATABASE_URL": database_url}
    broken = await start_worker(payment_failure_rate=1.0, max_attempts=1)
    response = await api.post(
        "/orders", json={"customer_id": "d", "items": [{"sku": "PEN-1", "quantity": 1}]}
    )
    order_id = response.json()["id"]
    await settled(conn, [order_id])
    broken.set()

    listed = await asyncio.to_thread(orders, "dlq", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert orjson.loads(listed.stdout.splitlines()[0])["message_id"] == order_id
    replayed = await asyncio.to_thread(orders, "dlq", "replay", order_id, env=env)
    assert replayed.stdout.split() == [order_id]
    await start_worker()

    async def completed() -> bool:
        return (
            await conn.fetchval("SELECT status FROM orders WHERE id = $1::uuid", order_id)
            == "completed"
        )

    await wait_until(completed, 20, "the replayed order to complete")


async def test_clear_errors_when_the_stack_is_not_reachable() -> None:
    down = await asyncio.to_thread(orders, "status", "x", "--url", "http://127.0.0.1:9")
    assert down.returncode == 2
    assert "cannot reach the producer at http://127.0.0.1:9" in down.stderr
    no_broker = await asyncio.to_thread(
        orders, "queues", env={"RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:9/"}
    )
    assert no_broker.returncode == 2
    assert "cannot read the queues" in no_broker.stderr
    bad = await asyncio.to_thread(orders, "submit", "--item", "BOOK-1")
    assert bad.returncode == 2
    assert "SKU:QUANTITY" in bad.stderr
    missing = await asyncio.to_thread(orders, "submit", "--file", "/no/such/order.json")
    assert missing.returncode == 2
    assert "cannot read /no/such/order.json: No such file or directory" in missing.stderr
    for mix in ("0:abc", "x:1", "10:1", "0:-1", "0:nan"):
        mixed = await asyncio.to_thread(orders, "load", "--priority-mix", mix)
        assert mixed.returncode == 2, mix
        assert "like 0:90,9:10" in mixed.stderr, mixed.stderr
    for command in ([], ["submit"], ["load"], ["queues"], ["dlq", "replay"]):
        helped = await asyncio.to_thread(orders, *command, "--help")
        assert helped.returncode == 0, command
