"""Jepsen-style fault injection: real processes under steady HTTP load, one fault at a time.

Every request is recorded as ok (202), failed (4xx) or in doubt (timeout, 5xx, connection error);
in-doubt requests are retried with the same Idempotency-Key. After the load and a drain, the
checker counts lost (ok but not completed), duplicated (stock arithmetic does not add up),
stuck (not final) and unexpected (an order nobody asked for) orders, and untold ones: an order
whose events do not end in its status, or an event of an order that is not there, or a final
status that the stack's webhook receiver (on 127.0.0.1, registered for the final events) did not
receive, verified, with the order's status.
"""

import asyncio
import contextlib
import itertools
import math
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import httpx

from shared import amqp, db, setup, topology
from shared.settings import SetupSettings
from testbed.patroni import PostgresCluster
from testbed.processes import API_KEY, AUTH, Producer, Relay, Service, free_port
from testbed.receiver import Receiver
from tests.faults.nodes import PostgresNode, RabbitCluster, RabbitNode
from tests.integration.proxy import Proxy

SKU = "FAULT-1"
STOCK = 10_000_000


@dataclass(frozen=True)
class Timing:
    """How long each phase lasts; the short form keeps every scenario but shrinks the waits."""

    rate: float  # orders per second
    warmup: float
    cooldown: float  # load after the fault has ended, however long the fault took
    outage: float  # pause, alarm, network cut
    churn: float  # how long consumers are killed for
    drain: float = 60.0


SHORT = Timing(rate=25, warmup=2, cooldown=3, outage=8, churn=8)
FULL = Timing(rate=50, warmup=5, cooldown=5, outage=20, churn=20)
NETWORK_CUT_FULL = 30.0


@dataclass
class Request:
    key: str
    quantity: int
    outcome: str = "in doubt"  # ok | failed | in doubt
    order_id: str | None = None
    tries: int = 0


CONNECTIONS = 64  # the load's HTTP connections, each with one request at a time


@dataclass
class Load:
    """Steady HTTP load at ``rate`` orders/s until ``stop_in`` is called and its time is up."""

    base_url: str
    rate: float
    history: list[Request] = field(default_factory=list)
    in_doubt_events: int = 0
    unavailable: int = 0  # 503 answers (with Retry-After)
    end: float = math.inf  # monotonic time the last order is sent by
    _connections: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONNECTIONS))

    def stop_in(self, seconds: float) -> None:
        """Keep sending for ``seconds`` more: a fault that ran long still has load after it."""
        self.end = time.monotonic() + seconds

    async def run(self) -> None:
        started = time.monotonic()
        limits = httpx.Limits(max_connections=CONNECTIONS)
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=AUTH, timeout=5, limits=limits
        ) as client:
            tasks = []
            for i in itertools.count():
                await asyncio.sleep(max(0.0, started + i / self.rate - time.monotonic()))
                if time.monotonic() >= self.end:
                    break
                request = Request(key=f"fault-{uuid.uuid4()}", quantity=random.randint(1, 3))
                self.history.append(request)
                give_up = time.monotonic() + 90
                tasks.append(asyncio.create_task(self._send(client, request, give_up)))
            await asyncio.gather(*tasks)

    async def _send(self, client: httpx.AsyncClient, request: Request, give_up: float) -> None:
        body = {
            "customer_id": "fault",
            "items": [{"sku": SKU, "quantity": request.quantity}],
            "priority": random.randint(0, 9),
        }
        while time.monotonic() < give_up:
            request.tries += 1
            # as a client should: a timeout is retried later each time (0.5 s doubling to 8 s),
            # or thousands of retries of a stalled API would load this process, not the API
            wait = min(0.5 * 2 ** (request.tries - 1), 8.0)
            try:
                async with self._connections:  # httpx's pool grows slow with many waiting on it
                    response = await client.post(
                        "/orders", json=body, headers={"Idempotency-Key": request.key}
                    )
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 202:
                request.outcome, request.order_id = "ok", response.json()["id"]
                return
            if response is not None and 400 <= response.status_code < 500:
                request.outcome = "failed"
                return
            self.in_doubt_events += 1
            if response is not None and response.status_code == 503:
                self.unavailable += 1
                wait = float(response.headers.get("retry-after", "1"))
            await asyncio.sleep(wait)


