"""``make bench``: the system against its own raw baselines, measured in one run on this machine.

Runs the producer and consumers as local processes against BENCH_RABBITMQ_URL /
BENCH_DATABASE_URL (default: vhost and database ``orders_bench`` on the local services, the
broker on BENCH_RABBITMQ_PORT, 5672 unless set, or a local cluster's nodes on several ports
separated by commas; both are emptied), and prints one table: every
figure the median of ``--runs`` runs with min-max, the baselines, the ratios and the targets of
docs/performance.md. ``--smoke`` runs each phase once on a tiny load, no targets.
BENCH_PREFETCH, BENCH_CONCURRENCY and BENCH_ORDER_WORK_MS set the consumers' PREFETCH,
CONCURRENCY and ORDER_WORK_MS.
"""

import argparse
import asyncio
import dataclasses
import functools
import os
import platform
import pwd
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop
from yarl import URL

from bench import baselines, load
from shared import amqp, db, hosts, messages, topology
from testbed.patroni import PostgresCluster
from testbed.processes import Producer, Relay, Service, free_port
from testbed.receiver import Receiver

SKUS = 100
_CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Size:
    runs: int
    seconds: float  # each wrk run
    batch_orders: int
    backlog: int  # relay and drain
    small_backlog: int  # the drain again, for memory against backlog
    priority_backlog: int
    urgent: int
    raw: int  # messages for the raw aio-pika baselines


FULL = Size(
    runs=3,
    seconds=15,
    batch_orders=20_000,
    backlog=50_000,
    small_backlog=5_000,
    priority_backlog=10_000,
    urgent=100,
    raw=30_000,
)
SMOKE = Size(
    runs=1,
    seconds=1,
    batch_orders=1_000,
    backlog=300,
    small_backlog=100,
    priority_backlog=200,
    urgent=10,
    raw=500,
)


class Bench:
    """The services as processes, their data reset between phases, and what to measure them by."""

    def __init__(
        self,
        amqp_url: str,
        database_url: str,
        size: Size,
        consumer_env: dict[str, str],
        relay_inline: bool = False,
        kind: topology.Kind = topology.Kind.CLASSIC,
    ):
        self.amqp_url, self.database_url, self.size = amqp_url, database_url, size
        self.consumer_env, self.relay_inline = consumer_env, relay_inline
        self.topology = topology.of(kind)
        self.services: list[Service] = []
        self.relay: Relay | None = None  # the producer's relay process, when it runs apart

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "RABBITMQ_URL": self.amqp_url,
            "DATABASE_URL": self.database_url,
            "LOG_LEVEL": "WARNING",
            "ORDER_WORK_MS": "0",
            "METRICS_PORT": "0",
            "QUEUE_KIND": self.topology.kind,
            "WEBHOOK_ALLOWED_PRIVATE_HOSTS": "127.0.0.1",  # the e2e phase's receiver
            **self.consumer_env,
            **extra,
        }

    async def reset(self) -> None:
        pool = await db.create_pool(self.database_url, 2)
        try:
            await db.migrate(pool, 30)
            await pool.execute(
                "TRUNCATE reservations, outbox, orders, order_events, inventory,"
                " webhook_deliveries, webhook_endpoints"
            )
            await pool.execute(
                "INSERT INTO inventory (sku, available)"
                " SELECT 'SKU-' || g, 1000000000 FROM generate_series(0, $1 - 1) g",
                SKUS,
            )
        finally:
            await pool.close()
        async with await amqp.connect(self.amqp_url, "bench") as connection:
            channel = await connection.channel()
            for queue in topology.of(self.topology.kind.other).queues:  # the vhost is the bench's
                await channel.queue_delete(queue.name)
            await topology.declare(channel, self.topology.kind)
            for queue in self.topology.queues:
                await (await channel.get_queue(queue.name)).purge()

    async def seed_outbox(self, count: int, priority: int = 0) -> None:
        """``count`` accepted orders waiting in the outbox, as if submitted while nothing ran."""
        async with self.connection() as conn:
            await conn.execute(
                """WITH new AS (
                     INSERT INTO orders (id, customer_id, items, priority, status)
                     SELECT id, 'bench',
                            jsonb_build_array(jsonb_build_object('sku', 'SKU-' || g % $2,
                                                                 'quantity', 1)),
                            $3, 'accepted'
                     FROM unnest($1::uuid[]) WITH ORDINALITY n (id, g) RETURNING id, priority)
                   INSERT INTO outbox (order_id, priority) SELECT id, priority FROM new""",
                [messages.new_id() for _ in range(count)],  # the ids the API would make
                SKUS,
                priority,
            )

    @asynccontextmanager
    async def connection(self) -> Any:
        conn = await db.connect(self.database_url)
        try:
            yield conn
        finally:
            await conn.close()

    async def producer(self, **extra: str) -> Producer:
        """The API and, unless ``relay_inline``, its relay in a process of its own (as compose
        runs them)."""
        inline = "true" if self.relay_inline else "false"
        name = f"bench-producer-{len(self.services)}"
        producer = Producer(name, self.env(RELAY_INLINE=inline, **extra))
        self.services.append(producer)
        if not self.relay_inline:
            self.relay = Relay(f"{name}-relay", self.env(**extra))
            self.services.append(self.relay)
        await producer.wait_healthy(60)
        return producer

    def producer_pids(self, producer: Producer) -> dict[str, Callable[[], list[int]]]:
        """Watch groups: the API process and the relay process (none when inline)."""
        relay = self.relay
        return {
            "producer": lambda: [producer.pid],
            "relay": lambda: [relay.pid] if relay and relay.process.poll() is None else [],
        }

    async def consumers(self, count: int, **extra: str) -> list[Service]:
        started = [
            Service(
                "consumer",
                f"bench-consumer-{len(self.services)}-{i}",
                self.env(CONSUMER_NAME=f"c{i}", **extra),
            )
            for i in range(count)
        ]
        self.services += started
        await self.until(lambda: self.consumer_count(count), 60)
        return started

    async def consumer_count(self, n: int) -> bool:
        """Whether ``n`` consumers consume the order lane (each consumes every band)."""
        async with await amqp.connect(self.amqp_url, "bench") as connection:
            queue = await (await connection.channel()).declare_queue(
                self.topology.orders.work[-1].name, passive=True
            )
            return (queue.declaration_result.consumer_count or 0) >= n

    async def queued(self) -> int:
        """Orders ready in the order lane's work queues."""
        total = 0
        async with await amqp.connect(self.amqp_url, "bench") as connection:
            channel = await connection.channel()
            for work in self.topology.orders.work:
                queue = await channel.declare_queue(work.name, passive=True)
                total += queue.declaration_result.message_count or 0
        return total

    async def count(self, sql: str) -> int:
        async with self.connection() as conn:
            return int(await conn.fetchval(sql))

    async def until(
        self, check: Callable[[], Awaitable[object]], timeout: float, every: float = 0.05
    ) -> float:
        started = time.perf_counter()
        while not await check():
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"bench: not done within {timeout}s")
            await asyncio.sleep(every)
        return time.perf_counter() - started

    async def stop_all(self) -> None:
        for service in self.services:
            service.signal(signal.SIGTERM)
        for service in self.services:
            try:
                await service.wait(30)
            except AssertionError:
                service.kill()
        self.services.clear()
        self.relay = None


