"""What every peer shares: where the broker and the database are, the tasks' arguments, the
task's effect, and the priority phase's record of when each task was done."""

import os
import threading
import time
from typing import Any

AMQP_URL = os.environ.get("PEERS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/orders_bench")
DATABASE_URL = os.environ.get("PEERS_DATABASE_URL", "postgresql://postgres@127.0.0.1/orders_bench")
SKUS = 100

# The same effect as an order's, reduced to its core: one stock row locked and updated, in a
# transaction committed before the message is acked (the bench's inventory rows, SKU-0..99).
EFFECT = (
    "UPDATE inventory SET available = available - 1, updated_at = clock_timestamp() WHERE sku = {}"
)


def arguments(task: str, n: int, priority: int) -> tuple[Any, ...]:
    """A task's arguments. Every peer defines ``noop(n)``, ``effect(n)`` and ``timed(n, sent,
    priority)`` (the effect, then its wait recorded); the web endpoint sends ``noop`` with the
    order as ``n``."""
    return (n, time.time(), priority) if task == "timed" else (n,)


def sku(n: int) -> str:
    return f"SKU-{n % SKUS}"


_local = threading.local()
_pool: Any = None
_waits: int | None = None


def apply_effect(n: int) -> None:
    """The effect, for the blocking workers: a connection per thread (psycopg)."""
    import psycopg  # the blocking peers' driver; the async ones use asyncpg

    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(DATABASE_URL)
    with conn.transaction():
        conn.execute(EFFECT.format("%s"), (sku(n),))


async def apply_effect_async(n: int) -> None:
    """The effect, for the async workers: one pool per process (asyncpg)."""
    import asyncpg

    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=8)
    async with _pool.acquire() as conn, conn.transaction():
        await conn.execute(EFFECT.format("$1"), sku(n))


def record(sent: float, priority: int) -> None:
    """Append ``priority sent done`` to ``PEERS_WAITS``: one write, whole, from any process."""
    global _waits
    if _waits is None:
        _waits = os.open(os.environ["PEERS_WAITS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(_waits, f"{priority} {sent} {time.time()}\n".encode())