class Stack:
    """Producer and consumers as processes; a broker node is reached through a cuttable proxy, a
    cluster at every node's own address. ``relay_apart``: the producer's relay runs as
    ``python -m producer relay``, as in compose."""

    def __init__(
        self,
        name: str,
        broker: RabbitNode | RabbitCluster,
        database: PostgresNode | PostgresCluster,
        consumers: int,
        relay_apart: bool = False,
        kind: topology.Kind = topology.Kind.CLASSIC,
    ) -> None:
        self.name, self.broker, self.database = name, broker, database
        self.topology = topology.of(kind)
        self.consumed = self.topology.orders.work[0].name  # in a consumer's ``consuming`` event
        self.vhost, self.dbname = f"fault-{name}", f"fault_{name.replace('-', '_')}"
        self.proxy = Proxy("127.0.0.1", broker.port) if isinstance(broker, RabbitNode) else None
        self.consumers: list[Service] = []
        self.count = consumers
        self.generation = itertools.count(1)
        self.port = free_port()
        self.starts = 0
        self.producer: Producer | None = None
        self.relay_apart = relay_apart
        self.relay: Relay | None = None
        self.retired: list[Service] = []
        self.elections = 0  # work queues whose leader a fault moved to another node
        self.receiver = Receiver()  # the stack's webhook endpoint

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "RABBITMQ_URL": (
                self.broker.url(self.vhost, self.proxy.port)
                if self.proxy
                else self.broker.url(self.vhost)
            ),
            "DATABASE_URL": self.database.url(self.dbname),
            "API_KEYS": f"faults:{API_KEY}",
            "RATE_LIMIT_PER_SECOND": "0",
            "ORDER_WORK_MS": "200",  # long enough that a kill catches orders in flight
            "PREFETCH": "4",
            "CONCURRENCY": "4",
            "MAX_ATTEMPTS": "60",
            "RETRY_BASE_MS": "200",
            "RETRY_CAP_MS": "5000",
            "PUBLISH_TIMEOUT": "5",
            "RELAY_INTERVAL": "0.5",
            "STARTUP_TIMEOUT": "120",
            "SHUTDOWN_GRACE": "10",
            "METRICS_PORT": "0",
            "RELAY_INLINE": "false" if self.relay_apart else "true",
            "QUEUE_KIND": self.topology.kind,
            "WEBHOOK_ALLOWED_PRIVATE_HOSTS": "127.0.0.1",
            "WEBHOOK_RETRY_BASE_MS": "200",
            "WEBHOOK_RETRY_CAP_MS": "5000",
            "WEBHOOK_MAX_ATTEMPTS": "60",
        }

    async def start(self) -> None:
        await self.broker.add_vhost(self.vhost)
        admin = await db.connect(self.database.url())
        await admin.execute(f'CREATE DATABASE "{self.dbname}"')
        await admin.close()
        env = self.env()
        await setup.run(
            SetupSettings(
                rabbitmq_url=env["RABBITMQ_URL"],
                database_url=env["DATABASE_URL"],
                queue_kind=self.topology.kind,
            )
        )
        if self.proxy:
            await self.proxy.start()
        await self.start_producer()
        if self.relay_apart:
            await self.start_relay()
        for i in range(self.count):
            self.consumers.append(self._consumer(i))
        for consumer in self.consumers:
            await consumer.wait_for_event("consuming", queues=self.consumed)
        await self.receiver.start()
        async with httpx.AsyncClient(base_url=self.base_url, headers=AUTH) as client:
            await _until(lambda: _ready(client), 60)
            await client.put(f"/inventory/{SKU}", json={"available": STOCK})
            endpoint = await client.post("/webhooks", json={"url": self.receiver.url("/hook")})
            assert endpoint.status_code == 201, endpoint.text
            self.receiver.secrets["/hook"] = endpoint.json()["secret"]

    def _consumer(self, i: int) -> Service:
        self.starts += 1
        name = f"fault-{self.name}-consumer{i}-{next(self.generation)}"
        return Service("consumer", name, {**self.env(), "CONSUMER_NAME": f"consumer{i}"})

    async def start_producer(self) -> None:
        self.starts += 1
        name = f"fault-{self.name}-producer-{next(self.generation)}"
        self.producer = Producer(name, self.env(), port=self.port)
        await self.producer.wait_healthy(60)

    async def start_relay(self) -> None:
        self.starts += 1
        self.relay = Relay(f"fault-{self.name}-relay-{next(self.generation)}", self.env())
        await self.relay.wait_for_event("relay_connected", 60)

    async def kill_relay(self) -> None:
        assert self.relay is not None
        self.relay.kill()
        self.retired.append(self.relay)
        self.relay = None

    async def restart_consumer(self, i: int, sig: signal.Signals) -> int:
        """Stop consumer ``i`` with ``sig``, start a new one; the old one's exit status."""
        old = self.consumers[i]
        old.signal(sig)
        code = await old.wait(60)
        self.retired.append(old)
        self.consumers[i] = self._consumer(i)
        await self.consumers[i].wait_for_event("consuming", 120, queues=self.consumed)
        return code

    async def kill_producer(self) -> None:
        assert self.producer is not None
        self.producer.kill()
        self.retired.append(self.producer)

    def services(self) -> list[Service]:
        running = [s for s in (self.producer, self.relay) if s is not None]
        return [*self.retired, *self.consumers, *running]

    def reconnects(self) -> int:
        """Broker sessions opened beyond each process's first."""
        return sum(
            max(len(s.events("relay_connected", "consuming")) - 1, 0) for s in self.services()
        )

    async def stop(self) -> None:
        for service in self.services():
            service.signal(signal.SIGTERM)
        for service in self.services():
            with contextlib.suppress(AssertionError):
                await service.wait(20)
            service.kill()
        if self.proxy:
            await self.proxy.close()
        await self.receiver.stop()
        # Its queues gone: a later scenario's node restarts recover only its own.
        with contextlib.suppress(RuntimeError):
            await self.broker.ctl("delete_vhost", self.vhost)