# --- what the machine is doing --------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[float, int]:
    """CPU seconds used and resident memory (bytes) of one process."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    except OSError:
        return 0.0, 0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def _pids(user: str) -> list[int]:
    """The processes of ``user`` on this machine's own root, read from /proc: no child process,
    so nothing of the watching is counted as wrk's CPU (load.wrk reads its children's usage)."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return []
    return [pid for pid, owner, root in _processes() if owner == uid and root == "/"]


@functools.cache  # read once: the watch asks ten times a second
def _root_uids(*users: str) -> frozenset[int]:
    """The ids of ``users`` in the Debian 13 root (scripts/rabbitmq4.sh), which mean other users
    out here."""
    try:
        lines = (Path(RABBITMQ4_ROOT) / "etc" / "passwd").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(
        int(fields[2]) for fields in (line.split(":") for line in lines) if fields[0] in users
    )


_DATABASE_USERS = ("postgres", "etcd")  # in the root: PostgreSQL and Patroni, etcd (make bench-ha)


def broker_pids() -> list[int]:
    """The broker's processes: the machine's own ``rabbitmq`` user's, or those running in the
    root but the database's."""
    theirs = _root_uids(*_DATABASE_USERS)
    return _pids("rabbitmq") + [
        pid for pid, owner, root in _processes() if root == RABBITMQ4_ROOT and owner not in theirs
    ]


def database_pids() -> list[int]:
    """The database's processes: the machine's own ``postgres`` user's, and a failover cluster's
    in the root (PostgreSQL, Patroni, etcd)."""
    theirs = _root_uids(*_DATABASE_USERS)
    return _pids("postgres") + [
        pid for pid, owner, root in _processes() if root == RABBITMQ4_ROOT and owner in theirs
    ]


def _processes() -> Iterator[tuple[int, int, str]]:
    """Each process: its id, its user's id and its root directory."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            owner = os.stat(f"/proc/{entry}").st_uid
            root = os.readlink(f"/proc/{entry}/root")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        yield int(entry), owner, root


class Watch:
    """Peak RSS of some processes and CPU use of the services, the broker and the database."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.peak_rss: dict[str, int] = dict.fromkeys(groups, 0)
        self.cpu: dict[str, float] = {}  # cores used, on average
        self.wall = 0.0
        self._task: asyncio.Task[None] | None = None

    def _cpu(self) -> dict[str, float]:
        return {g: sum(_proc_stat(p)[0] for p in pids()) for g, pids in self.groups.items()}

    async def _sample(self) -> None:
        while True:
            for group, pids in self.groups.items():
                rss = sum(_proc_stat(p)[1] for p in pids())
                self.peak_rss[group] = max(self.peak_rss[group], rss)
            await asyncio.sleep(0.1)

    @contextmanager
    def running(self) -> Iterator["Watch"]:
        before, started = self._cpu(), time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._sample())
        try:
            yield self
        finally:
            self._task.cancel()
            self.wall = time.perf_counter() - started
            self.cpu = {g: (c - before[g]) / self.wall for g, c in self._cpu().items()}


# --- the phases ---------------------------------------------------------------------------------


def server_args(port: int, app: str = "bench.bare_app:app") -> tuple[str, ...]:
    """uvicorn's arguments for (a), as the producer's server is run."""
    return (app, "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
            "--http", "httptools", "--no-access-log", "--log-level", "warning")  # fmt: skip


async def bare_fastapi(bench: Bench, connections: int) -> dict[str, float]:
    """Baseline (a): the same server settings as the producer, no I/O."""
    port = free_port()
    server = Service("uvicorn", "bench-bare-fastapi", bench.env(), args=server_args(port))
    watch = Watch({"server": lambda: [server.pid]})
    try:
        async with httpx.AsyncClient() as client:
            await bench.until(lambda: up(client, f"http://127.0.0.1:{port}/docs"), 30)
        with watch.running():
            url = f"http://127.0.0.1:{port}/orders"
            result = await load.wrk(url, connections, bench.size.seconds)
        return {**result, **per_order(watch, result["rate"])}
    finally:
        server.kill()


def per_order(watch: "Watch", rate: float) -> dict[str, float]:
    """CPU time per order of each watched group (``us_<group>``), at ``rate`` orders/s."""
    return {f"us_{group}": cores / max(rate, 1e-9) * 1e6 for group, cores in watch.cpu.items()}


async def up(client: httpx.AsyncClient, url: str) -> bool:
    """Whether ``url`` answers 200."""
    try:
        return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


async def submit(bench: Bench, connections: int) -> dict[str, float]:
    """(1) POST /orders, one order per request, the relay publishing as it goes."""
    await bench.reset()
    producer = await bench.producer()
    watch = Watch(
        {
            **bench.producer_pids(producer),
            "broker": broker_pids,
            "database": database_pids,
        }
    )
    try:
        with watch.running():
            result = await load.wrk(f"{producer.base_url}/orders", connections, bench.size.seconds)
        result["producer_rss_mb"] = watch.peak_rss["producer"] / 2**20
        result["relay_rss_mb"] = watch.peak_rss["relay"] / 2**20
        return {**result, **per_order(watch, result["rate"])}
    finally:
        await bench.stop_all()