async def _ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


async def _until(check: Callable[[], Awaitable[object]], timeout: float) -> float:
    """Seconds until ``check`` is truthy; raises after ``timeout``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not true within {timeout}s")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


# The faults. Each gets the stack and the timing, and returns when the fault is healed.
Fault = Callable[[Stack, Timing], Awaitable[None]]


async def consumers_killed(stack: Stack, t: Timing) -> None:
    end = time.monotonic() + t.churn
    while time.monotonic() < end:
        await stack.restart_consumer(random.randrange(stack.count), signal.SIGKILL)
        await asyncio.sleep(2)


async def rolling_redeploy(stack: Stack, t: Timing) -> None:
    for i in range(stack.count):
        code = await stack.restart_consumer(i, signal.SIGTERM)
        assert code == 0, f"consumer {i} did not stop cleanly: {code}"
        await asyncio.sleep(1)


async def producer_killed(stack: Stack, t: Timing) -> None:
    await _killed_twice(stack.kill_producer, stack.start_producer, t)


async def relay_killed(stack: Stack, t: Timing) -> None:
    await _killed_twice(stack.kill_relay, stack.start_relay, t)


async def _killed_twice(
    kill: Callable[[], Awaitable[None]], start: Callable[[], Awaitable[None]], t: Timing
) -> None:
    for _ in range(2):
        await kill()
        await asyncio.sleep(1)
        await start()
        await asyncio.sleep(t.churn / 4)


async def broker_restarted(stack: Stack, t: Timing) -> None:
    await stack.broker.ctl("stop_app")
    await asyncio.sleep(3)
    await stack.broker.ctl("start_app")


async def broker_killed(stack: Stack, t: Timing) -> None:
    await stack.broker.kill()
    await stack.broker.restart_after_kill()


async def connections_closed(stack: Stack, t: Timing) -> None:
    for _ in range(3):
        await stack.broker.ctl("close_all_connections", "-p", stack.vhost, "fault injection")
        await asyncio.sleep(3)


async def broker_paused(stack: Stack, t: Timing) -> None:
    stack.broker.pause()
    try:
        await asyncio.sleep(t.outage)
    finally:
        stack.broker.resume()


async def _alarm(stack: Stack, t: Timing, setting: str, raised: str, normal: str) -> None:
    await stack.broker.ctl(setting, raised)
    try:
        await asyncio.sleep(t.outage)
    finally:
        await stack.broker.ctl(setting, normal)


async def memory_alarm(stack: Stack, t: Timing) -> None:
    await _alarm(stack, t, "set_vm_memory_high_watermark", "0", "0.4")


async def disk_alarm(stack: Stack, t: Timing) -> None:
    await _alarm(stack, t, "set_disk_free_limit", "10000GB", "50MB")


async def postgres_killed(stack: Stack, t: Timing) -> None:
    await stack.database.kill()
    await asyncio.sleep(2)
    await stack.database.start()


async def network_cut(stack: Stack, t: Timing) -> None:
    assert stack.proxy is not None
    await stack.proxy.cut()
    try:
        await asyncio.sleep(NETWORK_CUT_FULL if t is FULL else t.outage)
    finally:
        await stack.proxy.restore()


# On a three-node cluster (quorum queues, a replica on each node).
def _cluster(stack: Stack) -> RabbitCluster:
    assert isinstance(stack.broker, RabbitCluster)
    return stack.broker


async def work_leader_killed(stack: Stack, t: Timing) -> None:
    """SIGKILL the node that leads the most work queues, and wait for their new leaders."""
    cluster = _cluster(stack)
    work = {queue.name for queue in stack.topology.orders.work}
    leaders = {q: n for q, n in (await cluster.leaders(stack.vhost)).items() if q in work}
    name = max(set(leaders.values()), key=list(leaders.values()).count)
    led = [queue for queue, leader in leaders.items() if leader == name]
    node = cluster.node(name)
    await node.kill()

    async def elected() -> bool:
        now = await cluster.leaders(stack.vhost)
        return all(now.get(queue, name) != name for queue in led)

    await _until(elected, 60)
    stack.elections += len(led)
    await asyncio.sleep(t.outage / 2)  # the cluster serves on two nodes meanwhile
    await node.restart_after_kill()


async def connected_node_killed(stack: Stack, t: Timing) -> None:
    """SIGKILL the node the relay publishes through; it must move to another."""
    cluster = _cluster(stack)
    node = await cluster.node_of("producer")
    await node.kill()
    await asyncio.sleep(t.outage / 2)
    await node.restart_after_kill()


async def node_partitioned(stack: Stack, t: Timing) -> None:
    """Cut the node the relay publishes through off from the other two and from every client
    (its host's link down) until the other two count it out, the work queues it led have new
    leaders and the relay has moved, a while longer; then heal it. Meanwhile it paused
    (pause_minority); healed, it rejoins."""
    cluster, producer = _cluster(stack), stack.producer
    assert producer is not None
    node = await cluster.node_of("producer")
    assert node.host is not None
    witness = next(other for other in cluster.nodes if other is not node)
    work = {queue.name for queue in stack.topology.orders.work}
    led = [
        q for q, n in (await cluster.leaders(stack.vhost)).items() if q in work and n == node.name
    ]
    sessions = len(producer.events("relay_connected"))

    async def counted_out() -> bool:
        return node.name not in await cluster.running(witness)

    async def elected() -> bool:
        now = await cluster.leaders(stack.vhost, witness)
        return all(now.get(queue, node.name) != node.name for queue in led)

    async def moved() -> bool:
        return len(producer.events("relay_connected")) > sessions

    async def rejoined() -> bool:
        return len(await cluster.running(witness)) == len(cluster.nodes)

    await node.host.cut()
    try:
        for condition in (counted_out, elected, moved):
            await _until(condition, 90)
        stack.elections += len(led)
        await asyncio.sleep(t.outage / 2)  # the majority serves meanwhile
    finally:
        await node.host.heal()
    await _until(rejoined, 120)


async def rolling_restart(stack: Stack, t: Timing) -> None:
    """Each node stopped cleanly and started again in turn, as an upgrade does."""
    for node in _cluster(stack).nodes:
        await node.restart()
        await asyncio.sleep(t.churn / 4)


# On a primary, a synchronous standby and a second standby under Patroni (one RabbitMQ node).
def _database_cluster(stack: Stack) -> PostgresCluster:
    assert isinstance(stack.database, PostgresCluster)
    return stack.database


async def primary_killed(stack: Stack, t: Timing) -> None:
    """SIGKILL everything on the primary's host (Patroni and PostgreSQL: the machine dies) until
    the standby is promoted, a while longer; then start it again: it rejoins as the standby."""
    cluster = _database_cluster(stack)
    primary = await cluster.leader()
    assert primary is not None
    await primary.kill_all()
    await cluster.promoted(other_than=primary)
    await asyncio.sleep(t.outage / 2)
    await cluster.start_member(primary)
    await cluster.healthy()


async def primary_partitioned(stack: Stack, t: Timing) -> None:
    """Cut the primary's host off from the standby, from etcd and from every client until the
    standby is promoted, a while longer; then heal it: it finds itself demoted and rejoins."""
    cluster = _database_cluster(stack)
    primary = await cluster.leader()
    assert primary is not None
    await primary.cut()
    try:
        await cluster.promoted(other_than=primary)
        await asyncio.sleep(t.outage / 2)
    finally:
        await primary.heal()
    await cluster.healthy()


async def switchover(stack: Stack, t: Timing) -> None:
    """A planned switchover to the synchronous standby, as before maintenance of the primary."""
    cluster = _database_cluster(stack)
    roles = await cluster.roles()
    primary = next(cluster.host(n) for n, role in roles.items() if role == "leader")
    standby = next(cluster.host(n) for n, role in roles.items() if role == "sync_standby")
    await cluster.switchover(primary, standby)
    await cluster.promoted(other_than=primary)
    await cluster.healthy()


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Fault
    evidence: str  # which observation proves the fault was real
    relay_apart: bool = False  # the relay in a process of its own (compose's layout)


SCENARIOS = (
    Scenario("consumers-sigkill", consumers_killed, "redeliveries"),
    Scenario("rolling-redeploy", rolling_redeploy, "restarts"),
    Scenario("producer-sigkill", producer_killed, "in_doubt"),
    Scenario("relay-sigkill", relay_killed, "restarts", relay_apart=True),
    Scenario("broker-restart", broker_restarted, "reconnects"),
    Scenario("broker-sigkill", broker_killed, "reconnects"),
    Scenario("connections-closed", connections_closed, "reconnects"),
    Scenario("broker-paused", broker_paused, "stalled"),
    Scenario("memory-alarm", memory_alarm, "stalled"),
    Scenario("disk-alarm", disk_alarm, "stalled"),
    Scenario("postgres-sigkill", postgres_killed, "in_doubt"),
    Scenario("network-cut", network_cut, "reconnects"),
)
CLUSTER_SCENARIOS = (
    Scenario("cluster-leader-sigkill", work_leader_killed, "elections"),
    Scenario("cluster-connected-node-sigkill", connected_node_killed, "reconnects"),
    Scenario("cluster-rolling-restart", rolling_restart, "reconnects"),
    Scenario("cluster-node-partitioned", node_partitioned, "reconnects"),
)
DATABASE_SCENARIOS = (
    Scenario("db-primary-sigkill", primary_killed, "failovers"),
    Scenario("db-primary-partitioned", primary_partitioned, "failovers"),
    Scenario("db-switchover", switchover, "failovers"),
)


@dataclass
class Result:
    scenario: str
    ok: int
    failed: int
    in_doubt: int
    completed: int
    lost: int
    duplicated: int
    stuck: int
    unexpected: int
    untold: int
    redeliveries: int
    reconnects: int
    unavailable: int
    not_ready: int
    stalled: int
    restarts: int
    elections: int
    failovers: int
    recovery_s: float
    drained_s: float
    evidence: str

    @property
    def fault_observed(self) -> bool:
        return int(getattr(self, self.evidence)) > 0

    @property
    def passed(self) -> bool:
        counts = (self.lost, self.duplicated, self.stuck, self.unexpected, self.untold)
        return counts == (0, 0, 0, 0, 0) and self.fault_observed and self.drained_s <= 60


async def run_scenario(
    scenario: Scenario,
    broker: RabbitNode | RabbitCluster,
    database: PostgresNode | PostgresCluster,
    t: Timing,
    consumers: int = 3,
    kind: topology.Kind = topology.Kind.CLASSIC,
) -> Result:
    stack = Stack(scenario.name, broker, database, consumers, scenario.relay_apart, kind)
    await stack.start()
    readiness: list[int] = []
    load = Load(stack.base_url, t.rate)
    load_task = asyncio.create_task(load.run())
    watch = asyncio.create_task(_watch_readiness(stack.base_url, readiness))
    try:
        await asyncio.sleep(t.warmup)
        restarts_before = stack.starts
        failovers_before = _failovers(database)
        await scenario.fault(stack, t)
        healed = datetime.now(UTC)
        load.stop_in(t.cooldown)  # orders keep coming after the fault, however long it took
        recovery = await _recovery(stack, healed)
        await load_task
        watch.cancel()
        drained = await _drain(stack, load, t.drain)
        stalled = sum(len(s.events("relay_round_failed", "move_failed")) for s in stack.services())
        counts = await _check(stack, load)
        return Result(
            scenario=scenario.name,
            ok=sum(r.outcome == "ok" for r in load.history),
            failed=sum(r.outcome == "failed" for r in load.history),
            in_doubt=load.in_doubt_events,
            unavailable=load.unavailable,
            not_ready=sum(code != 200 for code in readiness),
            reconnects=stack.reconnects(),
            stalled=stalled,
            restarts=stack.starts - restarts_before,
            elections=stack.elections,
            failovers=_failovers(database) - failovers_before,
            recovery_s=recovery,
            drained_s=drained,
            evidence=scenario.evidence,
            **counts,
        )
    finally:
        load_task.cancel()  # gone already unless the fault itself failed
        watch.cancel()
        await stack.stop()


def _failovers(database: PostgresNode | PostgresCluster) -> int:
    return database.failovers if isinstance(database, PostgresCluster) else 0


async def _watch_readiness(base_url: str, seen: list[int]) -> None:
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=2) as client:
        while True:
            try:
                seen.append((await client.get("/readyz")).status_code)
            except httpx.HTTPError:
                seen.append(0)
            await asyncio.sleep(0.5)


async def _recovery(stack: Stack, healed: datetime) -> float:
    """Seconds from the fault's end until /readyz is 200 and an order completes again."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=stack.base_url, headers=AUTH, timeout=2) as client:
        await _until(lambda: _ready(client), 120)
    conn = await _connect(stack)
    try:
        await _until(
            lambda: conn.fetchval("SELECT count(*) FROM orders WHERE completed_at > $1", healed),
            120,
        )
    finally:
        await conn.close()
    return time.monotonic() - started


async def _connect(stack: Stack) -> asyncpg.Connection:
    deadline = time.monotonic() + 60
    while True:
        try:
            return await db.connect(stack.database.url(stack.dbname))
        except (OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _drain(stack: Stack, load: Load, limit: float) -> float:
    """Seconds after the load until the queues and the outbox are empty and every order is final."""
    started = time.monotonic()
    conn = await _connect(stack)
    connection = await amqp.connect(stack.broker.url(stack.vhost), "fault-checker")
    try:
        channel = await connection.channel()

        async def empty() -> bool:
            for lane in (stack.topology.orders, stack.topology.webhooks):
                for queue in (*lane.work, *lane.retry_queues):
                    declared = await channel.declare_queue(queue.name, passive=True)
                    if declared.declaration_result.message_count:
                        return False
            pending = await conn.fetchval(
                "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM orders"
                " WHERE status NOT IN ('completed', 'rejected', 'failed'))"
                " + (SELECT count(*) FROM webhook_deliveries WHERE status = 'pending')"
            )
            return bool(pending == 0)

        with contextlib.suppress(TimeoutError):
            await _until(empty, limit + 30)
    finally:
        await connection.close()
        await conn.close()
    return time.monotonic() - started


async def _check(stack: Stack, load: Load) -> dict[str, int]:
    conn = await _connect(stack)
    try:
        orders = {
            r["idempotency_key"]: r
            for r in await conn.fetch(
                """SELECT o.idempotency_key, o.status, (o.items->0->>'quantity')::int AS quantity,
                          o.attempts,
                          coalesce(sum(r.quantity), 0) AS reserved
                   FROM orders o LEFT JOIN reservations r ON r.order_id = o.id
                   GROUP BY o.id"""
            )
        }
        available = await conn.fetchval("SELECT available FROM inventory WHERE sku = $1", SKU)
        # Each order's events tell its story (docs/notifications.md): it has some, the last one
        # leaves it in its status; and no event names an order that is not there (rolled back).
        untold = await conn.fetchval(
            """SELECT (SELECT count(*) FROM orders o
                      WHERE o.status IS DISTINCT FROM (SELECT e.status FROM order_events e
                                                        WHERE e.order_id = o.id
                                                        ORDER BY e.tx DESC, e.id DESC LIMIT 1))
                   + (SELECT count(*) FROM order_events e
                       WHERE NOT EXISTS (SELECT FROM orders o WHERE o.id = e.order_id))"""
        )
        statuses = {
            str(r["id"]): r["status"]
            for r in await conn.fetch(
                "SELECT id, status FROM orders WHERE status IN ('completed', 'rejected', 'failed')"
            )
        }
    finally:
        await conn.close()
    sent = {r.key: r for r in load.history}
    ok = [r for r in load.history if r.outcome == "ok"]
    completed = [row for row in orders.values() if row["status"] == "completed"]
    wanted = sum(row["quantity"] for row in completed)
    twice = sum(
        1
        for row in orders.values()
        if row["reserved"] != (row["quantity"] if row["status"] == "completed" else 0)
    )
    return {
        "completed": len(completed),
        "lost": sum(1 for r in ok if r.key not in orders or orders[r.key]["status"] == "failed"),
        "duplicated": twice + (1 if STOCK - available != wanted else 0),
        "stuck": sum(
            1 for row in orders.values() if row["status"] not in ("completed", "failed", "rejected")
        ),
        "unexpected": sum(1 for key in orders if key not in sent or sent[key].outcome == "failed"),
        # and its final status reached the webhook receiver, signed (none forged)
        "untold": untold
        + sum(stack.receiver.final().get(i) != status for i, status in statuses.items())
        + stack.receiver.forged,
        "redeliveries": sum(row["attempts"] - 1 for row in completed),
    }


COLUMNS = (
    ("scenario", "scenario"),
    ("ok", "ok"),
    ("failed", "failed"),
    ("in doubt", "in_doubt"),
    ("completed", "completed"),
    ("lost", "lost"),
    ("dup", "duplicated"),
    ("stuck", "stuck"),
    ("unexp", "unexpected"),
    ("untold", "untold"),
    ("redeliv", "redeliveries"),
    ("reconn", "reconnects"),
    ("503s", "unavailable"),
    ("not ready", "not_ready"),
    ("stalled", "stalled"),
    ("elections", "elections"),
    ("failovers", "failovers"),
    ("recovery s", "recovery_s"),
    ("drained s", "drained_s"),
    ("pass", "passed"),
)


def table(results: list[Result]) -> str:
    """A Markdown table of the results."""

    def cell(result: Result, attr: str) -> str:
        value = getattr(result, attr)
        if isinstance(value, bool):
            return "yes" if value else "**NO**"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = [
        "| " + " | ".join(h for h, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell(r, a) for _, a in COLUMNS) + " |" for r in results]
    return "\n".join(lines)