async def batch_submit(bench: Bench) -> dict[str, float]:
    """(2) POST /orders/batch with 1,000 orders a request."""
    await bench.reset()
    producer = await bench.producer()
    try:
        bodies = [
            orjson.dumps(
                {
                    "orders": [
                        {
                            "customer_id": "bench",
                            "items": [{"sku": f"SKU-{n % SKUS}", "quantity": 1}],
                            "priority": n % 10,
                            "idempotency_key": f"b{b}-{n}",
                        }
                        for n in range(1_000)
                    ]
                }
            )
            for b in range(bench.size.batch_orders // 1_000)
        ]
        async with producer.client(timeout=60) as client:
            started = time.perf_counter()
            for body in bodies:
                response = await client.post(
                    "/orders/batch", content=body, headers={"content-type": "application/json"}
                )
                assert response.status_code == 202, response.text
            return {"rate": len(bodies) * 1_000 / (time.perf_counter() - started)}
    finally:
        await bench.stop_all()


async def relay(bench: Bench, backlog: int, priority: int = 0) -> dict[str, float]:
    """(3) The outbox relay: committed orders to confirmed messages. Leaves the backlog queued."""
    await bench.reset()
    await bench.seed_outbox(backlog, priority)
    await bench.producer()
    first = await bench.until(lambda: _below(bench, "SELECT count(*) FROM outbox", backlog), 60)
    took = await bench.until(lambda: _below(bench, "SELECT count(*) FROM outbox", 1), 600)
    await bench.until(lambda: _queued(bench, backlog), 60)
    await bench.stop_all()
    return {"rate": backlog / (took + 0.05), "startup_s": first}


async def _below(bench: Bench, sql: str, n: int) -> bool:
    return await bench.count(sql) < n


async def _queued(bench: Bench, n: int) -> bool:
    return await bench.queued() >= n


async def drain(
    bench: Bench, consumers: int, backlog: int, events: bool = True
) -> dict[str, float]:
    """(4) A backlog consumed with the real effect by ``consumers`` processes; without
    ``events``, with the order events' triggers off (what events cost, docs/notifications.md)."""
    if not events:
        await _event_triggers(bench, "DISABLE")
    try:
        return await _drain(bench, consumers, backlog)
    finally:
        await _event_triggers(bench, "ENABLE")


async def _event_triggers(bench: Bench, verb: str) -> None:
    async with bench.connection() as conn:
        for trigger in ("order_events_inserted", "order_events_updated"):
            await conn.execute(f"ALTER TABLE orders {verb} TRIGGER {trigger}")


async def _drain(bench: Bench, consumers: int, backlog: int) -> dict[str, float]:
    await relay(bench, backlog)
    done = "SELECT count(*) FROM orders WHERE status = 'completed'"
    watch = Watch(
        {
            "consumer": lambda: [s.pid for s in bench.services],
            "broker": broker_pids,
            "database": database_pids,
        }
    )
    with watch.running():
        await bench.consumers(consumers)
        await bench.until(lambda: _at_least(bench, done, backlog), 900, every=0.5)
    # From the first completion to the last, by the database's clock: the consumers' start-up
    # is not consuming (the raw baseline starts its clock connected, too), and the polling above
    # (a count over the orders) is kept rare so that it costs the database little.
    took = await bench.count(
        "SELECT extract(epoch FROM max(completed_at) - min(completed_at)) * 1e6 FROM orders"
    )
    await bench.stop_all()
    return {
        "rate": (backlog - 1) / (took / 1e6),
        "consumer_rss_mb": watch.peak_rss["consumer"] / 2**20 / consumers,
        **{f"cpu_{g}": c * 100 for g, c in watch.cpu.items()},
        # CPU time per order, start-up included: what an order costs, however busy the machine
        **{f"us_{g}": c * watch.wall / backlog * 1e6 for g, c in watch.cpu.items()},
    }


async def _at_least(bench: Bench, sql: str, n: int) -> bool:
    return await bench.count(sql) >= n


async def end_to_end(bench: Bench) -> dict[str, float]:
    """(5) HTTP to completed, and its webhook delivered: the sustained rate, then latency at half
    of it."""
    await bench.reset()
    producer = await bench.producer()
    workers = await bench.consumers(2)
    done = "SELECT count(*) FROM orders WHERE status = 'completed'"
    try:
        # Every order's completion is also a webhook, to a receiver in this process.
        receiver = await Receiver().start()
        async with producer.client() as client:
            endpoint = await client.post("/webhooks", json={"url": receiver.url("/hook")})
            receiver.secrets["/hook"] = endpoint.json()["secret"]
        before = await bench.count(done)
        started = time.perf_counter()
        await load.wrk(f"{producer.base_url}/orders", 16, bench.size.seconds)
        await bench.until(lambda: _settled(bench), 600)
        await bench.until(lambda: _delivered(bench), 600)
        sustained = (await bench.count(done) - before) / (time.perf_counter() - started)

        rate = sustained / 2
        bodies = [
            orjson.dumps(
                {
                    "customer_id": "e2e",
                    "priority": 0,
                    "items": [{"sku": f"SKU-{n % SKUS}", "quantity": 1}],
                }
            )
            for n in range(int(rate * bench.size.seconds))
        ]
        url = URL(producer.base_url)
        completed_read: dict[str, float] = {}
        opened = asyncio.Event()
        reading = asyncio.create_task(_read_completions(producer, completed_read, opened))
        await asyncio.wait_for(opened.wait(), 30)
        await asyncio.sleep(0.5)  # the stream subscribes as its response starts: let it
        watch = Watch(
            {
                **bench.producer_pids(producer),
                "consumers": lambda: [s.pid for s in workers],
                "broker": broker_pids,
                "database": database_pids,
                # this process: the paced load, the stream's reader, the webhook receiver
                "client": lambda: [os.getpid()],
            }
        )
        with watch.running():
            await load.paced(url.host or "127.0.0.1", url.port or 80, bodies, rate)
            await bench.until(lambda: _settled(bench), 120)
            await bench.until(lambda: _all_read(bench, completed_read), 30)
            await bench.until(lambda: _all_read(bench, receiver.arrived), 60)
        reading.cancel()
        await receiver.stop()
        async with bench.connection() as conn:
            rows = await conn.fetch(
                "SELECT id::text, extract(epoch FROM completed_at) AS done,"
                " extract(epoch FROM completed_at - created_at) * 1000 AS wait"
                " FROM orders WHERE customer_id = 'e2e' AND status = 'completed'"
            )
        waits = [r["wait"] for r in rows]
        # From the final status's write (completed_at, by the database's clock: this machine's)
        # to the event read from the key's stream (GET /events) by this process.
        told = [(completed_read[r["id"]] - float(r["done"])) * 1000 for r in rows]
        sent = [(receiver.arrived[r["id"]] - float(r["done"])) * 1000 for r in rows]
        return {
            "rate": sustained,
            "half_rate": rate,
            **percentiles(waits),
            **{f"sse_{k}": v for k, v in percentiles(told).items()},
            **{f"webhook_{k}": v for k, v in percentiles(sent).items()},
            # CPU time per order at half load, by process group
            **{f"us_{g}": c * watch.wall / max(len(bodies), 1) * 1e6 for g, c in watch.cpu.items()},
        }
    finally:
        await bench.stop_all()


async def _read_completions(
    producer: Producer, read: dict[str, float], opened: asyncio.Event
) -> None:
    """Each ``completed`` event of the key's stream: when it was read, by its order id. As a
    client should, it resumes after the last event read when the stream ends (the server ends a
    stream that falls 1,000 events behind)."""
    last: dict[str, str] = {}
    async with producer.client(timeout=None) as client:
        while True:
            async with client.stream("GET", "/events", headers=last) as stream:
                opened.set()
                kind = ""
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("id: "):
                        last = {"Last-Event-ID": line[4:]}
                    elif line.startswith("data: ") and kind == "completed":
                        read[orjson.loads(line[6:])["order_id"]] = time.time()


async def _all_read(bench: Bench, read: dict[str, float]) -> bool:
    """Whether every completed e2e order is in ``read``."""
    async with bench.connection() as conn:
        done = await conn.fetch(
            "SELECT id::text FROM orders WHERE customer_id = 'e2e' AND status = 'completed'"
        )
    return all(r["id"] in read for r in done)


async def _delivered(bench: Bench) -> bool:
    pending = "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
    return await bench.count(pending) == 0


async def _settled(bench: Bench) -> bool:
    return (
        await bench.count(f"SELECT count(*) FROM orders WHERE status NOT IN ({db.FINAL_SQL})") == 0
    )


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(float(v) for v in values)
    if not ordered:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99)}


async def priority(bench: Bench) -> dict[str, float]:
    """(6) Urgent orders posted into a backlog of normal ones: how long each waits."""
    await relay(bench, bench.size.priority_backlog, priority=0)
    producer = await bench.producer()
    consumers_started = time.time()
    # The documented defaults: priority only reorders what is still queued, and a throughput
    # prefetch would put 64 normal orders ahead of every urgent one in each consumer.
    await bench.consumers(2, PREFETCH="4", CONCURRENCY="4")
    bodies = [
        orjson.dumps(
            {"customer_id": "urgent", "priority": 9, "items": [{"sku": "SKU-1", "quantity": 1}]}
        )
        for _ in range(bench.size.urgent)
    ]
    url = URL(producer.base_url)
    await load.paced(url.host or "127.0.0.1", url.port or 80, bodies, 50)
    await bench.until(lambda: _settled(bench), 600)
    async with bench.connection() as conn:
        rows = await conn.fetch(
            """SELECT priority, extract(epoch FROM completed_at
                 - greatest(created_at, to_timestamp($1))) * 1000 AS wait
               FROM orders""",
            consumers_started,
        )
    await bench.stop_all()
    urgent = percentiles([r["wait"] for r in rows if r["priority"] == 9])
    normal = percentiles([r["wait"] for r in rows if r["priority"] == 0])
    return {
        "p9_p50_ms": urgent["p50_ms"],
        "p9_p99_ms": urgent["p99_ms"],
        "p0_p50_ms": normal["p50_ms"],
        "p0_p99_ms": normal["p99_ms"],
    }


# --- the table ------------------------------------------------------------------------------


def _median(runs: list[dict[str, float]], key: str) -> tuple[float, float, float]:
    values = [r[key] for r in runs]
    return statistics.median(values), min(values), max(values)


def _fmt(stat: tuple[float, float, float], unit: str = "") -> str:
    med, lo, hi = stat
    digits = 0 if med >= 100 else 1
    return f"{med:,.{digits}f}{unit} ({lo:,.{digits}f}–{hi:,.{digits}f})"


async def measure(bench: Bench, runs: int, only: set[str] | None = None) -> list[str]:
    """Every phase (or those in ``only``) ``runs`` times, interleaved so drift hits all alike."""
    s = bench.size
    phases: dict[str, Callable[[], Awaitable[dict[str, float]]]] = {
        "bare16": lambda: bare_fastapi(bench, 16),
        "bare64": lambda: bare_fastapi(bench, 64),
        "submit16": lambda: submit(bench, 16),
        "submit64": lambda: submit(bench, 64),
        "batch": lambda: batch_submit(bench),
        "raw_publish": lambda: _rate(baselines.publish(bench.amqp_url, s.raw)),
        "raw_consume": lambda: _rate(baselines.consume(bench.amqp_url, s.raw)),
        "relay": lambda: relay(bench, s.backlog),
        "drain1": lambda: drain(bench, 1, s.backlog),
        "drain2": lambda: drain(bench, 2, s.backlog),
        "drain1_small": lambda: drain(bench, 1, s.small_backlog),
        "drain1_no_events": lambda: drain(bench, 1, s.backlog, events=False),
        "e2e": lambda: end_to_end(bench),
        "priority": lambda: priority(bench),
    }
    if only:
        phases = {name: phase for name, phase in phases.items() if name in only}
    results: dict[str, list[dict[str, float]]] = {k: [] for k in phases}
    for run in range(runs):
        for name, phase in phases.items():
            print(f"bench: run {run + 1}/{runs} {name}", file=sys.stderr, flush=True)
            try:
                results[name].append(await phase())
            finally:  # a phase that fails leaves no service behind to take the next one's rows
                await bench.stop_all()
    if only:  # no table without every phase: each figure as measured, and the ratios it has
        lines = [
            f"{name} {key}: {_fmt(_median(rs, key))}"
            for name, rs in results.items()
            for key in rs[0]
        ]
        if {"drain1", "drain1_small"} <= results.keys():
            big, small = (
                _median(results[n], "consumer_rss_mb")[0] for n in ("drain1", "drain1_small")
            )
            lines.append(f"consumer peak RSS, large ÷ small backlog: {big / small:.2f}x (≤ 1.1x)")
        if {"drain1", "drain1_no_events"} <= results.keys():
            groups = ("consumer", "broker", "database")
            with_events, without = (
                _cpu_per_order(results[n], groups)[0] for n in ("drain1", "drain1_no_events")
            )
            lines.append(
                f"drain CPU per order, with events ÷ without: {with_events / without:.1%} (≤ 115%)"
            )
        if "priority" in results:
            p9, p0 = (_median(results["priority"], f"p{n}_p99_ms")[0] for n in (9, 0))
            lines.append(f"priority 9 p99 ÷ priority 0 p99: {p9 / p0:.2%} (≤ 5%)")
        return lines
    return _table(results, smoke=runs == 1 and s is SMOKE)


async def _rate(measured: Awaitable[float]) -> dict[str, float]:
    return {"rate": await measured}


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return ""
    return f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.1%}" if ratio < 0.1 else f"{ratio:.0%}"


def _table(r: dict[str, list[dict[str, float]]], smoke: bool) -> list[str]:
    lines = [
        "| figure | measured: median (min–max) | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]

    def m(name: str, key: str = "rate") -> tuple[float, float, float]:
        return _median(r[name], key)

    def add(
        figure: str,
        ours: tuple[float, float, float],
        unit: str = "",
        base: str = "",
        ratio: float | None = None,
        target: str = "",
        met: bool | None = None,
    ) -> None:
        shown = _ratio(ratio)
        verdict = "" if smoke or met is None else ("yes" if met else "**no**")
        lines.append(f"| {figure} | {_fmt(ours, unit)} | {base} | {shown} | {target} | {verdict} |")

    def against(figure: str, ours: str, base: str, label: str, need: float) -> None:
        o, b = m(ours), m(base)
        target = f"≥ {need:.0%} of {label}" if need < 1 else f"≥ {need}x"
        add(figure, o, "", f"{_fmt(b)} {label}", o[0] / b[0], target, o[0] >= need * b[0])

    for c in (16, 64):
        against(f"submit, c={c}: accepted orders/s", f"submit{c}", f"bare{c}", "(a)", 0.7)
        add(
            f"submit, c={c}: latency p50 / p99",
            m(f"submit{c}", "p50_ms"),
            " ms",
            f"p99 {_fmt(m(f'submit{c}', 'p99_ms'), ' ms')}",
        )
    # What bounds submit: CPU per order of every process, and what two cores allow at that cost.
    submit_groups = ("producer", "relay", "broker", "database", "wrk")
    for group in submit_groups:
        add(f"CPU per order, submit c=16: {group}", m("submit16", f"us_{group}"), " µs")
    add(
        "CPU per request, bare app (a) c=16: server / wrk",
        m("bare16", "us_server"),
        " µs",
        f"wrk: {_fmt(m('bare16', 'us_wrk'), ' µs')}",
    )
    add(
        f"submit c=16: the ceiling of {_CORES} cores at that CPU per order",
        _ceiling(r["submit16"], submit_groups),
        " orders/s",
        f"70% of (a): {0.7 * m('bare16')[0]:,.0f}",
    )
    against("batch submit, 1,000 per request: orders/s", "batch", "raw_publish", "(b)", 0.9)
    against("relay publish, committed → confirmed: orders/s", "relay", "raw_publish", "(b)", 0.9)
    against("drain, 1 consumer: orders/s", "drain1", "raw_consume", "(c)", 0.7)
    against("drain, 2 consumers: orders/s", "drain2", "drain1", "drain, 1 consumer", 1.3)
    for group in ("consumer", "broker", "database"):
        add(f"CPU during the 2-consumer drain: {group}", m("drain2", f"cpu_{group}"), "% of a core")
    drain_groups = ("consumer", "broker", "database")
    for group in drain_groups:
        add(f"CPU per order, 1-consumer drain: {group}", m("drain1", f"us_{group}"), " µs")
    add(
        f"drain: the ceiling of {_CORES} cores at that CPU per order",
        _ceiling(r["drain1"], drain_groups),
        " orders/s",
        f"70% of (c): {0.7 * m('raw_consume')[0]:,.0f}",
    )
    with_events, without = (
        _cpu_per_order(r[name], drain_groups) for name in ("drain1", "drain1_no_events")
    )
    add(
        "CPU per order, 1-consumer drain, all processes: with order events",
        with_events,
        " µs",
        f"without: {_fmt(without, ' µs')}",
        with_events[0] / without[0] - 1,
        "events add ≤ 15%",
        with_events[0] <= 1.15 * without[0],
    )
    add("end to end, HTTP → completed, its webhook delivered: orders/s sustained", m("e2e"))
    half = _median(r["e2e"], "half_rate")[0]
    add(f"end to end at half load ({half:.0f}/s): p50", m("e2e", "p50_ms"), " ms")
    p99 = m("e2e", "p99_ms")
    add("end to end at half load: p99", p99, " ms", target="≤ 50 ms", met=p99[0] <= 50)
    add(
        "at half load, final status written → its event read from GET /events: p50",
        m("e2e", "sse_p50_ms"),
        " ms",
        f"p99 {_fmt(m('e2e', 'sse_p99_ms'), ' ms')}",
    )
    add(
        "at half load, final status written → its webhook received, verified: p50",
        m("e2e", "webhook_p50_ms"),
        " ms",
        f"p99 {_fmt(m('e2e', 'webhook_p99_ms'), ' ms')}",
    )
    for group in ("producer", "relay", "consumers", "broker", "database", "client"):
        add(f"CPU per order at half load: {group}", m("e2e", f"us_{group}"), " µs")
    p9, p0 = m("priority", "p9_p99_ms"), m("priority", "p0_p99_ms")
    add(
        "priority 9 wait in a backlog (2 consumers, PREFETCH=4): p50",
        m("priority", "p9_p50_ms"),
        " ms",
        f"priority 0: {_fmt(m('priority', 'p0_p50_ms'), ' ms')}",
    )
    add(
        "priority 9 wait in a backlog: p99",
        p9,
        " ms",
        f"priority 0: {_fmt(p0, ' ms')}",
        p9[0] / p0[0],
        "≤ 5% of priority 0",
        p9[0] <= 0.05 * p0[0],
    )
    big, small = m("drain1", "consumer_rss_mb"), m("drain1_small", "consumer_rss_mb")
    add(
        "consumer peak RSS, large backlog",
        big,
        " MB",
        f"small backlog: {_fmt(small, ' MB')}",
        big[0] / small[0],
        "same (≤ 1.1x)",
        big[0] <= 1.1 * small[0],
    )
    for process in ("producer", "relay"):
        add(
            f"{process} peak RSS under submit, c=64",
            m("submit64", f"{process}_rss_mb"),
            " MB",
            f"c=16: {_fmt(m('submit16', f'{process}_rss_mb'), ' MB')}",
            target="bounded",
        )
    return lines


def _cpu_per_order(
    runs: list[dict[str, float]], groups: tuple[str, ...]
) -> tuple[float, float, float]:
    """The CPU time per order of ``groups`` together: median (min, max) over the runs."""
    totals = sorted(sum(run[f"us_{g}"] for g in groups) for run in runs)
    return statistics.median(totals), totals[0], totals[-1]


def _ceiling(runs: list[dict[str, float]], groups: tuple[str, ...]) -> tuple[float, float, float]:
    """Orders/s the machine's cores could carry, each run, were they all spent at its CPU per
    order."""
    ceilings = [_CORES * 1e6 / sum(run[f"us_{g}"] for g in groups) for run in runs]
    return statistics.median(ceilings), min(ceilings), max(ceilings)


# What manages the broker behind RABBITMQ_URL (scripts/rabbitmq4.sh's nodes need their own).
RABBITMQCTL = shlex.split(os.environ.get("RABBITMQCTL", "rabbitmqctl"))
RABBITMQ4_ROOT = os.environ.get("RABBITMQ4_ROOT", "/var/cache/orders/trixie")


def _versions() -> str:
    rabbit = (
        subprocess.run(
            [*RABBITMQCTL, "-q", "version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or "?"
    )
    pg = subprocess.run(
        ["psql", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()[2:3] or ["?"]
    return (
        f"{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()};"
        f" Python {platform.python_version()}, RabbitMQ {rabbit}, PostgreSQL {pg[0]}"
    )


def prepare(amqp_url: str, database_url: str) -> None:
    """Create the benchmark's vhost and database when they are local and missing."""
    first = URL(hosts.each(amqp_url)[0])  # a cluster's nodes share the vhost and the user
    vhost = first.path.lstrip("/")
    if vhost and shutil.which(RABBITMQCTL[0]):
        subprocess.run([*RABBITMQCTL, "-q", "add_vhost", vhost], capture_output=True, check=False)
        subprocess.run(
            [
                *RABBITMQCTL,
                "-q",
                "set_permissions",
                "-p",
                vhost,
                first.user or "guest",
                ".*",
                ".*",
                ".*",
            ],
            capture_output=True,
            check=False,
        )

    async def create() -> None:
        server, name = database_url.split("?")[0].rsplit("/", 1)  # its hosts may be several
        admin = await db.connect(f"{server}/postgres")
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()

    uvloop.run(create())


async def round_sizes(amqp_url: str) -> list[str]:
    """RabbitMQ's CPU per confirmed message by the size of a publisher's rounds (the relay's
    rounds grow with the orders committed while one waits for its confirms)."""
    lines = ["| round | messages/s | broker CPU per message |", "|---|---|---|"]
    for size in (1, 4, 16, 64, 256):
        watch = Watch({"broker": broker_pids})
        with watch.running():
            rate = await baselines.publish_rounds(amqp_url, size, 1_024 if size < 16 else 8_192)
        lines.append(f"| {size} | {rate:,.0f} | {watch.cpu['broker'] / rate * 1e6:,.0f} µs |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny load, one run, no targets")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", help="comma-separated phases to run (bare16, drain1, ...)")
    parser.add_argument("--backlog", type=int, help="orders for the relay and the drains")
    parser.add_argument(
        "--rounds", action="store_true", help="only the broker's CPU per message by round size"
    )
    parser.add_argument(
        "--relay-inline",
        action="store_true",
        help="the relay in the API's process (RELAY_INLINE=true), not in its own",
    )
    parser.add_argument(
        "--kind",
        choices=[*(k.value for k in topology.Kind), "both"],
        default="classic",
        help="QUEUE_KIND of the run (both: a table for each, one after the other); the vhost is"
        " emptied of the other kind's queues",
    )
    parser.add_argument(
        "--database",
        choices=list(_DATABASES),
        default="server",
        help="alone: one PostgreSQL 17 under Patroni on a host of its own; failover: a primary"
        " with a synchronous standby and a second standby; both started for the run"
        " (testbed/patroni.py) instead of BENCH_DATABASE_URL's server",
    )
    args = parser.parse_args()
    if args.database != "server":
        cluster = PostgresCluster(size=1 if args.database == "alone" else 3)
        asyncio.run(cluster.start())
        try:
            os.environ["BENCH_DATABASE_URL"] = cluster.url("orders_bench")
            return _run(args)
        finally:
            asyncio.run(cluster.stop())
    return _run(args)


_DATABASES = {
    "server": "BENCH_DATABASE_URL's server",
    "alone": "one PostgreSQL 17 under Patroni, no standby",
    "failover": "a PostgreSQL 17 primary with a synchronous standby and a second (Patroni)",
}


def consumers_env() -> dict[str, str]:
    """The consumers' settings in the throughput phases, from BENCH_PREFETCH, BENCH_CONCURRENCY
    and BENCH_ORDER_WORK_MS."""
    return {
        "PREFETCH": os.environ.get("BENCH_PREFETCH", "512"),
        "CONCURRENCY": os.environ.get("BENCH_CONCURRENCY", "128"),
        "ORDER_WORK_MS": os.environ.get("BENCH_ORDER_WORK_MS", "0"),
    }


def _run(args: argparse.Namespace) -> int:
    # The local broker's port, or a local cluster's ports separated by commas.
    ports = os.environ.get("BENCH_RABBITMQ_PORT", "5672").split(",")
    nodes = ",".join(f"127.0.0.1:{port}" for port in ports)
    amqp_url = os.environ.get("BENCH_RABBITMQ_URL", f"amqp://guest:guest@{nodes}/orders_bench")
    database_url = os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/orders_bench"
    )
    consumer_env = consumers_env()
    prepare(amqp_url, database_url)
    if args.rounds:
        print("\n".join(uvloop.run(round_sizes(amqp_url))))
        return 0
    size = SMOKE if args.smoke else FULL
    if args.backlog:
        size = dataclasses.replace(size, backlog=args.backlog)
    only = set(args.only.split(",")) if args.only else None
    kinds = list(topology.Kind) if args.kind == "both" else [topology.Kind(args.kind)]
    where = "in the API process" if args.relay_inline else "in a process of its own"
    for kind in kinds:
        bench = Bench(amqp_url, database_url, size, consumer_env, args.relay_inline, kind)
        started = time.perf_counter()
        lines = uvloop.run(measure(bench, 1 if args.smoke else args.runs, only))
        print(
            f"\n{'smoke' if args.smoke else 'full'} run, {_versions()};"
            f" {kind} queues; consumers with PREFETCH={consumer_env['PREFETCH']}"
            f" CONCURRENCY={consumer_env['CONCURRENCY']},"
            f" ORDER_WORK_MS={consumer_env['ORDER_WORK_MS']};"
            f" the relay {where};"
            f" the database {_DATABASES[args.database]};"
            f" took {time.perf_counter() - started:.0f} s\n"
        )
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
